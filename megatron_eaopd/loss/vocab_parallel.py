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
  losses and wrong gradients on non-owner shards; docs/design.md, "Failure classes").

Errors: :class:`ValueError` for NaN / +inf logits (naming the flattened row and TP rank), rows with
no finite logit, ids outside ``[0, vocab_size)``, ``k`` larger than the vocabulary, shards of unequal
size across the TP group, or a ``vocab_size`` larger than ``TP * V_local``.
"""

from __future__ import annotations

import torch

from megatron_eaopd.loss.kernels import _KLPair, _LogProbsEntropy, _stats_forward
from megatron_eaopd.loss.shards import (  # noqa: F401  (CHUNK_BYTES, default_tp_group: public names)
    CHUNK_BYTES,
    _check_ids,
    _check_same_shards,
    _rows,
    _shard,
    default_tp_group,
)

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
    Source: docs/method.md "teacher entropy over the FULL vocabulary"; NeMo-RL ``ChunkedDistributedEntropy``
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
    Source: docs/method.md "Exact full-vocabulary mode" (gradients p(log p - log q - KL) and p - q).
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
    Source: docs/method.md, "Exact full-vocabulary mode".
    """
    return vocab_parallel_kl_pair(
        p_logits, q_logits, group=group, vocab_size=vocab_size, temperature=temperature, chunk_size=chunk_size
    )[0]
