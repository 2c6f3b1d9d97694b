"""HF folder <-> Megatron torch_dist checkpoint.

* :func:`import_hf` — HF folder (safetensors or .bin, single or sharded with an index) -> checkpoint
  written by :func:`megatron_eaopd.checkpoint.save_checkpoint` (loads at any TP/PP).
* :func:`export_hf` — checkpoint (from import or training, any TP/PP) -> HF folder (sharded
  safetensors + index, config, tokenizer, generation config) for ``AutoModelForCausalLM``.
* :func:`load_hf_weights` — fill built model chunks straight from an HF folder at any TP/PP.
* :func:`verify_logits` (from :mod:`.verify`) checks a conversion; :class:`HFTensorReader` (from
  :mod:`.hf_reader`) reads the HF tensors. Both stay importable from here.

Memory: weights are read tensor by tensor (safetensors by plain reads, ``.bin`` mmapped), so
a conversion holds about one copy of the weights (the model) plus one output shard.

Source: the flow follows Megatron-Bridge ``AutoBridge.import_ckpt`` / ``export_ckpt``; the mapping
is :mod:`megatron_eaopd.models.mapping`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_eaopd.checkpoint import (
    ASSETS_DIR,
    EXPORT_MARKER,
    copy_hf_assets,
    iter_dir_name,
    load_checkpoint,
    save_checkpoint,
)
from megatron_eaopd.distributed import collective_device, init_world, is_rank0, unwrap
from megatron_eaopd.dtypes import dtype_name, parse_dtype
from megatron_eaopd.models.hf_reader import HFTensorReader
from megatron_eaopd.models.mapping import canonical_name, megatron_names, to_hf, to_megatron, tp_shard
from megatron_eaopd.models.provider import build_gpt_model
from megatron_eaopd.models.staging import make_staging_dir, remove_stale_staging, replace_folder
from megatron_eaopd.models.targets import check_export, check_export_target, check_import, parse_size
from megatron_eaopd.models.verify import DEFAULT_PROMPT, require_passed, verify_logits

__all__ = ["HFTensorReader", "load_hf_weights", "check_import", "import_hf", "check_export", "export_hf", "verify_logits", "parse_size", "DEFAULT_PROMPT"]

#: seed of the model RNG for conversions (no weight is random: every parameter is loaded)
_SEED = 1234


def _layer_offset(model) -> int:
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    if layers is None or len(layers) == 0:
        return 0
    return int(layers[0].layer_number) - 1


def _tp_coords(model, ps) -> tuple[int, int]:
    """``(tp_rank, tp_size)`` of ``model``: its own ``pg_collection``'s TP group (a teacher built on its own
    groups), else the global ``parallel_state``'s."""
    group = getattr(getattr(model, "pg_collection", None), "tp", None)
    if group is None:
        return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    return group.rank(), group.size()


@torch.no_grad()
def load_hf_weights(model_chunks: list, hf_dir: str | os.PathLike, *, progress: bool = True) -> int:
    """Copy an HF folder's weights into built model chunks at their TP/PP rank (each model's own
    ``pg_collection`` groups, which are the global ``parallel_state``'s unless it was built on its own).

    Each parameter is assembled from its HF tensors (:func:`~megatron_eaopd.models.mapping.to_megatron`),
    cut to this rank's TP piece (:func:`~megatron_eaopd.models.mapping.tp_shard`) and copied
    (cast to the parameter dtype). With tied embeddings at PP>1 the last stage's output layer is
    filled from ``embed_tokens`` (it must equal the embedding, prior-art B25).

    Returns:
        number of elements loaded on this rank.
    Raises:
        KeyError: an HF tensor is missing (partial checkpoint; B23: an untied model without ``lm_head``).
        ValueError: shape mismatch between the folder and its config (names the tensor).
    """
    from megatron.core import parallel_state as ps  # deferred: megatron-core is heavy (see _allreduce_sum)

    reader = HFTensorReader(hf_dir)
    n = 0
    try:
        for chunk in model_chunks:
            m = unwrap(chunk)
            tp_rank, tp_size = _tp_coords(m, ps)
            spec = m.model_info.mapping_spec
            off = _layer_offset(m)
            params = list(m.named_parameters())
            for name, p in tqdm(params, desc="loading HF weights", disable=not (progress and is_rank0()), leave=False):
                cn = canonical_name(name, off)
                full = to_megatron(cn, reader.get, spec)
                p.data.copy_(tp_shard(cn, full, p, tp_rank, tp_size))
                n += p.numel()
                del full
    finally:
        reader.close()
    return n


