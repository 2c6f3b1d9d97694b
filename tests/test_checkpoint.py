"""megatron_eaopd.checkpoint: loading tolerates only absent module extra state (TE's core attention),
on a plain torch module and through a real save -> load of a tiny GPTModel."""

from __future__ import annotations

import pytest
import torch

from megatron_eaopd.checkpoint import load_model_state


class _ExtraOnly(torch.nn.Module):
    """Like TE's core attention: extra state, no weights."""

    def get_extra_state(self):
        return torch.tensor([1.0])

    def set_extra_state(self, state):
        self.seen = state


class _Net(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(3, 2)
        self.attn = _ExtraOnly()


def _without(sd: dict, *keys: str) -> dict:
    return {k: v for k, v in sd.items() if k not in keys}


def test_absent_extra_state_loads_at_strict():
    src, dst = _Net(0), _Net(1)
    sd = _without(src.state_dict(), "attn._extra_state")
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*attn\._extra_state"):
        _Net(2).load_state_dict(sd, strict=True)  # torch's own strict load: the defect
    load_model_state(dst, sd, strict=True)
    assert torch.equal(dst.lin.weight, src.lin.weight) and torch.equal(dst.lin.bias, src.lin.bias)
    load_model_state(dst, {**sd, "x._extra_state3": None}, strict=True)  # TE GroupedLinear-style extra keys too


def test_real_missing_or_unexpected_keys_fail_and_are_named():
    src, dst = _Net(0), _Net(1)
    sd = _without(src.state_dict(), "attn._extra_state", "lin.weight")
    with pytest.raises(RuntimeError, match=r"1 weight\(s\) of the model are not in ck7: lin\.weight\. The model"):
        load_model_state(dst, sd, strict=True, source="ck7")
    with pytest.raises(RuntimeError, match=r"1 key\(s\) of the checkpoint are not in the model: extra\.bias"):
        load_model_state(dst, {**src.state_dict(), "extra.bias": torch.zeros(1)}, strict=True)
    fresh = _Net(1)
    load_model_state(fresh, sd, strict=False)  # non-strict: loads what matches
    assert torch.equal(fresh.lin.bias, src.lin.bias) and not torch.equal(fresh.lin.weight, src.lin.weight)


def test_many_missing_keys_are_counted():
    net = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(15)])
    with pytest.raises(RuntimeError, match=r"30 weight\(s\).*\.\.\. and 10 more"):
        load_model_state(net, {}, strict=True)


def test_te_style_core_attention_round_trip(torchrun, tmp_path):
    """A real GPTModel whose core attentions keep an _extra_state out of the sharded state dict (as TE's
    do under megatron-core 0.19.2) saves and loads at strict=True; a real weight left out still fails."""
    r = torchrun("ckpt_checks.py", 1, str(tmp_path), "extra_state")[0][0]
    assert r["iteration"] == 3 and len(r["extra_keys"]) == COMMON_LAYERS
    assert r["torch_strict"] is not None and "core_attention._extra_state" in r["torch_strict"]
    assert r["differs_before"] and r["same_after"]
    assert r["bad_error"] is not None and "decoder.layers.0.self_attention.core_attention.softmax_offset" in r["bad_error"]
    assert "2 weight(s) of the model are not in checkpoint" in r["bad_error"] and "_extra_state" not in r["bad_error"]
    assert r["bad_nonstrict_same"]


COMMON_LAYERS = 2  # tests/scripts/models_tiny.COMMON num_hidden_layers


@pytest.fixture(scope="module")
def opt_runs(tmp_path_factory):
    """DP = 2 save, then resumes at DP = 2 (+ a TP = 2 attempt) and at DP = 1 (scripts/ckpt_checks.py)."""
    from conftest import run_torchrun

    work = tmp_path_factory.mktemp("opt")
    saved = run_torchrun("ckpt_checks.py", 2, str(work), "opt_save", timeout=600)
    dp2 = run_torchrun("ckpt_checks.py", 2, str(work), "opt_resume", timeout=600)
    dp1 = run_torchrun("ckpt_checks.py", 1, str(work), "opt_resume", timeout=600)
    return work, saved, dp2, dp1


def test_distributed_optimizer_saved_dp_reshardable_without_copies(opt_runs):
    _, saved, _, _ = opt_runs
    for rank in (0, 1):
        r = saved[rank][0]
        assert r["sharding"] == r["saved"] == "dp_reshardable"
        assert r["n_params"] >= 9 and r["n_tensors"] == 3 * r["n_params"]  # fp32 main param, exp_avg, exp_avg_sq
        assert r["n_views"] == r["n_tensors"]  # all of them the optimizer's own tensors: nothing gathered or copied
        assert r["steps"] == [2.0]
    assert saved[0][0]["n_params"] + saved[1][0]["n_params"] >= 19  # each rank holds its own part (params may straddle)


def test_distributed_optimizer_resume_exact_at_dp2_and_dp1(opt_runs):
    """The full optimizer state after a resume equals the state at save, at the same DP size and at DP = 1;
    Adam's step survives; at DP = 2 the next step is bit-identical to the uninterrupted run."""
    _, _, dp2, dp1 = opt_runs
    for r in (dp2[0][0], dp2[1][0], dp1[0][0]):
        assert r["iteration"] == 2 and r["note"] == "opt"
        assert r["state_diff"] == 0.0 and r["min_exp_avg_sq_max"] > 0.0 and r["weight_diff"] == 0.0, r
        assert r["steps"] == r["ref_steps"] == [2.0], r  # torch Adam's step, not the dummy init's 1 (nor shared)
    assert dp2[0][0]["step3_diff"] == 0.0 and dp2[1][0]["step3_diff"] == 0.0
    # DP = 1 averages the same global batch in another order: bf16 weights may differ by an ulp
    assert dp1[0][0]["step3_diff"] < 1e-3, dp1[0][0]
    for rank in (0, 1):
        e = dp2[rank][0]["tp_error"]
        assert e and "tp=1 pp=1" in e and "this run has tp=2 pp=1" in e and "only the data-parallel size may change" in e


def test_optimizer_state_mismatches_are_refused(opt_runs):
    from megatron_eaopd.checkpoint_optimizer import optimizer_sharded_state_dict, saved_optimizer_sharding

    work = opt_runs[0]
    assert saved_optimizer_sharding(work / "ck") == "dp_reshardable"
    with pytest.raises(ValueError, match="holds distributed-optimizer state .*use_distributed_optimizer: true"):
        optimizer_sharded_state_dict(None, {}, use_distributed_optimizer=False, is_loading=True, checkpoint=work / "ck")
    with pytest.raises(ValueError, match="needs checkpoint="):
        optimizer_sharded_state_dict(None, {}, use_distributed_optimizer=True, is_loading=True)
    with pytest.raises(ValueError, match="'fully_sharded_model_space' is not supported"):
        optimizer_sharded_state_dict(None, {}, use_distributed_optimizer=True, is_loading=False,
                                     sharding_type="fully_sharded_model_space")
