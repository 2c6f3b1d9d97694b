"""Full-vocabulary softmax statistics, entropy, log-probs, top-k and KL on vocab-parallel logits.

Layout (Megatron's ``ColumnParallelLinear`` output head with ``parallel_output=True``): logits have
shape ``[..., V_local]`` and rank ``r`` of the tensor-parallel (TP) group holds global vocabulary ids
``[r * V_local, (r + 1) * V_local)``. Every full-vocabulary quantity is a reduction across the TP
group: one MAX all-reduce of the row max, then one SUM all-reduce of a stack of partial sums
(sum exp, sum p*z, logits gathered at global ids, partial KL sums) per chunk of tokens.

Conventions shared by every function here:

* fp32 accumulation whatever the input dtype (bf16 in: sums over 151,936 entries stay exact to fp32);
* the caller's logits are never modified (each chunk is upcast into a fresh fp32 buffer);
* leading dimensions are flattened and processed in chunks of tokens, so no fp32 copy of
  ``[N, V_local]`` exists beyond one chunk (see :data:`CHUNK_BYTES`); a chunk holding -inf logits is
  recomputed on a clamped "safe" path (detected from its all-reduced sums: one host sync per call);
* ``vocab_size=`` (the tokenizer's true vocabulary) gives padded rows (global id >= vocab_size)
  zero probability everywhere; ``-inf`` logits are allowed (zero probability, finite gradients);
* ``temperature=T`` divides the logits before any softmax (gradients carry the 1/T factor);
* backward passes are written by hand, like Megatron's ``_VocabParallelCrossEntropy``
  (``megatron/core/tensor_parallel/cross_entropy.py``): the softmax is recomputed per chunk from the
  saved logits and the saved per-row statistics, so the only full-size tensor backward allocates is
  the logits gradient itself. No collective runs inside backward: each shard's gradient is local
  once the global statistics are known (an in-place all-reduce inside autograd would give correct
  losses and wrong gradients on non-owner shards; prior_art.md B8/B10).

Errors: :class:`ValueError` for NaN / +inf logits (naming the flattened row and TP rank), rows with
no finite logit, ids outside ``[0, vocab_size)``, ``k`` larger than the vocabulary, shards of unequal
size across the TP group, or a ``vocab_size`` larger than ``TP * V_local``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "CHUNK_BYTES",
    "vocab_parallel_log_softmax_stats",
    "vocab_parallel_entropy",
    "vocab_parallel_log_probs",
    "vocab_parallel_log_probs_and_entropy",
    "vocab_parallel_topk",
    "vocab_parallel_kl",
    "vocab_parallel_kl_pair",
    "default_tp_group",
]

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


def _check_max(m: torch.Tensor, bad: list) -> None:
    """Record (lazily, no host sync) rows whose global max is NaN/+inf or that have no finite entry."""
    bad.append((~torch.isfinite(m)) | (m <= _FILL / 2))


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


# ----------------------------------------------------------------------------------------------
# Shared forward pass: global max, log-sum-exp, entropy and logits at ids, chunked
# ----------------------------------------------------------------------------------------------
def _stats_forward(sh: _Shard, x: torch.Tensor, ids: torch.Tensor | None, name: str, topk: int = 0, shape=None):
    """One chunked pass over ``x [N, V_local]``.

    Returns fp32 ``m [N]`` (global max of z = x/T), ``log_s [N]`` (log sum exp(z - m)), ``ent [N]``
    (nats), ``gathered [N, k]`` (z - m at global ids, or None), ``(top_vals, top_ids, rest_log_prob)``
    (top-k of z - m, each ``[N, topk]``, and ``[N]`` the log of the probability mass outside the top-k,
    summed directly over the other entries so that it stays exact when the top-k holds nearly all of
    it; or three None) and the per-chunk safe-path flags.
    Per chunk: one MAX all-reduce ``[n]`` and one SUM all-reduce ``[n, 2 + k]`` (``+ 1`` with topk).
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
    rest = torch.empty(n_rows, dtype=torch.float32, device=dev) if topk else None
    bad: list = []
    zero = torch.zeros((), device=dev)

    def run_chunk(r0, r1, safe):
        xc = x[r0:r1]
        m = sh.all_reduce(_local_max(sh, xc), dist.ReduceOp.MAX)
        if not safe:
            _check_max(m, bad)
        m = torch.where(torch.isfinite(m), m, zero)  # keep the pass NaN-free; the error is raised below
        z = _shifted(sh, xc, m, safe)
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
            loc, own = _local_ids(sh, ids[r0:r1])
            parts.append(torch.where(own, z.gather(1, loc), zero))
        e = torch.exp(z)
        if topk:
            # the mass outside the global top-k, summed directly (1 - sum of the top-k would cancel): this
            # shard's top-k entries are taken out of e (an accumulating index_put adds -e at the owned ids
            # and 0 at the clamped ids of the others: exact, no host sync) and added back to the sums
            loc_k, own_k = _local_ids(sh, top_i[r0:r1])
            e_k = torch.where(own_k, e.gather(1, loc_k), zero)
            zk_ek = torch.where(own_k, z.gather(1, loc_k), zero) * e_k
            rows_k = torch.arange(r1 - r0, device=dev).unsqueeze(1).expand_as(loc_k)
            e.index_put_((rows_k, loc_k), -e_k, accumulate=True)
            rest_sum = e.sum(dim=-1, keepdim=True)
            parts = [rest_sum + e_k.sum(dim=-1, keepdim=True),
                     z.mul_(e).sum(dim=-1, keepdim=True) + zk_ek.sum(dim=-1, keepdim=True)] + parts + [rest_sum]
        else:
            # in-place product, then torch's cascade sum (a BLAS dot over 151,936 fp32 terms loses ~2e-4)
            parts = [e.sum(dim=-1, keepdim=True), z.mul_(e).sum(dim=-1, keepdim=True)] + parts
        del e, z
        red = sh.all_reduce(torch.cat(parts, dim=1))
        s = red[:, 0]
        m_all[r0:r1] = m
        log_s[r0:r1] = torch.log(s)
        ent[r0:r1] = log_s[r0:r1] - red[:, 1] / s
        if k:
            gathered[r0:r1] = red[:, 2:2 + k]
        if topk:
            rest[r0:r1] = torch.log(red[:, 2 + k]) - log_s[r0:r1]
        return torch.isnan(red[:, 1]).any()

    safe = _two_phase(sh, n_rows, run_chunk)
    _raise_bad(bad, name, sh, shape if shape is not None else x.shape)
    # zero-probability entries (-inf or padded logits, held as _FILL inside the pass) leave as -inf, never
    # as a huge finite number; a top-k slot beyond the row's finite entries gets id 0 and log-prob -inf
    if gathered is not None:
        gathered.masked_fill_(gathered <= _FILL / 2, float("-inf"))
    if topk:
        empty = top_v <= _FILL / 2
        top_v.masked_fill_(empty, float("-inf"))
        top_i.masked_fill_(empty, 0)
    return m_all, log_s, ent, gathered, (top_v, top_i, rest), safe


