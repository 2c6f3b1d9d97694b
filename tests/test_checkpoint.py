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
