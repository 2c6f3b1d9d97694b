"""Exact KL divergences between two alike-sharded sets of vocab-parallel logits, in one fused pass.

``KL(p||q)``, ``KL(q||p)`` and ``H(p)`` over the full vocabulary with a hand-written backward for both
sides: the kernel behind :func:`vocab_parallel_kl` and EOPD's exact ``mode="full"``. Layout, chunking,
fp32 accumulation, padded rows, -inf logits and temperature follow the conventions of
:mod:`megatron_eaopd.loss.vocab_parallel`; the shard bookkeeping is :mod:`megatron_eaopd.loss.vocab_shard`.
A side with mass where the other has zero probability gives ``+inf`` (never a huge finite number).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_eaopd.loss.vocab_shard import (
    FILL,
    Shard,
    as_rows,
    check_ids,
    check_max,
    check_same_shards,
    chunk_ranges,
    grad_buffer,
    local_ids,
    local_max,
    make_shard,
    raise_bad,
    shifted,
    two_phase,
    write_grad,
)

__all__ = ["vocab_parallel_kl_pair", "vocab_parallel_kl"]


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
    def forward(ctx, xp, xq, ids, sh: Shard, shape):
        n_rows, dev = xp.shape[0], xp.device
        # rows: kl_pq, kl_qp, h_p, lse_p, lse_q
        out = torch.empty(5, n_rows, dtype=torch.float32, device=dev)
        k = 0 if ids is None else ids.shape[1]
        logp_ids = torch.empty(n_rows, k, dtype=torch.float32, device=dev)
        bad_p: list = []
        bad_q: list = []
        zero = torch.zeros((), device=dev)

        def run_chunk(r0, r1, safe):
            m = sh.all_reduce(torch.stack([local_max(sh, xp[r0:r1]), local_max(sh, xq[r0:r1])]), dist.ReduceOp.MAX)
            if not safe:
                check_max(m[0], bad_p)
                check_max(m[1], bad_q)
            m = torch.where(torch.isfinite(m), m, zero)
            zp = shifted(sh, xp[r0:r1], m[0], safe)
            zq = shifted(sh, xq[r0:r1], m[1], safe)
            gathered = None
            if k:
                loc, own = local_ids(sh, ids[r0:r1])
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

        safe = two_phase(sh, n_rows, run_chunk)
        raise_bad(bad_p, "p_logits", sh, shape)
        raise_bad(bad_q, "q_logits", sh, shape)
        # mass where the other side has zero probability (a FILL logit) makes the KL infinite: say so
        out[:2].masked_fill_(out[:2] > -FILL / 1e3, float("inf"))
        if k:
            logp_ids.masked_fill_(logp_ids <= FILL / 2, float("-inf"))
        # an infinite KL (p > 0 where q = 0) has no usable gradient; keep backward NaN-free for masked rows
        ctx.save_for_backward(xp, xq, torch.nan_to_num(out, posinf=0.0, neginf=0.0))
        ctx.sh, ctx.safe = sh, safe
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(logp_ids)
        return out[0].clone(), out[1].clone(), out[2].clone(), logp_ids

    @staticmethod
    def backward(ctx, g_pq, g_qp, g_h, _g_ids):
        xp, xq, out = ctx.saved_tensors
        sh: Shard = ctx.sh
        need_p, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_p = torch.empty_like(xp) if need_p else None
        grad_q = torch.empty_like(xq) if need_q else None
        dev = xp.device

        def col(g, r0, r1):
            if g is None:
                return torch.zeros(r1 - r0, 1, dtype=torch.float32, device=dev)
            return g[r0:r1].float().unsqueeze(1)

        for (r0, r1), safe in zip(chunk_ranges(sh, xp.shape[0]), ctx.safe):
            a, b, c = col(g_pq, r0, r1), col(g_qp, r0, r1), col(g_h, r0, r1)
            kl_pq, kl_qp, h_p = (out[i, r0:r1].unsqueeze(1) for i in range(3))
            lp = shifted(sh, xp[r0:r1], out[3, r0:r1], safe)  # log p
            lq = shifted(sh, xq[r0:r1], out[4, r0:r1], safe)  # log q
            p, q = torch.exp(lp), torch.exp(lq)
            if need_p:
                # p * [(a - c) log p - a log q + (b - a KL_pq - c H)] - b q
                t = torch.mul(lp, a - c, out=grad_buffer(grad_p, r0, r1, safe))
                t.addcmul_(lq, -a).add_(b - a * kl_pq - c * h_p).mul_(p).addcmul_(q, -b)
                write_grad(sh, grad_p, r0, r1, t)
                del t
            if need_q:
                # q * [b log q - b log p + (a - b KL_qp)] - a p
                t = torch.mul(lq, b, out=grad_buffer(grad_q, r0, r1, safe))
                t.addcmul_(lp, -b).add_(a - b * kl_qp).mul_(q).addcmul_(p, -a)
                write_grad(sh, grad_q, r0, r1, t)
                del t
        return grad_p, grad_q, None, None, None


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
    sh = make_shard(p_logits, group, vocab_size, temperature, chunk_size, name="p_logits")
    check_same_shards(sh, p_logits)
    lead = p_logits.shape[:-1]
    ids2 = None
    if ids is not None:
        if ids.shape[:-1] != lead:
            raise ValueError(f"ids must have shape [..., k] with leading shape {tuple(lead)}, got {tuple(ids.shape)}")
        check_ids(ids, vocab_size if vocab_size is not None else sh.v_local * sh.world)
        ids2 = ids.reshape(-1, ids.shape[-1]).long()
    kl_pq, kl_qp, h_p, lp_ids = _KLPair.apply(as_rows(p_logits), as_rows(q_logits), ids2, sh, tuple(p_logits.shape))
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
