"""The vocab-parallel EOPD loss against an independent float64 reference (tests/loss_reference.py).

TP = 1 runs in-process; TP = 2 and TP = 4 run the same checks under torchrun (gloo).
Tolerances: fp32 inputs: values 1e-6 relative, gradients 2e-6 relative to the largest entry of the
whole gradient (fp32 log p = z/T - lse carries ~1e-6 absolute error when |z/T| ~ 10-15, and the
gradients are p times such terms); bf16 inputs: values 1e-6 against the reference evaluated on the same
bf16-rounded numbers (fp32 accumulation), gradients 5e-3 (the gradient is returned in bf16, whose unit
roundoff is 2^-8 = 3.9e-3).
"""

from __future__ import annotations

import math

import pytest
import torch

import loss_reference as ref
from megatron_eaopd.loss import (
    METRIC_KEYS,
    EOPDConfig,
    TeacherSignals,
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

TOL = {"torch.float32": (1e-6, 2e-6), "torch.bfloat16": (1e-6, 5e-3)}


def _assert_checks(records):
    # every metric of every EOPD variant was compared with the reference
    for variant in {r["check"] for r in records if r["check"].startswith("eopd_") and "_metric_" not in r["check"]}:
        compared = {r["check"].split("_metric_")[1] for r in records if r["check"].startswith(variant + "_metric_")}
        assert compared == set(METRIC_KEYS), (variant, set(METRIC_KEYS) ^ compared)
    bad = []
    for r in records:
        if r["check"] == "unequal_shards":
            continue
        tv, tg = TOL[r["dtype"]]
        if not (r["err"] <= tv and r["gerr"] <= tg):
            bad.append(r)
    assert not bad, "checks beyond tolerance:\n" + "\n".join(map(str, bad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tp1_against_fp64_reference(dtype):
    import loss_tp

    recs = [dict(dtype=str(dtype), **r) for r in loss_tp.run_checks(0, 1, dtype)]
    assert len(recs) >= 7 + 7 * (1 + len(METRIC_KEYS))
    if dtype == torch.float32:
        recs += [dict(dtype=str(dtype), **r) for r in loss_tp.run_layout_checks(0, 1, loss_tp.PADDED_VOCAB, tag="padded_shards_")]
    _assert_checks(recs)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_against_fp64_reference(torchrun, tp):
    check_tensor_parallel_results(torchrun("loss_tp.py", tp), tp)


def check_tensor_parallel_results(results: dict[int, list[dict]], tp: int) -> None:
    """The assertions on ``tests/scripts/loss_tp.py``'s records (``{rank: [record]}``) at TP = ``tp``; also the
    judge of the mutation run's phase 2 (bench/mutation_tp.py)."""
    for rank, recs in results.items():
        _assert_checks(recs)
        layout = {r["check"] for r in recs if r["check"].startswith(("padded_shards_", "explicit_group_", "tp2_subgroup_"))}
        assert len(layout) == (2 if tp < 4 else 3) * 6, layout
        assert [r for r in recs if r["check"] == "no_megatron_default_tp1"], rank
        msg = [r for r in recs if r["check"] == "unequal_shards"][0]["message"]
        assert msg.startswith(f"vocab shards differ across the tensor-parallel group (V_local ranges from 10 to {9 + tp}): "
                              "the TP group does not divide the vocabulary evenly. Pad the vocabulary to a multiple of "
                              "TP (Megatron's make_vocab_size_divisible_by) or pass the model's TP group"), (rank, msg)
    # every rank computes the same loss and metric values, bit for bit (B9: the loss must not depend on the
    # rank; the values come out of the same all-reduced sums)
    values = {rank: {(r["dtype"], r["check"]): r["value"] for r in recs if "value" in r} for rank, recs in results.items()}
    assert len(values[0]) >= 2 * 7 * (1 + len(METRIC_KEYS))
    for rank, v in values.items():
        diff = {k: (x, values[0].get(k)) for k, x in v.items() if x != values[0].get(k)}
        assert v.keys() == values[0].keys() and not diff, (rank, diff)


# ---------------------------------------------------------------------------------------------
# Helpers for the single-process tests
# ---------------------------------------------------------------------------------------------
def _batch(b=4, s=6, v=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.2, 5.0, b * s).view(b, s, 1)
    student = (torch.randn(b, s, v, generator=g) * 2).to(dtype)
    teacher = (torch.randn(b, s, v, generator=g) * scale).to(dtype)
    target = torch.randint(0, v, (b, s), generator=g)
    old = torch.log_softmax(student.float(), -1).gather(-1, target[..., None])[..., 0] - 0.05
    mask = torch.ones(b, s)
    mask[:, 0] = 0  # prompt position
    mask[-1, -2:] = 0  # padding
    return student, teacher, target, old, mask


def _loss(student, teacher, target, old, mask, cfg, **kw):
    sig = teacher_signals(teacher, target, cfg)
    return eopd_loss(student, sig, old, mask, cfg, **kw)


# ---------------------------------------------------------------------------------------------
# Micro-batch invariance (docs/design.md, failure classes: verl-project/verl#7200)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["topk", "full"])
def test_micro_batch_invariance(mode):
    cfg = EOPDConfig(mode=mode, top_k=8, tau=1.0)
    student, teacher, target, old, mask = _batch(b=8, s=5, v=48, seed=3)
    mask[2, :] = 0
    mask[5, 1:] = 0
    results = []
    for n_micro in (1, 2, 8):
        x = student.clone().requires_grad_(True)
        total_loss, total_tokens = 0.0, 0
        sums = []
        for idx in torch.arange(8).chunk(n_micro):
            ls, n, _ = _loss(x[idx], teacher[idx], target[idx], old[idx], mask[idx], cfg)
            sums.append(ls)
            total_tokens += int(n)
        total = torch.stack(sums).sum() / total_tokens
        total.backward()
        results.append((float(total), x.grad.clone()))
    for loss, grad in results[1:]:
        assert abs(loss - results[0][0]) <= 1e-6 * max(1.0, abs(results[0][0]))
        torch.testing.assert_close(grad, results[0][1], rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Identities and invariants
# ---------------------------------------------------------------------------------------------
def test_teacher_equals_student_gives_zero_full_mode_kls():
    student, _, target, old, mask = _batch(seed=1)
    cfg = EOPDConfig(mode="full", top_k=8, tau=0.0)
    x = student.clone().requires_grad_(True)
    loss, n, m = _loss(x, student.clone(), target, old, mask, cfg)
    loss.backward()
    assert abs(float(loss)) < 1e-5 * float(n)
    assert abs(float(m["rkl_term"])) < 1e-6 and abs(float(m["fkl_term"])) < 1e-6
    assert float(m["gate_fraction"]) == 1.0  # tau = 0: every token gated
    assert float(x.grad.abs().max()) < 1e-6
    kpq, kqp, _, _ = vocab_parallel_kl_pair(student, student)
    assert float(kpq.abs().max()) < 1e-6 and float(kqp.abs().max()) < 1e-6


def test_tail_forward_kl_never_negative_and_exact_when_k_is_the_vocabulary():
    # B1 (verl #7856): student = teacher + 1 on the teacher's top-k makes the truncated sum negative.
    v, k = 1000, 8
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(64, 1, v, generator=g) * 1.5
    _, tk = teacher.topk(k, dim=-1)
    student = teacher.clone().scatter_add_(-1, tk, torch.ones_like(tk, dtype=teacher.dtype))
    target = tk[..., 0]
    mask = torch.ones(64, 1)
    old = torch.log_softmax(student, -1).gather(-1, target[..., None])[..., 0]
    losses = {}
    for support in ("raw", "tail"):
        cfg = EOPDConfig(top_k=k, tau=0.0, fkl_support=support)
        _, _, m = _loss(student, teacher, target, old, mask, cfg)
        losses[support] = float(m["fkl_term"])
    assert losses["raw"] < 0 < losses["tail"]
    # per token, on many random pairs including identical distributions: never negative
    from megatron_eaopd.loss.topk_kl import topk_forward_kl as _topk_forward_kl

    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        t = torch.log_softmax(torch.randn(200, v, generator=g) * (seed + 1), -1)
        s = t.clone() if seed == 0 else torch.log_softmax(torch.randn(200, v, generator=g) * 2, -1)
        tv, ti = t.topk(k, -1)
        fkl = _topk_forward_kl(tv, s.gather(-1, ti), "tail")
        assert bool((fkl >= 0).all()), fkl.min()
    # with K = the whole vocabulary the tail bucket is empty: equals the exact KL(teacher || student)
    small_t, small_s = torch.randn(5, 1, 12, generator=g), torch.randn(5, 1, 12, generator=g)
    cfg = EOPDConfig(top_k=12, tau=0.0, fkl_support="tail")
    tgt = torch.zeros(5, 1, dtype=torch.long)
    old = torch.log_softmax(small_s, -1)[..., 0]
    _, _, m = _loss(small_s, small_t, tgt, old, torch.ones(5, 1), cfg)
    assert abs(float(m["fkl_term"]) - float(ref.kl(small_t, small_s).mean())) < 1e-6


def test_padded_rows_get_no_mass_even_with_the_largest_logits():
    v, true_v = 40, 33
    student, teacher, target, old, mask = _batch(v=v, seed=4)
    target = target % true_v
    student[..., true_v:] = 50.0
    teacher[..., true_v:] = 60.0
    lp, ids = vocab_parallel_topk(teacher, 8, vocab_size=true_v)
    assert int(ids.max()) < true_v
    torch.testing.assert_close(lp.double(), ref.masked_log_softmax(teacher, true_v).topk(8, -1)[0], atol=1e-6, rtol=0)
    h = vocab_parallel_entropy(teacher, vocab_size=true_v)
    torch.testing.assert_close(h.double(), ref.entropy(teacher, true_v), atol=1e-6, rtol=0)
    _, lse = vocab_parallel_log_softmax_stats(teacher, vocab_size=true_v)
    torch.testing.assert_close(lse.double(), ref.lse(teacher, true_v), atol=1e-6, rtol=0)
    for mode in ("topk", "full"):
        cfg = EOPDConfig(mode=mode, top_k=8, vocab_size=true_v)
        x = student.clone().requires_grad_(True)
        loss, _, m = _loss(x, teacher, target, old, mask, cfg)
        loss.backward()
        assert torch.isfinite(loss) and float(m["student_topk_mass"]) <= 1.0
        assert float(x.grad[..., true_v:].abs().max()) == 0.0
    with pytest.raises(ValueError, match=r"ids must lie in \[0, vocab_size=33\)"):
        vocab_parallel_log_probs(student, torch.full((4, 6, 1), 35), vocab_size=true_v)


def test_entropy_sums_exact_at_the_151936_vocabulary_in_bf16():
    # fp32 accumulation over a Qwen-sized vocabulary (bf16 in); -inf, +-60 and bf16 through the whole loss
    # are compared with the reference in test_loss_metrics.py
    big = (torch.randn(3, 151936, generator=torch.Generator().manual_seed(0)) * 4).to(torch.bfloat16)
    h = vocab_parallel_entropy(big)
    torch.testing.assert_close(h.double(), ref.entropy(big.double()), atol=2e-5, rtol=1e-6)


def test_all_masked_batch_gives_zero_tokens_and_zero_gradients():
    student, teacher, target, old, mask = _batch(seed=6)
    old = torch.full_like(old, float("-inf"))  # garbage at masked positions must not leak NaN
    for mode in ("topk", "full"):
        cfg = EOPDConfig(mode=mode, top_k=8)
        x = student.clone().requires_grad_(True)
        loss, n, m = _loss(x, teacher, target, old, torch.zeros_like(mask), cfg)
        loss.backward()
        assert int(n) == 0 and float(loss) == 0.0
        assert float(x.grad.abs().max()) == 0.0
        assert all(bool(torch.isfinite(t)) for t in m.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_callers_logits_unchanged_and_reusable(dtype):
    # B11: in-place ops must not touch the caller's logits; reusing them for a second loss works
    student, teacher, target, old, mask = _batch(seed=7, dtype=dtype)
    s0, t0 = student.clone(), teacher.clone()
    x = student.clone().requires_grad_(True)
    x0 = x.detach().clone()
    cfg = EOPDConfig(mode="full", top_k=8)
    loss, _, _ = _loss(x, teacher, target, old, mask, cfg)
    ids = target[..., None]
    lp = vocab_parallel_log_probs(x, ids)
    h = vocab_parallel_entropy(x, chunk_size=5)
    _, lse = vocab_parallel_log_softmax_stats(x)
    vocab_parallel_topk(x.detach(), 4)
    (loss + lp.sum() + h.sum()).backward()
    assert torch.equal(x.detach(), x0) and torch.equal(teacher, t0) and torch.equal(student, s0)
    xr = x0.double().requires_grad_(True)
    lref, *_ = ref.eopd(xr, teacher.double(), target, old, mask, mode="full", top_k=8)
    (lref + ref.log_probs(xr, ids).sum() + ref.entropy(xr).sum()).backward()
    tol = 1e-6 if dtype == torch.float32 else 5e-3
    assert ref.rel_err(x.grad, xr.grad) <= tol


def test_gate_at_exactly_tau_is_off():
    student, _, target, old, mask = _batch(b=1, s=3, v=16, seed=8)
    mask = torch.ones(1, 3)
    sig = TeacherSignals(
        target_ids=target, target_log_probs=old.clone(), entropy=torch.tensor([[0.8, 0.8000001, 0.7999999]]),
        topk_ids=torch.arange(4).expand(1, 3, 4).contiguous(), topk_log_probs=torch.full((1, 3, 4), math.log(0.2)),
    )
    cfg = EOPDConfig(top_k=4, tau=0.8)
    _, _, m = eopd_loss(student, sig, old, mask, cfg)
    assert float(m["gate_fraction"]) == pytest.approx(1 / 3)
    assert float(m["num_gated"]) == 1.0


def test_chunked_equals_unchunked_on_packed_2d_input():
    # B14: a packed [nnz, V] input, chunked over tokens, must match one chunk exactly
    x = torch.randn(37, 100, generator=torch.Generator().manual_seed(9))
    ids = torch.randint(0, 100, (37, 3))
    for cs in (1, 5, 64):
        torch.testing.assert_close(vocab_parallel_entropy(x, chunk_size=cs), vocab_parallel_entropy(x), atol=0, rtol=0)
        torch.testing.assert_close(vocab_parallel_log_probs(x, ids, chunk_size=cs), vocab_parallel_log_probs(x, ids),
                                   atol=0, rtol=0)
    torch.testing.assert_close(vocab_parallel_entropy(x).double(), ref.entropy(x), atol=1e-6, rtol=0)
    # the teacher pass (top-k and the mass outside it) chunked over tokens: every chunk's rows as in one chunk
    t, target = x.view(1, 37, 100), ids[:, 0].view(1, 37)
    one = teacher_signals(t, target, EOPDConfig(top_k=4))
    for cs in (1, 5):
        chunked = teacher_signals(t, target, EOPDConfig(top_k=4), chunk_size=cs)
        for f in ("target_log_probs", "entropy", "topk_ids", "topk_log_probs", "rest_log_prob"):
            torch.testing.assert_close(getattr(chunked, f), getattr(one, f), atol=0, rtol=0)


def test_self_distillation_topk_mode_has_zero_advantage():
    # B7: student == teacher and old == current: the reverse-KL term and its gradient vanish
    student, _, target, _, mask = _batch(seed=10)
    cfg = EOPDConfig(top_k=8, alpha=0.0)
    old = torch.log_softmax(student, -1).gather(-1, target[..., None])[..., 0]
    x = student.clone().requires_grad_(True)
    loss, _, m = _loss(x, student, target, old, mask, cfg)
    loss.backward()
    assert abs(float(loss)) < 1e-5 and float(x.grad.abs().max()) < 1e-6
    assert abs(float(m["log_ratio"])) < 1e-6 and float(m["clip_fraction"]) == 0.0


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_clear_errors():
    student, teacher, target, old, mask = _batch(seed=12)
    cfg = EOPDConfig(top_k=8)
    sig = teacher_signals(teacher, target, cfg)
    with pytest.raises(ValueError, match=r"old_log_probs has shape \(4, 5\), expected \[B, S\] = \(4, 6\)"):
        eopd_loss(student, sig, old[:, :5], mask, cfg)
    with pytest.raises(ValueError, match="top_k=100 is larger than the vocabulary"):
        teacher_signals(teacher, target, EOPDConfig(top_k=100))
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, vocab_size=64\]"):
        vocab_parallel_topk(teacher, 65)
    with pytest.raises(ValueError, match=r"mode\n  Input should be 'topk' or 'full'.*input_value='fulll'"):
        EOPDConfig(mode="fulll")
    with pytest.raises(ValueError, match=r"fkl_support\n  Input should be 'renormalize', 'raw' or 'tail'.*'tails'"):
        EOPDConfig(fkl_support="tails")
    with pytest.raises(ValueError, match=r"tau\n  Input should be greater than or equal to 0.*input_value=-1"):
        EOPDConfig(tau=-1)
    with pytest.raises(ValueError, match=r"temperature\n  Input should be greater than 0.*input_value=0"):
        EOPDConfig(temperature=0)
    bad = student.clone()
    bad[2, 3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"logits has a row with NaN.*index \(2, 3\)"):
        eopd_loss(bad, sig, old, mask, cfg)
    bad_old = old.clone()
    bad_old[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"old_log_probs contains NaN or inf at a valid \(loss_mask=1\) position \(1, 4\)"):
        eopd_loss(student, sig, bad_old, mask, cfg)
    inf_old = old.clone()
    inf_old[2, 2] = float("-inf")
    with pytest.raises(ValueError, match=r"old_log_probs contains NaN or inf at a valid \(loss_mask=1\) position \(2, 2\)"):
        eopd_loss(student, sig, inf_old, mask, cfg)
    with pytest.raises(ValueError, match="loss_mask must hold 0/1 values"):
        eopd_loss(student, sig, old, mask * 0.5, cfg)
    with pytest.raises(ValueError, match="vocab_size=65 does not fit"):
        vocab_parallel_entropy(student, vocab_size=65)
    with pytest.raises(ValueError, match="mode='full' needs the teacher logits"):
        eopd_loss(student, sig, old, mask, EOPDConfig(mode="full", top_k=8))
    with pytest.raises(ValueError, match="sig carries top-8 teacher ids but EOPDConfig.top_k=4"):
        eopd_loss(student, sig, old, mask, EOPDConfig(top_k=4))
    with pytest.raises(ValueError, match="p_logits .* and q_logits .* must have the same shape"):
        vocab_parallel_kl(student, teacher[:, :3])
    with pytest.raises(ValueError, match=r"target_ids must lie in \[0, vocab_size=64\)"):
        teacher_signals(teacher, target + 64, cfg)
    allneg = student.clone()
    allneg[0, 0, :] = float("-inf")
    with pytest.raises(ValueError, match="no finite entry"):
        vocab_parallel_entropy(allneg)
