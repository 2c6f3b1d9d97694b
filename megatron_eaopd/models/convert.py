"""HF folder <-> Megatron torch_dist checkpoint, and logit verification.

* :func:`import_hf` — HF folder (safetensors or .bin, single or sharded with an index) -> checkpoint
  written by :func:`megatron_eaopd.checkpoint.save_checkpoint` (loads at any TP/PP).
* :func:`export_hf` — checkpoint (from import or training, any TP/PP) -> HF folder (sharded
  safetensors + index, config, tokenizer, generation config) for ``AutoModelForCausalLM``.
* :func:`load_hf_weights` — fill built model chunks straight from an HF folder at any TP/PP.
* :func:`verify_logits` — compare a Megatron model's logits with an HF folder's on a fixed prompt.

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
from typing import Any

import torch

from megatron_eaopd.models.hf import HFWeightFiles, dtype_name, inspect_hf_dir, parse_dtype
from megatron_eaopd.models.mapping import canonical_name, megatron_names, to_hf, to_megatron, tp_shard

__all__ = ["HFTensorReader", "load_hf_weights", "import_hf", "export_hf", "verify_logits", "parse_size", "DEFAULT_PROMPT"]

DEFAULT_PROMPT = "The capital of France is Paris. Two plus three equals"
_IGNORED_HF = ("rotary_emb.inv_freq",)


def parse_size(s: str | int) -> int:
    """``"2GB"`` / ``"500MB"`` / ``1000`` -> bytes (decimal units as transformers uses).

    Raises:
        ValueError: unparseable size.
    """
    if isinstance(s, int):
        return s
    t = str(s).strip().upper()
    for unit, mul in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * mul)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise ValueError(f"cannot parse size {s!r}; use e.g. 2GB, 500MB or a byte count") from None


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class _SafetensorsFile:
    """Reads single tensors from a ``.safetensors`` file with plain ``readinto`` (no mmap), so
    reading a tensor costs exactly its own size in memory (the format: 8-byte little-endian header
    length, JSON header of ``{name: {dtype, shape, data_offsets}}``, then the data)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            self.header = json.loads(fh.read(n))
        self.base = 8 + n
        self.header.pop("__metadata__", None)

    def keys(self):
        return list(self.header)

    def get_tensor(self, name: str) -> torch.Tensor:
        h = self.header[name]
        if h["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {h['dtype']}")
        start, end = h["data_offsets"]
        buf = bytearray(end - start)
        with open(self.path, "rb") as fh:
            fh.seek(self.base + start)
            if fh.readinto(buf) != len(buf):
                raise ValueError(f"{self.path} is truncated (tensor {name}); re-download the file")
        if not buf:
            return torch.empty(h["shape"], dtype=_ST_DTYPES[h["dtype"]])
        return torch.frombuffer(buf, dtype=_ST_DTYPES[h["dtype"]]).reshape(h["shape"])


class HFTensorReader:
    """Lazy reader over an HF folder's weight files: tensors are read one at a time (safetensors
    without mmap; ``.bin`` mmapped, one file open at a time), so memory holds one tensor at a time.

    Args:
        files: from :func:`megatron_eaopd.models.hf.inspect_hf_dir` (or a folder path).
    Raises:
        FileNotFoundError: see ``inspect_hf_dir``.
    """

    def __init__(self, files: HFWeightFiles | str | os.PathLike):
        self.files = files if isinstance(files, HFWeightFiles) else inspect_hf_dir(files)
        self._open: dict[Path, Any] = {}
        self.where: dict[str, Path] = {k: self.files.root / v for k, v in self.files.weight_map.items()}
        if not self.where:
            for f in self.files.files:
                for k in self._handle(f).keys():
                    self.where[k] = f

    def _handle(self, f: Path):
        if f not in self._open:
            # keep one file open: mmapped pages count as resident memory until the file is closed
            self._open.clear()
            if self.files.fmt == "safetensors":
                self._open[f] = _SafetensorsFile(f)
            else:
                self._open[f] = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
        return self._open[f]

    def keys(self) -> list[str]:
        """All tensor names."""
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor.

        Raises:
            KeyError: the tensor is absent (a partial / truncated checkpoint) — names the folder.
        """
        if name not in self.where:
            raise KeyError(f"tensor {name!r} is missing from {self.files.root} (partial or incompatible checkpoint)")
        h = self._handle(self.where[name])
        return h.get_tensor(name) if self.files.fmt == "safetensors" else h[name]

    def close(self) -> None:
        """Drop open file handles / mmaps."""
        self._open.clear()


def _layer_offset(model) -> int:
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    if layers is None or len(layers) == 0:
        return 0
    return int(layers[0].layer_number) - 1


def _rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


@torch.no_grad()
def load_hf_weights(model_chunks: list, hf_dir: str | os.PathLike, *, progress: bool = True) -> int:
    """Copy an HF folder's weights into built model chunks at the current TP/PP rank.

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
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from megatron_eaopd.models.provider import unwrap

    reader = HFTensorReader(hf_dir)
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    n = 0
    try:
        for chunk in model_chunks:
            m = unwrap(chunk)
            spec = m.model_info.mapping_spec
            off = _layer_offset(m)
            params = list(m.named_parameters())
            for name, p in tqdm(params, desc="loading HF weights", disable=not (progress and _rank0()), leave=False):
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


