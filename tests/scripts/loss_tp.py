"""Vocab-parallel loss vs the float64 single-process reference, at the TP size of the launch.

    torchrun --nproc-per-node N tests/scripts/loss_tp.py      (N in 1, 2, 4; gloo)

Every rank builds the same full logits, keeps its vocab shard, runs each public function forward and
backward, and reports ``err`` (values) and ``gerr`` (its shard of the gradient) against the reference,
and for the EOPD loss and each of its metrics the ``value`` itself (every rank must report the same).
The inputs set the PPO ratio and advantage per token so that the clip binds in both directions.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import loss_reference as ref  # noqa: E402
from _report import report  # noqa: E402

from megatron_eaopd.loss import (  # noqa: E402
    EOPDConfig,
    eopd_loss,
    teacher_signals,
    vocab_parallel_entropy,
    vocab_parallel_kl,
    vocab_parallel_kl_pair,
    vocab_parallel_log_probs,
    vocab_parallel_log_probs_and_entropy,
    vocab_parallel_log_softmax_stats,
    vocab_parallel_topk,
)

V, VOCAB, B, S = 96, 90, 3, 7  # padded vocabulary 96 (divisible by 1, 2, 4), true vocabulary 90
PADDED_VOCAB = 40  # a true vocabulary that leaves whole shards padded at TP = 2 and 4


#: PPO ratios and advantages set per token (cycled over the B x S tokens): the clip (eps = 0.2) binds
#: both ways (ratio < 0.8 with A < 0, ratio > 1.2 with A > 0) and stays off elsewhere (the same ratios
#: with the other sign of A, and ratios inside the range).
RATIOS = (0.5, 1.5, 0.7, 1.3, 0.9, 1.1, 1.0)
ADVANTAGES = (-1.0, 1.0, 0.3, -0.3)


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.3, 6.0, B * S).view(B, S, 1)[:, torch.randperm(S, generator=g)]  # entropies across tau
    student = torch.randn(B, S, V, generator=g, dtype=torch.float64) * 2.0
    teacher = torch.randn(B, S, V, generator=g, dtype=torch.float64) * scale
    teacher[..., VOCAB:] = 25.0  # padded rows: largest logits, must still get zero mass
    student[..., VOCAB:] = 30.0
    # the sampled token: the teacher's 10th..39th most likely (probability <= 1/10, so any ratio is reachable)
    rank_of_target = torch.randint(10, 40, (B, S, 1), generator=g)
    target = teacher[..., :VOCAB].argsort(dim=-1, descending=True).gather(-1, rank_of_target)[..., 0]
    n = B * S
    ratio = torch.tensor(RATIOS, dtype=torch.float64).repeat(n // len(RATIOS) + 1)[:n].view(B, S)
    adv = torch.tensor(ADVANTAGES, dtype=torch.float64).repeat(n // len(ADVANTAGES) + 1)[:n].view(B, S)
    student, old = ref.with_ratios(student, teacher, target, ratio, adv, VOCAB)
    mask = (torch.rand(B, S, generator=g) > 0.25).double()
    mask[0, 0] = 1.0
    upstream = torch.randn(B, S, generator=g, dtype=torch.float64)
    valid = mask.bool()
    binds_up, binds_down = valid & (ratio > 1.2) & (adv > 0), valid & (ratio < 0.8) & (adv < 0)
    assert bool(binds_up.any()) and bool(binds_down.any()), "inputs must make the PPO clip bind both ways"
    return student, teacher, target, old, mask, upstream


def _check_margins(st, te, target, old, variants):
    """The inputs as the kernel sees them keep every discrete decision (clip, gate) away from its boundary,
    so that fp32 and the float64 reference must agree on it."""
    for v in variants:
        t = v.get("temperature", 1.0)
        m = ref.clip_margin(st, target, old, vocab_size=VOCAB, temperature=t)
        h = ref.entropy(te, VOCAB, t)
        gm = float((h - 0.8).abs().min())
        assert m > 1e-3 and gm > 1e-4, f"inputs too close to a boundary for {v}: clip margin {m}, gate margin {gm}"


def leaf(full, rank, world, dtype):
    return ref.shard(full, rank, world).to(dtype).clone().requires_grad_(True)


def grad_err(mine, full_ref, rank, world):
    """Max error of this rank's gradient shard relative to max(1, the largest entry of the whole gradient)."""
    err = (mine.detach().double() - ref.shard(full_ref, rank, world)).abs().max()
    return float(err / max(1.0, float(full_ref.abs().max())))


