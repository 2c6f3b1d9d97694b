"""Tensor-parallel shard geometry, chunking and input checks for the vocab-parallel loss kernels.

Rank ``r`` of the TP group holds global vocabulary ids ``[r * V_local, (r + 1) * V_local)``;
:class:`_Shard` records that layout, the true vocabulary (padded rows beyond it have zero probability),
the temperature and the chunk size, and every kernel (:mod:`megatron_eaopd.loss.kernels`) works
through it. See :mod:`megatron_eaopd.loss.vocab_parallel` for the conventions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["CHUNK_BYTES", "default_tp_group"]

#: Upper bound in bytes for one fp32 working buffer of ``[chunk, V_local]``; a pass keeps 2-5 of them.
#: On CUDA the caching allocator recycles them; on CPU, buffers above glibc's mmap threshold (32 MiB at
#: most) are mapped and page-faulted afresh for every chunk, which costs more than the arithmetic, so
#: CPU chunks stay below it.
CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 8 * 2**20}

#: Stand-in for -inf inside the fp32 working buffers: exp() gives exactly 0, and 0 * FILL == 0 (no NaN).
_FILL = -1e30


# ----------------------------------------------------------------------------------------------
# TP group and shard geometry
# ----------------------------------------------------------------------------------------------
def default_tp_group():
    """Megatron's tensor-parallel group if ``parallel_state`` is initialised, else ``None`` (TP = 1)."""
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            return parallel_state.get_tensor_model_parallel_group()
    except Exception:  # pragma: no cover - megatron missing or half-initialised
        pass
    return None


@dataclass(frozen=True)
class _Shard:
    group: object
    rank: int
    world: int
    v_local: int
    start: int  # first global id on this rank
    n_valid: int  # columns [0, n_valid) of this shard are real vocabulary entries
    temperature: float
    chunk: int

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=op, group=self.group)
        return t