def _hf_reference(hf_dir, weight_dtype: torch.dtype | None):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    hf.eval()
    if weight_dtype is not None and weight_dtype != torch.float32:
        for p in hf.parameters():
            p.data = p.data.to(weight_dtype).float()
    return hf


def _prompt_ids(assets_dir, vocab: int, prompt: str | None) -> torch.Tensor:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(assets_dir))
        ids = tok(prompt or DEFAULT_PROMPT, return_tensors="pt").input_ids
        if ids.numel() >= 2 and int(ids.max()) < vocab:
            return ids
    except Exception:
        pass
    return (torch.arange(16, dtype=torch.long) * 7919 % vocab).unsqueeze(0)


@torch.no_grad()
def verify_logits(model_chunks: list, hf_dir: str | os.PathLike, *, weight_dtype: torch.dtype | None = None,
                  atol: float = 1e-3, prompt: str | None = None, hf_model=None) -> dict:
    """Compare Megatron logits with transformers' on a fixed prompt (collective over the world).

    The HF model runs in fp32; with ``weight_dtype`` (e.g. bf16) its weights are first rounded to that
    dtype, so both sides hold identical values and the check measures the conversion only. The
    Megatron chunks should hold fp32 (or upcast) weights.

    Args:
        model_chunks: built and loaded model chunks (any TP/PP).
        hf_dir: HF folder (weights + tokenizer; no tokenizer -> fixed ids).
        atol: pass threshold on max |logit diff|.
        hf_model: an already-loaded HF model to use instead of loading ``hf_dir``.
    Returns:
        ``{"max_abs_diff": float, "top1_agreement": float in [0,1], "tokens": int, "passed": bool}``
        (identical on every rank).
    """
    import torch.distributed as dist

    from megatron_eaopd.models.provider import forward_logits, unwrap

    info = unwrap(model_chunks[0]).model_info
    ids = _prompt_ids(hf_dir, info.true_vocab_size, prompt)
    out = forward_logits(model_chunks, ids)
    stats = torch.zeros(3, dtype=torch.float64)
    if out is not None:
        hf = hf_model if hf_model is not None else _hf_reference(hf_dir, weight_dtype)
        ref = hf(ids).logits.float()
        del hf
        stats[0] = (out - ref).abs().max().item()
        stats[1] = 1.0 - (out.argmax(-1) == ref.argmax(-1)).double().mean().item()
        stats[2] = 1.0
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    diff, disagree = float(stats[0]), float(stats[1])
    return {"max_abs_diff": diff, "top1_agreement": 1.0 - disagree, "tokens": int(ids.numel()),
            "passed": bool(diff <= atol)}


def _setup(tp: int, pp: int):
    from megatron_eaopd.distributed import init_distributed, init_model_parallel
    from megatron_eaopd.models.provider import seed_model_rng

    if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ and "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:  # a world of one: any free port (never collide with a concurrent run)
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    init_distributed()
    init_model_parallel(tp, pp)
    seed_model_rng(1234)


def _checked(res: dict, atol: float) -> dict:
    """Return a :func:`verify_logits` result, or raise RuntimeError when it failed the tolerance."""
    if not res["passed"]:
        raise RuntimeError(f"verification failed: max |logit diff| {res['max_abs_diff']:.3g} > atol {atol} "
                           f"(top-1 agreement {res['top1_agreement']:.3f})")
    return res


def _check_export_target(ckpt: Path, out: Path) -> None:
    """Refuse an export target that would destroy data: the checkpoint itself (or a folder holding it),
    a Megatron checkpoint, or a non-empty folder that is not a previous Hugging Face export."""
    ck, o = Path(ckpt).resolve(), Path(out).resolve()
    if o == ck or o in ck.parents:
        raise ValueError(f"--out {out} is (or contains) the checkpoint being exported ({ckpt}); choose a new folder")
    if o.is_file():
        raise ValueError(f"--out {out} is a file; give a folder path")
    if o.is_dir() and any(o.iterdir()):
        names = {p.name for p in o.iterdir()}
        if "latest" in names or any(n.startswith("iter_") for n in names):
            raise ValueError(f"--out {out} holds a Megatron checkpoint; refusing to replace it with an HF export")
        if "config.json" not in names or not any(n.endswith((".safetensors", ".safetensors.index.json")) for n in names):
            raise ValueError(f"--out {out} is a non-empty folder that is not a previous Hugging Face export; "
                             f"choose an empty or new folder (nothing was written)")


