"""Stop tokens with the real Qwen3 parts: a Qwen3-Base student prompted with the chat template must stop
at <|im_end|> although its config.json / generation_config.json declare only <|endoftext|>.

The scaled-down Qwen3-4B-Base (tests/qwen3/: the real tokenizer, config and generation config, random
weights, 151,936 rows) is built and loaded through the converter's path; its output is then FORCED
(a hook on the output layer) to emit two chosen tokens and then <|im_end|>, so the stop is certain
whatever the random weights would sample. In this process, world of one (gloo).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from qwen3.build_models import ENDOFTEXT, IM_END, build_pair, qwen3_tokenizer_dir

A, B = 785, 4226  # two ordinary tokens the forced output emits before <|im_end|>
NEW = 12


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """The tiny Qwen3-4B-Base as a Megatron model (TP = PP = 1), its info and the real tokenizer."""
    from transformers import AutoTokenizer

    from megatron_eaopd.distributed import destroy, init_distributed, init_model_parallel, seed_everything
    from megatron_eaopd.models.convert import load_hf_weights
    from megatron_eaopd.models.provider import build_gpt_model

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):  # a world of one on an in-process store (no port)
        os.environ.pop(k, None)
    init_distributed(timeout_s=300)
    init_model_parallel(1, 1)
    seed_everything(1)
    pair = build_pair(tmp_path_factory.mktemp("qwen3_stop_pair"))
    chunks, info = build_gpt_model(str(pair["student"]), perform_initialization=False)
    load_hf_weights(chunks, pair["student"], progress=False)
    yield SimpleNamespace(chunks=chunks, info=info, tok=AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir())),
                          assets=str(pair["student"]))
    destroy()


class _Script:
    """Forward hook on the output layer: call i adds +100 to the logit of ``script[i]`` (later calls: none).

    One prompt (all rows the same length): call 0 is the prefill, call i the i-th decode step, so the
    engine's i-th sampled token is ``script[i]``."""

    def __init__(self, model, script):
        self.script, self.calls = list(script), 0
        self.handle = model.output_layer.register_forward_hook(self)

    def __call__(self, module, args, output):
        logits, bias = output
        if self.calls < len(self.script):
            logits = logits.clone()
            logits[..., self.script[self.calls]] += 100.0
        self.calls += 1
        return logits, bias


def _prompt(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+3? Answer in \\boxed{}."}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=False)
    return tok.encode(text, add_special_tokens=False)


def test_qwen3_base_stop_ids_include_the_chat_end_of_turn(qwen3):
    from megatron_eaopd.rollout import chat_end_of_turn_ids, stop_token_ids

    assert qwen3.info.eos_token_ids == (ENDOFTEXT,)  # what Qwen3-Base's config + generation config declare
    assert chat_end_of_turn_ids(qwen3.tok) == (IM_END,)
    assert stop_token_ids(qwen3.tok, qwen3.info.eos_token_ids, chat_template=True) == (ENDOFTEXT, IM_END)


@pytest.mark.parametrize("kind", ["static", "recompute"])
def test_forced_output_stops_at_im_end(qwen3, kind):
    from megatron_eaopd.rollout import RolloutParams, stop_token_ids
    from megatron_eaopd.rollout.factory import make_engine

    stops = stop_token_ids(qwen3.tok, qwen3.info.eos_token_ids, chat_template=True)
    engine = make_engine(qwen3.chunks, qwen3.tok, stop_ids=stops, kind=kind)
    script = _Script(qwen3.chunks[0], [A, B, IM_END])
    try:
        batch = engine.generate([_prompt(qwen3.tok)], RolloutParams(max_new_tokens=NEW, n=2, seed=3))
    finally:
        script.handle.remove()
    for row in range(2):
        assert batch.response_tokens(row) == [A, B, IM_END]  # stopped, and the stop token is the one met
        assert bool(batch.finished[row])
    assert int(batch.loss_mask.sum()) == 6  # the stop token is trained on: the policy learns to stop
    assert batch.response_texts[0] == qwen3.tok.decode([A, B])


def test_without_the_end_of_turn_the_response_runs_on(qwen3):
    """The defect this guards against: stopping only on the config's <|endoftext|> runs past <|im_end|>."""
    from megatron_eaopd.rollout import RolloutParams
    from megatron_eaopd.rollout.factory import make_engine

    engine = make_engine(qwen3.chunks, qwen3.tok, stop_ids=qwen3.info.eos_token_ids, kind="static")
    script = _Script(qwen3.chunks[0], [A, B, IM_END] + [A] * (NEW - 3))
    try:
        batch = engine.generate([_prompt(qwen3.tok)], RolloutParams(max_new_tokens=NEW, n=1, seed=3))
    finally:
        script.handle.remove()
    r = batch.response_tokens(0)
    assert r[:3] == [A, B, IM_END] and len(r) == NEW and not bool(batch.finished[0])


def test_padded_rows_never_sampled_with_the_real_vocabulary(qwen3):
    """151,936 real rows padded to 152,064 (what TP = 2 pads to: a multiple of 128 x 2): the 128 padded
    rows, forced to the largest logits, are never sampled."""
    from megatron_eaopd.models.convert import load_hf_weights
    from megatron_eaopd.models.provider import build_gpt_model
    from megatron_eaopd.rollout import RolloutParams
    from megatron_eaopd.rollout.factory import make_engine

    chunks, info = build_gpt_model(qwen3.assets, perform_initialization=False, make_vocab_size_divisible_by=256)
    load_hf_weights(chunks, qwen3.assets, progress=False)
    assert (info.true_vocab_size, info.padded_vocab_size) == (151936, 152064)
    engine = make_engine(chunks, qwen3.tok, stop_ids=(ENDOFTEXT, IM_END), kind="static")
    handle = chunks[0].output_layer.register_forward_hook(
        lambda m, a, out: (out[0] + 100.0 * (torch.arange(out[0].shape[-1]) >= 151936).to(out[0].dtype), out[1]))
    try:
        batch = engine.generate([_prompt(qwen3.tok)], RolloutParams(max_new_tokens=6, n=2, seed=5))
    finally:
        handle.remove()
    assert max(max(batch.response_tokens(i)) for i in range(2)) < 151936
