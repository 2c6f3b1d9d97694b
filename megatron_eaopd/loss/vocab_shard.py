"""Vocab shards of the tensor-parallel group and the chunked full-vocabulary statistics pass.

The bookkeeping shared by every vocab-parallel kernel in this package (:mod:`.vocab_parallel`,
:mod:`.vocab_parallel_kl`, :mod:`.eopd`): which global vocabulary ids a rank holds (:class:`Shard`,
:func:`make_shard`), the input checks, the chunking of ``[N, V_local]`` rows with the fast/safe two-phase
pass for chunks holding -inf logits (:func:`two_phase`), and the one forward pass that produces the
row max, log-sum-exp, entropy, logits at global ids and the global top-k (:func:`stats_forward`).
The conventions (fp32 accumulation, caller's logits untouched, padded rows, temperature, no collective
in backward) are described in :mod:`megatron_eaopd.loss.vocab_parallel`.

Package-internal: the public API is :mod:`megatron_eaopd.loss`.
Source: the steps of Megatron's ``VocabParallelCrossEntropy`` (``calculate_logits_max``,
``calculate_predicted_logits``) in ``megatron/core/tensor_parallel/cross_entropy.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "CHUNK_BYTES", "FILL", "Shard", "default_tp_group", "make_shard", "check_same_shards", "as_rows",
    "local_max", "shifted", "check_max", "raise_bad", "local_ids", "check_ids", "chunk_ranges", "two_phase",
    "stats_forward", "write_grad", "grad_buffer",
]

#: Upper bound in bytes for one fp32 working buffer of ``[chunk, V_local]``; a pass keeps 2-5 of them.
#: On CUDA the caching allocator recycles them; on CPU, buffers above glibc's mmap threshold (32 MiB at
#: most) are mapped and page-faulted afresh for every chunk, which costs more than the arithmetic, so
#: CPU chunks stay below it.
CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 8 * 2**20}

#: Stand-in for -inf inside the fp32 working buffers: exp() gives exactly 0, and 0 * FILL == 0 (no NaN).
FILL = -1e30


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
class Shard:
    """This rank's slice ``[start, start + v_local)`` of the (padded) vocabulary and the pass settings."""

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


def make_shard(logits: torch.Tensor, group, vocab_size, temperature, chunk_size, name="logits") -> Shard:
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
    return Shard(group, rank, world, v_local, start, n_valid, float(temperature), int(chunk_size))


def check_same_shards(sh: Shard, *tensors: torch.Tensor) -> None:
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


def as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def local_max(sh: Shard, x: torch.Tensor) -> torch.Tensor:
    """fp32 row max of ``x / T`` over this shard's real vocabulary columns (-inf if it has none)."""
    if sh.n_valid == 0:
        return torch.full((x.shape[0],), float("-inf"), dtype=torch.float32, device=x.device)
    xv = x if sh.n_valid == sh.v_local else x[:, : sh.n_valid]
    m = xv.amax(dim=-1).float()
    return m.div_(sh.temperature) if sh.temperature != 1.0 else m


def shifted(sh: Shard, x: torch.Tensor, shift: torch.Tensor, safe: bool, out: torch.Tensor | None = None):
    """fp32 ``x / T - shift[:, None]`` for a ``[n, V_local]`` chunk, in a new buffer (or ``out``).

    The fast path is a single fused pass (bf16 promotes to fp32 through the fp32 ``shift``). ``safe``
    first clamps -inf logits to the finite ``FILL``, so that products like ``0 * z`` stay 0 instead of
    NaN; it is used only for chunks that hold -inf logits. Padded columns are set to ``FILL``.
    """
    if safe or sh.temperature != 1.0:
        z = x.to(torch.float32, copy=True) if out is None else out.copy_(x)
        if sh.temperature != 1.0:
            z.div_(sh.temperature)
        if safe:
            z.clamp_(min=FILL)
        z.sub_(shift.unsqueeze(1))
    else:
        z = torch.sub(x, shift.unsqueeze(1), out=out) if out is not None else torch.sub(x, shift.unsqueeze(1))
        if z.dtype != torch.float32:  # fp16/fp64 inputs
            z = z.float()
    if sh.n_valid < sh.v_local:
        z[:, sh.n_valid:] = FILL
    return z


def check_max(m: torch.Tensor, bad: list) -> None:
    """Record (lazily, no host sync) rows whose global max is NaN/+inf or that have no finite entry."""
    bad.append((~torch.isfinite(m)) | (m <= FILL / 2))


def raise_bad(bad: list, name: str, sh: Shard, shape) -> None:
    """Raise once per pass (a single host sync) if any row recorded by :func:`check_max` is bad."""
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


def local_ids(sh: Shard, ids: torch.Tensor):
    local = ids - sh.start
    own = (local >= 0) & (local < sh.v_local)
    return local.clamp(0, sh.v_local - 1), own


def check_ids(ids: torch.Tensor, vocab_size_eff: int) -> None:
    if ids.numel() and (bool((ids < 0).any()) or bool((ids >= vocab_size_eff).any())):
        lo, hi = int(ids.min()), int(ids.max())
        raise ValueError(
            f"ids must lie in [0, vocab_size={vocab_size_eff}) (padded vocabulary rows have zero probability), "
            f"got values in [{lo}, {hi}]"
        )


def chunk_ranges(sh: Shard, n_rows: int):
    return [(r0, min(n_rows, r0 + sh.chunk)) for r0 in range(0, n_rows, sh.chunk)]


