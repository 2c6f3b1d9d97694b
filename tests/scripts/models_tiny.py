"""Tiny random HF models for the converter tests (8 heads / 2 KV groups so TP=2 works; vocab 300
pads to 384 at TP1 and 512 at TP2, so resharding crosses a padding change)."""

from pathlib import Path

import torch

KINDS = ("qwen3_tied", "qwen3_untied", "qwen2_bias_bin", "llama_rope")
COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=128)


def make_tiny(kind: str, out: str | Path) -> Path:
    """Write one tiny model (fp32, random, seeded) to ``out``; returns ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    out = Path(out)
    g = torch.Generator().manual_seed(KINDS.index(kind))
    if kind.startswith("qwen3"):
        cfg = Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=kind == "qwen3_tied", rope_theta=1e6)
        model = Qwen3ForCausalLM(cfg)
    elif kind == "qwen2_bias_bin":
        cfg = Qwen2Config(**COMMON, tie_word_embeddings=True)
        model = Qwen2ForCausalLM(cfg)
    elif kind == "llama_rope":
        cfg = LlamaConfig(**COMMON, tie_word_embeddings=False, rope_theta=50000.0,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # non-trivial values everywhere, norms included
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 0.08) + (1.0 if p.dim() == 1 else 0.0))
    if kind == "qwen3_tied":
        model.save_pretrained(out, max_shard_size="100KB")  # sharded + index
    elif kind == "qwen2_bias_bin":
        model.save_pretrained(out)
        (out / "model.safetensors").unlink()
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    else:
        model.save_pretrained(out)
    return out


def fixed_ids(vocab: int = 300, b: int = 2, s: int = 40) -> torch.Tensor:
    """Deterministic token ids ``[b, s]`` (longer than llama_rope's original context of 16)."""
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, vocab, (b, s), generator=g)


def hf_logits(hf_dir) -> torch.Tensor:
    """fp32 HF logits ``[b, s, V]`` on :func:`fixed_ids`."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return m(fixed_ids()).logits.float()
