"""Validated settings: the base class of every settings object, and readable validation errors.

Every settings class of the package (the loss's :class:`~megatron_eaopd.loss.EOPDConfig`, the
rollout's :class:`~megatron_eaopd.rollout.params.RolloutParams`, each section of the run
configuration) is a :class:`Settings`: a pydantic model that forbids unknown keys and rejects
inf/NaN, so each rule is written once, as a field constraint. Errors never surface as raw pydantic
output: :func:`format_validation_error` gives one line per problem with the key path, the allowed
values and a suggestion::

    config error at loss.mode: 'fulll' is not one of ['topk', 'full'] (did you mean 'full'?)
    config error: unknown key 'optimizer.lrr' (allowed: name, lr, min_lr, ...); did you mean 'optimizer.lr'?
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["ConfigError", "Settings", "FrozenSettings", "format_validation_error"]


class ConfigError(ValueError):
    """A configuration is invalid. The message is meant for the user: key path + allowed values."""


class Settings(BaseModel):
    """Base of every settings class: unknown keys are errors, assignments are validated, inf/NaN rejected.

    Building one directly (``EOPDConfig(tau=-1)``) raises ``pydantic.ValidationError`` (a
    ``ValueError``) naming the field, the bad value and the rule; the run configuration's loader
    turns the same errors into one line each with the full key path (:func:`format_validation_error`).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class FrozenSettings(Settings):
    """A :class:`Settings` whose instances cannot change (hashable; safe to share between phases)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def _unwrap(annotation):
    """The model class inside ``X | None`` / ``list[X]`` / ``dict[str, X]``, or the annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    if origin in (list, tuple, dict):
        args = typing.get_args(annotation)
        return _unwrap(args[-1]) if args else annotation
    return annotation


def _is_model(x) -> bool:
    return isinstance(x, type) and issubclass(x, BaseModel)


def _walk(model_cls: type[BaseModel], loc: Sequence) -> tuple[str, type[BaseModel] | None, Any]:
    """Turn a pydantic ``loc`` into a dotted key path.

    Returns (path, parent model class of the last key or None, the last field's annotation or None).
    Union-member tags that pydantic inserts into ``loc`` are dropped.
    """
    parts: list[str] = []
    cur: Any = model_cls
    parent: type[BaseModel] | None = None
    ann = None
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
            continue
        if _is_model(cur) and item in cur.model_fields:
            parent = cur
            ann = cur.model_fields[item].annotation
            parts.append(item)
            cur = _unwrap(ann)
        elif _is_model(cur):  # unknown key below a model: keep it, the caller reports it
            parent = cur
            ann = None
            parts.append(str(item))
            cur = None
        # else: a union tag such as 'literal[...]' or 'int'; skip
    return ".".join(parts), parent, ann


def _suggest(word: str, options: Sequence[str]) -> str | None:
    m = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return m[0] if m else None


def format_validation_error(err: ValidationError, model_cls: type[BaseModel], prefix: str = "") -> str:
    """Turn a pydantic ``ValidationError`` into one readable line per problem.

    Args:
        err: raised by ``model_cls.model_validate``.
        model_cls: the root model (e.g. :class:`megatron_eaopd.config.Config`), used to map locations
            to key paths and to list the allowed keys / literal values.
        prefix: prepended to every key path (e.g. ``"EOPDConfig"`` for a directly built settings object).
    Returns:
        Lines such as ``config error at loss.mode: 'fulll' is not one of ['topk', 'full']`` or
        ``config error: unknown key 'optimizer.lrr' (allowed: ...); did you mean 'optimizer.lr'?``.
    """
    lines: list[str] = []
    for e in err.errors():
        path, parent, ann = _walk(model_cls, e["loc"])
        path = ".".join(p for p in (prefix, path) if p)
        typ, msg, inp = e["type"], e["msg"], e.get("input")
        if typ == "extra_forbidden":
            key = path.rsplit(".", 1)[-1]
            allowed = list(parent.model_fields) if parent else []
            hint = _suggest(key, allowed)
            line = f"config error: unknown key '{path}' (allowed: {', '.join(allowed)})"
            if hint:
                line += f"; did you mean '{path.rsplit('.', 1)[0] + '.' if '.' in path else ''}{hint}'?"
        elif typ == "literal_error":
            allowed = list(typing.get_args(_unwrap(ann))) if ann is not None else []
            if not allowed:
                allowed = [e.get("ctx", {}).get("expected", "?")]
            line = f"config error at {path}: {inp!r} is not one of {allowed!r}"
            hint = _suggest(inp, [a for a in allowed if isinstance(a, str)]) if isinstance(inp, str) else None
            if hint:
                line += f" (did you mean {hint!r}?)"
        elif typ == "missing":
            what = "item is missing (too few items)" if e["loc"] and isinstance(e["loc"][-1], int) else "required key is missing"
            line = f"config error at {path}: {what}"
        else:
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            where = f" at {path}" if path else ""
            got = "" if typ in ("value_error", "assertion_error") or isinstance(inp, dict) else f" (got {inp!r})"
            line = f"config error{where}: {msg}{got}"
        if line not in lines:
            lines.append(line)
    return "\n".join(lines)