def two_phase(sh: Shard, n_rows: int, run_chunk) -> list[bool]:
    """Run ``run_chunk(r0, r1, safe) -> nan_flag`` on every chunk on the fast path, then (after one host
    sync) rerun the chunks whose all-reduced sums came out NaN on the safe path (-inf logits there).
    The flag comes from all-reduced values, so every TP rank takes the same decision (same collectives).
    Returns the per-chunk ``safe`` flags (backward reuses them)."""
    chunks = chunk_ranges(sh, n_rows)
    flags = [run_chunk(r0, r1, False) for r0, r1 in chunks]
    redo = torch.stack(flags).tolist() if flags else []
    for (r0, r1), again in zip(chunks, redo):
        if again:
            run_chunk(r0, r1, True)
    return redo


# ----------------------------------------------------------------------------------------------
# Shared forward pass: global max, log-sum-exp, entropy and logits at ids, chunked
# ----------------------------------------------------------------------------------------------
def stats_forward(sh: Shard, x: torch.Tensor, ids: torch.Tensor | None, name: str, topk: int = 0, shape=None):
    """One chunked pass over ``x [N, V_local]``.

    Returns fp32 ``m [N]`` (global max of z = x/T), ``log_s [N]`` (log sum exp(z - m)), ``ent [N]``
    (nats), ``gathered [N, k]`` (z - m at global ids, or None), ``(top_vals, top_ids)`` of z - m
    (each ``[N, topk]``, or None) and the per-chunk safe-path flags.
    Per chunk: one MAX all-reduce ``[n]`` and one SUM all-reduce ``[n, 2 + k]``.
    """
    n_rows = x.shape[0]
    dev = x.device
    m_all = torch.empty(n_rows, dtype=torch.float32, device=dev)
    log_s = torch.empty_like(m_all)
    ent = torch.empty_like(m_all)
    k = 0 if ids is None else ids.shape[1]
    gathered = torch.empty(n_rows, k, dtype=torch.float32, device=dev) if k else None
    top_v = torch.empty(n_rows, topk, dtype=torch.float32, device=dev) if topk else None
    top_i = torch.empty(n_rows, topk, dtype=torch.int64, device=dev) if topk else None
    bad: list = []
    zero = torch.zeros((), device=dev)

    def run_chunk(r0, r1, safe):
        xc = x[r0:r1]
        m = sh.all_reduce(local_max(sh, xc), dist.ReduceOp.MAX)
        if not safe:
            check_max(m, bad)
        m = torch.where(torch.isfinite(m), m, zero)  # keep the pass NaN-free; the error is raised below
        z = shifted(sh, xc, m, safe)
        if topk:
            v, i = z.topk(min(topk, sh.v_local), dim=-1)
            i = i + sh.start
            if sh.world > 1:
                vs = [torch.empty_like(v) for _ in range(sh.world)]
                is_ = [torch.empty_like(i) for _ in range(sh.world)]
                dist.all_gather(vs, v.contiguous(), group=sh.group)
                dist.all_gather(is_, i.contiguous(), group=sh.group)
                v, i = torch.cat(vs, dim=1), torch.cat(is_, dim=1)
            v2, j = v.topk(topk, dim=-1)
            top_v[r0:r1] = v2
            top_i[r0:r1] = i.gather(1, j)
        parts = []
        if k:
            loc, own = local_ids(sh, ids[r0:r1])
            parts.append(torch.where(own, z.gather(1, loc), zero))
        # in-place product, then torch's cascade sum (a BLAS dot over 151,936 fp32 terms loses ~2e-4)
        e = torch.exp(z)
        parts = [e.sum(dim=-1, keepdim=True), z.mul_(e).sum(dim=-1, keepdim=True)] + parts
        del e, z
        red = sh.all_reduce(torch.cat(parts, dim=1))
        s = red[:, 0]
        m_all[r0:r1] = m
        log_s[r0:r1] = torch.log(s)
        ent[r0:r1] = log_s[r0:r1] - red[:, 1] / s
        if k:
            gathered[r0:r1] = red[:, 2:]
        return torch.isnan(red[:, 1]).any()

    safe = two_phase(sh, n_rows, run_chunk)
    raise_bad(bad, name, sh, shape if shape is not None else x.shape)
    # zero-probability entries (-inf or padded logits, held as FILL inside the pass) leave as -inf, never
    # as a huge finite number; a top-k slot beyond the row's finite entries gets id 0 and log-prob -inf
    if gathered is not None:
        gathered.masked_fill_(gathered <= FILL / 2, float("-inf"))
    if topk:
        empty = top_v <= FILL / 2
        top_v.masked_fill_(empty, float("-inf"))
        top_i.masked_fill_(empty, 0)
    return m_all, log_s, ent, gathered, (top_v, top_i), safe


def write_grad(sh: Shard, grad: torch.Tensor, r0: int, r1: int, g: torch.Tensor) -> None:
    """Finish a chunk's fp32 gradient (zero on padded columns, times 1/T) and store it in ``grad``."""
    if sh.n_valid < sh.v_local:
        g[:, sh.n_valid:] = 0.0
    if sh.temperature != 1.0:
        g.div_(sh.temperature)
    if g.data_ptr() != grad[r0:r1].data_ptr():
        grad[r0:r1] = g


def grad_buffer(grad: torch.Tensor, r0: int, r1: int, safe: bool):
    """Where a chunk's fp32 gradient is built: directly in ``grad`` when it is fp32, else a temporary."""
    return grad[r0:r1] if grad.dtype == torch.float32 and not safe else None
