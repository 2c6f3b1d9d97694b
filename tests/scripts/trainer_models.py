"""Tiny random teacher (4 layers) / student (2 layers) pair with the real SmolLM2 tokenizer, as Megatron checkpoints.

    python tests/scripts/trainer_models.py OUT_DIR

Writes OUT_DIR/{hf_teacher,hf_student} (Llama shape: 8 heads / 2 KV groups so TP=2 splits, untied
teacher, tied student) and converts them with the project's converter to OUT_DIR/{teacher,student};
also OUT_DIR/hf_teacher_wide, a teacher with 160 more output rows than the tokenizer's 49,152 tokens
(the same tokenizer, a different logit width, as Qwen2.5-7B against Qwen2.5-1.5B).
"""

import json
import shutil
import sys
from pathlib import Path

import torch


def make(out: Path, layers: int, seed: int, tied: bool, tok_dir: Path, rows: int = 49152) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=rows, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                      rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      rope_theta=10000.0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger logits than the default init so the teacher is not uniform
        model.lm_head.weight.mul_(20.0) if not tied else model.model.embed_tokens.weight.mul_(20.0)
    model.save_pretrained(out)
    for f in tok_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy2(f, out / f.name)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return out


def main():
    from megatron_eaopd.models.convert import import_hf
    from megatron_eaopd.models.gguf import prepare_smollm2

    out = Path(sys.argv[1])
    tok = prepare_smollm2()
    for name, layers, seed, tied in (("teacher", 4, 1, False), ("student", 2, 2, True)):
        hf = make(out / f"hf_{name}", layers, seed, tied, tok)
        import_hf(hf, out / name, dtype="fp32", progress=False)
    make(out / "hf_teacher_wide", 4, 3, False, tok, rows=49152 + 160)
    (out / "READY").write_text("ok\n")


if __name__ == "__main__":
    main()
