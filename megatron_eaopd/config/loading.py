"""Reading a run's configuration: YAML files (with ``extends:``), dotted command-line overrides, validation.

A run is described by one YAML file (see ``recipes/``) whose top-level sections are the fields of
:class:`~megatron_eaopd.config.schema.Config`. Command-line overrides are ``key.sub=value`` strings
whose value is parsed as a YAML scalar (``loss.tau=0.5``, ``data.train_files=[a.jsonl,b.jsonl]``,
``logging.wandb_project=null``). A recipe may begin with ``extends: base.yaml`` to inherit another
file (:func:`read_yaml`). :func:`load_config` raises :class:`~megatron_eaopd.config.errors.ConfigError`
with one readable line per problem.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Sequence

import yaml
from pydantic import ValidationError

from megatron_eaopd.config.errors import ConfigError, format_validation_error
from megatron_eaopd.config.layout import RuntimeLayout
from megatron_eaopd.config.schema import Config

__all__ = [
    "RESOLVED_CONFIG_NAME",
    "load_config",
    "read_yaml",
    "apply_overrides",
    "parse_override",
    "parse_cli",
    "write_resolved_config",
]

#: File name of the resolved configuration written into the run directory.
RESOLVED_CONFIG_NAME = "resolved_config.yaml"




def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``"a.b.c=value"`` into (``["a", "b", "c"]``, YAML-parsed value).

    ``key=`` (empty value) gives None. Raises :class:`ConfigError` on a missing ``=`` or empty key.
    """
    if "=" not in item:
        raise ConfigError(f"config error: override {item!r} is not of the form key.sub=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"config error: override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error at {key}: value {raw!r} is not valid YAML ({exc})") from None
    return parts, value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply dotted overrides to a nested dict (a deep copy is returned; the input is untouched).

    Missing intermediate sections are created (schema validation later rejects unknown keys).
    Raises :class:`ConfigError` if a path goes through a non-mapping value.
    """
    out = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(
                    f"config error at {'.'.join(parts[: i + 1])}: is a {type(nxt).__name__}, not a section, "
                    f"so override {item!r} cannot set a key inside it"
                )
            node = nxt
        node[parts[-1]] = value
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a config YAML file into a dict, resolving ``extends:``.

    A file may start with ``extends: other.yaml`` (relative to the file's own directory): the
    other file is read first and this file's keys are deep-merged over it (sections merge key by
    key; lists and scalars are replaced). Chains are allowed, cycles are errors.

    Raises:
        ConfigError: unreadable file, invalid YAML, not a mapping, or an ``extends`` cycle.
    """
    path = Path(path).resolve()
    if path in _chain:
        raise ConfigError(f"config error: 'extends' cycle: {' -> '.join(str(p) for p in (*_chain, path))}")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config error: cannot read {path}: {exc}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error: {path} is not valid YAML: {exc}") from None
    loaded = {} if loaded is None else loaded
    if not isinstance(loaded, dict):
        raise ConfigError(f"config error: {path} must hold a mapping of sections, got {type(loaded).__name__}")
    parent = loaded.pop("extends", None)
    if parent is None:
        return loaded
    if not isinstance(parent, str):
        raise ConfigError(f"config error at extends: must be a file path, got {parent!r}")
    return _deep_merge(read_yaml(path.parent / parent, (*_chain, path)), loaded)


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), data: dict | None = None
) -> Config:
    """Load, override and validate a configuration.

    Args:
        path: YAML file (a mapping of sections; may use ``extends:``, see :func:`read_yaml`).
        overrides: ``key.sub=value`` strings, applied in order after the file.
        data: a dict of sections; with ``path`` the file is deep-merged over it.
    Returns:
        A validated :class:`Config`.
    Raises:
        ConfigError: unreadable/invalid YAML, a bad override, or any schema violation (message
            lists every problem with its key path).
    """
    base = dict(data or {})
    if path is not None:
        base = _deep_merge(base, read_yaml(path))
    merged = apply_overrides(base, overrides)
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, Config)) from None


#: ``key.sub=value`` (optionally ``--key.sub=value``): what :func:`parse_cli` reads as an override.
_OVERRIDE = re.compile(r"^(--)?[A-Za-z_][A-Za-z0-9_.]*=")


def parse_cli(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split a command line into (config path, overrides).

    Accepts ``[--config] PATH key=value ...``; an override is ``dotted.key=value`` (the key made of
    letters, digits, ``_`` and dots); the path is the one other argument (or the one after ``--config``),
    and may itself contain ``=`` (``sweep/lr=1e-5/cfg.yaml``). Raises :class:`ConfigError` on more
    than one path.
    """
    path, overrides = None, []
    it = iter(argv)
    for a in it:
        if a in ("--config", "-c"):
            a = next(it, None)
            if a is None:
                raise ConfigError("config error: --config needs a path")
        elif a.startswith("--config="):
            a = a.split("=", 1)[1]
        elif _OVERRIDE.match(a) and not Path(a).is_file():  # a recipe path may contain "=" (sweep folders)
            overrides.append(a[2:] if a.startswith("--") else a)
            continue
        if path is not None:
            raise ConfigError(f"config error: two config files given ({path!r}, {a!r})")
        path = a
    return path, overrides


def write_resolved_config(cfg: Config, run_dir: str | Path, layout: RuntimeLayout | None = None) -> Path:
    """Write ``<run_dir>/resolved_config.yaml``: every field with defaults filled in.

    The file loads back with :func:`load_config` to an equal :class:`Config`. When ``layout`` is
    given, the resolved runtime values (DP size, auto switches, batch split) are written as a
    comment header, not as keys. Written atomically (temp file + rename). Returns the path.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / RESOLVED_CONFIG_NAME
    header = "# resolved megatron_eaopd configuration (load with megatron_eaopd.config.load_config)\n"
    if layout is not None:
        header += "".join(f"# runtime.{k}: {v}\n" for k, v in layout.__dict__.items())
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(header + cfg.to_yaml())
    tmp.replace(out)
    return out