def _write_grad(sh: _Shard, grad: torch.Tensor, r0: int, r1: int, g: torch.Tensor) -> None:
    """Finish a chunk's fp32 gradient (zero on padded columns, times 1/T) and store it in ``grad``."""
    if sh.n_valid < sh.v_local:
        g[:, sh.n_valid:] = 0.0
    if sh.temperature != 1.0:
        g.div_(sh.temperature)
    if g.data_ptr() != grad[r0:r1].data_ptr():
        grad[r0:r1] = g


def _grad_buffer(sh: _Shard, x: torch.Tensor, grad: torch.Tensor, r0: int, r1: int, safe: bool):
    """Where a chunk's fp32 gradient is built: directly in ``grad`` when it is fp32, else a temporary."""
    return grad[r0:r1] if grad.dtype == torch.float32 and not safe else None


# ----------------------------------------------------------------------------------------------
# Autograd Function: log-probs at ids and entropy of one set of vocab-parallel logits
# ----------------------------------------------------------------------------------------------
class _LogProbsEntropy(torch.autograd.Function):
    """``(log p[ids] [N, k], H [N])`` with a hand-written backward.

    d log p_i / dz_j = 1[j = i] - p_j ;  dH / dz_j = -p_j (log p_j + H)  (times 1/T).
    """

    @staticmethod
    def forward(ctx, x, ids, sh: _Shard, shape):
        m, log_s, ent, gathered, _, safe = _stats_forward(sh, x, ids, "logits", shape=shape)
        logp = gathered - log_s.unsqueeze(1) if gathered is not None else None
        ctx.save_for_backward(x, ids, m + log_s, ent)
        ctx.sh, ctx.safe = sh, safe
        ctx.set_materialize_grads(False)
        if logp is None:
            logp = torch.empty(x.shape[0], 0, dtype=torch.float32, device=x.device)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        x, ids, lse, ent = ctx.saved_tensors
        sh: _Shard = ctx.sh
        grad = torch.empty_like(x)
        has_lp = g_logp is not None and g_logp.numel() > 0
        has_h = g_ent is not None
        dev = x.device
        for (r0, r1), safe in zip(_chunks(sh, x.shape[0]), ctx.safe):
            safe = safe or has_h  # the entropy term multiplies log p: keep -inf out of it
            coef = torch.zeros(r1 - r0, 1, dtype=torch.float32, device=dev)
            if has_lp:
                coef -= g_logp[r0:r1].float().sum(dim=1, keepdim=True)
            if has_h:
                lp = _shifted(sh, x[r0:r1], lse[r0:r1], True)  # log p
                p = torch.exp(lp)
                gh = g_ent[r0:r1].float().unsqueeze(1)
                # p * (coef - gh * (log p + H))
                g = lp.add_(ent[r0:r1].unsqueeze(1)).mul_(-gh).add_(coef).mul_(p)
                del p
            else:
                g = _shifted(sh, x[r0:r1], lse[r0:r1], safe, out=_grad_buffer(sh, x, grad, r0, r1, safe))
                g.exp_().mul_(coef)  # -p * sum_k g_k
            if has_lp:
                loc, own = _local_ids(sh, ids[r0:r1])
                g.scatter_add_(1, loc, torch.where(own, g_logp[r0:r1].float(), torch.zeros((), device=dev)))
            _write_grad(sh, grad, r0, r1, g)
        return grad, None, None, None


