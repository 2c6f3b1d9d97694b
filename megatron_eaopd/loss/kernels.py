"""The chunked passes behind :mod:`megatron_eaopd.loss.vocab_parallel`: the shared statistics pass and the
autograd Functions with hand-written backward (log-probs + entropy; the KL pair).

Per chunk of tokens: one MAX all-reduce of the row max and one SUM all-reduce of stacked partial sums;
no collective runs inside backward (each shard's gradient is local once the global statistics are
known). See :mod:`megatron_eaopd.loss.vocab_parallel` for the conventions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_eaopd.loss.shards import (
    _FILL,
    _check_max,
    _chunks,
    _local_ids,
    _local_max,
    _raise_bad,
    _Shard,
    _shifted,
    _two_phase,
)

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
            _check_max(m, bad, sh.temperature)
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
                _check_max(m[0], bad_p, sh.temperature)
                _check_max(m[1], bad_q, sh.temperature)
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
