"""What users read in their logs, and the edges of the number range, against independent values.

* every metric of ``eopd_loss`` against the float64 reference (``loss_reference.eopd_metrics``) on inputs
  where the PPO clip binds in both directions (``loss_tp.make_inputs``), on all tokens and on the
  tokens of each direction alone;
* the PPO clip on hand-set ratios (0.5, 1.5) and advantages of both signs: each token's value and
  whether its gradient is zero, written out from the clipped surrogate;
* -inf logits, logits of +-60 and bf16 inputs: values, gradients and metrics against the reference
  evaluated on the same rounded inputs (not only "finite").

Tolerances: fp32 values 1e-6 relative (sums relative to the sum of their absolute terms), bf16-input
values 1e-6 (the reference sees the same bf16-rounded numbers; accumulation is fp32), gradients 2e-6
(fp32; see tests/test_loss.py) and 5e-3 (bf16: the gradient is returned in bf16, unit roundoff 2^-8)
relative to their largest entry.
"""

from __future__ import annotations

import math

import pytest
import torch

import loss_reference as ref
import loss_tp
from megatron_eaopd.loss import (
    METRIC_KEYS,
    EOPDConfig,
    TeacherSignals,
    eopd_loss,
    teacher_signals,
    vocab_parallel_kl_pair,
    vocab_parallel_topk,
)

VOCAB = loss_tp.VOCAB


def _metric_errors(mine: dict, theirs: dict) -> dict:
    """Relative error per metric; a metric missing on either side is an error of +inf."""
    return {k: (ref.rel_err(mine[k], theirs[k]) if k in mine and k in theirs else math.inf)
            for k in set(mine) | set(theirs)}


def test_metric_keys_are_the_reference_metrics():
    assert set(METRIC_KEYS) == set(ref.METRICS)


@pytest.mark.parametrize("mode", ["topk", "full"])
@pytest.mark.parametrize("tokens", ["all", "ratio_above_1", "ratio_below_1"])
def test_every_metric_against_reference_with_the_clip_binding_both_ways(mode, tokens):
    student, teacher, target, old, mask, _ = loss_tp.make_inputs()
    old = old.float()
    ratio = torch.exp(ref.log_probs(student, target[..., None], VOCAB)[..., 0] - old.double())
    adv = ref.log_probs(teacher, target[..., None], VOCAB)[..., 0] - old.double()
    if tokens == "ratio_above_1":
        mask = mask * (ratio > 1.0)
    elif tokens == "ratio_below_1":
        mask = mask * (ratio < 1.0)
    valid = mask.bool()
    up, down = valid & (ratio > 1.2) & (adv > 0), valid & (ratio < 0.8) & (adv < 0)
    # the inputs do what this test is about: the clip binds, and not everywhere
    assert {"all": up.any() and down.any(), "ratio_above_1": up.any(), "ratio_below_1": down.any()}[tokens]
    assert 0 < int(up.sum() + down.sum()) < int(valid.sum())
    cfg = EOPDConfig(mode=mode, top_k=8, vocab_size=VOCAB, tau=0.8)
    sig = teacher_signals(teacher.float(), target, cfg)
    _, n, m = eopd_loss(student.float(), sig, old, mask, cfg)
    r = ref.eopd_metrics(student, teacher, target, old.double(), mask, mode=mode, top_k=8, vocab_size=VOCAB, tau=0.8)
    errs = _metric_errors(m, r)
    assert int(n) == int(valid.sum())
    assert max(errs.values()) <= 1e-6, {k: (float(m.get(k, math.nan)), float(r.get(k, math.nan)), e)
                                        for k, e in errs.items() if e > 1e-6}
    expected_clip = float((up | down).sum()) / float(valid.sum()) if mode == "topk" else 0.0
    assert float(m["clip_fraction"]) == pytest.approx(expected_clip, abs=1e-7)


# ---------------------------------------------------------------------------------------------
# The PPO clip, by hand
# ---------------------------------------------------------------------------------------------
#: (ratio r, advantage A, l_rkl = max(-r A, -clip(r, 0.8, 1.2) A), clipped branch active -> zero gradient)
PPO_CASES = [
    (0.5, +1.0, -0.5, False),  # ratio below the range, A > 0: the unclipped term is larger, gradient flows
    (0.5, -1.0, +0.8, True),  # ratio below the range, A < 0: clipped, constant 0.8, no gradient
    (1.5, +1.0, -1.2, True),  # ratio above the range, A > 0: clipped, constant -1.2, no gradient
    (1.5, -1.0, +1.5, False),  # ratio above the range, A < 0: unclipped, gradient flows
    (1.0, +0.5, -0.5, False),  # inside the range: plain -r A
    (1.0, -0.5, +0.5, False),
]


