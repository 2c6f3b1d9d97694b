"""Numerical contracts of the vocab-parallel kernels that the reference tests alone did not pin.

* gradients are the same whatever the chunking (several chunks, in place for fp32 and through a
  temporary for bf16, with -inf rows on the safe path) and equal to the float64 reference;
* every output of the KL pair is differentiated (both sides, any subset of the outputs);
* temperatures other than 1 in every public function; the documented default temperature;
* -inf logits: log-probs exactly -inf there, and finite reference gradients of the entropy;
* fp32 outputs whatever the input dtype or torch's default dtype;
* ``log(1 - exp(x))`` of the ``tail`` support against a 400-digit decimal reference.
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import pytest
import torch

import loss_reference as ref
from megatron_eaopd.loss import (
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
from megatron_eaopd.loss.topk_kl import log1mexp as _log1mexp


def _logits(n=7, v=40, seed=0, minus_inf=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * 3
    y = torch.randn(n, v, generator=g) * 2
    if minus_inf:  # zero-probability entries on both sides (finite KLs), in two different chunks
        x[1, 5:9] = float("-inf")
        y[1, 5:9] = float("-inf")
        x[5, 30:] = float("-inf")
        y[5, 30:] = float("-inf")
    w = torch.randn(n, 3, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.arange(n) % 5, (torch.arange(n) * 7 + 2) % 40], dim=-1)
    ids[1, 0] = 10  # a finite entry in the row with -inf entries
    return x, y, w, ids


def _all_grads(x, y, w, ids, chunk_size, temperature=1.0, vocab_size=None):
    """Loss of every differentiable output of every public function; returns (values, grads)."""
    kw = dict(chunk_size=chunk_size, temperature=temperature, vocab_size=vocab_size)
    xp, yq = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    lp, h = vocab_parallel_log_probs_and_entropy(xp, ids, **kw)
    h_only = vocab_parallel_entropy(xp, **kw)
    lp_only = vocab_parallel_log_probs(xp, ids[:, :1], **kw)
    kpq, kqp, hp, lpp = vocab_parallel_kl_pair(xp, yq, ids, **kw)
    k_only = vocab_parallel_kl(xp, yq, **kw)
    total = ((lp.double() * w[:, :2]).sum() + (h.double() * w[:, 2]).sum() + (h_only.double() * w[:, 0]).sum()
             + (lp_only.double()[:, 0] * w[:, 1]).sum() + (kpq.double() * w[:, 0]).sum()
             + (kqp.double() * w[:, 1]).sum() + (hp.double() * w[:, 2]).sum() + (k_only.double() * w[:, 2]).sum())
    total.backward()
    return [lp, h, h_only, lp_only, kpq, kqp, hp, lpp, k_only], (xp.grad, yq.grad)


def _ref_all(x, y, w, ids, temperature=1.0, vocab_size=None):
    xr, yr = x.double().requires_grad_(True), y.double().requires_grad_(True)
    lp = ref.log_probs(xr, ids, vocab_size, temperature)
    h = ref.entropy(xr, vocab_size, temperature)
    kpq, kqp = ref.kl(xr, yr, vocab_size, temperature), ref.kl(yr, xr, vocab_size, temperature)
    total = ((lp * w[:, :2]).sum() + (h * w[:, 2]).sum() + (h * w[:, 0]).sum() + (lp[:, 0] * w[:, 1]).sum()
             + (kpq * w[:, 0]).sum() + (kqp * w[:, 1]).sum() + (h * w[:, 2]).sum() + (kpq * w[:, 2]).sum())
    total.backward()
    return [lp, h, h, lp[:, :1], kpq, kqp, h, lp, kpq], (xr.grad, yr.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_backward_equals_unchunked_and_the_reference(dtype):
    x, y, w, ids = _logits()
    x, y = x.to(dtype), y.to(dtype)
    vals0, grads0 = _all_grads(x, y, w, ids, None)
    for cs in (1, 3):
        vals, grads = _all_grads(x, y, w, ids, cs)
        for a, b in zip(vals + list(grads), vals0 + list(grads0)):
            assert torch.equal(a, b), cs
    rvals, rgrads = _ref_all(x, y, w, ids)
    for mine, theirs in zip(vals0, rvals):
        assert ref.rel_err(mine, theirs) <= 1e-6
    if dtype == torch.float32:  # (bf16: autograd sums the 8 outputs' gradients in bf16; each alone is in test_loss)
        for mine, theirs in zip(grads0, rgrads):
            assert ref.rel_err(mine, theirs) <= 2e-6


@pytest.mark.parametrize("temperature", [2.0, 0.7])
def test_temperatures_in_every_function(temperature):
    x, y, w, ids = _logits(minus_inf=False, seed=1)
    ids = ids % 37
    vals, grads = _all_grads(x, y, w, ids, 3, temperature=temperature, vocab_size=37)
    rvals, rgrads = _ref_all(x, y, w, ids, temperature=temperature, vocab_size=37)
    for mine, theirs in zip(vals, rvals):
        assert ref.rel_err(mine, theirs) <= 1e-6
    for mine, theirs in zip(grads, rgrads):
        assert ref.rel_err(mine, theirs) <= 2e-6
    _, lse = vocab_parallel_log_softmax_stats(x, temperature=temperature, vocab_size=37)
    assert ref.rel_err(lse, ref.lse(x, 37, temperature)) <= 1e-6
    tv, ti = vocab_parallel_topk(x, 5, temperature=temperature, vocab_size=37)
    rv, ri = ref.masked_log_softmax(x, 37, temperature).topk(5, -1)
    assert ref.rel_err(tv, rv) <= 1e-6 and torch.equal(ti, ri)


def test_large_logits_at_temperature_two():
    # z / T is what is shifted by its row maximum: logits of +-300 at T = 2 stay exact (no underflow of
    # exp(z - max) to 0), for the statistics, the entropy, the log-probs and the KL
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(8)) + 300.0
    x[:, ::2] -= 600.0
    y = x.flip(-1).contiguous()
    ids = torch.tensor([[0, 1], [2, 5], [7, 23]])
    _, lse = vocab_parallel_log_softmax_stats(x, temperature=2.0)
    assert ref.rel_err(lse, ref.lse(x, temperature=2.0)) <= 1e-6
    assert ref.rel_err(vocab_parallel_entropy(x, temperature=2.0), ref.entropy(x, temperature=2.0)) <= 1e-6
    assert ref.rel_err(vocab_parallel_log_probs(x, ids, temperature=2.0), ref.log_probs(x, ids, temperature=2.0)) <= 1e-6
    assert ref.rel_err(vocab_parallel_kl(x, y, temperature=2.0), ref.kl(x, y, temperature=2.0)) <= 1e-6


def test_default_temperature_is_one():
    x, _, _, ids = _logits(minus_inf=False, seed=2)
    lp, h = vocab_parallel_log_probs_and_entropy(x, ids)
    assert ref.rel_err(lp, ref.log_probs(x, ids)) <= 1e-6 and ref.rel_err(h, ref.entropy(x)) <= 1e-6


def test_single_token_single_id_gradient():
    x = torch.randn(1, 12, generator=torch.Generator().manual_seed(3), requires_grad=True)
    ids = torch.tensor([[4]])
    vocab_parallel_log_probs(x, ids).sum().backward()
    expected = torch.nn.functional.one_hot(torch.tensor(4), 12).double() - torch.softmax(x.detach().double(), -1)[0]
    torch.testing.assert_close(x.grad[0].double(), expected, atol=1e-6, rtol=0)


def test_minus_inf_logits_give_minus_inf_log_probs_and_finite_gradients():
    x, y, w, ids = _logits()
    at_inf = ids.clone()
    at_inf[1, 1] = 6  # x[1, 6] = -inf
    xp = x.clone().requires_grad_(True)
    lp = vocab_parallel_log_probs(xp, at_inf)
    assert float(lp[1, 1]) == float("-inf")
    _, _, _, lp_pair = vocab_parallel_kl_pair(x, y, at_inf)
    assert float(lp_pair[1, 1]) == float("-inf")
    lp[torch.isfinite(lp)].sum().backward()
    assert bool(torch.isfinite(xp.grad).all())
    # the entropy's gradient over rows with -inf entries, against the reference
    xp = x.clone().requires_grad_(True)
    (vocab_parallel_entropy(xp).double() * w[:, 0]).sum().backward()
    xr = x.double().requires_grad_(True)
    (ref.entropy(xr) * w[:, 0]).sum().backward()
    assert ref.rel_err(xp.grad, xr.grad) <= 2e-6


@pytest.mark.parametrize("used", ["pq", "qp", "h", "pq+qp", "pq+h", "qp+h", "pq+qp+h"])
def test_kl_pair_every_output_and_both_sides_differentiated(used):
    x, y, w, _ = _logits(seed=4)
    for side in ("p", "q", "pq"):
        xp = x.clone().requires_grad_("p" in side)
        yq = y.clone().requires_grad_("q" in side)
        outs = vocab_parallel_kl_pair(xp, yq, chunk_size=3, temperature=0.9)
        xr, yr = x.double().requires_grad_("p" in side), y.double().requires_grad_("q" in side)
        routs = (ref.kl(xr, yr, temperature=0.9), ref.kl(yr, xr, temperature=0.9), ref.entropy(xr, temperature=0.9))
        total = rtotal = 0.0
        for j, name in enumerate(("pq", "qp", "h")):
            if name in used.split("+"):
                total = total + (outs[j].double() * w[:, j]).sum()
                rtotal = rtotal + (routs[j] * w[:, j]).sum()
        total.backward()
        if rtotal.requires_grad:  # (H(p) alone has no q-side graph in the reference)
            rtotal.backward()
        for mine, theirs in ((xp, xr), (yq, yr)):
            if theirs.requires_grad:
                g = torch.zeros_like(theirs) if theirs.grad is None else theirs.grad
                assert mine.grad is not None and ref.rel_err(mine.grad, g) <= 2e-6, (used, side)


def test_infinite_kl_on_a_masked_row_keeps_the_gradient_finite():
    x, y, w, _ = _logits(minus_inf=False, seed=5)
    y[2, :10] = float("-inf")  # p has mass where q has none: KL(p||q) = +inf on row 2
    xp = x.clone().requires_grad_(True)
    kpq = vocab_parallel_kl(xp, y)
    assert float(kpq[2]) == float("inf") and bool(torch.isfinite(kpq[torch.arange(7) != 2]).all())
    weights = w[:, 0].clone()
    weights[2] = 0.0
    (torch.where(torch.isfinite(kpq), kpq, 0.0).double() * weights).sum().backward()
    assert bool(torch.isfinite(xp.grad).all()) and float(xp.grad[2].abs().max()) == 0.0
    keep = torch.arange(7) != 2
    xr = x.double()[keep].requires_grad_(True)
    (ref.kl(xr, y.double()[keep]) * weights[keep]).sum().backward()
    assert ref.rel_err(xp.grad[keep], xr.grad) <= 2e-6


def test_fp32_outputs_for_fp64_inputs_and_a_float64_default_dtype():
    x, y, w, ids = _logits(minus_inf=False, seed=6)
    vals32, grads32 = _all_grads(x, y, w, ids, 3)
    # fp64 logits are computed in fp32 (the documented accumulation), outputs fp32
    vals64, grads64 = _all_grads(x.double(), y.double(), w, ids, 3)
    for a, b in zip(vals64, vals32):
        assert a.dtype == torch.float32 and ref.rel_err(a, b) <= 1e-6
    for a, b in zip(grads64, grads32):
        assert a.dtype == torch.float64 and ref.rel_err(a, b) <= 2e-6
    # torch's default dtype does not leak into the kernels' buffers or outputs
    student, teacher = x.view(1, 7, 40), y.view(1, 7, 40)
    target = ids[:, :1].view(1, 7)
    old = torch.log_softmax(student, -1).gather(-1, target[..., None])[..., 0] - 0.1

    def run():
        vals, grads = _all_grads(x, y, w, ids, 3)
        out = list(vals) + list(grads)
        for mode in ("topk", "full"):
            cfg = EOPDConfig(mode=mode, top_k=4)
            xs = student.clone().requires_grad_(True)
            loss, _, m = eopd_loss(xs, teacher_signals(teacher, target, cfg), old, torch.ones(1, 7), cfg)
            loss.backward()
            out += [loss, xs.grad] + [m[k] for k in sorted(m)]
        sig = teacher_signals(teacher, target, EOPDConfig(top_k=4))
        out += [getattr(sig, f) for f in ("target_log_probs", "entropy", "topk_log_probs", "rest_log_prob")]
        _, lse = vocab_parallel_log_softmax_stats(x)
        return out + [lse, vocab_parallel_topk(x, 3)[0]]

    base = run()
    old_default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        again = run()
    finally:
        torch.set_default_dtype(old_default)
    for a, b in zip(again, base):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_log1mexp_against_a_400_digit_reference():
    xs = [-1e-20, -1e-12, -1e-6, -0.3, -math.log(2.0) + 1e-12, -math.log(2.0), -math.log(2.0) - 1e-12, -0.7, -1.0,
          -10.0, -40.0, -700.0]
    got = _log1mexp(torch.tensor(xs, dtype=torch.float64))
    for x, g in zip(xs, got.tolist()):
        with localcontext() as ctx:
            ctx.prec = 400  # 1 - e^-700 needs ~305 digits
            exact = float((1 - Decimal(x).exp()).ln())
        assert abs(g - exact) <= 4e-16 * abs(exact), (x, g, exact)
    assert float(_log1mexp(torch.tensor(0.5, dtype=torch.float64))) == float("-inf")  # clamped to x <= 0