def _check_import_target(out: Path) -> None:
    """Refuse to write a converted model (iteration 0) into a training run's checkpoint folder."""
    from megatron_eaopd.checkpoint import LATEST, META_FILE

    o = Path(out)
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
        shapes or missing tensors (each names the problem); RuntimeError: verification failed.
    """
    from megatron_eaopd.checkpoint import load_checkpoint, save_checkpoint
    from megatron_eaopd.models.hf import hf_to_gpt_args
    from megatron_eaopd.models.provider import build_gpt_model

    t0 = time.perf_counter()
    files = inspect_hf_dir(hf_dir)  # fast, clear errors before any heavy work
    _check_import_target(Path(out))
    args = hf_to_gpt_args(hf_dir)
    dt = parse_dtype(dtype, args.source_dtype or torch.bfloat16)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world % (tp * pp):
        raise ValueError(
            f"--tp {tp} --pp {pp} needs a multiple of {tp * pp} processes but this run has {world}; launch with "
            f"torchrun --nproc-per-node {tp * pp}, or convert at tp=pp=1 (the checkpoint reshards to any TP/PP on load)"
        )
    _setup(tp, pp)
    chunks, info = build_gpt_model(hf_dir, params_dtype=dt, perform_initialization=False)
    n = load_hf_weights(chunks, files, progress=progress)
    nbytes = _model_bytes(chunks)
    path = save_checkpoint(out, 0, chunks, model_info=info, hf_assets=hf_dir,
                           extra_metadata={"source": str(Path(hf_dir).resolve()), "converted_by": "megatron_eaopd.import_hf"})
    del chunks
    summary = {"params": _allreduce_sum(n), "bytes": _allreduce_sum(nbytes), "seconds": time.perf_counter() - t0,
               "dtype": dtype_name(dt), "path": str(path)}
    if verify:
        vchunks, _ = build_gpt_model(path / "hf_assets", params_dtype=dt, perform_initialization=False, parallel_output=True)
        load_checkpoint(path, vchunks)
        for c in vchunks:
            c.float()
        summary["verify"] = _checked(verify_logits(vchunks, hf_dir, weight_dtype=dt, atol=atol), atol)
    return summary


def _allreduce_sum(x: int) -> int:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return int(x)
    from megatron.core import parallel_state as ps

    t = torch.tensor([x], dtype=torch.float64)
    # count each model-parallel shard once: sum over the TP x PP group of data-parallel rank 0
    dist.all_reduce(t, group=ps.get_model_parallel_group())
    return int(t.item())


def _write_shards(tensors_iter, out: Path, max_shard: int, dtype: torch.dtype, progress: bool) -> tuple[int, int]:
    """Stream ``(name, tensor)`` into safetensors shards; returns (params, bytes)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

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
    error, B22). The folder is written to ``out.tmp`` and renamed when complete.

    Args:
        dtype: output dtype; default the dtype recorded in the checkpoint, else bf16.
        max_shard_size: e.g. ``"2GB"``; one shard -> ``model.safetensors``, else an index.
        verify: load the result with ``AutoModelForCausalLM`` and compare logits with the checkpoint.
    Returns:
        summary ``{"params", "bytes", "seconds", "dtype", "path", "verify"?}``.
    Raises:
        FileNotFoundError: not a checkpoint (an HF folder names the ``import`` command);
        RuntimeError: verification failed.
    """
    from megatron_eaopd.checkpoint import ASSETS_DIR, load_checkpoint, read_checkpoint_metadata
    from megatron_eaopd.models.provider import build_gpt_model, unwrap

    t0 = time.perf_counter()
    meta = read_checkpoint_metadata(ckpt, iteration)
    src = Path(meta["path"])
    assets = src / ASSETS_DIR
    if not (assets / "config.json").is_file():
        raise FileNotFoundError(f"{assets}/config.json is missing; this checkpoint cannot be exported without its HF config")
    _check_export_target(Path(ckpt), Path(out))
    stored = parse_dtype(meta.get("dtype"), torch.bfloat16)
    out_dtype = parse_dtype(dtype, stored)
    _setup(1, 1)
    chunks, info = build_gpt_model(assets, params_dtype=stored, perform_initialization=False)
    load_checkpoint(src, chunks)
    m = unwrap(chunks[0])
    spec = info.mapping_spec
    params = dict(m.named_parameters())
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    def gen():
        for name in megatron_names(spec):
            if name not in params:
                raise KeyError(f"model has no parameter {name!r}")
            yield from to_hf(name, params[name].detach(), spec)

    n, nbytes = _write_shards(gen(), tmp, parse_size(max_shard_size), out_dtype, progress)
    from megatron_eaopd.checkpoint import copy_hf_assets

    copy_hf_assets(assets, tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    if out_dtype != parse_dtype(cfg.get("dtype") or cfg.get("torch_dtype"), None):
        cfg["dtype"] = dtype_name(out_dtype)
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = dtype_name(out_dtype)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    summary = {"params": n, "bytes": nbytes, "seconds": time.perf_counter() - t0, "dtype": dtype_name(out_dtype), "path": str(out)}
    if verify:
        for c in chunks:  # same values as the written (possibly lower-precision) tensors, computed in fp32
            for p in c.parameters():
                p.data = p.data.to(out_dtype).float()
        summary["verify"] = _checked(verify_logits(chunks, out, weight_dtype=out_dtype, atol=atol), atol)
    return summary