def _model_bytes(model_chunks) -> int:
    return sum(p.numel() * p.element_size() for c in model_chunks for p in c.parameters())


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
              tp: int = 1, pp: int = 1, verify: bool = False, atol: float = 1e-3, progress: bool = True) -> dict:
    """Convert an HF folder to a Megatron torch_dist checkpoint (iteration 0) under ``out``.

    Run as one process (TP=PP=1; the checkpoint reshards on load) or under torchrun with
    ``tp*pp`` dividing the world size. Everything export needs (HF config, tokenizer files,
    generation config, true vocab size, dtype) is stored in the checkpoint.

    Args:
        dtype: storage dtype; default the source's (``config.dtype``), else bf16.
        verify: reload the saved checkpoint in fp32 and compare logits with the source
            (:func:`verify_logits`); raises if beyond ``atol``.
    Returns:
        summary ``{"params", "bytes", "seconds", "dtype", "path", "verify"?}``.
    Raises:
        FileNotFoundError / NotImplementedError / ValueError / KeyError: bad folder, architecture,
        shapes or missing tensors (each names the problem); RuntimeError: verification failed (the checkpoint it wrote is removed).
    """
    t0 = time.perf_counter()
    files, _, dt = check_import(hf_dir, out, dtype=dtype, tp=tp, pp=pp)
    init_world(tp, pp, _SEED)
    chunks, info = build_gpt_model(hf_dir, params_dtype=dt, perform_initialization=False)
    n = load_hf_weights(chunks, files, progress=progress)
    nbytes = _model_bytes(chunks)
    root = Path(out)
    new_dirs = [a for a in (root, *root.parents) if not a.exists()]
    try:
        path = save_checkpoint(out, 0, chunks, model_info=info, hf_assets=hf_dir,
                               extra_metadata={"source": str(Path(hf_dir).resolve()), "converted_by": "megatron_eaopd.import_hf"})
    except BaseException:
        if is_rank0():  # nothing half-written: this save's temp folder, and the folders it created
            shutil.rmtree(root / f".{iter_dir_name(0)}.tmp", ignore_errors=True)
            _remove_empty(new_dirs)
        raise
    del chunks
    summary = {"params": _allreduce_sum(n), "bytes": _allreduce_sum(nbytes), "seconds": time.perf_counter() - t0,
               "dtype": dtype_name(dt), "path": str(path)}
    if verify:
        # an fp32 model (its attention/softmax settings follow its build dtype, so a bf16 model cast with
        # .float() mixes dtypes); the checkpoint's values load into it exactly
        vchunks, _ = build_gpt_model(path / "hf_assets", params_dtype=torch.float32, perform_initialization=False,
                                     parallel_output=True)
        load_checkpoint(path, vchunks)
        try:
            summary["verify"] = require_passed(verify_logits(vchunks, hf_dir, weight_dtype=dt, atol=atol), atol)
        except RuntimeError as e:  # never leave a complete-looking checkpoint that failed its check
            if is_rank0():
                shutil.rmtree(path, ignore_errors=True)
                if (root / "latest").is_file() and (root / "latest").read_text().strip() == path.name:
                    (root / "latest").unlink()
                _remove_empty(new_dirs)
            raise RuntimeError(f"{e}; the checkpoint written to {path} was removed") from None
    return summary


def _remove_empty(dirs: list[Path]) -> None:
    """Remove the folders of ``dirs`` (deepest first) that are empty: those a failed run created."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def _allreduce_sum(x: int) -> int:
    """Sum a per-rank count over the model-parallel (TP x PP) group, so each shard counts once
    (collective on every rank; the tensor lives on :func:`~megatron_eaopd.distributed.collective_device`)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return int(x)
    from megatron.core import parallel_state as ps  # deferred: importing megatron-core costs seconds

    group = ps.get_model_parallel_group()
    t = torch.tensor([x], dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(t, group=group)
    return int(t.item())


def _write_shards(tensors_iter, out: Path, max_shard: int, dtype: torch.dtype, progress: bool) -> tuple[int, int]:
    """Stream ``(name, tensor)`` into safetensors shards; returns (params, bytes)."""
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    size = 0
    written: list[tuple[str, list[str]]] = []
    total_bytes = total_params = 0

    def flush():
        nonlocal shard, size
        if not shard:
            return
        tmpname = f"shard-{len(written):05d}.tmp"
        save_file(shard, str(out / tmpname), metadata={"format": "pt"})
        written.append((tmpname, list(shard)))
        shard, size = {}, 0

    for name, t in tqdm(tensors_iter, desc="writing HF shards", disable=not progress, leave=False):
        t = t.to(dtype).contiguous()
        b = t.numel() * t.element_size()
        if shard and size + b > max_shard:
            flush()
        shard[name] = t
        size += b
        total_bytes += b
        total_params += t.numel()
    flush()
    if len(written) == 1:
        os.replace(out / written[0][0], out / "model.safetensors")
    else:
        wm = {}
        for i, (tmpname, names) in enumerate(written):
            fn = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
            os.replace(out / tmpname, out / fn)
            wm.update({n: fn for n in names})
        idx = {"metadata": {"total_size": total_bytes, "total_parameters": total_params}, "weight_map": wm}
        (out / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2) + "\n")
    return total_params, total_bytes


