"""Input contracts of the loss: what is accepted at the boundaries, and the exact error for what is not.

Messages are matched whole (anchored), so that a message that loses its subject, its values or its
advice fails here. Added for the mutation score of loss/ (``make mutation``): each block names the
contract it pins.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import loss_reference as ref
from megatron_eaopd.loss import (
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
from megatron_eaopd.loss.shards import CHUNK_BYTES
from megatron_eaopd.loss.shards import _shard as make_shard

V = 64


def _inputs(b=4, s=6, v=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, s, v, generator=g) * 2
    teacher = torch.randn(b, s, v, generator=g) * 2
    target = torch.randint(0, v, (b, s), generator=g)
    old = torch.log_softmax(student, -1).gather(-1, target[..., None])[..., 0] - 0.1
    return student, teacher, target, old, torch.ones(b, s)


def _exact(msg: str) -> str:
    return "^" + re.escape(msg) + "$"


# ---------------------------------------------------------------------------------------------
# EOPDConfig: boundaries accepted, everything else named
# ---------------------------------------------------------------------------------------------
def test_config_accepts_its_boundaries():
    for cfg in (EOPDConfig(top_k=1), EOPDConfig(top_k=1, vocab_size=1), EOPDConfig(top_k=4, vocab_size=4),
                EOPDConfig(tau=0, alpha=0, clip_eps=1e-9), EOPDConfig(tau=2, alpha=0.5, clip_eps=0.999)):
        assert isinstance(cfg, EOPDConfig)


def test_config_copies_with_vocab_size_and_tau():
    c = EOPDConfig(top_k=4, tau=0.3, gate="sigmoid", gate_sharpness=0.5, tau_quantile=0.4)
    e, t = c.with_vocab_size(10), c.with_tau(1.25)
    assert e.model_dump() == {**c.model_dump(), "vocab_size": 10} and type(e.vocab_size) is int
    assert t.model_dump() == {**c.model_dump(), "tau": 1.25} and (c.vocab_size, c.tau) == (None, 0.3)
    with pytest.raises(ValueError, match=r"top_k \(4\) exceeds vocab_size \(3\)"):
        c.with_vocab_size(3)
    with pytest.raises(ValueError, match=r"tau\n  Input should be greater than or equal to 0"):
        c.with_tau(-0.5)


@pytest.mark.parametrize("kw,msg", [
    (dict(tau="high"), r"tau\n  Input should be a valid number.*input_value='high'"),
    (dict(alpha=float("nan")), r"alpha\n  Input should be a finite number.*input_value=nan"),
    (dict(tau=-0.1), r"tau\n  Input should be greater than or equal to 0.*input_value=-0.1"),
    (dict(clip_eps=0.0), r"clip_eps\n  Input should be greater than 0.*input_value=0.0"),
    (dict(clip_eps=1.0), r"clip_eps\n  Input should be less than 1.*input_value=1.0"),
    (dict(top_k=0), r"top_k\n  Input should be greater than or equal to 1.*input_value=0"),
    (dict(top_k=2.5), r"top_k\n  Input should be a valid integer, got a number with a fractional part.*input_value=2.5"),
    (dict(vocab_size=0), r"vocab_size\n  Input should be greater than or equal to 1.*input_value=0"),
    (dict(top_k=5, vocab_size=4), r"top_k \(5\) exceeds vocab_size \(4\)"),
    (dict(temperature=-1.0), r"temperature\n  Input should be greater than 0.*input_value=-1.0"),
    (dict(temperature=float("inf")), r"temperature\n  Input should be a finite number.*input_value=inf"),
    (dict(mode="fulll"), r"mode\n  Input should be 'topk' or 'full'.*input_value='fulll'"),
    (dict(tua=0.5), r"tua\n  Extra inputs are not permitted"),
])
def test_config_rejects(kw, msg):
    with pytest.raises(ValueError, match=re.compile(msg, re.S)):
        EOPDConfig(**kw)


# ---------------------------------------------------------------------------------------------
# Logits, temperature, vocabulary size, chunk size (every public function shares these checks)
# ---------------------------------------------------------------------------------------------
def test_logits_and_settings_rejected_with_the_value():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=_exact("logits must be a tensor of shape [..., V_local], got list")):
        vocab_parallel_entropy([1.0, 2.0])
    with pytest.raises(ValueError, match=_exact("logits must be a tensor of shape [..., V_local], got Tensor")):
        vocab_parallel_entropy(torch.tensor(1.0))
    with pytest.raises(ValueError, match=_exact("logits must be floating point, got dtype torch.int64")):
        vocab_parallel_entropy(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=_exact("p_logits must be floating point, got dtype torch.int64")):
        vocab_parallel_kl(torch.ones(3, 8, dtype=torch.int64), x)
    with pytest.raises(ValueError, match=_exact("teacher_logits must be floating point, got dtype torch.int64")):
        teacher_signals(torch.ones(1, 3, 8, dtype=torch.int64), torch.zeros(1, 3, dtype=torch.long), EOPDConfig(top_k=2))
    for t in (0, -1.0, float("inf"), "1"):
        with pytest.raises(ValueError, match=_exact(f"temperature must be a positive finite number, got {t!r}")):
            vocab_parallel_entropy(x, temperature=t)
    with pytest.raises(ValueError, match=_exact("logits has an empty vocabulary dimension (shape (3, 0))")):
        vocab_parallel_entropy(torch.empty(3, 0))
    with pytest.raises(ValueError, match=r"^vocab_size=0 does not fit the vocab-parallel logits: TP=1 x V_local=8 = 8 rows"):
        vocab_parallel_entropy(x, vocab_size=0)
    for cs in (0, -1, 2.5):
        msg = _exact(f"chunk_size must be a positive integer (tokens per chunk), got {cs!r}")
        for call in (lambda: vocab_parallel_entropy(x, chunk_size=cs),
                     lambda: vocab_parallel_log_softmax_stats(x, chunk_size=cs),
                     lambda: vocab_parallel_log_probs(x, torch.zeros(3, 1, dtype=torch.long), chunk_size=cs),
                     lambda: vocab_parallel_topk(x, 2, chunk_size=cs),
                     lambda: vocab_parallel_kl(x, x, chunk_size=cs),
                     lambda: vocab_parallel_kl_pair(x, x, chunk_size=cs)):
            with pytest.raises(ValueError, match=msg):
                call()


def test_degenerate_but_valid_shapes():
    # one vocabulary entry: entropy 0, log-prob 0; 1-D logits: a 0-dim result; vocab_size=1 of 8 columns
    one = torch.randn(3, 1)
    assert torch.equal(vocab_parallel_entropy(one), torch.zeros(3))
    assert torch.equal(vocab_parallel_log_probs(one, torch.zeros(3, 1, dtype=torch.long)), torch.zeros(3, 1))
    x = torch.randn(8)
    h = vocab_parallel_entropy(x)
    assert h.shape == () and float(h) == pytest.approx(float(ref.entropy(x)), abs=1e-6)
    x = torch.randn(3, 8)
    assert torch.equal(vocab_parallel_entropy(x, vocab_size=1), torch.zeros(3))
    assert torch.equal(vocab_parallel_log_probs(x, torch.zeros(3, 1, dtype=torch.long), vocab_size=1), torch.zeros(3, 1))
    # zero rows: empty results, and an empty gradient
    e = torch.empty(0, 8, requires_grad=True)
    lp, h = vocab_parallel_log_probs_and_entropy(e, torch.empty(0, 2, dtype=torch.long))
    (lp.sum() + h.sum()).backward()
    assert lp.shape == (0, 2) and h.shape == (0,) and e.grad.shape == (0, 8)
    assert vocab_parallel_topk(e.detach(), 3)[0].shape == (0, 3) and vocab_parallel_kl(e, e).shape == (0,)


def test_default_chunk_follows_the_byte_budget():
    # one fp32 work buffer of [chunk, V_local] stays within CHUNK_BYTES for the device type
    assert make_shard(torch.empty(10, 1000), None, None, 1.0, None).chunk == CHUNK_BYTES["cpu"] // 4000
    # other device types use the CUDA budget
    assert make_shard(torch.empty(10, 1000, device="meta"), None, None, 1.0, None).chunk == CHUNK_BYTES["cuda"] // 4000
    # a row larger than the budget is still processed, one row at a time
    assert make_shard(torch.empty(1, CHUNK_BYTES["cpu"] // 4 + 1), None, None, 1.0, None).chunk == 1
    assert make_shard(torch.empty(10, 1000), None, None, 1.0, 7).chunk == 7


# ---------------------------------------------------------------------------------------------
# Global ids
# ---------------------------------------------------------------------------------------------
def test_ids_checked_at_the_boundary():
    x = torch.randn(4, 6, V)
    ok = torch.full((4, 6, 1), V - 1)
    assert vocab_parallel_log_probs(x, ok.int()).shape == (4, 6, 1)  # int32 ids are accepted
    with pytest.raises(ValueError, match=re.escape(f"ids must lie in [0, vocab_size={V}) (padded vocabulary rows "
                                                   f"have zero probability), got values in [{V}, {V}]")):
        vocab_parallel_log_probs(x, ok + 1)
    with pytest.raises(ValueError, match=re.escape("got values in [-1, -1]")):
        vocab_parallel_log_probs(x, torch.full((4, 6, 1), -1))
    with pytest.raises(ValueError, match=re.escape("ids must lie in [0, vocab_size=60)")):
        vocab_parallel_log_probs(x, torch.full((4, 6, 1), 60), vocab_size=60)
    with pytest.raises(ValueError, match=re.escape("ids must lie in [0, vocab_size=60)")):
        vocab_parallel_kl_pair(x, x, torch.full((4, 6, 1), 60), vocab_size=60)
    with pytest.raises(ValueError, match=re.escape(f"ids must lie in [0, vocab_size={V})")):
        vocab_parallel_kl_pair(x, x, torch.full((4, 6, 1), V))
    with pytest.raises(ValueError, match=_exact("ids must have shape [..., k] with the logits' leading shape (4, 6), "
                                                "got (4, 5, 1)")):
        vocab_parallel_log_probs(x, torch.zeros(4, 5, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=_exact("ids must have shape [..., k] with the logits' leading shape (4, 6), "
                                                "got (4, 6)")):
        vocab_parallel_log_probs_and_entropy(x, torch.zeros(4, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=_exact("ids must be int64 (or int32), got torch.float32")):
        vocab_parallel_log_probs(x, torch.zeros(4, 6, 1))
    with pytest.raises(ValueError, match=_exact("ids must have shape [..., k] with leading shape (4, 6), got (4, 5, 2)")):
        vocab_parallel_kl_pair(x, x, torch.zeros(4, 5, 2, dtype=torch.long))


def test_topk_k_at_the_boundary():
    x = torch.randn(3, 8)
    lp, ids = vocab_parallel_topk(x, 1)
    assert torch.equal(ids[:, 0], x.argmax(-1))
    lp, ids = vocab_parallel_topk(x, 6, vocab_size=6)  # k = the true vocabulary: all of it, no padded id
    assert sorted(ids[0].tolist()) == list(range(6))
    torch.testing.assert_close(lp.double(), ref.masked_log_softmax(x, 6).topk(6, -1)[0], atol=1e-6, rtol=0)
    for k, vs in ((7, 6), (0, None), (2.0, None)):
        true_v = vs or 8
        with pytest.raises(ValueError, match=_exact(f"k must be an integer in [1, vocab_size={true_v}], got {k!r}")):
            vocab_parallel_topk(x, k, vocab_size=vs)


# ---------------------------------------------------------------------------------------------
# NaN / +inf / rows without a finite entry: named tensor, (b, s) index, rank
# ---------------------------------------------------------------------------------------------
def _bad_row_msg(name, where, row, n=1):
    return re.escape(f"{name} has a row with NaN, +inf or no finite entry at index {where} (flattened row {row}, "
                     f"{n} bad rows in total; TP rank 0). Check the model's forward")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bad_rows_named_with_their_index(bad):
    x = torch.randn(2, 4, 8)
    x[1, 2, 5] = bad
    msg = _bad_row_msg("logits", (1, 2), 6)
    for call in (lambda: vocab_parallel_entropy(x), lambda: vocab_parallel_log_softmax_stats(x),
                 lambda: vocab_parallel_topk(x, 2),
                 lambda: vocab_parallel_log_probs(x, torch.zeros(2, 4, 1, dtype=torch.long))):
        with pytest.raises(ValueError, match=msg):
            call()
    y = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=_bad_row_msg("p_logits", (1, 2), 6)):
        vocab_parallel_kl(x, y)
    with pytest.raises(ValueError, match=_bad_row_msg("q_logits", (1, 2), 6)):
        vocab_parallel_kl(y, x)
    with pytest.raises(ValueError, match=_bad_row_msg("teacher_logits", (1, 2), 6)):
        teacher_signals(x, torch.zeros(2, 4, dtype=torch.long), EOPDConfig(top_k=2))
    one = torch.randn(8)
    one[3] = bad
    with pytest.raises(ValueError, match=_bad_row_msg("logits", (), 0)):
        vocab_parallel_entropy(one)


@pytest.mark.parametrize("fill", [-1e30, torch.finfo(torch.float32).min, torch.finfo(torch.bfloat16).min],
                         ids=["minus_1e30", "fp32_min", "bf16_min"])
def test_rows_masked_with_a_finite_fill_have_no_finite_entry(fill):
    """A row masked with a large finite negative value (-1e30 or the dtype's min, as attention-style masking does)
    is a row without a real entry, like an all -inf row: named, never turned into a uniform distribution."""
    x = torch.randn(2, 4, 8)
    x[0, 3, :] = fill
    for t in (1.0, 0.5, 3.0):  # the test is on the logits, not on x / T (-1e30 / 3 is not a real logit either)
        with pytest.raises(ValueError, match=_bad_row_msg("logits", (0, 3), 3)):
            vocab_parallel_entropy(x, temperature=t)
        with pytest.raises(ValueError, match=_bad_row_msg("p_logits", (0, 3), 3)):
            vocab_parallel_kl(x, torch.randn(2, 4, 8), temperature=t)
        with pytest.raises(ValueError, match=_bad_row_msg("teacher_logits", (0, 3), 3)):
            teacher_signals(x, torch.zeros(2, 4, dtype=torch.long), EOPDConfig(top_k=2, temperature=t))
    x[0, 3, 5] = -30.0  # one real entry: a valid (one-hot) distribution
    assert float(vocab_parallel_entropy(x)[0, 3]) == pytest.approx(0.0, abs=1e-6)


def test_the_masked_row_threshold_is_half_the_fill():
    """A row counts as masked when its largest logit is at most -5e29 (half the -1e30 stand-in for -inf):
    exactly at the threshold it is refused, just above it it is an ordinary (uniform) row."""
    x = torch.randn(1, 2, 8)
    x[0, 1, :] = -5e29
    with pytest.raises(ValueError, match=_bad_row_msg("logits", (0, 1), 1)):
        vocab_parallel_entropy(x)
    x[0, 1, :] = -4e29
    assert float(vocab_parallel_entropy(x)[0, 1]) == pytest.approx(math.log(8), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# teacher_signals and eopd_loss
# ---------------------------------------------------------------------------------------------
def test_teacher_signals_checks_and_keep_logits():
    _, teacher, target, _, _ = _inputs()
    cfg = EOPDConfig(top_k=4, vocab_size=60)
    with pytest.raises(ValueError, match=_exact("teacher_logits must be [B, S, V_local] and target_ids [B, S]; got "
                                                "(4, 64) and (4,)")):
        teacher_signals(teacher[:, 0], target[:, 0], cfg)
    with pytest.raises(ValueError, match=_exact("teacher_logits must be [B, S, V_local] and target_ids [B, S]; got "
                                                "(4, 6, 64) and (4, 5)")):
        teacher_signals(teacher, target[:, :5], cfg)
    for bad, lo_hi in ((60, "[60, 60]"), (-1, "[-1, -1]")):
        with pytest.raises(ValueError, match=re.escape(f"target_ids must lie in [0, vocab_size=60); got values in {lo_hi}. "
                                                       "Replace padding ids with a valid id")):
            teacher_signals(teacher, torch.full_like(target, bad), cfg)
    with pytest.raises(ValueError, match=_exact("target_ids must be int64, got torch.float32")):
        teacher_signals(teacher, target.float(), cfg)
    assert teacher_signals(teacher, target % 60, cfg).logits is None
    kept = teacher_signals(teacher, target % 60, cfg, keep_logits=True).logits
    assert kept.data_ptr() == teacher.data_ptr() and not kept.requires_grad  # a detached view, no copy
    full = EOPDConfig(mode="full", top_k=4)
    assert teacher_signals(teacher, target, full).logits.data_ptr() == teacher.data_ptr()
    assert teacher_signals(teacher, target, full, keep_logits=False).logits is None
    with pytest.raises(ValueError, match=re.escape("chunk_size must be a positive integer")):
        teacher_signals(teacher, target, full, chunk_size=0)


def test_teacher_signals_select_and_to():
    _, teacher, target, _, _ = _inputs()
    for cfg in (EOPDConfig(top_k=4), EOPDConfig(mode="full", top_k=4)):
        sig = teacher_signals(teacher, target, cfg)
        for index in (slice(1, 3), torch.tensor([0, 2])):
            part = sig.select(index)
            for name in ("target_ids", "target_log_probs", "entropy", "topk_ids", "topk_log_probs", "logits"):
                whole, got = getattr(sig, name), getattr(part, name)
                assert (got is None) if whole is None else torch.equal(got, whole[index]), name
        moved = sig.to("cpu")
        assert (moved.logits is None) == (sig.logits is None)
        assert torch.equal(moved.topk_log_probs, sig.topk_log_probs) and torch.equal(moved.target_ids, sig.target_ids)
        on_meta = sig.to("meta")  # every tensor goes to the device asked for
        assert all(t is None or t.device.type == "meta" for t in on_meta.__dict__.values())
        assert (on_meta.logits is None) == (sig.logits is None)


def test_eopd_loss_names_the_bad_argument():
    student, teacher, target, old, mask = _inputs()
    cfg = EOPDConfig(top_k=4)
    sig = teacher_signals(teacher, target, cfg)
    with pytest.raises(ValueError, match=_exact("cfg must be an EOPDConfig, got dict")):
        eopd_loss(student, sig, old, mask, {})
    with pytest.raises(ValueError, match=_exact("student_logits must be [B, S, V_local], got shape (4, 64)")):
        eopd_loss(student[:, 0], sig, old, mask, cfg)
    for name in ("loss_mask", "sig.target_ids", "sig.target_log_probs", "sig.entropy", "sig.rest_log_prob"):
        args = dict(mask=mask, sig=sig)
        if name == "loss_mask":
            args["mask"] = mask[:, :5]
        else:
            field = name.split(".")[1]
            args["sig"] = TeacherSignals(**{**sig.__dict__, field: getattr(sig, field)[:, :5]})
        with pytest.raises(ValueError, match=_exact(f"{name} has shape (4, 5), expected [B, S] = (4, 6) like student_logits")):
            eopd_loss(student, args["sig"], old, args["mask"], cfg)
    for field, shapes in (("topk_ids", "(4, 6, 3) / sig.topk_log_probs (4, 6, 4)"),
                          ("topk_log_probs", "(4, 6, 4) / sig.topk_log_probs (4, 6, 3)")):
        bad = TeacherSignals(**{**sig.__dict__, field: getattr(sig, field)[..., :3]})
        with pytest.raises(ValueError, match=_exact(f"sig.topk_ids {shapes} must be [B, S, k] with [B, S] = (4, 6)")):
            eopd_loss(student, bad, old, mask, cfg)
    for field, index in (("target_log_probs", (1, 2)), ("entropy", (1, 2)), ("topk_log_probs", (1, 2, 3)),
                         ("rest_log_prob", (2, 4))):
        t = getattr(sig, field).clone()
        t[index] = float("nan")
        bad = TeacherSignals(**{**sig.__dict__, field: t})
        with pytest.raises(ValueError, match=_exact(f"sig.{field} contains NaN at a valid (loss_mask=1) position {index} "
                                                    "(1 in total)")):
            eopd_loss(student, bad, old, mask, cfg)
    minus_inf = sig.target_log_probs.clone()
    minus_inf[0, 1] = float("-inf")  # zero teacher probability is allowed (not NaN)
    eopd_loss(student, TeacherSignals(**{**sig.__dict__, "target_log_probs": minus_inf}), old, mask, cfg)
    with pytest.raises(ValueError, match=_exact("loss_mask must hold 0/1 values (bool or float); weighted masks would "
                                                "break the token mean")):
        eopd_loss(student, sig, old, mask * 2, cfg)
    with pytest.raises(ValueError, match=_exact(
            "EOPDConfig.mode='full' needs the teacher logits on the student's vocab shards: compute the signals with "
            "teacher_signals(..., keep_logits=True) from a teacher in the student's TP layout")):
        eopd_loss(student, sig, old, mask, EOPDConfig(mode="full", top_k=4))
    full = teacher_signals(teacher[..., :32], target % 32, EOPDConfig(mode="full", top_k=4))
    with pytest.raises(ValueError, match=_exact("teacher logits (4, 6, 32) and student logits (4, 6, 64) must have the "
                                                "same shape (same micro-batch, same vocab shards)")):
        eopd_loss(student, full, old, mask, EOPDConfig(mode="full", top_k=4))
    with pytest.raises(ValueError, match=re.escape("chunk_size must be a positive integer")):
        eopd_loss(student, sig, old, mask, cfg, chunk_size=0)


def test_eopd_loss_returns_fp32_sum_and_int64_count_for_any_mask_dtype():
    student, teacher, target, old, mask = _inputs()
    for mode in ("topk", "full"):
        cfg = EOPDConfig(mode=mode, top_k=4)
        sig = teacher_signals(teacher, target, cfg)
        ref_loss = None
        for m in (mask, mask.bool(), mask.double()):
            loss, n, metrics = eopd_loss(student, sig, old, m, cfg)
            assert loss.dtype == torch.float32 and n.dtype == torch.int64 and int(n) == 24
            assert all(v.dtype == torch.float64 and v.dim() == 0 for v in metrics.values())  # exact sums
            ref_loss = float(loss) if ref_loss is None else ref_loss
            assert float(loss) == ref_loss
