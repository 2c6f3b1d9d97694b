"""Unit tests for models/: HF config -> TransformerConfig table, RoPE parsing, vocab padding,
qkv / fc1 fusing and TP sharding, name canonicalisation, backend detection (TE, FlashAttention).
Single process, no distributed init."""

from __future__ import annotations

import pytest
import torch

from megatron_eaopd.models import backend
from megatron_eaopd.models.hf import hf_to_gpt_args, hf_to_transformer_config, load_hf_config, rope_spec
from megatron_eaopd.models.mapping import (
    MappingSpec,
    canonical_name,
    fc1_fuse,
    fc1_split,
    hf_keys,
    megatron_names,
    qkv_fuse,
    qkv_split,
    to_hf,
    to_megatron,
    tp_shard,
)
from megatron_eaopd.models.provider import pad_vocab_size

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=128)


def _cfg(kind, **kw):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    return {"qwen3": Qwen3Config, "qwen2": Qwen2Config, "llama": LlamaConfig}[kind](**{**SMALL, **kw})


def test_family_table():
    q3 = hf_to_gpt_args(_cfg("qwen3", head_dim=16, tie_word_embeddings=True))
    assert (q3.architecture, q3.qk_layernorm, q3.qkv_bias, q3.tie_word_embeddings, q3.head_dim) == ("Qwen3ForCausalLM", True, False, True, 16)
    q2 = hf_to_gpt_args(_cfg("qwen2"))
    assert (q2.architecture, q2.qk_layernorm, q2.qkv_bias, q2.head_dim) == ("Qwen2ForCausalLM", False, True, 8)
    ll = hf_to_gpt_args(_cfg("llama", attention_bias=True))
    assert (ll.architecture, ll.qkv_bias, ll.num_query_groups) == ("LlamaForCausalLM", True, 2)
    with pytest.raises(NotImplementedError, match="use_sliding_window"):
        hf_to_gpt_args(_cfg("qwen2", use_sliding_window=True))


