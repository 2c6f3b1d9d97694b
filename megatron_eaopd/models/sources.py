"""Where a model comes from: a local folder, a Megatron checkpoint, or a Hugging Face hub id.

A value such as ``student.hf_path``, ``student.checkpoint``, ``student.tokenizer`` or
``tools/evaluate.py --model`` names a model in one of three ways; :func:`resolve_model_source`
turns it into local folders or fails with a message that says what to do:

* **a Megatron checkpoint** written by this project (the converter or the trainer): a root with
  ``latest``, or an ``iter_*`` folder. Its HF assets (config.json, tokenizer, generation config, chat
  template) travel inside it (``iter_*/hf_assets``), so it needs no separate HF folder;
* **a Hugging Face folder** (``config.json`` + tokenizer files, ``save_pretrained`` output);
* **a hub id** (``Qwen/Qwen3-4B-Base``) that is not a local path: looked up in the local Hugging Face
  cache only (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), never
  downloaded: compute nodes are usually offline, and a download inside a job would run on every rank.
  When it is not cached, the error names the command that fetches it (``hf download <id>``, the CLI
  of huggingface_hub >= 1.0) on a machine with network access.

A training **run directory** (``<run>/checkpoints``, ``resolved_config.yaml``) given where a model is
expected is recognised and the error points at its checkpoints.

Source: the hub cache layout of ``huggingface_hub`` (``models--org--name/{refs,snapshots}``) read
through ``huggingface_hub.snapshot_download(local_files_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from megatron_eaopd.checkpoint import ASSETS_DIR, LATEST, META_FILE, resolve_checkpoint
from megatron_eaopd.models.hf import inspect_hf_dir

__all__ = ["ModelSource", "ModelSourceError", "SourceKind", "resolve_model_source", "hub_cache_dir",
           "looks_like_hub_id", "download_command", "run_dir_checkpoints", "source_identity"]

SourceKind = Literal["megatron", "hf_dir", "hub"]
_ALL_KINDS: tuple[SourceKind, ...] = ("megatron", "hf_dir", "hub")
#: ``org/name`` with the hub's allowed characters (one slash, no leading dot or slash).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_RUN_DIR_MARKERS = ("resolved_config.yaml", "metrics.jsonl")


class ModelSourceError(FileNotFoundError):
    """A model source cannot be used; the message names the key, the value and the fix."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model source.

    Attributes:
        value: what the user wrote.
        kind: ``"megatron"`` (a checkpoint of this project), ``"hf_dir"`` (a local HF folder) or
            ``"hub"`` (a hub id found in the local cache).
        path: the local folder: the ``iter_*`` folder of a Megatron checkpoint, the HF folder, or the
            cached snapshot folder of a hub id.
        assets: the folder holding ``config.json`` and the tokenizer files (``iter_*/hf_assets`` for
            a Megatron checkpoint, else ``path``).
    """

    value: str
    kind: SourceKind
    path: Path
    assets: Path

    @property
    def is_megatron(self) -> bool:
        return self.kind == "megatron"


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, read from the environment at call time (``HF_HUB_CACHE``,
    ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME/hub``, ``XDG_CACHE_HOME/huggingface/hub``,
    ``~/.cache/huggingface/hub``: huggingface_hub's own order)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.path.expanduser(os.environ[var])))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def looks_like_hub_id(value: str) -> bool:
    """True for ``org/name`` (one slash, hub characters, not starting with ``.`` or ``/``)."""
    return bool(_HUB_ID.match(value)) and not value.endswith((".jsonl", ".json", ".parquet", ".yaml"))


def download_command(repo_id: str, revision: str | None = None) -> str:
    """The shell command that puts ``repo_id`` into the hub cache (huggingface_hub's ``hf`` CLI)."""
    return f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")


def run_dir_checkpoints(path: Path) -> Path | None:
    """``path/checkpoints`` when ``path`` is a training run directory of this project, else None."""
    ckpts = path / "checkpoints"
    if not ckpts.is_dir() or (path / "config.json").is_file():
        return None
    if (ckpts / LATEST).is_file() or any((path / m).is_file() for m in _RUN_DIR_MARKERS):
        return ckpts
    return None


def _is_megatron(p: Path) -> bool:
    if (p / META_FILE).is_file() or (p / LATEST).is_file():
        return True
    return any(c.name.startswith("iter_") and (c / META_FILE).is_file() for c in p.iterdir())


def _kind_hint(key: str, kind: SourceKind, value: str) -> str:
    base = key.rsplit(".", 1)[0] if "." in key else ""
    if kind == "megatron":
        where = f"set {base}.checkpoint={value}" if base else "pass it where a Megatron checkpoint is expected"
        return f"is a Megatron checkpoint, not a Hugging Face model: {where} (it carries its HF assets), " \
               f"or export it first: python tools/convert_hf.py export --ckpt {value} --out HF_DIR"
    where = f"set {base}.hf_path={value}" if base else "pass it where a Hugging Face model is expected"
    return f"is a Hugging Face model folder, not a Megatron checkpoint: convert it first " \
           f"(python tools/convert_hf.py import --hf {value} --out CKPT), or {where}"


def _check_assets(key: str, value: str, kind: SourceKind, assets: Path, need: str) -> None:
    if need == "tokenizer":
        if not any((assets / f).is_file() for f in _TOKENIZER_FILES):
            raise ModelSourceError(f"{key} = {value!r}: no tokenizer files in {assets} (expected one of "
                                   f"{', '.join(_TOKENIZER_FILES)})")
        return
    if not (assets / "config.json").is_file():
        raise ModelSourceError(f"{key} = {value!r}: no config.json in {assets}")
    if need == "weights" and kind != "megatron":
        try:
            inspect_hf_dir(assets)
        except FileNotFoundError as e:
            fix = f"; complete the download: {download_command(value)}" if kind == "hub" else ""
            raise ModelSourceError(f"{key} = {value!r}: {e}{fix}") from None


def resolve_model_source(
    value: str | os.PathLike,
    *,
    key: str = "model",
    kinds: tuple[SourceKind, ...] = _ALL_KINDS,
    need: Literal["model", "weights", "tokenizer"] = "model",
    revision: str | None = None,
) -> ModelSource:
    """Resolve a model source to local folders; never touches the network.

    Args:
        value: a local path (Megatron checkpoint root or ``iter_*`` folder, HF folder) or a hub id.
            Relative paths resolve against the current directory.
        key: the config key or option the value came from (``"student.hf_path"``, ``"--model"``),
            used in error messages.
        kinds: the kinds accepted here; another kind fails with a hint (e.g. a Megatron checkpoint
            given as ``hf_path`` -> "set student.checkpoint=...").
        need: ``"model"``: ``config.json`` must be in the assets (architecture + tokenizer, e.g. the
            assets of a run whose weights come from a checkpoint); ``"weights"``: also the weight
            files of an HF folder / hub snapshot (a Megatron checkpoint holds its own);
            ``"tokenizer"``: only a tokenizer file (a tokenizer-only hub repo has no config.json).
        revision: hub revision (branch, tag or commit) for a hub id; default the cached ``main``.
    Returns:
        :class:`ModelSource`.
    Raises:
        ModelSourceError (a ``FileNotFoundError``): empty value; a path that does not exist and is
            not a cached hub id (names ``hf download <id>`` and the cache folder searched); a training
            run directory (names its ``checkpoints`` folder); a folder that is not a model; a kind not
            in ``kinds``; an incomplete checkpoint; missing config/tokenizer/weight files.
    """
    s = os.fspath(value).strip() if value is not None else ""
    if not s:
        raise ModelSourceError(f"{key} is empty: give a Megatron checkpoint, a Hugging Face folder or a hub id")
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelSourceError(f"{key} = {s!r} is a file; expected a model folder")
        ckpts = run_dir_checkpoints(p)
        if ckpts is not None:
            raise ModelSourceError(
                f"{key} = {s!r} is a training run directory, not a model: use its checkpoints, "
                f"{ckpts} (the latest) or {ckpts}/iter_NNNNNNN (one iteration)")
        if _is_megatron(p):
            kind: SourceKind = "megatron"
            if kind not in kinds:
                raise ModelSourceError(f"{key} = {s!r} {_kind_hint(key, kind, s)}")
            try:
                it = resolve_checkpoint(p)
            except FileNotFoundError as e:
                raise ModelSourceError(f"{key} = {s!r}: {e}") from None
            path, assets = it, it / ASSETS_DIR
        elif (p / "config.json").is_file() or (need == "tokenizer" and any((p / f).is_file() for f in _TOKENIZER_FILES)):
            kind, path, assets = "hf_dir", p, p
        else:
            try:
                resolve_checkpoint(p)  # names foreign Megatron layouts precisely
            except FileNotFoundError as e:
                raise ModelSourceError(f"{key} = {s!r} is not a model folder: no config.json, and {e}") from None
            raise ModelSourceError(f"{key} = {s!r} is not a model folder")  # pragma: no cover (resolve raises)
    elif looks_like_hub_id(s) and "hub" in kinds:
        cache = hub_cache_dir()
        try:
            snap = snapshot_download(s, revision=revision, cache_dir=str(cache), local_files_only=True)
        except LocalEntryNotFoundError:
            raise ModelSourceError(
                f"{key} = {s!r} is neither a local folder (relative to {Path.cwd()}) nor in the local Hugging "
                f"Face cache {cache}. Download it once on a machine with network access, into the cache the "
                f"job reads (set HF_HOME or HF_HUB_CACHE the same way there):\n  {download_command(s, revision)}\n"
                f"or give a local folder / converted checkpoint instead") from None
        kind, path, assets = "hub", Path(snap), Path(snap)
    else:
        wanted = [w for k, w in (("megatron", "a Megatron checkpoint"), ("hf_dir", "a Hugging Face folder"),
                                 ("hub", "a cached hub id (org/name)")) if k in kinds]
        expected = wanted[0] if len(wanted) == 1 else ", ".join(wanted[:-1]) + " or " + wanted[-1]
        raise ModelSourceError(f"{key} = {s!r} does not exist (relative paths resolve against {Path.cwd()}); "
                               f"expected {expected}")
    if kind not in kinds:
        raise ModelSourceError(f"{key} = {s!r} {_kind_hint(key, kind, s)}")
    _check_assets(key, s, kind, assets, need)
    return ModelSource(value=s, kind=kind, path=path, assets=assets)


#: Small files hashed whole, and large ones fingerprinted by (size, mtime), for :func:`source_identity`.
_HASHED = (META_FILE, ".metadata", "metadata.json", "config.json", "model.safetensors.index.json",
           "pytorch_model.bin.index.json")
_STATTED = ("common.pt", "*.distcp", "*.safetensors", "*.bin")


def source_identity(src: ModelSource) -> dict:
    """What a resolved model source IS, cheaply, for refusing to mix samples of different models.

    Returns ``{"kind", "path", "iteration", "fingerprint"}``: ``path`` is the resolved folder (a
    checkpoint root resolves through ``latest`` to its ``iter_*`` folder), ``iteration`` the saved
    iteration of a Megatron checkpoint (None for an HF folder), ``fingerprint`` a sha256 over the
    small metadata files (``eaopd_checkpoint.json`` records the save time; ``.metadata``,
    ``config.json``, index files) and the names, sizes and mtimes of the weight files. Nothing large
    is read.
    """
    d = Path(src.path).resolve()
    h = hashlib.sha256()
    for name in _HASHED:
        f = d / name
        if f.is_file():
            h.update(f"{name}\0".encode())
            h.update(f.read_bytes())
    for pattern in _STATTED:
        for f in sorted(d.glob(pattern)):
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    iteration = None
    if src.is_megatron and (d / META_FILE).is_file():
        iteration = json.loads((d / META_FILE).read_text()).get("iteration")
    return {"kind": src.kind, "path": str(d), "iteration": iteration, "fingerprint": h.hexdigest()}