def test_ppo_clip_hand_set_ratios_and_advantages():
    v, n = 16, len(PPO_CASES)
    g = torch.Generator().manual_seed(21)
    student = torch.randn(n, 1, v, generator=g)
    target = torch.randint(0, v, (n, 1), generator=g)
    lp = torch.log_softmax(student.double(), -1).gather(-1, target[..., None])[..., 0]  # [n, 1]
    r = torch.tensor([c[0] for c in PPO_CASES], dtype=torch.float64).view(n, 1)
    a = torch.tensor([c[1] for c in PPO_CASES], dtype=torch.float64).view(n, 1)
    old = (lp - torch.log(r)).float()  # exp(log pi_theta - old) = r
    sig = TeacherSignals(  # log pi_T(y) = old + A; alpha = 0: only the reverse-KL term
        target_ids=target, target_log_probs=(old.double() + a).float(), entropy=torch.zeros(n, 1),
        topk_ids=torch.arange(4).expand(n, 1, 4).contiguous(), topk_log_probs=torch.full((n, 1, 4), math.log(0.25)),
    )
    cfg = EOPDConfig(top_k=4, alpha=0.0, clip_eps=0.2)
    for i, (ratio, adv, value, clipped) in enumerate(PPO_CASES):
        x = student.clone().requires_grad_(True)
        only_i = torch.zeros(n, 1)
        only_i[i] = 1.0
        loss, num, m = eopd_loss(x, sig, old, only_i, cfg)
        loss.backward()
        assert int(num) == 1
        assert float(loss) == pytest.approx(value, abs=1e-6), (ratio, adv)
        assert float(m["clip_fraction"]) == float(clipped), (ratio, adv)
        assert float(m["rkl_term"]) == pytest.approx(value, abs=1e-6)
        assert float(m["log_ratio"]) == pytest.approx(math.log(ratio), abs=1e-6)
        assert float(m["teacher_student_log_ratio"]) == pytest.approx(adv - math.log(ratio), abs=1e-6)
        if clipped:
            assert float(x.grad.abs().max()) == 0.0, (ratio, adv)
        else:
            # d l / d z = -r A (onehot(y) - softmax(z)) on the token's row, 0 elsewhere
            p = torch.softmax(student[i, 0].double(), -1)
            expected = -ratio * adv * (torch.nn.functional.one_hot(target[i, 0], v).double() - p)
            torch.testing.assert_close(x.grad[i, 0].double(), expected, atol=1e-6, rtol=0)
            assert float(x.grad.abs().sum() - x.grad[i].abs().sum()) == 0.0
    # all tokens at once: the means of the above
    x = student.clone().requires_grad_(True)
    loss, num, m = eopd_loss(x, sig, old, torch.ones(n, 1), cfg)
    assert float(loss) == pytest.approx(sum(c[2] for c in PPO_CASES), abs=1e-5)
    assert float(m["clip_fraction"]) == pytest.approx(2 / n)
    assert float(m["log_ratio"]) == pytest.approx(sum(math.log(c[0]) for c in PPO_CASES) / n, abs=1e-6)
    assert float(m["teacher_student_log_ratio"]) == pytest.approx(
        sum(c[1] - math.log(c[0]) for c in PPO_CASES) / n, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# -inf, +-60 and bf16: values and gradients, not only finiteness
# ---------------------------------------------------------------------------------------------
def _extreme_batch(dtype):
    """B5 / B13 inputs: -inf entries, logits of +-60, a 151,936 / 8 vocabulary; rounded to ``dtype``."""
    b, s, v = 2, 4, 151936 // 8
    g = torch.Generator().manual_seed(5)
    scale = torch.linspace(0.2, 5.0, b * s).view(b, s, 1)
    student = torch.randn(b, s, v, generator=g) * 2
    teacher = torch.randn(b, s, v, generator=g) * scale
    target = torch.randint(0, v, (b, s), generator=g)
    student[0, 1, 100:400] = float("-inf")  # same zero-probability support: both KLs stay finite
    teacher[0, 1, 100:400] = float("-inf")
    teacher[0, 2, 500:900] = float("-inf")  # teacher-only zeros: fine for topk mode (the target is finite)
    # lift each row's top-16 by 0.5 so that bf16 rounding cannot tie the 16th with the 17th (which id a
    # tie picks is arbitrary, and the top-k mass and forward KL would then differ by that choice)
    top = teacher.topk(16, dim=-1).indices
    teacher.scatter_add_(-1, top, torch.full(top.shape, 0.5))
    teacher[1, 2, :] = -60.0
    teacher[1, 2, 7] = 60.0
    teacher[1, 2, 8:23] = -60.0 + 0.25 * torch.arange(1, 16)  # distinct top-16 (ties among -60 below it)
    student[1, 3, 5] = 60.0
    student[1, 3, 6] = -60.0
    target[0, 1] = 3
    student, teacher = student.to(dtype), teacher.to(dtype)
    # PPO ratios per token; with these tokens' advantages (signs +--, --+ on the valid columns 1..3) the
    # clip binds upward at [0, 1] and [1, 3], downward at [0, 2] and [1, 1]
    ratio = torch.tensor([[1.0, 1.5, 0.5, 1.5], [1.0, 0.7, 1.3, 1.5]])
    old = torch.log_softmax(student.float(), -1).gather(-1, target[..., None])[..., 0] - torch.log(ratio)
    mask = torch.ones(b, s)
    mask[:, 0] = 0
    return student, teacher, target, old, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minus_inf_large_logits_and_bf16_against_reference(dtype):
    student, teacher, target, old, mask = _extreme_batch(dtype)
    finite = teacher.float()[torch.isfinite(teacher)]
    assert bool(torch.isinf(student).any()) and float(finite.abs().max()) == 60.0
    adv = ref.log_probs(teacher, target[..., None])[..., 0] - old.double()
    r = torch.exp(ref.log_probs(student, target[..., None])[..., 0] - old.double())
    valid = mask.bool()
    assert bool((valid & (r > 1.2) & (adv > 0)).any()) and bool((valid & (r < 0.8) & (adv < 0)).any())
    tol_g = 2e-6 if dtype == torch.float32 else 5e-3
    for mode in ("topk", "full"):
        t_in = teacher.clone()
        if mode == "full":  # KL(student || teacher) needs teacher mass wherever the student has some
            t_in[0, 2, 500:900] = 0.0
        # the top-k is well defined: no tie between the teacher's k-th and (k+1)-th log-prob
        tk = ref.masked_log_softmax(t_in).topk(17, -1)[0]
        assert bool((tk[..., 15] > tk[..., 16]).all())
        for support in ("renormalize", "raw", "tail"):
            kw = dict(mode=mode, top_k=16, fkl_support=support, tau=0.1)
            cfg = EOPDConfig(**kw)
            x = student.clone().requires_grad_(True)
            loss, _, m = eopd_loss(x, teacher_signals(t_in, target, cfg), old, mask, cfg)
            loss.backward()
            xr = student.double().requires_grad_(True)
            lref, _, per_tok, _ = ref.eopd(xr, t_in.double(), target, old.double(), mask, **kw)
            lref.backward()
            mref = ref.eopd_metrics(student.double(), t_in.double(), target, old.double(), mask, **kw)
            errs = _metric_errors(m, mref)
            where = (dtype, mode, support)
            assert ref.sum_err(loss, lref, per_tok) <= 1e-6, (where, float(loss), float(lref))
            assert ref.rel_err(x.grad, xr.grad) <= tol_g, (where, ref.rel_err(x.grad, xr.grad))
            assert max(errs.values()) <= 1e-6, (where, {k: e for k, e in errs.items() if e > 1e-6})
    # student mass where the teacher has none: KL(student || teacher) is +inf, never a huge finite number
    kpq, kqp, _, _ = vocab_parallel_kl_pair(student[0:1, 2:3].float(), teacher[0:1, 2:3].float())
    assert float(kpq) == float("inf")
    assert float(kqp) == pytest.approx(float(ref.kl(teacher[0:1, 2:3], student[0:1, 2:3])), rel=1e-6)


def test_teacher_with_fewer_finite_logits_than_k():
    # empty top-k slots are (-inf, id 0), never padded ids; they carry neither teacher nor student mass
    few = torch.full((1, 1, 8), float("-inf"))
    few[..., :3] = torch.tensor([1.0, 2.0, 3.0])
    tv, ti = vocab_parallel_topk(few, 4, vocab_size=6)
    assert tv[0, 0, 3] == float("-inf") and int(ti[0, 0, 3]) == 0 and int(ti.max()) < 6
    student = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(3))
    student[0, 0, 0] = 3.0  # the empty slot's id 0 is also a real top-k id: its mass must count once
    target, old, mask = torch.tensor([[2]]), torch.tensor([[-1.0]]), torch.ones(1, 1)
    for support in ("renormalize", "raw", "tail"):
        kw = dict(top_k=4, fkl_support=support, tau=0.0, vocab_size=6)
        cfg = EOPDConfig(**kw)
        x = student.clone().requires_grad_(True)
        loss, _, m = eopd_loss(x, teacher_signals(few, target, cfg), old, mask, cfg)
        loss.backward()
        xr = student.double().requires_grad_(True)
        lref, *_ = ref.eopd(xr, few.double(), target, old.double(), mask, **kw)
        lref.backward()
        errs = _metric_errors(m, ref.eopd_metrics(student.double(), few.double(), target, old.double(), mask, **kw))
        assert ref.rel_err(loss, lref) <= 1e-6 and ref.rel_err(x.grad, xr.grad) <= 1e-6, support
        assert max(errs.values()) <= 1e-6, (support, errs)
        assert float(m["student_topk_mass"]) <= 1.0
