"""The objective variants (rkl_baseline, gates, tau_quantile) vs the float64 reference, at the launch's TP size.

    torchrun --nproc-per-node N tests/scripts/objectives_tp.py      (N in 1, 2, 4; gloo)

Every rank builds the same full logits and keeps its vocab shard (TP = N); each variant's loss value,
its gradient shard and its reduced metrics are compared with tests/objectives_reference.py. Then the
world acts as the data-parallel group (TP = 1 per rank): each rank holds some of the micro-batches,
``for_iteration`` must find the tau of the whole batch and the summed loss must equal the
single-process one.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import loss_reference as ref  # noqa: E402
import objectives_reference as oref  # noqa: E402
from _report import report  # noqa: E402

from megatron_eaopd.loss import EOPDConfig, build_objective  # noqa: E402

V, VOCAB, B, S, K = 96, 90, 4, 6, 8  # padded vocabulary 96 (divisible by 1, 2, 4), true vocabulary 90

#: Every variant beyond the paper, alone and combined, in both modes.
VARIANTS = [
    dict(rkl_baseline="kl"),
    dict(rkl_baseline="kl", fkl_support="tail"),
    dict(gate="hard_ge"),
    dict(gate="sigmoid", gate_sharpness=0.3),
    dict(tau_quantile=0.7),
    dict(rkl_baseline="kl", gate="sigmoid", gate_sharpness=0.5, tau_quantile=0.4, fkl_support="tail", temperature=0.8),
    dict(mode="full", rkl_baseline="kl"),
    dict(mode="full", gate="sigmoid", gate_sharpness=0.2),
    dict(mode="full", tau_quantile=0.5, gate="hard_ge"),
]

#: Reduced metrics compared with the reference (absolute error, see METRIC_TOL in the test).
METRICS = ("tau", "gate_fraction", "fkl_gated", "teacher_high_entropy_fraction", "student_high_entropy_fraction",
           "advantage", "advantage_var", "advantage_var_baselined", "baseline_kl", "rkl_term")


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.3, 6.0, B * S).view(B, S, 1)[:, torch.randperm(S, generator=g)]  # entropies across tau
    student = torch.randn(B, S, V, generator=g, dtype=torch.float64) * 2.0
    teacher = torch.randn(B, S, V, generator=g, dtype=torch.float64) * scale
    teacher[..., VOCAB:] = 25.0  # padded rows: largest logits, must still get zero mass
    student[..., VOCAB:] = 30.0
    target = torch.randint(0, VOCAB, (B, S), generator=g)
    # old log-probs of a nearby policy at T = 1: some ratios fall outside the clip range
    old = ref.log_probs(student + 0.15 * torch.randn(B, S, V, generator=g, dtype=torch.float64), target[..., None],
                        VOCAB)[..., 0]
    mask = (torch.rand(B, S, generator=g) > 0.2).double()
    mask[0, 0] = 1.0
    return student, teacher, target, old, mask


class FakeTeacher:
    """The teacher phase's output for precomputed signals: ``for_micro_batch(mb)`` -> rows ``mb.rows``."""

    def __init__(self, sig):
        self.sig = sig

    def for_micro_batch(self, mb):
        return self.sig.select(mb.rows)


class MB:
    def __init__(self, index, rows, loss_mask):
        self.index, self.rows, self.loss_mask = index, rows, loss_mask


def _name(v):
    return "_".join(f"{a}={b}" for a, b in v.items())


