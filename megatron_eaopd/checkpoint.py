"""Distributed checkpoints: megatron-core ``dist_checkpointing`` (torch_dist) with an atomic layout.

Layout::

    CKPT/
      latest                      "iter_0000100\\n" (written last, atomically)
      iter_0000100/
        .metadata, __*.distcp, common.pt, metadata.json     (dist_checkpointing, torch_dist)
        eaopd_checkpoint.json     iteration, true/padded vocab, dtype, architecture, format version
        hf_assets/                config.json, tokenizer files, generation_config.json (for export)

A save goes to ``CKPT/.iter_0000100.tmp`` and is renamed into place only when complete, so a crash
never leaves a half-written ``iter_*`` folder or a ``latest`` pointing at one. Only global rank 0
writes shared files (metadata, assets, ``latest``); every rank writes its own shards.

Any TP/PP can load any other TP/PP's checkpoint (torch_dist resharding; padded vocabulary rows are
allowed to differ — megatron marks them ``allow_shape_mismatch``).

The trainer adds optimizer / scheduler / RNG / data state through ``extra_sharded`` (sharded state,
e.g. ``{"optimizer": ...}`` from :func:`megatron_eaopd.checkpoint_optimizer.optimizer_sharded_state_dict`)
and ``extra_common`` (plain picklable objects saved once by rank 0).

Source: follows Megatron-LM ``megatron.training.checkpointing.save_checkpoint`` / ``load_checkpoint``
(``latest_checkpointed_iteration.txt`` + ``iter_%07d``), simplified.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_eaopd.distributed import unwrap
from megatron_eaopd.dtypes import dtype_name

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "EXPORT_MARKER",
    "ASSETS_DIR",
    "iter_dir_name",
    "resolve_checkpoint",
    "read_checkpoint_metadata",
    "model_sharded_state_dict",
    "load_model_state",
    "save_checkpoint",
    "load_checkpoint",
    "copy_hf_assets",
]

FORMAT_VERSION = 1
META_FILE = "eaopd_checkpoint.json"
#: written into every Hugging Face export (tools/convert_hf.py export): only a folder that carries it is
#: ever replaced by a later export (megatron_eaopd.models.targets.check_export_target)
EXPORT_MARKER = ".eaopd_export.json"
ASSETS_DIR = "hf_assets"
LATEST = "latest"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx")
_WEIGHT_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
#: ``..._extra_state`` / ``..._extra_state3`` (TE GroupedLinear): module extra state, not weights
_EXTRA_STATE = re.compile(r"(^|\.)_extra_state\d*$")
_SHOWN_KEYS = 20


def iter_dir_name(iteration: int) -> str:
    """``12`` -> ``"iter_0000012"`` (Megatron-LM's naming)."""
    return f"iter_{int(iteration):07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def resolve_checkpoint(path: str | os.PathLike, iteration: int | None = None) -> Path:
    """Find the ``iter_*`` folder to load.

    Args:
        path: the checkpoint root (with ``latest``) or an ``iter_*`` folder itself.
        iteration: pick this iteration instead of ``latest``.
    Returns:
        the ``iter_*`` folder.
    Raises:
        FileNotFoundError: nothing there; an HF folder given instead (names the ``import`` command);
            a foreign layout (e.g. a Megatron-LM checkpoint without our metadata) — names what is missing.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if (p / META_FILE).is_file():
        return p
    if iteration is not None:
        d = p / iter_dir_name(iteration)
        if not (d / META_FILE).is_file():
            raise FileNotFoundError(f"no complete checkpoint for iteration {iteration} in {p} (looked for {d / META_FILE})")
        return d
    if (p / LATEST).is_file():
        name = (p / LATEST).read_text().strip()
        d = p / name
        if not (d / META_FILE).is_file():
            raise FileNotFoundError(f"{p / LATEST} points to {name}, which is missing or incomplete")
        return d
    if (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{p} is a Hugging Face model folder, not a Megatron checkpoint. To convert it run:\n"
            f"  python tools/convert_hf.py import --hf {p} --out CKPT"
        )
    iters = sorted(c for c in p.glob("iter_*") if (c / META_FILE).is_file())
    if iters:
        return iters[-1]
    if (p / ".metadata").is_file() or (p / "latest_checkpointed_iteration.txt").is_file():
        raise FileNotFoundError(
            f"{p} is a Megatron checkpoint from another tool (no {META_FILE}); this converter only reads checkpoints "
            f"written by megatron_eaopd (tools/convert_hf.py import or the trainer)"
        )
    raise FileNotFoundError(f"{p} is not a checkpoint: no '{LATEST}' file and no iter_* folder with {META_FILE}")


def read_checkpoint_metadata(path: str | os.PathLike, iteration: int | None = None) -> dict:
    """Read ``eaopd_checkpoint.json`` (see module doc); adds ``"path"`` (the ``iter_*`` folder) and
    ``"hf_assets"`` (its assets folder). Raises like :func:`resolve_checkpoint`."""
    d = resolve_checkpoint(path, iteration)
    meta = json.loads((d / META_FILE).read_text())
    meta["path"] = str(d)
    meta["hf_assets"] = str(d / ASSETS_DIR)
    return meta


def copy_hf_assets(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy config.json, tokenizer files, generation_config.json, chat template... from an HF folder:
    every plain file except weights, weight indexes, our checkpoint metadata and export marker (and files
    > 64 MiB). Returns the names copied."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.endswith(_WEIGHT_SUFFIXES) or f.name in _WEIGHT_INDEX \
                or f.name in (META_FILE, EXPORT_MARKER):
            continue
        if f.stat().st_size > 64 * 2**20:
            continue
        shutil.copy2(f, dst / f.name)
        out.append(f.name)
    return out


def model_sharded_state_dict(model_chunks: list, metadata: dict | None = None) -> dict:
    """``{"model": sd}`` (one chunk) or ``{"model0": sd0, "model1": ...}`` (virtual pipeline), as
    Megatron-LM names them. DDP / Float16Module wrappers are unwrapped.

    ``metadata``: passed to ``sharded_state_dict``; a model on its own process groups (a teacher in its own
    layout) needs ``{"dp_cp_group": <its DP x CP group>}``, or megatron-core numbers its replicas with the
    global DP group and skips shards."""
    if len(model_chunks) == 1:
        return {"model": unwrap(model_chunks[0]).sharded_state_dict(metadata=metadata)}
    return {f"model{i}": unwrap(m).sharded_state_dict(metadata=metadata) for i, m in enumerate(model_chunks)}


def _key_list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (f" ... and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else "")


def load_model_state(module, state_dict: dict, *, strict: bool = True, source: str = "the checkpoint") -> None:
    """``module.load_state_dict(state_dict)``, tolerant of absent module extra state only.

    Transformer Engine modules report an ``_extra_state`` entry (FP8 metadata) in ``state_dict()``, but
    megatron-core leaves some of them out of the sharded state dict, so a torch_dist checkpoint never
    holds them: ``TEDotProductAttention.sharded_state_dict`` (megatron-core 0.19.2,
    ``extensions/transformer_engine.py``) returns nothing unless the softmax offset is learnable. A
    ``strict=True`` torch load then fails on ``...core_attention._extra_state``. So the load is
    non-strict, and with ``strict`` only missing or unexpected keys other than ``*._extra_state`` fail
    (as Megatron-LM's ``load_model_state_dict`` falls back to ``strict=False``, but without hiding real
    weights). Modules whose extra state is absent keep their own (TE's defaults).

    Args:
        module: the unwrapped model (``GPTModel``).
        state_dict: as loaded by ``dist_checkpointing.load`` for the model's sharded state dict.
        strict: fail on missing / unexpected weights.
        source: names the checkpoint in the error.
    Raises:
        RuntimeError: missing / unexpected keys that are not ``_extra_state``, all counted and (up to 20 each)
            named, with the fix.
    """
    result = module.load_state_dict(state_dict, strict=False)
    if not strict:
        return
    missing = sorted(k for k in result.missing_keys if not _EXTRA_STATE.search(k))
    unexpected = sorted(k for k in result.unexpected_keys if not _EXTRA_STATE.search(k))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weight(s) of the model are not in {source}: {_key_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} key(s) of {source} are not in the model: {_key_list(unexpected)}")
        raise RuntimeError("; ".join(parts) + ". The model was built for another architecture or layer spec than the "
                           "checkpoint; build it from the checkpoint's hf_assets with the same spec, or pass strict=False "
                           "to load what matches")


def save_checkpoint(
    ckpt_dir: str | os.PathLike,
    iteration: int,
    model_chunks: list,
    *,
    extra_sharded: dict | None = None,
    extra_common: dict | None = None,
    model_info: Any = None,
    hf_assets: str | os.PathLike | None = None,
    extra_metadata: dict | None = None,
) -> Path:
    """Save a checkpoint atomically (collective: call on every rank).

    Args:
        ckpt_dir: checkpoint root (created).
        iteration: training iteration (``0`` for a converted HF model).
        model_chunks: from :func:`megatron_eaopd.models.provider.build_gpt_model`.
        extra_sharded: more sharded state merged at the top level (e.g. ``{"optimizer": ...}``).
        extra_common: plain objects saved once (e.g. ``{"scheduler": ..., "rng": ..., "data": ...}``),
            returned by :func:`load_checkpoint`.
        model_info: a :class:`~megatron_eaopd.models.provider.ModelInfo`; default ``model_chunks[0].model_info``.
        hf_assets: folder to copy config/tokenizer files from; default ``model_info.hf_assets_dir``.
        extra_metadata: merged into ``eaopd_checkpoint.json``.
    Returns:
        the final ``iter_*`` folder.
    Raises:
        ValueError: a key of ``extra_sharded`` / ``extra_common`` collides with the model or reserved keys.
    """
    from megatron.core import dist_checkpointing

    root = Path(ckpt_dir)
    name = iter_dir_name(iteration)
    final = root / name
    tmp = root / f".{name}.tmp"
    info = model_info if model_info is not None else getattr(unwrap(model_chunks[0]), "model_info", None)
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    state = model_sharded_state_dict(model_chunks)
    reserved = set(state) | {"iteration", "checkpoint_version", "common"}
    for k in (extra_sharded or {}):
        if k in reserved:
            raise ValueError(f"extra_sharded key {k!r} collides with a reserved key ({sorted(reserved)})")
        state[k] = extra_sharded[k]
    state["iteration"] = int(iteration)
    state["checkpoint_version"] = FORMAT_VERSION
    state["common"] = dict(extra_common or {})
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if _rank() == 0:
        meta = {
            "format_version": FORMAT_VERSION,
            "iteration": int(iteration),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "backend": "torch_dist",
        }
        if info is not None:
            meta.update(
                architecture=info.architecture,
                true_vocab_size=info.true_vocab_size,
                padded_vocab_size=info.padded_vocab_size,
                dtype=dtype_name(info.params_dtype),
                tied_embeddings=info.tied,
                eos_token_ids=list(info.eos_token_ids),
            )
        try:
            from megatron.core import parallel_state as ps

            meta["saved_with"] = {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
                                  "world_size": dist.get_world_size() if dist.is_initialized() else 1}
        except Exception:
            pass
        meta.update(extra_metadata or {})
        assets = hf_assets or (info.hf_assets_dir if info is not None else None)
        if assets is not None:
            copy_hf_assets(assets, tmp / ASSETS_DIR)
        if info is not None and not (tmp / ASSETS_DIR / "config.json").is_file():
            (tmp / ASSETS_DIR).mkdir(exist_ok=True)
            (tmp / ASSETS_DIR / "config.json").write_text(json.dumps(info.hf_config, indent=2, sort_keys=True) + "\n")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if final.exists():
            old = root / f".{name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        lt = root / f".{LATEST}.tmp"
        lt.write_text(name + "\n")
        os.replace(lt, root / LATEST)
    _barrier()
    return final


def _first_failure(e: CheckpointException) -> str:
    """``"FileNotFoundError: ... (rank 0)"`` for the lowest failed rank of a torch.distributed.checkpoint error."""
    if not e.failures:
        return str(e.args[0] if e.args else e)
    rank = min(e.failures)
    exc = e.failures[rank][0]
    return f"{type(exc).__name__}: {exc} (rank {rank})"


def load_checkpoint(
    ckpt_dir: str | os.PathLike,
    model_chunks: list,
    *,
    iteration: int | None = None,
    extra_sharded: dict | None = None,
    strict: bool = True,
    metadata: dict | None = None,
) -> tuple[int, dict, dict]:
    """Load a checkpoint into ``model_chunks`` at the current TP/PP (resharding as needed).

    Args:
        ckpt_dir: checkpoint root or ``iter_*`` folder.
        model_chunks: built for the same architecture (any TP/PP).
        iteration: load this iteration instead of ``latest``.
        extra_sharded: sharded state templates to load too (e.g. the optimizer's); their loaded
            values are returned.
        strict: fail on weights missing from the checkpoint or unknown to the model; module extra state
            (``*._extra_state``, which megatron-core leaves out of some TE modules' sharded state) may
            always be absent (:func:`load_model_state`).
        metadata: sharded-state-dict metadata (see :func:`model_sharded_state_dict`).
    Returns:
        ``(iteration, common, loaded_extra)``: ``common`` is what ``extra_common`` was at save time,
        ``loaded_extra`` maps each ``extra_sharded`` key to its loaded state.
    Raises:
        FileNotFoundError: see :func:`resolve_checkpoint`.
        RuntimeError: architecture/vocabulary differs from the checkpoint's (names both); with ``strict``,
            weights missing or unexpected (names them); a shard file missing or unreadable (names the
            first rank's error: torch's ``CheckpointException`` is a ``BaseException`` that no ``except
            Exception`` would see).
    """
    from megatron.core import dist_checkpointing

    d = resolve_checkpoint(ckpt_dir, iteration)
    meta = json.loads((d / META_FILE).read_text())
    info = getattr(unwrap(model_chunks[0]), "model_info", None)
    if info is not None and "true_vocab_size" in meta:
        if meta["true_vocab_size"] != info.true_vocab_size or meta.get("architecture") != info.architecture:
            raise RuntimeError(
                f"checkpoint {d} holds a {meta.get('architecture')} with vocab {meta['true_vocab_size']}, but the model is a "
                f"{info.architecture} with vocab {info.true_vocab_size}; build the model from {d / ASSETS_DIR}"
            )
    state = model_sharded_state_dict(model_chunks, metadata)
    for k, v in (extra_sharded or {}).items():
        state[k] = v
    try:
        loaded = dist_checkpointing.load(state, str(d))
    except CheckpointException as e:  # a BaseException carrying every rank's traceback: name the cause instead
        raise RuntimeError(f"cannot read checkpoint {d}: {_first_failure(e)}; the folder is incomplete or damaged "
                           f"(load another iteration with --iteration, or convert/train it again)") from None
    keys = ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]
    for k, m in zip(keys, model_chunks):
        load_model_state(unwrap(m), loaded[k], strict=strict, source=f"checkpoint {d}")
    common = dist_checkpointing.load_common_state_dict(str(d))
    it = int(common.get("iteration", meta.get("iteration", 0)))
    return it, dict(common.get("common", {})), {k: loaded[k] for k in (extra_sharded or {})}

