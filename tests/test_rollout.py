"""Rollout: batch layout (pure, in-process) and the static engine on a tiny GPTModel (torchrun).

The multi-rank part runs tests/scripts/rollout_check.py once at TP=1 and once at TP=2 (gloo) and
asserts on its reports; the GPU-only dynamic engine runs the same script under ``-m gpu``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import run_torchrun
from megatron_eaopd.rollout import RolloutConfig, RolloutParams, assemble_batch, sampling_seed
from megatron_eaopd.rollout.engine import MegatronTokenizer

EOS = 127
ENGINE_EOS = EOS  # the stop id of tests/scripts/rollout_check.py


# ---------------------------------------------------------------------------------------------
# pure layout


def test_assemble_batch_layout_static_eos_and_truncation():
    # row 0 stopped at EOS (static engine: EOS not returned), row 1 hit max_new_tokens=3
    b = assemble_batch(
        prompts=[[1, 2, 3], [4, 5]],
        responses=[[10, 11], [20, 21, 22]],
        logprobs=[[-1.0, -2.0], [-3.0, -4.0, -5.0]],
        engine_stopped=[True, False],
        eos_ids=[EOS],
        max_new_tokens=3,
        decode=lambda ids: " ".join(map(str, ids)),
    )
    assert b.tokens.tolist() == [[1, 2, 3, 10, 11, EOS], [4, 5, 20, 21, 22, EOS]]  # row 1 padded with EOS
    assert b.prompt_lengths.tolist() == [3, 2] and b.response_lengths.tolist() == [3, 3]
    assert b.finished.tolist() == [True, False]
    # target position s predicts tokens[s+1]
    assert b.loss_mask.long().tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]]
    assert b.logprob_mask.long().tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 0]]  # appended EOS: no engine value
    assert b.raw_logprobs.tolist() == [[0, 0, -1, -2, 0], [0, -3, -4, -5, 0]]
    assert torch.equal(b.targets[b.loss_mask], torch.tensor([10, 11, EOS, 20, 21, 22]))
    assert b.response_texts == ["10 11", "20 21 22"]
    assert b.inputs.shape == b.loss_mask.shape == b.position_ids.shape == (2, 5)
    assert b.num_response_tokens == 6 and b.response_tokens(0) == [10, 11, EOS]


def test_assemble_batch_returned_eos_and_secondary_stop_ids():
    # dynamic engine returns the EOS with its log-prob; a secondary stop id (99) cuts the response
    b = assemble_batch(
        prompts=[[1], [1]],
        responses=[[10, EOS], [10, 99, 12, 13]],
        logprobs=[[-1.0, -0.5], [-1.0, -2.0, -3.0, -4.0]],
        engine_stopped=[False, False],
        eos_ids=[EOS, 99],
        max_new_tokens=4,
    )
    assert b.response_tokens(0) == [10, EOS] and b.response_tokens(1) == [10, 99]
    assert b.finished.tolist() == [True, True]
    assert b.logprob_mask.long().tolist() == [[1, 1], [1, 1]]
    assert b.raw_logprobs.tolist() == [[-1.0, -0.5], [-1.0, -2.0]]
    assert b.response_texts == []


def test_assemble_batch_without_logprobs_and_errors():
    b = assemble_batch([[1, 2]], [[3]], [None], [True], [EOS], 4)
    assert b.logprob_mask.sum() == 0 and b.loss_mask.long().tolist() == [[0, 1, 1]]
    with pytest.raises(ValueError, match="empty prompt"):
        assemble_batch([[]], [[3]], [None], [False], [EOS], 4)
    with pytest.raises(ValueError, match="log-probs for"):
        assemble_batch([[1]], [[3, 4]], [[-1.0]], [False], [EOS], 4)
    with pytest.raises(ValueError, match="EOS"):
        assemble_batch([[1]], [[3]], [None], [False], [], 4)


def test_params_seed_and_tokenizer_adaptor():
    with pytest.raises(ValueError, match="top_p"):
        RolloutParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        RolloutParams(temperature=0.0)
    rp = RolloutConfig(n=4, max_new_tokens=32, top_p=0.9, engine="static").params()
    assert isinstance(rp, RolloutParams) and (rp.n, rp.max_new_tokens, rp.top_p, rp.temperature) == (4, 32, 0.9, 1.0)
    assert sampling_seed(7, 0) == 7 and sampling_seed(7, 1) != sampling_seed(7, 0)
    assert sampling_seed(7, 1, dp_rank=1) != sampling_seed(7, 1, dp_rank=0)

    class Tok:
        eos_token_id = 5

        def __len__(self):
            return 10

        def encode(self, text, add_special_tokens=False):
            return [int(x) for x in text.split()]

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    t = MegatronTokenizer(Tok(), eod=5)
    assert (t.eod, t.pad, t.vocab_size, t.bos) == (5, 5, 10, None)
    assert t.tokenize("1 2 3") == [1, 2, 3] and t.detokenize(torch.tensor([1, 2])) == "1 2"
    assert t.offsets([1, 22], "1 22") == [0, 1]


# ---------------------------------------------------------------------------------------------
# static engine on a tiny GPTModel (torchrun)


def _by_name(results):
    return {rec["name"]: rec for rec in results}


@pytest.fixture(scope="module")
def tp1():
    return _by_name(run_torchrun("rollout_check.py", 1)[0])


@pytest.fixture(scope="module")
def tp2():
    res = run_torchrun("rollout_check.py", 2)
    return _by_name(res[0]), _by_name(res[1])


def test_shapes_padding_and_masks(tp1):
    a = tp1["A"]
    tok = torch.tensor(a["tokens"]).long()
    plen, rlen = torch.tensor(a["prompt_lengths"]).long(), torch.tensor(a["response_lengths"]).long()
    mask = torch.tensor(a["loss_mask"]).bool()
    assert a["engine"] == "static"
    assert tok.shape == (8, int((plen + rlen).max())) and mask.shape == (8, tok.shape[1] - 1)
    assert plen.tolist() == [6, 6, 2, 2, 10, 10, 4, 4] and a["prompt_index"] == [0, 0, 1, 1, 2, 2, 3, 3]
    for b in range(8):
        p, r = int(plen[b]), int(rlen[b])
        assert tok[b, :p].tolist() == [[5, 17, 42, 99, 3, 8], [7, 1], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
                                       [100, 3, 3, 9]][b // 2]
        assert (tok[b, p + r :] == ENGINE_EOS).all()  # right padding with the EOS/pad id
        assert mask[b].nonzero().flatten().tolist() == list(range(p - 1, p - 1 + r))
        assert 1 <= r <= 13 and (r <= 12 or a["finished"][b])  # <= max_new_tokens (+ EOS)
    assert a["global_rng_kept"], "rollout must not reseed the global torch RNG"


def test_raw_logprobs_equal_full_forward(tp1):
    # engine log-probs == log_softmax of a full forward at the sampled tokens (T=1), fp32
    assert tp1["A"]["lp_err"] < 1e-5
    assert tp1["EOS"]["lp_err"] < 1e-5
    # at T=0.5/top-p 0.9 they are STILL the raw T=1 log-probs (the documented engine trap)
    assert tp1["T05"]["lp_err"] < 1e-5


def test_seed_reproducibility(tp1):
    assert tp1["C_repeat"]["tokens"] == tp1["A"]["tokens"]  # same seed + call index, fresh object
    assert tp1["C_repeat"]["raw_logprobs"] == tp1["A"]["raw_logprobs"]
    assert tp1["B_next_call"]["tokens"] != tp1["A"]["tokens"]  # next call index: new stream


def test_stop_at_eos(tp1):
    a, e = tp1["A"], tp1.get("EOS")
    assert e is not None, "row 0 of run A had no fresh token to use as EOS"
    stop, k = e["stop"], e["k"]
    assert e["finished"][0] == 1 and e["responses"][0] == a["responses"][0][:k] + [stop]
    # the appended EOS is a loss target without an engine log-prob
    p = int(e["prompt_lengths"][0])
    eos_pos = p - 1 + k
    assert e["loss_mask"][0][eos_pos] == 1 and e["logprob_mask"][0][eos_pos] == 0
    assert e["tokens"][0][p + k] == stop
    for ra, re_ in zip(a["responses"], e["responses"]):  # same stream: every row is run A's cut at `stop`
        exp = ra[: ra.index(stop) + 1] if stop in ra else ra
        assert re_ == exp
    assert e["finished"] == [int(stop in r or r[-1] == ENGINE_EOS) for r in e["responses"]]


def test_tp2_identical_on_ranks_and_equal_to_tp1(tp1, tp2):
    r0, r1 = tp2
    assert r0["A"]["tokens"] == r1["A"]["tokens"]
    assert r0["A"]["tokens"] == tp1["A"]["tokens"]
    assert r0["EOS"]["responses"] == tp1["EOS"]["responses"]
    assert r0["A"]["lp_err"] < 1e-5 and r1["A"]["lp_err"] < 1e-5


def test_megatron_generator_protocol(tp1):
    g = tp1["GEN"]
    assert g["sample_type"] == "megatron_eaopd.evaluation.runner.Sample"
    assert g["shape"] == [2, 2] and g["same"]
    for group in g["samples"]:
        for text, num_tokens, truncated in group:
            assert 1 <= num_tokens <= 8 and truncated == (num_tokens == 8) and len(text.split()) == num_tokens


def test_padded_vocabulary_rows_are_never_sampled(tp1, tp2):
    # rows >= the true vocabulary (120 of 128) get +100 logits; masked by every engine, never sampled
    for rec in (tp1, *tp2):
        for kind in ("static", "recompute"):
            r = rec[f"PAD_{kind}"]
            assert r["engine"] == kind and r["n_tokens"] > 0
            assert r["max_id"] < 120, r
    # the check can fail: without the true vocabulary set, the forced rows are all that is sampled
    assert tp1["PAD_unmasked"]["min_id"] >= 120


def test_recompute_engine_at_pp1():
    rec = _by_name(run_torchrun("rollout_check.py", 1, "recompute")[0])
    a = rec["A"]
    assert a["engine"] == "recompute" and a["prompt_index"] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sum(a["logprob_mask"][b][t] for b in range(8) for t in range(len(a["logprob_mask"][b]))) == 0
    assert rec["C_repeat"]["tokens"] == a["tokens"] and rec["B_next_call"]["tokens"] != a["tokens"]
    for b in range(8):
        r = a["responses"][b]
        assert 1 <= len(r) <= 13 and (len(r) <= 12 or a["finished"][b])
        assert a["finished"][b] == int(r[-1] == ENGINE_EOS) and ENGINE_EOS not in r[:-1]
    e = rec.get("EOS")
    if e is not None:  # two stop ids: each row ends at the first of either, and keeps the one it met
        for ra, re_ in zip(a["responses"], e["responses"]):
            cut = next((i for i, t in enumerate(ra) if t == e["stop"]), None)
            assert re_ == (ra[: cut + 1] if cut is not None else ra)


@pytest.mark.gpu
def test_dynamic_engine_gpu():
    from megatron_eaopd.models.backend import flash_attn_unavailable_reason

    reason = flash_attn_unavailable_reason()
    if reason:
        pytest.skip(f"megatron-core's dynamic inference engine cannot run: {reason}")
    rec = _by_name(run_torchrun("rollout_check.py", 1, "dynamic")[0])
    a = rec["A"]
    assert a["engine"] == "dynamic"
    assert a["lp_err"] < 5e-2  # bf16 weights: KV-cached decode vs one full forward
    assert rec["C_repeat"]["tokens"] == a["tokens"]
    e = rec.get("EOS")
    if e is not None:  # the first stop id and the second (a stop word in the dynamic engine) both end rows
        for ra, re_ in zip(a["responses"], e["responses"]):
            cut = next((i for i, t in enumerate(ra) if t in (e["stop"], ENGINE_EOS)), None)
            assert re_ == (ra[: cut + 1] if cut is not None else ra)
