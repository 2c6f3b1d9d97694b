"""Where a conversion may write: the checks on ``--out`` that :mod:`megatron_eaopd.models.convert` (and
``tools/convert_hf.py import --check-only``, which slurm/convert.sh runs for every pair before converting any)
make before anything is loaded. Light: imports no megatron-core.

* :func:`check_import_target` — new, empty, an earlier import's checkpoint or a crashed import's leftovers.
* :func:`check_export_target` — new, empty or an earlier export of this tool (it carries the export marker).
* :func:`check_import` / :func:`check_export` — every check of an import / export before loading: the source,
  the options and the target.

Both raise ValueError with one line naming the folder, what is in it and the fix; nothing is written.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from megatron_eaopd.checkpoint import ASSETS_DIR, EXPORT_MARKER, LATEST, META_FILE, read_checkpoint_metadata
from megatron_eaopd.dtypes import parse_dtype
from megatron_eaopd.models.hf import hf_to_gpt_args, inspect_hf_dir

__all__ = ["check_import", "check_export", "check_import_target", "check_export_target", "check_not_under_file",
           "parse_size"]

#: what a checkpoint root written by :func:`~megatron_eaopd.checkpoint.save_checkpoint` holds, a crashed save's
#: leftovers included (``.iter_NNNNNNN.tmp``); anything else in an import target is someone else's data
_CKPT_ENTRY = re.compile(r"^(latest|\.latest\.tmp|iter_\d{7}|\.iter_\d{7}\.(tmp|old))$")
_SHOWN_NAMES = 5


def _shown(names: list[str]) -> str:
    names = sorted(names)
    return ", ".join(names[:_SHOWN_NAMES]) + (f" ... ({len(names)} entries)" if len(names) > _SHOWN_NAMES else "")


def check_not_under_file(out: Path) -> None:
    """``out`` (or the first of its parents that exists) must be a folder."""
    for a in (out, *out.parents):
        if a.exists() or a.is_symlink():
            if not a.is_dir():
                what = "is a file" if a == out else f"is under {a}, which is a file"
                raise ValueError(f"--out {out} {what}; give a folder path (a new folder is created)")
            return


def check_export_target(ckpt: Path, out: Path) -> None:
    """Refuse an export target that would destroy data: the checkpoint itself (or a folder holding it),
    a file, a Megatron checkpoint, or any non-empty folder without the marker a previous export of this
    tool writes (:data:`~megatron_eaopd.checkpoint.EXPORT_MARKER`): a downloaded model is never replaced."""
    ck, o = Path(ckpt).resolve(), Path(out).resolve()
    if o == ck or o in ck.parents:
        raise ValueError(f"--out {out} is (or contains) the checkpoint being exported ({ckpt}); choose a new folder")
    if Path(out).is_symlink():  # the export is renamed into place: that would replace the link, not its folder
        raise ValueError(f"--out {out} is a symbolic link (to {o}); give the folder itself (--out {o}) or a new path")
    check_not_under_file(Path(out))
    if o.is_dir() and any(o.iterdir()):
        names = [p.name for p in o.iterdir()]
        if LATEST in names or any(n.startswith("iter_") for n in names):
            raise ValueError(f"--out {out} holds a Megatron checkpoint; refusing to replace it with an HF export. "
                             f"Choose a new folder (nothing was written)")
        if (o / EXPORT_MARKER).is_file():
            return  # a previous export of this tool: replaced as a whole
        raise ValueError(f"--out {out} is a non-empty folder that this exporter did not write (no {EXPORT_MARKER}; "
                         f"it holds {_shown(names)}), so it is not replaced and nothing was written. Export to a new "
                         f"folder (e.g. --out {out}-export), or remove {out} yourself if nothing in it is needed")


def check_import_target(out: Path, hf_dir: str | os.PathLike | None = None) -> None:
    """Refuse an import target that is a file, the HF source folder (or inside / around it), a non-empty
    folder that is not a checkpoint root of this project, or a training run's checkpoint folder (the
    import, iteration 0, would move its ``latest`` back). An earlier import's checkpoint (only
    ``iter_0000000``, not a training one) is re-imported in place; a crashed import's ``.iter_*.tmp`` is
    cleared by the save."""
    o = Path(out)
    check_not_under_file(o)
    if hf_dir is not None:
        src, dst = Path(hf_dir).resolve(), o.resolve()
        if dst == src or src in dst.parents:
            where = "the" if dst == src else "inside the"
            raise ValueError(f"--out {out} is {where} Hugging Face source folder {hf_dir}; the checkpoint would be "
                             f"mixed into the model's files. Choose a folder outside it (e.g. checkpoints/mcore/{src.name})")
        if dst in src.parents:
            raise ValueError(f"--out {out} contains the Hugging Face source folder {hf_dir}; choose a new folder "
                             f"(e.g. checkpoints/mcore/{src.name})")
    if o.is_dir():
        foreign = [p.name for p in o.iterdir() if not _CKPT_ENTRY.match(p.name)]
        if foreign:
            raise ValueError(f"--out {out} is a non-empty folder that is not a checkpoint written by this project (it "
                             f"holds {_shown(foreign)}); nothing was written. Choose a new or empty folder, or remove "
                             f"{out} yourself if nothing in it is needed")
    if (o / LATEST).exists() and not (o / LATEST).is_file():
        raise ValueError(f"--out {out} holds '{LATEST}' that is not a file (a checkpoint root's '{LATEST}' names its "
                         f"iteration); choose a new or empty folder")
    if not (o / LATEST).is_file():
        if o.is_dir() and any(p.name.startswith("iter_") for p in o.iterdir()):
            raise ValueError(f"--out {out} already holds checkpoints; choose a new folder")
        return
    for d in o.glob("iter_*"):
        meta = d / META_FILE
        kind = json.loads(meta.read_text()).get("kind") if meta.is_file() else None
        if d.name != "iter_0000000" or kind == "training":
            raise ValueError(f"--out {out} holds training checkpoints ({d.name}); importing would move its 'latest' "
                             f"to iteration 0. Choose a new folder")


def parse_size(s: str | int, key: str = "size") -> int:
    """``"2GB"`` / ``"500MB"`` / ``1000`` -> bytes (decimal units as transformers uses).

    Args:
        key: names the value in the error (e.g. ``"--max-shard-size"``).
    Raises:
        ValueError: unparseable, not finite (``infGB``) or not a positive number of bytes (``0``, ``-5GB``).
    """
    fix = "use e.g. 2GB, 500MB or a byte count"
    if isinstance(s, bool) or not isinstance(s, (int, str)):
        raise ValueError(f"{key} {s!r} is not a size; {fix}")
    n: int | None = s if isinstance(s, int) else None
    if n is None:
        t = str(s).strip().upper()
        for unit, mul in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
            if t.endswith(unit):
                try:
                    v = float(t[: -len(unit)])
                except ValueError:
                    break
                if not math.isfinite(v):
                    raise ValueError(f"{key} {s!r} is not a finite size; {fix}")
                n = int(v * mul)
                break
        if n is None:
            try:
                n = int(t)
            except ValueError:
                raise ValueError(f"cannot parse {key} {s!r}; {fix}") from None
    if n <= 0:
        raise ValueError(f"{key} {s!r} must be a positive number of bytes; {fix}")
    return n


def check_import(hf_dir: str | os.PathLike, out: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
                 tp: int = 1, pp: int = 1) -> tuple:
    """Every check :func:`import_hf` makes before it loads or writes anything (the CLI runs it first and
    answers a failure with exit code 2: bad input, nothing written).

    Returns:
        ``(files, gpt_args, dtype)``: the HF folder's weight files, its model arguments, the storage dtype.
    Raises:
        ValueError: a bad ``tp``/``pp``/``dtype``, a world size they do not divide, an ``out`` that is a file,
        the source folder or holds other data; FileNotFoundError / NotImplementedError / KeyError: not an HF
        model folder of a supported architecture (each error names the problem and the fix).
    """
    for name, v in (("--tp", tp), ("--pp", pp)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} {v!r} must be an integer >= 1 (1 is fine: the checkpoint reshards to any TP/PP on load)")
    files = inspect_hf_dir(hf_dir)  # fast, clear errors before any heavy work
    check_import_target(Path(out), hf_dir)
    args = hf_to_gpt_args(hf_dir)
    dt = parse_dtype(dtype, args.source_dtype or torch.bfloat16)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world % (tp * pp):
        raise ValueError(
            f"--tp {tp} --pp {pp} needs a multiple of {tp * pp} processes but this run has {world}; launch with "
            f"torchrun --nproc-per-node {tp * pp}, or convert at tp=pp=1 (the checkpoint reshards to any TP/PP on load)"
        )
    return files, args, dt


def check_export(ckpt: str | os.PathLike, out: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
                 iteration: int | None = None, max_shard_size: str | int = "2GB") -> tuple:
    """Every check :func:`export_hf` makes before it loads or writes anything (the CLI runs it first and
    answers a failure with exit code 2: bad input, nothing written).

    Returns:
        ``(max_shard_bytes, checkpoint_metadata, stored_dtype, out_dtype)``.
    Raises:
        FileNotFoundError: not a checkpoint, or one without its HF config; ValueError: a bad
        ``max_shard_size`` / ``dtype`` or an ``out`` that is not new, empty or an earlier export.
    """
    max_shard = parse_size(max_shard_size, "--max-shard-size")
    meta = read_checkpoint_metadata(ckpt, iteration)
    assets = Path(meta["path"]) / ASSETS_DIR
    if not (assets / "config.json").is_file():
        raise FileNotFoundError(f"{assets}/config.json is missing; this checkpoint cannot be exported without its HF config")
    check_export_target(Path(ckpt), Path(out))
    stored = parse_dtype(meta.get("dtype"), torch.bfloat16)
    return max_shard, meta, stored, parse_dtype(dtype, stored)