# ----------------------------------------------------------------------------------------------
# Autograd Function: KL(p||q), KL(q||p) and H(p) of two alike-sharded sets of logits
# ----------------------------------------------------------------------------------------------
class _KLPair(torch.autograd.Function):
    """``(KL(p||q) [N], KL(q||p) [N], H(p) [N], log p[ids] [N, k] (no grad))``, one pass.

    Gradients (per shard, exact once the global statistics are known; times 1/T):
      w.r.t. p-logits: dKL(p||q) = p (log p - log q - KL(p||q));  dKL(q||p) = p - q;
                       dH(p) = -p (log p + H(p))
      w.r.t. q-logits: dKL(p||q) = q - p;  dKL(q||p) = q (log q - log p - KL(q||p))
    Per chunk: one MAX all-reduce ``[2, n]`` and one SUM all-reduce ``[n, 5 + k]``.
    """

    @staticmethod
    def forward(ctx, xp, xq, ids, sh: _Shard, shape):
        n_rows, dev = xp.shape[0], xp.device
        # rows: kl_pq, kl_qp, h_p, lse_p, lse_q
        out = torch.empty(5, n_rows, dtype=torch.float32, device=dev)
        k = 0 if ids is None else ids.shape[1]
        logp_ids = torch.empty(n_rows, k, dtype=torch.float32, device=dev)
        bad_p: list = []
        bad_q: list = []
        zero = torch.zeros((), device=dev)

        def run_chunk(r0, r1, safe):
            m = sh.all_reduce(torch.stack([_local_max(sh, xp[r0:r1]), _local_max(sh, xq[r0:r1])]), dist.ReduceOp.MAX)
            if not safe:
                _check_max(m[0], bad_p)
                _check_max(m[1], bad_q)
            m = torch.where(torch.isfinite(m), m, zero)
            zp = _shifted(sh, xp[r0:r1], m[0], safe)
            zq = _shifted(sh, xq[r0:r1], m[1], safe)
            gathered = None
            if k:
                loc, own = _local_ids(sh, ids[r0:r1])
                gathered = torch.where(own, zp.gather(1, loc), zero)
            ep, eq = torch.exp(zp), torch.exp(zq)
            sums = [ep.sum(-1), eq.sum(-1)]
            d = torch.sub(zp, zq, out=zq)  # z_p - z_q, reusing z_q's buffer
            # in-place products, then torch's cascade sums (accurate over 151,936 fp32 terms)
            sums += [zp.mul_(ep).sum(-1), ep.mul_(d).sum(-1), eq.mul_(d).sum(-1)]
            del ep, eq, d, zp, zq
            parts = [t.unsqueeze(1) for t in sums] + ([gathered] if k else [])
            red = sh.all_reduce(torch.cat(parts, dim=1))
            sp, sq, b_p, a_p, a_q = (red[:, i] for i in range(5))
            lsp, lsq = torch.log(sp), torch.log(sq)
            out[0, r0:r1] = a_p / sp - lsp + lsq
            out[1, r0:r1] = -a_q / sq - lsq + lsp
            out[2, r0:r1] = lsp - b_p / sp
            out[3, r0:r1] = m[0] + lsp
            out[4, r0:r1] = m[1] + lsq
            if k:
                logp_ids[r0:r1] = red[:, 5:] - lsp.unsqueeze(1)
            return torch.isnan(red[:, 2:5]).any()

        safe = _two_phase(sh, n_rows, run_chunk)
        _raise_bad(bad_p, "p_logits", sh, shape)
        _raise_bad(bad_q, "q_logits", sh, shape)
        # mass where the other side has zero probability (a _FILL logit) makes the KL infinite: say so
        out[:2].masked_fill_(out[:2] > -_FILL / 1e3, float("inf"))
        if k:
            logp_ids.masked_fill_(logp_ids <= _FILL / 2, float("-inf"))
        # an infinite KL (p > 0 where q = 0) has no usable gradient; keep backward NaN-free for masked rows
        ctx.save_for_backward(xp, xq, torch.nan_to_num(out, posinf=0.0, neginf=0.0))
        ctx.sh, ctx.safe = sh, safe
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(logp_ids)
        return out[0].clone(), out[1].clone(), out[2].clone(), logp_ids

    @staticmethod
    def backward(ctx, g_pq, g_qp, g_h, _g_ids):
        xp, xq, out = ctx.saved_tensors
        sh: _Shard = ctx.sh
        need_p, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_p = torch.empty_like(xp) if need_p else None
        grad_q = torch.empty_like(xq) if need_q else None
        dev = xp.device

        def col(g, r0, r1):
            if g is None:
                return torch.zeros(r1 - r0, 1, dtype=torch.float32, device=dev)
            return g[r0:r1].float().unsqueeze(1)

        for (r0, r1), safe in zip(_chunks(sh, xp.shape[0]), ctx.safe):
            a, b, c = col(g_pq, r0, r1), col(g_qp, r0, r1), col(g_h, r0, r1)
            kl_pq, kl_qp, h_p = (out[i, r0:r1].unsqueeze(1) for i in range(3))
            lp = _shifted(sh, xp[r0:r1], out[3, r0:r1], safe)  # log p
            lq = _shifted(sh, xq[r0:r1], out[4, r0:r1], safe)  # log q
            p, q = torch.exp(lp), torch.exp(lq)
            if need_p:
                # p * [(a - c) log p - a log q + (b - a KL_pq - c H)] - b q
                t = torch.mul(lp, a - c, out=_grad_buffer(sh, xp, grad_p, r0, r1, safe))
                t.addcmul_(lq, -a).add_(b - a * kl_pq - c * h_p).mul_(p).addcmul_(q, -b)
                _write_grad(sh, grad_p, r0, r1, t)
                del t
            if need_q:
                # q * [b log q - b log p + (a - b KL_qp)] - a p
                t = torch.mul(lq, b, out=_grad_buffer(sh, xq, grad_q, r0, r1, safe))
                t.addcmul_(lp, -b).add_(a - b * kl_qp).mul_(q).addcmul_(p, -a)
                _write_grad(sh, grad_q, r0, r1, t)
                del t
        return grad_p, grad_q, None, None, None


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def vocab_parallel_log_softmax_stats(
    logits: torch.Tensor, *, group=None, vocab_size: int | None = None, temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row max and log-sum-exp of the full-vocabulary softmax of vocab-parallel logits (no grad).

    Args:
        logits: ``[..., V_local]`` float (fp32/bf16/fp16), rank r holding global ids ``[r*V_local, (r+1)*V_local)``.
        group: tensor-parallel process group (default: Megatron's TP group, or TP = 1).
        vocab_size: true vocabulary size; padded rows (global id >= vocab_size) are excluded.
        temperature: logits are divided by it first.
        chunk_size: tokens per chunk (default: :data:`CHUNK_BYTES` of fp32 work buffer).
    Returns:
        ``(max [...], lse [...])`` fp32, identical on every TP rank; ``lse = log sum_v exp(z_v / T)``.
    Raises:
        ValueError: NaN/+inf logits, a row without a finite logit, unequal shards, bad vocab_size.
    Source: the max/sum-exp reductions of Megatron's ``VocabParallelCrossEntropy.calculate_logits_max``
    and ``calculate_predicted_logits``.
    """
    sh = _shard(logits, group, vocab_size, temperature, chunk_size)
    _check_same_shards(sh, logits)
    with torch.no_grad():
        m, log_s, *_ = _stats_forward(sh, _rows(logits), None, "logits", shape=tuple(logits.shape))
    lead = logits.shape[:-1]
    return m.view(lead), (m + log_s).view(lead)


def vocab_parallel_log_probs_and_entropy(
    logits: torch.Tensor, ids: torch.Tensor, *, group=None, vocab_size: int | None = None,
    temperature: float = 1.0, chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary log-softmax at global ``ids`` and the entropy, in one pass; both differentiable.

    Args:
        logits: ``[..., V_local]`` vocab-parallel logits (any float dtype; accumulated in fp32).
        ids: ``[..., k]`` int64 global vocabulary ids (same on every TP rank), ``0 <= id < vocab_size``.
        group, vocab_size, temperature, chunk_size: as in :func:`vocab_parallel_log_softmax_stats`.
    Returns:
        ``log_probs [..., k]`` fp32 (nats, ``log softmax(z/T)[id]``) and ``entropy [...]`` fp32 (nats).
    Raises:
        ValueError: shape mismatch, ids out of range, and the errors of the stats pass.
    Source: Megatron ``_VocabParallelCrossEntropy`` (masked gather + SUM all-reduce, hand-written
    backward ``onehot - softmax``), extended to k ids and the entropy ``-sum p log p``.
    """
    sh = _shard(logits, group, vocab_size, temperature, chunk_size)
    if ids.shape[:-1] != logits.shape[:-1] or ids.dim() != logits.dim():
        raise ValueError(
            f"ids must have shape [..., k] with the logits' leading shape {tuple(logits.shape[:-1])}, "
            f"got {tuple(ids.shape)}"
        )
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids must be int64 (or int32), got {ids.dtype}")
    _check_same_shards(sh, logits)
    _check_ids(sh, ids, vocab_size if vocab_size is not None else sh.v_local * sh.world)
    lead = logits.shape[:-1]
    lp, ent = _LogProbsEntropy.apply(_rows(logits), ids.reshape(-1, ids.shape[-1]).long(), sh, tuple(logits.shape))
    return lp.view(*lead, ids.shape[-1]), ent.view(lead)


def vocab_parallel_log_probs(
    logits: torch.Tensor, ids: torch.Tensor, *, group=None, vocab_size: int | None = None,
    temperature: float = 1.0, chunk_size: int | None = None,
) -> torch.Tensor:
    """Full-vocabulary log-softmax of vocab-parallel ``logits`` at global ``ids``; differentiable.

    Args:
        logits: ``[..., V_local]`` (any float dtype; fp32 accumulation).
        ids: ``[..., k]`` int64 global ids, identical on every TP rank.
    Returns:
        ``[..., k]`` fp32 log-probabilities (nats). Gradients reach every shard's logits
        (``onehot - softmax``, times 1/T), not only the shard that owns the id.
    Raises:
        ValueError: see :func:`vocab_parallel_log_probs_and_entropy`.
    Source: Megatron ``tensor_parallel.vocab_parallel_cross_entropy`` (negated, k ids).
    """
    lp, _ = vocab_parallel_log_probs_and_entropy(
        logits, ids, group=group, vocab_size=vocab_size, temperature=temperature, chunk_size=chunk_size
    )
    return lp


def vocab_parallel_entropy(
    logits: torch.Tensor, *, group=None, vocab_size: int | None = None, temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Full-vocabulary entropy ``H = -sum_v p_v log p_v`` (nats) of vocab-parallel logits; differentiable.

    Args:
        logits: ``[..., V_local]`` (any float dtype; fp32 accumulation).
    Returns:
        ``[...]`` fp32 entropy in nats. Backward: ``dH/dz = -p (log p + H) / T`` on every shard.
    Raises:
        ValueError: see :func:`vocab_parallel_log_softmax_stats`.
    Source: method.md "teacher entropy over the FULL vocabulary"; NeMo-RL ``ChunkedDistributedEntropy``
    (same reduction; backward written here by hand).
    """
    sh = _shard(logits, group, vocab_size, temperature, chunk_size)
    _check_same_shards(sh, logits)
    _, ent = _LogProbsEntropy.apply(_rows(logits), None, sh, tuple(logits.shape))
    return ent.view(logits.shape[:-1])


def vocab_parallel_topk(
    logits: torch.Tensor, k: int, *, group=None, vocab_size: int | None = None, temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k of the full-vocabulary log-softmax of vocab-parallel logits (no gradient).

    Local top-k per shard, all-gather of (values, global ids) across TP, top-k again.

    Args:
        logits: ``[..., V_local]``.
        k: number of entries, ``1 <= k <= vocab_size``.
    Returns:
        ``(log_probs [..., k] fp32 nats, descending; ids [..., k] int64 global ids)``, identical on all
        TP ranks. Padded rows never appear.
    Raises:
        ValueError: k out of range, and the errors of the stats pass.
    Source: NeMo-RL ``distributed_vocab_topk`` (local top-k, all-gather, top-k).
    """
    sh = _shard(logits, group, vocab_size, temperature, chunk_size)
    true_v = vocab_size if vocab_size is not None else sh.v_local * sh.world
    if not isinstance(k, int) or not (1 <= k <= true_v):
        raise ValueError(f"k must be an integer in [1, vocab_size={true_v}], got {k!r}")
    _check_same_shards(sh, logits)
    with torch.no_grad():
        _, log_s, _, _, (tv, ti, _), _ = _stats_forward(sh, _rows(logits), None, "logits", topk=k,
                                                        shape=tuple(logits.shape))
    lead = logits.shape[:-1]
    return (tv - log_s.unsqueeze(1)).view(*lead, k), ti.view(*lead, k)


def vocab_parallel_kl_pair(
    p_logits: torch.Tensor, q_logits: torch.Tensor, ids: torch.Tensor | None = None, *, group=None,
    vocab_size: int | None = None, temperature: float = 1.0, chunk_size: int | None = None,
):
    """``KL(p||q)``, ``KL(q||p)``, ``H(p)`` and (no grad) ``log p`` at ``ids``, in one fused pass.

    The fused kernel behind :func:`vocab_parallel_kl` and EOPD's exact ``mode="full"``: per chunk one
    MAX all-reduce of both row maxima and one SUM all-reduce of (sum e_p, sum e_q, sum e_p (z_p - z_q),
    sum e_q (z_p - z_q), sum e_p z_p, logits at ids).

    Args:
        p_logits, q_logits: ``[..., V_local]``, sharded alike; either may require grad.
        ids: optional ``[..., k]`` global ids at which ``log p`` is returned (metrics; no gradient).
    Returns:
        ``(kl_pq [...], kl_qp [...], entropy_p [...], log_p_at_ids [..., k] or None)``, fp32 nats.
    Raises:
        ValueError: shape mismatch between the two logits, and the errors of the stats pass.
    Source: method.md "Exact full-vocabulary mode" (gradients p(log p - log q - KL) and p - q).
    """
    if p_logits.shape != q_logits.shape:
        raise ValueError(
            f"p_logits {tuple(p_logits.shape)} and q_logits {tuple(q_logits.shape)} must have the same shape "
            f"(both [..., V_local] on the same vocab shards)"
        )
    sh = _shard(p_logits, group, vocab_size, temperature, chunk_size, name="p_logits")
    _check_same_shards(sh, p_logits)
    lead = p_logits.shape[:-1]
    ids2 = None
    if ids is not None:
        if ids.shape[:-1] != lead:
            raise ValueError(f"ids must have shape [..., k] with leading shape {tuple(lead)}, got {tuple(ids.shape)}")
        _check_ids(sh, ids, vocab_size if vocab_size is not None else sh.v_local * sh.world)
        ids2 = ids.reshape(-1, ids.shape[-1]).long()
    kl_pq, kl_qp, h_p, lp_ids = _KLPair.apply(_rows(p_logits), _rows(q_logits), ids2, sh, tuple(p_logits.shape))
    lp_ids = lp_ids.view(*lead, ids.shape[-1]) if ids is not None else None
    return kl_pq.view(lead), kl_qp.view(lead), h_p.view(lead), lp_ids


def vocab_parallel_kl(
    p_logits: torch.Tensor, q_logits: torch.Tensor, *, group=None, vocab_size: int | None = None,
    temperature: float = 1.0, chunk_size: int | None = None,
) -> torch.Tensor:
    """Exact ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` over the full vocabulary (nats).

    Args:
        p_logits, q_logits: ``[..., V_local]`` logits sharded alike (any float dtype); gradients flow to
            whichever requires grad: ``p (log p - log q - KL)/T`` for p, ``(q - p)/T`` for q.
    Returns:
        ``[...]`` fp32 KL in nats (>= 0 up to rounding).
    Raises:
        ValueError: see :func:`vocab_parallel_kl_pair`.
    Source: method.md, "Exact full-vocabulary mode".
    """
    return vocab_parallel_kl_pair(
        p_logits, q_logits, group=group, vocab_size=vocab_size, temperature=temperature, chunk_size=chunk_size
    )[0]
