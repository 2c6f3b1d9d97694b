"""Full-vocabulary softmax statistics, entropy, log-probs and top-k on vocab-parallel logits.

Layout (Megatron's ``ColumnParallelLinear`` output head with ``parallel_output=True``): logits have
shape ``[..., V_local]`` and rank ``r`` of the tensor-parallel (TP) group holds global vocabulary ids
``[r * V_local, (r + 1) * V_local)``. Every full-vocabulary quantity is a reduction across the TP
group: one MAX all-reduce of the row max, then one SUM all-reduce of a stack of partial sums
(sum exp, sum p*z, logits gathered at global ids, partial KL sums) per chunk of tokens.

Conventions shared by every function here:

* fp32 accumulation whatever the input dtype (bf16 in: sums over 151,936 entries stay exact to fp32);
* the caller's logits are never modified (each chunk is upcast into a fresh fp32 buffer);
* leading dimensions are flattened and processed in chunks of tokens, so no fp32 copy of
  ``[N, V_local]`` exists beyond one chunk (see :data:`~megatron_eaopd.loss.vocab_shard.CHUNK_BYTES`); a chunk holding -inf logits is
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

The KL pair between two sets of logits is in :mod:`megatron_eaopd.loss.vocab_parallel_kl` and the
shard bookkeeping and the chunked statistics pass shared by both in :mod:`megatron_eaopd.loss.vocab_shard`;
the same conventions hold there.

Errors: :class:`ValueError` for NaN / +inf logits (naming the flattened row and TP rank), rows with
no finite logit, ids outside ``[0, vocab_size)``, ``k`` larger than the vocabulary, shards of unequal
size across the TP group, or a ``vocab_size`` larger than ``TP * V_local``.
"""

from __future__ import annotations

import torch

from megatron_eaopd.loss.vocab_shard import (
    CHUNK_BYTES,
    Shard,
    as_rows,
    check_ids,
    check_same_shards,
    chunk_ranges,
    default_tp_group,
    grad_buffer,
    local_ids,
    make_shard,
    shifted,
    stats_forward,
    write_grad,
)

__all__ = [
    "CHUNK_BYTES",
    "vocab_parallel_log_softmax_stats",
    "vocab_parallel_entropy",
    "vocab_parallel_log_probs",
    "vocab_parallel_log_probs_and_entropy",
    "vocab_parallel_topk",
    "default_tp_group",
]


# ----------------------------------------------------------------------------------------------
# Autograd Function: log-probs at ids and entropy of one set of vocab-parallel logits
# ----------------------------------------------------------------------------------------------
class _LogProbsEntropy(torch.autograd.Function):
    """``(log p[ids] [N, k], H [N])`` with a hand-written backward.

    d log p_i / dz_j = 1[j = i] - p_j ;  dH / dz_j = -p_j (log p_j + H)  (times 1/T).
    """

    @staticmethod
    def forward(ctx, x, ids, sh: Shard, shape):
        m, log_s, ent, gathered, _, safe = stats_forward(sh, x, ids, "logits", shape=shape)
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
        sh: Shard = ctx.sh
        grad = torch.empty_like(x)
        has_lp = g_logp is not None and g_logp.numel() > 0
        has_h = g_ent is not None
        dev = x.device
        for (r0, r1), safe in zip(chunk_ranges(sh, x.shape[0]), ctx.safe):
            safe = safe or has_h  # the entropy term multiplies log p: keep -inf out of it
            coef = torch.zeros(r1 - r0, 1, dtype=torch.float32, device=dev)
            if has_lp:
                coef -= g_logp[r0:r1].float().sum(dim=1, keepdim=True)
            if has_h:
                lp = shifted(sh, x[r0:r1], lse[r0:r1], True)  # log p
                p = torch.exp(lp)
                gh = g_ent[r0:r1].float().unsqueeze(1)
                # p * (coef - gh * (log p + H))
                g = lp.add_(ent[r0:r1].unsqueeze(1)).mul_(-gh).add_(coef).mul_(p)
                del p
            else:
                g = shifted(sh, x[r0:r1], lse[r0:r1], safe, out=grad_buffer(grad, r0, r1, safe))
                g.exp_().mul_(coef)  # -p * sum_k g_k
            if has_lp:
                loc, own = local_ids(sh, ids[r0:r1])
                g.scatter_add_(1, loc, torch.where(own, g_logp[r0:r1].float(), torch.zeros((), device=dev)))
            write_grad(sh, grad, r0, r1, g)
        return grad, None, None, None


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
    sh = make_shard(logits, group, vocab_size, temperature, chunk_size)
    check_same_shards(sh, logits)
    with torch.no_grad():
        m, log_s, *_ = stats_forward(sh, as_rows(logits), None, "logits", shape=tuple(logits.shape))
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
    sh = make_shard(logits, group, vocab_size, temperature, chunk_size)
    if ids.shape[:-1] != logits.shape[:-1] or ids.dim() != logits.dim():
        raise ValueError(
            f"ids must have shape [..., k] with the logits' leading shape {tuple(logits.shape[:-1])}, "
            f"got {tuple(ids.shape)}"
        )
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids must be int64 (or int32), got {ids.dtype}")
    check_same_shards(sh, logits)
    check_ids(ids, vocab_size if vocab_size is not None else sh.v_local * sh.world)
    lead = logits.shape[:-1]
    lp, ent = _LogProbsEntropy.apply(as_rows(logits), ids.reshape(-1, ids.shape[-1]).long(), sh, tuple(logits.shape))
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
    sh = make_shard(logits, group, vocab_size, temperature, chunk_size)
    check_same_shards(sh, logits)
    _, ent = _LogProbsEntropy.apply(as_rows(logits), None, sh, tuple(logits.shape))
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
    sh = make_shard(logits, group, vocab_size, temperature, chunk_size)
    true_v = vocab_size if vocab_size is not None else sh.v_local * sh.world
    if not isinstance(k, int) or not (1 <= k <= true_v):
        raise ValueError(f"k must be an integer in [1, vocab_size={true_v}], got {k!r}")
    check_same_shards(sh, logits)
    with torch.no_grad():
        _, log_s, _, _, (tv, ti), _ = stats_forward(sh, as_rows(logits), None, "logits", topk=k, shape=tuple(logits.shape))
    lead = logits.shape[:-1]
    return (tv - log_s.unsqueeze(1)).view(*lead, k), ti.view(*lead, k)