def _shard(logits: torch.Tensor, group, vocab_size, temperature, chunk_size, name="logits") -> _Shard:
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1:
        raise ValueError(f"{name} must be a tensor of shape [..., V_local], got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {logits.dtype}")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    group = default_tp_group() if group is None else group
    if group is not None and dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(group), dist.get_rank(group)
    else:
        group, world, rank = None, 1, 0
    v_local = logits.shape[-1]
    if v_local == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (shape {tuple(logits.shape)})")
    padded = v_local * world
    if vocab_size is None:
        vocab_size = padded
    if not (0 < vocab_size <= padded):
        raise ValueError(
            f"vocab_size={vocab_size} does not fit the vocab-parallel logits: TP={world} x V_local={v_local} "
            f"= {padded} rows. Pass the tokenizer's true vocabulary size (<= {padded}), or check that the "
            f"TP group matches the model's tensor-parallel size"
        )
    start = rank * v_local
    n_valid = max(0, min(v_local, vocab_size - start))
    if chunk_size is None:
        budget = CHUNK_BYTES.get(logits.device.type, CHUNK_BYTES["cuda"])
        chunk_size = max(1, budget // (4 * v_local))
    elif not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer (tokens per chunk), got {chunk_size!r}")
    return _Shard(group, rank, world, v_local, start, n_valid, float(temperature), int(chunk_size))


def _check_same_shards(sh: _Shard, *tensors: torch.Tensor) -> None:
    """All ranks must hold equally sized shards: one tiny MAX all-reduce of (V_local, -V_local)."""
    if sh.world == 1:
        return
    v = torch.tensor([float(sh.v_local), -float(sh.v_local)], dtype=torch.float64, device=tensors[0].device)
    sh.all_reduce(v, dist.ReduceOp.MAX)
    if v[0].item() != -v[1].item():
        raise ValueError(
            f"vocab shards differ across the tensor-parallel group (V_local ranges from {-v[1].item():.0f} to "
            f"{v[0].item():.0f}): the TP group does not divide the vocabulary evenly. Pad the vocabulary to a "
            f"multiple of TP (Megatron's make_vocab_size_divisible_by) or pass the model's TP group"
        )


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _local_max(sh: _Shard, x: torch.Tensor) -> torch.Tensor:
    """fp32 row max of ``x / T`` over this shard's real vocabulary columns (-inf if it has none)."""
    if sh.n_valid == 0:
        return torch.full((x.shape[0],), float("-inf"), dtype=torch.float32, device=x.device)
    xv = x if sh.n_valid == sh.v_local else x[:, : sh.n_valid]
    m = xv.amax(dim=-1).float()
    return m.div_(sh.temperature) if sh.temperature != 1.0 else m


def _shifted(sh: _Shard, x: torch.Tensor, shift: torch.Tensor, safe: bool, out: torch.Tensor | None = None):
    """fp32 ``x / T - shift[:, None]`` for a ``[n, V_local]`` chunk, in a new buffer (or ``out``).

    The fast path is a single fused pass (bf16 promotes to fp32 through the fp32 ``shift``). ``safe``
    first clamps -inf logits to the finite ``_FILL``, so that products like ``0 * z`` stay 0 instead of
    NaN; it is used only for chunks that hold -inf logits. Padded columns are set to ``_FILL``.
    """
    if safe or sh.temperature != 1.0:
        z = x.to(torch.float32, copy=True) if out is None else out.copy_(x)
        if sh.temperature != 1.0:
            z.div_(sh.temperature)
        if safe:
            z.clamp_(min=_FILL)
        z.sub_(shift.unsqueeze(1))
    else:
        z = torch.sub(x, shift.unsqueeze(1), out=out) if out is not None else torch.sub(x, shift.unsqueeze(1))
        if z.dtype != torch.float32:  # fp16/fp64 inputs
            z = z.float()
    if sh.n_valid < sh.v_local:
        z[:, sh.n_valid:] = _FILL
    return z


def _check_max(m: torch.Tensor, bad: list, temperature: float) -> None:
    """Record (lazily, no host sync) rows whose global max ``m`` (of ``x / T``) is NaN/+inf or that have no real
    entry: every logit -inf or masked with a finite stand-in, i.e. a largest logit ``x`` (before dividing by
    ``T``) of at most ``_FILL / 2`` (-5e29; -1e30 and the fp32/bf16 minimum are such masks)."""
    bad.append((~torch.isfinite(m)) | (m * temperature <= _FILL / 2))


def _raise_bad(bad: list, name: str, sh: _Shard, shape) -> None:
    """Raise once per pass (a single host sync) if any row recorded by :func:`_check_max` is bad."""
    if not bad:
        return
    flags = torch.cat(bad)
    if not bool(flags.any()):
        return
    row = int(torch.nonzero(flags)[0, 0])
    lead = tuple(shape[:-1])
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(row), lead)) if lead else ()
    raise ValueError(
        f"{name} has a row with NaN, +inf or no finite entry at index {where} (flattened row {row}, "
        f"{int(flags.sum())} bad rows in total; TP rank {sh.rank}). Check the model's forward for overflow "
        f"(bf16 without fp32 softmax?) and that padded positions are not fed as all -inf rows"
    )


def _local_ids(sh: _Shard, ids: torch.Tensor):
    local = ids - sh.start
    own = (local >= 0) & (local < sh.v_local)
    return local.clamp(0, sh.v_local - 1), own


def _check_ids(sh: _Shard, ids: torch.Tensor, vocab_size_eff: int) -> None:
    if ids.numel() and (bool((ids < 0).any()) or bool((ids >= vocab_size_eff).any())):
        lo, hi = int(ids.min()), int(ids.max())
        raise ValueError(
            f"ids must lie in [0, vocab_size={vocab_size_eff}) (padded vocabulary rows have zero probability), "
            f"got values in [{lo}, {hi}]"
        )


def _chunks(sh: _Shard, n_rows: int):
    return [(r0, min(n_rows, r0 + sh.chunk)) for r0 in range(0, n_rows, sh.chunk)]


def _two_phase(sh: _Shard, n_rows: int, run_chunk) -> list[bool]:
    """Run ``run_chunk(r0, r1, safe) -> nan_flag`` on every chunk on the fast path, then (after one host
    sync) rerun the chunks whose all-reduced sums came out NaN on the safe path (-inf logits there).
    The flag comes from all-reduced values, so every TP rank takes the same decision (same collectives).
    Returns the per-chunk ``safe`` flags (backward reuses them)."""
    chunks = _chunks(sh, n_rows)
    flags = [run_chunk(r0, r1, False) for r0, r1 in chunks]
    redo = torch.stack(flags).tolist() if flags else []
    for (r0, r1), again in zip(chunks, redo):
        if again:
            run_chunk(r0, r1, True)
    return redo