def test_rope_theta_transformers5_and_legacy_dict():
    c = _cfg("qwen3", rope_theta=123456.0)
    assert getattr(c, "rope_theta", None) is None  # transformers 5 keeps it in rope_parameters
    assert rope_spec(c).theta == 123456.0
    legacy = load_hf_config({"model_type": "llama", **SMALL, "rope_theta": 5e5,
                             "rope_scaling": {"type": "linear", "factor": 2.0}})
    r = rope_spec(legacy)
    assert (r.theta, r.rope_type, r.factor) == (5e5, "linear", 2.0)
    r = rope_spec(_cfg("llama", rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}))
    assert (r.rope_type, r.factor, r.original_max_position_embeddings) == ("llama3", 32.0, 8192)
    with pytest.raises(NotImplementedError, match=r"rope type 'yarn' is not supported; supported: default, linear, llama3"):
        rope_spec(_cfg("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}))


def test_transformer_config_cpu_settings():
    tc, a = hf_to_transformer_config(_cfg("qwen3", head_dim=16), tp=2, pp=2, on_gpu=False)
    assert (tc.num_query_groups, tc.kv_channels, tc.ffn_hidden_size, tc.qk_layernorm, tc.add_qkv_bias) == (2, 16, 96, True, False)
    assert tc.use_cpu_initialization and not tc.sequence_parallel and tc.params_dtype == torch.float32
    assert not any([tc.bias_activation_fusion, tc.bias_dropout_fusion, tc.masked_softmax_fusion, tc.apply_rope_fusion,
                    tc.gradient_accumulation_fusion, tc.persist_layer_norm])
    assert tc.normalization == "RMSNorm" and tc.gated_linear_unit and tc.pipeline_dtype == torch.float32
    with pytest.raises(ValueError, match=r"tensor parallel size 4 must divide num_attention_heads \(8\) and num_key_value_heads \(2\)"):
        hf_to_transformer_config(_cfg("qwen3", head_dim=16), tp=4)
    with pytest.raises(ValueError, match="pipeline parallel size 3 must divide num_hidden_layers"):
        hf_to_transformer_config(_cfg("qwen3", head_dim=16), pp=3)


def test_pad_vocab_size():
    assert pad_vocab_size(300) == 384 and pad_vocab_size(300, tp=2) == 512
    assert pad_vocab_size(151936, 1) == 151936 and pad_vocab_size(151936, 2) == 152064
    assert pad_vocab_size(49152, 8) == 49152
    with pytest.raises(ValueError):
        pad_vocab_size(0)


def test_qkv_layout_and_roundtrip():
    n, g, d, h = 8, 2, 3, 5
    q = torch.arange(n * d * h, dtype=torch.float32).reshape(n * d, h)
    k = -torch.arange(g * d * h, dtype=torch.float32).reshape(g * d, h) - 1
    v = k - 1000
    fused = qkv_fuse(q, k, v, n, g, d)
    assert fused.shape == (g * (n // g + 2) * d, h)
    # group 0 = query heads 0..3, then key head 0, then value head 0
    assert torch.equal(fused[: 4 * d], q[: 4 * d]) and torch.equal(fused[4 * d: 5 * d], k[:d]) and torch.equal(fused[5 * d: 6 * d], v[:d])
    assert torch.equal(fused[6 * d: 10 * d], q[4 * d:])
    for a, b in zip(qkv_split(fused, n, g, d), (q, k, v)):
        assert torch.equal(a, b)
    bq, bk, bv = torch.randn(n * d), torch.randn(g * d), torch.randn(g * d)
    assert all(torch.equal(a, b) for a, b in zip(qkv_split(qkv_fuse(bq, bk, bv, n, g, d), n, g, d), (bq, bk, bv)))
    with pytest.raises(ValueError, match="do not match"):
        qkv_fuse(q, k[:-1], v, n, g, d)


def test_fc1_fuse_and_tp_shard():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fc1 = fc1_fuse(gate, up)
    assert all(torch.equal(a, b) for a, b in zip(fc1_split(fc1), (gate, up)))
    p = torch.nn.Parameter(torch.empty(6, 4))
    p.tensor_model_parallel, p.partition_dim = True, 0
    shard1 = tp_shard("decoder.layers.0.mlp.linear_fc1.weight", fc1, p, 1, 2)
    assert torch.equal(shard1, torch.cat([gate[3:], up[3:]]))  # [gate_r; up_r]
    row = torch.nn.Parameter(torch.empty(4, 3))
    row.tensor_model_parallel, row.partition_dim = True, 1
    w = torch.randn(4, 6)
    assert torch.equal(tp_shard("decoder.layers.0.self_attention.linear_proj.weight", w, row, 0, 2), w[:, :3])
    with pytest.raises(ValueError, match="shape mismatch"):
        tp_shard("x", torch.randn(5, 4), torch.nn.Parameter(torch.empty(6, 4)), 0, 1)


def test_canonical_names():
    assert canonical_name("module.module.decoder.layers.1.self_attention.linear_qkv.layer_norm_weight", 3) == \
        "decoder.layers.4.input_layernorm.weight"
    assert canonical_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == "decoder.layers.0.pre_mlp_layernorm.weight"
    assert canonical_name("decoder.final_layernorm.weight", 7) == "decoder.final_layernorm.weight"


@pytest.mark.parametrize("tied", [True, False])
def test_mapping_roundtrip_names(tied):
    a = hf_to_gpt_args(_cfg("qwen2", tie_word_embeddings=tied))
    spec = MappingSpec.from_args(a, 384)
    keys = hf_keys(spec)
    assert ("lm_head.weight" in keys) != tied and len(keys) == len(set(keys))
    g = torch.Generator().manual_seed(0)
    shapes = {"embed_tokens": (300, 64), "lm_head": (300, 64), "q_proj.weight": (64, 64), "k_proj.weight": (16, 64),
              "v_proj.weight": (16, 64), "q_proj.bias": (64,), "k_proj.bias": (16,), "v_proj.bias": (16,),
              "o_proj": (64, 64), "gate_proj": (96, 64), "up_proj": (96, 64), "down_proj": (64, 96)}
    src = {}
    for k in keys:
        shp = next((s for pat, s in shapes.items() if pat in k), (64,))
        src[k] = torch.randn(shp, generator=g)
    back = {}
    for name in megatron_names(spec):
        t = to_megatron(name, src.__getitem__, spec)
        if "word_embeddings" in name or "output_layer" in name:
            assert t.shape[0] == 384 and bool((t[300:] == 0).all())
        back.update(dict(to_hf(name, t, spec)))
    assert set(back) == set(src) and all(torch.equal(back[k], src[k]) for k in src)


def test_tp_shard_infers_untagged_split():
    p = torch.nn.Parameter(torch.empty(3, 4))  # no tensor_model_parallel attribute
    w = torch.randn(6, 4)
    assert torch.equal(tp_shard("decoder.layers.0.self_attention.linear_qkv.weight", w, p, 1, 2), w[3:])


@pytest.mark.parametrize("cuda, fa4, fa3, fa2, ok, needle", [
    (False, True, True, "2.8.3", False, "no CUDA device"),
    (True, False, False, None, False, "flash-attn is not installed"),
    (True, False, False, "2.7.2", False, "flash-attn 2.7.2 is too old"),
    (True, False, False, "2.7.3", True, None),               # megatron-core's floor, inclusive
    (True, False, False, "2.8.0.post2", True, None),
    (True, False, True, None, True, None),                   # FlashAttention-3 alone is enough
    (True, True, False, "2.6.0", True, None),                # so is FlashAttention-4, whatever FA2 says
])
def test_flash_attn_decision_mirrors_megatron(cuda, fa4, fa3, fa2, ok, needle):
    """megatron-core 0.19.2 Attention.forward asserts HAVE_FA4 or HAVE_FA3 or is_fa_min_version("2.7.3")
    before dynamic batching; the decision says the same and gives a one-line reason otherwise."""
    reason = backend.flash_attn_decision(cuda, fa4, fa3, fa2)
    assert (reason is None) == ok
    if needle:
        assert needle in reason and "\n" not in reason


def test_backend_on_this_machine():
    """No CUDA here: neither TE nor FlashAttention; the old import path of te_available still works."""
    from megatron_eaopd.models.provider import te_available as old_home

    assert old_home is backend.te_available
    assert backend.te_available() is False and backend.flash_attn_available() is False
    assert backend.flash_attn_unavailable_reason().startswith("no CUDA device")
    with pytest.raises(ValueError, match="unparseable version"):
        backend.flash_attn_decision(True, False, False, "not-a-version")


def test_flash_attn_reads_megatron_flags(monkeypatch):
    """With CUDA (faked), the answer comes from megatron-core's own import-time flags: none of FA2/3/4 here."""
    from megatron.core.transformer import attention as mattn

    assert not (mattn.HAVE_FA3 or mattn.HAVE_FA4) and mattn.flash_attn_with_kvcache is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backend.flash_attn_unavailable_reason.cache_clear()
    try:
        assert backend.flash_attn_unavailable_reason().startswith("flash-attn is not installed")
        monkeypatch.setattr(mattn, "HAVE_FA3", True)
        backend.flash_attn_unavailable_reason.cache_clear()
        assert backend.flash_attn_available() is True
    finally:
        backend.flash_attn_unavailable_reason.cache_clear()