def rounded(full, dtype):
    """The exact values the kernel sees: inputs rounded to ``dtype``, then float64 for the reference."""
    return full.to(dtype).double()


def run_checks(rank: int, world: int, dtype: torch.dtype, group=None) -> list[dict]:
    out = []
    student, teacher, target, old, mask, w = make_inputs()
    st, te = rounded(student, dtype), rounded(teacher, dtype)
    kw = dict(group=group, vocab_size=VOCAB)

    def rec(name, err, gerr=0.0, **extra):
        out.append(dict(check=name, err=err, gerr=gerr, **extra))

    # stats
    m, lse = vocab_parallel_log_softmax_stats(ref.shard(student, rank, world).to(dtype), **kw)
    rec("lse", ref.rel_err(lse, ref.lse(st, VOCAB)))

    # entropy (and at T = 0.7)
    for t in (1.0, 0.7):
        x = leaf(student, rank, world, dtype)
        h = vocab_parallel_entropy(x, temperature=t, **kw)
        (h.double() * w).sum().backward()
        xr = st.clone().requires_grad_(True)
        hr = ref.entropy(xr, VOCAB, t)
        (hr * w).sum().backward()
        rec(f"entropy_T{t}", ref.rel_err(h, hr), grad_err(x.grad, xr.grad, rank, world))

    # log-probs at 3 ids per row
    ids = torch.stack([target, (target * 7 + 3) % VOCAB, (target + 11) % VOCAB], dim=-1)
    wk = torch.randn(ids.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = leaf(student, rank, world, dtype)
    lp = vocab_parallel_log_probs(x, ids, **kw)
    (lp.double() * wk).sum().backward()
    xr = st.clone().requires_grad_(True)
    lr = ref.log_probs(xr, ids, VOCAB)
    (lr * wk).sum().backward()
    rec("log_probs", ref.rel_err(lp, lr), grad_err(x.grad, xr.grad, rank, world))

    # top-k
    tv, ti = vocab_parallel_topk(ref.shard(teacher, rank, world).to(dtype), 16, **kw)
    full_lp = ref.masked_log_softmax(te, VOCAB)
    rv, _ = full_lp.topk(16, dim=-1)
    # ids are compared through their values: bf16 rounding creates exact ties whose order is arbitrary
    rec("topk", ref.rel_err(tv, rv) + ref.rel_err(full_lp.gather(-1, ti), rv) + float((ti >= VOCAB).any())
        + float(any(len(set(r)) != 16 for r in ti.reshape(-1, 16).tolist())))

    # KL(p||q): gradient to p, then gradient to q
    for side in ("p", "q"):
        xp = leaf(student, rank, world, dtype)
        xq = leaf(teacher, rank, world, dtype)
        (xq if side == "p" else xp).requires_grad_(False)
        k = vocab_parallel_kl(xp, xq, **kw)
        (k.double() * w).sum().backward()
        pr = st.clone().requires_grad_(side == "p")
        qr = te.clone().requires_grad_(side == "q")
        kr = ref.kl(pr, qr, VOCAB)
        (kr * w).sum().backward()
        mine, theirs = (xp.grad, pr.grad) if side == "p" else (xq.grad, qr.grad)
        rec(f"kl_grad_{side}", ref.rel_err(k, kr), grad_err(mine, theirs, rank, world))

    # the EOPD objective, every mode and support: loss, gradient and every metric
    variants = [dict(mode="topk", fkl_support=s) for s in ("renormalize", "raw", "tail")]
    variants += [dict(mode="topk", fkl_support="tail", temperature=0.7, alpha=0.5), dict(mode="full"),
                 dict(mode="full", temperature=1.3), dict(mode="topk", alpha=0.0)]
    old32 = old.float()
    _check_margins(st, te, target, old32, variants)
    for v in variants:
        cfg = EOPDConfig(vocab_size=VOCAB, top_k=8, **v)
        xs = leaf(student, rank, world, dtype)
        xt = ref.shard(teacher, rank, world).to(dtype)
        sig = teacher_signals(xt, target, cfg, group=group)
        loss, n, metrics = eopd_loss(xs, sig, old32, mask, cfg, group=group)
        loss.backward()
        xr = st.clone().requires_grad_(True)
        lref, nref, per_tok, _ = ref.eopd(xr, te, target, old32.double(), mask, top_k=8, vocab_size=VOCAB, **v)
        lref.backward()
        name = "eopd_" + "_".join(f"{a}={b}" for a, b in v.items())
        rec(name, ref.sum_err(loss, lref, per_tok) + abs(float(n) - float(nref)),
            grad_err(xs.grad, xr.grad, rank, world), value=float(loss))
        mref = ref.eopd_metrics(st, te, target, old32.double(), mask, top_k=8, vocab_size=VOCAB, **v)
        for key in sorted(set(mref) | set(metrics)):
            if key not in metrics or key not in mref:  # a metric without a reference, or a missing one
                rec(f"{name}_metric_{key}", float("inf"))
                continue
            rec(f"{name}_metric_{key}", ref.rel_err(metrics[key], mref[key]), value=float(metrics[key]))
    return out


def run_layout_checks(rank: int, world: int, vocab: int | None, group=None, tag: str = "") -> list[dict]:
    """Every public function once (fp32), values and gradient shards against the reference, for a true
    vocabulary ``vocab`` and the group passed explicitly.

    Used with a vocabulary that leaves whole shards padded (40 of 96 columns: at TP = 2 rank 1 holds no
    real entry, at TP = 4 ranks 2 and 3), and with ``vocab=None`` and an explicit group that is not
    Megatron's TP group (every function must use the group it is given)."""
    out = []
    student, teacher, target, _, mask, w = make_inputs()
    n_real = vocab or V
    target = target % n_real
    old = (ref.log_probs(student, target[..., None], vocab)[..., 0] - 0.1).float()
    ids = torch.stack([target, (target * 7 + 3) % n_real], dim=-1)
    kw = dict(group=group, vocab_size=vocab)

    def rec(name, err, gerr=0.0):
        out.append(dict(check=f"{tag}{name}", err=err, gerr=gerr))

    _, lse = vocab_parallel_log_softmax_stats(ref.shard(student, rank, world).float(), **kw)
    rec("lse", ref.rel_err(lse, ref.lse(student, vocab)))
    x = leaf(student, rank, world, torch.float32)
    lp, h = vocab_parallel_log_probs_and_entropy(x, ids, **kw)
    h2 = vocab_parallel_entropy(x, **kw)
    lp2 = vocab_parallel_log_probs(x, ids[..., :1], **kw)
    ((lp.double() * w[..., None]).sum() + (h.double() * w).sum() + h2.double().sum() + lp2.double().sum()).backward()
    xr = student.clone().requires_grad_(True)
    lr, hr = ref.log_probs(xr, ids, vocab), ref.entropy(xr, vocab)
    ((lr * w[..., None]).sum() + (hr * w).sum() + hr.sum() + lr[..., :1].sum()).backward()
    rec("log_probs_entropy", max(ref.rel_err(lp, lr), ref.rel_err(h, hr), ref.rel_err(h2, hr), ref.rel_err(lp2, lr[..., :1])),
        grad_err(x.grad, xr.grad, rank, world))
    tv, ti = vocab_parallel_topk(ref.shard(teacher, rank, world).float(), 8, **kw)
    full_lp = ref.masked_log_softmax(teacher, vocab)
    rec("topk", ref.rel_err(tv, full_lp.topk(8, -1)[0]) + ref.rel_err(full_lp.gather(-1, ti), tv) + float((ti >= n_real).any()))
    xp, xq = leaf(student, rank, world, torch.float32), leaf(teacher, rank, world, torch.float32)
    kpq, kqp, hp, lpi = vocab_parallel_kl_pair(xp, xq, ids, **kw)
    kl_only = vocab_parallel_kl(xp, xq, **kw)
    ((kpq.double() * w).sum() + kqp.double().sum() + (hp.double() * w).sum() + kl_only.double().sum()).backward()
    pr, qr = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    rpq, rqp, rh = ref.kl(pr, qr, vocab), ref.kl(qr, pr, vocab), ref.entropy(pr, vocab)
    ((rpq * w).sum() + rqp.sum() + (rh * w).sum() + rpq.sum()).backward()
    rec("kl_pair", max(ref.rel_err(kpq, rpq), ref.rel_err(kqp, rqp), ref.rel_err(hp, rh), ref.rel_err(kl_only, rpq),
                       ref.rel_err(lpi, ref.log_probs(student, ids, vocab))),
        max(grad_err(xp.grad, pr.grad, rank, world), grad_err(xq.grad, qr.grad, rank, world)))
    for mode in ("topk", "full"):
        cfg = EOPDConfig(mode=mode, vocab_size=vocab, top_k=8)
        xs = leaf(student, rank, world, torch.float32)
        sig = teacher_signals(ref.shard(teacher, rank, world).float(), target, cfg, group=group)
        loss, n, metrics = eopd_loss(xs, sig, old, mask, cfg, group=group)
        loss.backward()
        xr = student.clone().requires_grad_(True)
        lref, nref, per_tok, _ = ref.eopd(xr, teacher, target, old.double(), mask, mode=mode, top_k=8, vocab_size=vocab)
        lref.backward()
        mref = ref.eopd_metrics(student, teacher, target, old.double(), mask, mode=mode, top_k=8, vocab_size=vocab)
        rec(f"eopd_{mode}", ref.sum_err(loss, lref, per_tok) + abs(float(n) - float(nref))
            + max(ref.rel_err(metrics[k], mref[k]) for k in mref), grad_err(xs.grad, xr.grad, rank, world))
    return out


def unequal_shards(rank: int, world: int) -> str:
    x = torch.randn(2, 10 + rank)
    try:
        vocab_parallel_entropy(x)
    except ValueError as e:
        return str(e)
    return ""


def main():
    from megatron.core import parallel_state

    from megatron_eaopd.distributed import init_distributed, init_model_parallel

    env = init_distributed(timeout_s=120)
    init_model_parallel(tp=env.world_size)
    rank, world = dist.get_rank(), dist.get_world_size()
    for dtype in (torch.float32, torch.bfloat16):
        for r in run_checks(rank, world, dtype):
            report(dtype=str(dtype), **r)
    report(check="unequal_shards", message=unequal_shards(rank, world))
    for r in run_layout_checks(rank, world, PADDED_VOCAB, tag="padded_shards_"):
        report(dtype=str(torch.float32), **r)
    # Megatron's TP group becomes each rank alone: the functions must use the group they are given
    init_model_parallel(tp=1)
    for r in run_layout_checks(rank, world, None, group=dist.group.WORLD, tag="explicit_group_"):
        report(dtype=str(torch.float32), **r)
    if world >= 4:  # TP groups that are a proper subset of the ranks: collectives must stay inside them
        init_model_parallel(tp=2)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        for r in run_layout_checks(tp_rank, 2, PADDED_VOCAB, tag="tp2_subgroup_"):
            report(dtype=str(torch.float32), **r)
    parallel_state.destroy_model_parallel()
    # without Megatron's parallel state and without a group, every rank computes alone (TP = 1): the whole
    # row is this rank's (no vocab_size, so a wrongly assumed TP = 2 would count 2 x 96 real columns)
    full = make_inputs()[0]
    h = vocab_parallel_entropy(full.float())
    report(dtype=str(torch.float32), check="no_megatron_default_tp1", err=ref.rel_err(h, ref.entropy(full)), gerr=0.0)
    dist.barrier()


if __name__ == "__main__":
    main()
