"""Greedy decoding through Megatron (full-forward loop) vs transformers, token for token.
Args: HF_DIR CKPT N_NEW"""

import sys

import torch
from _report import report


def main():
    hf_dir, ckpt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_eaopd.checkpoint import load_checkpoint, read_checkpoint_metadata
    from megatron_eaopd.distributed import init_distributed, init_model_parallel
    from megatron_eaopd.models.provider import build_gpt_model, forward_logits, seed_model_rng

    tok = AutoTokenizer.from_pretrained(hf_dir)
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # decode exactly n tokens on both sides (no early stop)
    with torch.no_grad():
        g = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    hf_tokens = g[0, ids.shape[1]:].tolist()
    del hf
    init_distributed()
    init_model_parallel(1, 1)
    seed_model_rng(1)
    chunks, info = build_gpt_model(read_checkpoint_metadata(ckpt)["hf_assets"], perform_initialization=False)
    load_checkpoint(ckpt, chunks)
    seq = ids.clone()
    for _ in range(n):
        logits = forward_logits(chunks, seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    report(megatron_tokens=seq[0, ids.shape[1]:].tolist(), hf_tokens=hf_tokens, text=tok.decode(hf_tokens))


if __name__ == "__main__":
    main()