def export_hf(ckpt: str | os.PathLike, out: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
              iteration: int | None = None, max_shard_size: str | int = "2GB", verify: bool = False,
              atol: float = 1e-3, progress: bool = True) -> dict:
    """Convert a checkpoint (any TP/PP it was saved with) to an HF folder.

    Runs in one process at TP=PP=1 (torch_dist reshards on load). Padded vocabulary rows are
    dropped; tied models store only ``embed_tokens`` (as ``save_pretrained`` does, no shared-tensor
    error, B22). The folder is written to a fresh temp folder next to ``out`` (``.NAME.tmp-*``) and renamed
    when complete; it carries ``.eaopd_export.json`` (source checkpoint, iteration). ``out`` must be new, empty
    or an earlier export (it has that marker): any other folder is refused, never replaced.

    Args:
        dtype: output dtype; default the dtype recorded in the checkpoint, else bf16.
        max_shard_size: e.g. ``"2GB"``; one shard -> ``model.safetensors``, else an index.
        verify: load the result with ``AutoModelForCausalLM`` and compare logits with the checkpoint.
    Returns:
        summary ``{"params", "bytes", "seconds", "dtype", "path", "verify"?}``.
    Raises:
        FileNotFoundError: not a checkpoint (an HF folder names the ``import`` command);
        ValueError: bad ``max_shard_size`` / ``dtype``, or an ``out`` that is not new, empty or an earlier export;
        RuntimeError: verification failed (checked before the export takes --out's place: a previous export stays).
    """
    t0 = time.perf_counter()
    max_shard, meta, stored, out_dtype = check_export(ckpt, out, dtype=dtype, iteration=iteration,
                                                      max_shard_size=max_shard_size)
    src = Path(meta["path"])
    assets = src / ASSETS_DIR
    init_world(1, 1, _SEED)
    chunks, info = build_gpt_model(assets, params_dtype=stored, perform_initialization=False)
    load_checkpoint(src, chunks)
    m = unwrap(chunks[0])
    spec = info.mapping_spec
    params = dict(m.named_parameters())
    out = Path(os.path.abspath(out))  # "." or "x/..": the staging folder goes beside the folder, not inside it
    new_dirs = [a for a in out.parents if not a.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    for d in remove_stale_staging(out):  # what killed exports left behind is removed; others are only named
        print(f"[convert_hf] note: {d} is an unfinished export of another live process or host, or a previous "
              f"export moved aside by a run that was killed; remove it yourself when it is not needed")
    tmp = make_staging_dir(out)  # this run's own: never another's

    def gen():
        for name in megatron_names(spec):
            if name not in params:
                raise KeyError(f"model has no parameter {name!r}")
            yield from to_hf(name, params[name].detach(), spec)

    try:
        n, nbytes = _write_shards(gen(), tmp, max_shard, out_dtype, progress)
        copy_hf_assets(assets, tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        if out_dtype != parse_dtype(cfg.get("dtype") or cfg.get("torch_dtype"), None):
            cfg["dtype"] = dtype_name(out_dtype)
            if "torch_dtype" in cfg:
                cfg["torch_dtype"] = dtype_name(out_dtype)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        marker = {"converted_by": "megatron_eaopd.export_hf", "checkpoint": str(Path(ckpt).resolve()),
                  "iteration": meta.get("iteration"), "iteration_dir": str(src.resolve()), "dtype": dtype_name(out_dtype),
                  "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        summary = {"params": n, "bytes": nbytes, "seconds": time.perf_counter() - t0, "dtype": dtype_name(out_dtype),
                   "path": str(out)}
        if verify:  # before the export takes --out's place: a failed check leaves the previous folder as it was
            del chunks, m, params
            # the written (possibly lower-precision) values in an fp32-built model, computed in fp32
            vchunks, _ = build_gpt_model(assets, params_dtype=torch.float32, perform_initialization=False)
            load_checkpoint(src, vchunks)
            for c in vchunks:
                for p in c.parameters():
                    p.data = p.data.to(out_dtype).float()
            summary["verify"] = require_passed(verify_logits(vchunks, tmp, weight_dtype=out_dtype, atol=atol), atol)
        check_export_target(Path(ckpt), out)  # again: nothing foreign appeared there while this ran
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(new_dirs)
        raise
    return summary