def run_checks(rank: int, world: int, dtype: torch.dtype, group=None, dp_group=None) -> list[dict]:
    """Every variant at TP = ``world`` (this rank's shard). ``dp_group``: a group of this rank alone when
    distributed (the TP peers hold the same tokens, so the quantile must not gather them twice)."""
    out = []
    student, teacher, target, old, mask = make_inputs()
    st, te = student.to(dtype).double(), teacher.to(dtype).double()  # what the kernel sees, in float64
    # the teacher's mass outside its top-k (TeacherSignals.rest_log_prob), against float64 on the same ids;
    # a sharp teacher (top-k mass within ~1e-6 of 1) is where log(1 - sum exp(top-k)) would lose it
    for sharp in (1.0, 4.0):
        xt = ref.shard(teacher * sharp, rank, world).to(dtype)
        sig = build_objective(EOPDConfig(vocab_size=VOCAB, top_k=K)).teacher_signals(xt, target, group=group)
        lp = ref.masked_log_softmax((teacher * sharp).to(dtype).double(), VOCAB)
        outside = torch.ones_like(lp, dtype=torch.bool).scatter_(-1, sig.topk_ids, False) & torch.isfinite(lp)
        rest = torch.logsumexp(torch.where(outside, lp, float("-inf")), dim=-1)
        out.append(dict(check=f"rest_log_prob_x{sharp}", kind="rest",
                        err=float(((sig.rest_log_prob.double() - rest) / rest.abs().clamp(min=1.0)).abs().max()),
                        gerr=0.0))
    for v in VARIANTS:
        cfg = EOPDConfig(vocab_size=VOCAB, top_k=K, **v)
        obj = build_objective(cfg)
        xs = ref.shard(student, rank, world).to(dtype).clone().requires_grad_(True)
        xt = ref.shard(teacher, rank, world).to(dtype)
        sig = obj.teacher_signals(xt, target, group=group)
        mbs = [MB(0, slice(0, B), mask.bool())]
        it_obj = obj.for_iteration(FakeTeacher(sig), mbs, dp_group=dp_group)
        loss, n, sums = it_obj.loss(xs, sig, old.float(), mask, group=group)
        loss.backward()
        metrics = it_obj.reduce(sums)
        xr = st.clone().requires_grad_(True)
        lref, nref, parts = oref.eopd_variant(xr, te, target, old.float().double(), mask, top_k=K, vocab_size=VOCAB,
                                              **v)
        lref.backward()
        name = "variant_" + _name(v)
        out.append(dict(check=name, err=ref.rel_err(loss, lref) + abs(float(n) - float(nref)),
                        gerr=ref.rel_err(xs.grad, ref.shard(xr.grad, rank, world))))
        for key in METRICS:
            out.append(dict(check=f"metric_{key}_{_name(v)}", kind="metric",
                            err=abs(float(metrics[key]) - parts["metrics"][key]), gerr=0.0))
    return out


def dp_checks(rank: int, world: int, dp_group, single) -> list[dict]:
    """The world as the DP group (TP = 1 per rank, ``single`` = a group of this rank alone): tau and the
    global loss of rows split over ranks."""
    out = []
    student, teacher, target, old, mask = make_inputs(seed=1)
    rows = torch.arange(B).chunk(world)[rank]  # B = 4 rows: 4, 2 or 1 per rank
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    for v in (dict(tau_quantile=0.6), dict(tau_quantile=0.3, gate="sigmoid", rkl_baseline="kl")):
        cfg = EOPDConfig(vocab_size=VOCAB, top_k=K, **v)
        obj = build_objective(cfg)
        sig = obj.teacher_signals(teacher[lo:hi].float(), target[lo:hi], group=single)
        mbs = [MB(i, slice(i, i + 1), mask[lo + i:lo + i + 1].bool()) for i in range(hi - lo)]  # 1 row each
        it_obj = obj.for_iteration(FakeTeacher(sig), mbs, dp_group=dp_group)
        x = student[lo:hi].float().clone().requires_grad_(True)
        local = torch.zeros((), dtype=torch.float64)
        tokens = torch.zeros((), dtype=torch.float64)
        for mb in mbs:
            ls, n, _ = it_obj.loss(x[mb.rows], sig.select(mb.rows), old[lo:hi][mb.rows].float(), mask[lo:hi][mb.rows],
                                   group=single)
            local = local + ls.double()
            tokens = tokens + n
        total = torch.stack([local.detach(), tokens.double()])
        dist.all_reduce(total, group=dp_group)
        (local / total[1]).backward()  # this rank's share of the global token mean
        xr = student.float().double().requires_grad_(True)
        lref, nref, parts = oref.eopd_variant(xr, teacher.float().double(), target, old.float().double(), mask,
                                              top_k=K, vocab_size=VOCAB, **v)
        (lref / nref).backward()
        out.append(dict(check="dp_" + _name(v), err=abs(it_obj.cfg.tau - parts["metrics"]["tau"])
                        + ref.rel_err(total[0] / total[1], lref / nref),
                        gerr=ref.rel_err(x.grad, xr.grad[lo:hi])))
    return out


def main():
    from megatron_eaopd.distributed import init_distributed, init_model_parallel

    env = init_distributed(timeout_s=120)
    init_model_parallel(tp=env.world_size)
    rank, world = dist.get_rank(), dist.get_world_size()
    singles = [dist.new_group([r]) for r in range(world)]
    for dtype in (torch.float32, torch.bfloat16):
        for r in run_checks(rank, world, dtype, dp_group=singles[rank]):
            report(dtype=str(dtype), **r)
    for r in dp_checks(rank, world, dist.group.WORLD, singles[rank]):
        report(dtype=str(torch.float32), **r)
    dist.barrier()


if __name__ == "__main__":
    main()
