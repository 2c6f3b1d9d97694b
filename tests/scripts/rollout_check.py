"""Rollout checks on a tiny random GPTModel (TP = world size, PP = 1); run under torchrun.

Usage: rollout_check.py [static|dynamic]. Reports (per rank): run A (4 prompts of 6/2/10/4 tokens, n=2), its log-prob error against a full
forward, reproducibility runs, an EOS-forced run, and a T=0.5/top-p run. The asserts live in
tests/test_rollout.py.
"""

import sys

import torch
import torch.nn.functional as F
from _report import report

VOCAB, NEW, EOS = 128, 12, 127
PROMPTS = [[5, 17, 42, 99, 3, 8], [7, 1], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [100, 3, 3, 9]]


class ToyTokenizer:
    """Ids <-> space-separated integers (the HF calls the rollout uses)."""

    eos_token_id = EOS

    def __len__(self):
        return VOCAB

    def encode(self, text, add_special_tokens=False):
        return [int(x) for x in text.split()]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


def tiny_model(tp):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2, kv_channels=8,
        ffn_hidden_size=128, normalization="RMSNorm", layernorm_epsilon=1e-6, qk_layernorm=True,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, sequence_parallel=False,
    )
    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    return GPTModel(
        config=cfg, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=64,
        share_embeddings_and_output_weights=False, position_embedding_type="rope", rotary_base=10000,
    ).eval()


def ref_logprobs(model, batch):
    """log_softmax of one full forward on batch.inputs, gathered at batch.targets: [B, S-1]."""
    dev = next(model.parameters()).device
    with torch.no_grad():
        logits = model(batch.inputs.to(dev), batch.position_ids.to(dev), attention_mask=None, runtime_gather_output=True)
    return F.log_softmax(logits.float(), -1).gather(-1, batch.targets.to(dev).unsqueeze(-1)).squeeze(-1).cpu()


def lp_err(model, batch):
    ref = ref_logprobs(model, batch)
    m = batch.logprob_mask
    return float((ref[m] - batch.raw_logprobs[m]).abs().max()) if m.any() else 0.0


def as_dict(b):
    return dict(
        tokens=b.tokens, prompt_lengths=b.prompt_lengths, response_lengths=b.response_lengths,
        loss_mask=b.loss_mask.long(), logprob_mask=b.logprob_mask.long(), raw_logprobs=b.raw_logprobs,
        finished=b.finished.long(), prompt_index=b.prompt_index, texts=b.response_texts,
        responses=[b.response_tokens(i) for i in range(b.tokens.shape[0])],
    )


def main():
    from megatron_eaopd.distributed import destroy, init_distributed, init_model_parallel, seed_everything
    from megatron_eaopd.rollout import Rollout, RolloutParams

    env = init_distributed()
    init_model_parallel(tp=env.world_size, pp=1)
    seed_everything(1234)
    engine = sys.argv[1] if len(sys.argv) > 1 else "static"
    model = tiny_model(env.world_size)
    if torch.cuda.is_available():
        model = model.cuda()
    tok = ToyTokenizer()
    ro = Rollout(model, tok, engine=engine)
    p = RolloutParams(temperature=1.0, top_p=1.0, max_new_tokens=NEW, n=2, seed=7, eos_ids=(EOS,))

    rng_before = torch.get_rng_state()
    a = ro.generate(PROMPTS, p)  # call index 0
    report(name="A", engine=ro.engine_kind, lp_err=lp_err(model, a), global_rng_kept=bool(torch.equal(rng_before, torch.get_rng_state())),
           **as_dict(a))

    b = ro.generate(PROMPTS, p)  # call index 1: a different stream
    report(name="B_next_call", tokens=b.tokens)
    c = Rollout(model, tok, engine=engine).generate(PROMPTS, p, call_index=0)  # fresh object, same seed
    report(name="C_repeat", tokens=c.tokens, raw_logprobs=c.raw_logprobs)

    # EOS: a token that row 0 sampled at step k >= 3 (not earlier) becomes the engine's stop id.
    r0 = a.response_tokens(0)
    k = next((i for i in range(3, len(r0)) if r0[i] not in r0[:i] and r0[i] != EOS), None)
    if k is not None:
        stop = r0[k]
        e = ro.generate(PROMPTS, RolloutParams(**{**p.__dict__, "eos_ids": (stop, EOS)}), call_index=0)
        report(name="EOS", stop=stop, k=k, lp_err=lp_err(model, e), **as_dict(e))

    t = ro.generate(PROMPTS, RolloutParams(temperature=0.5, top_p=0.9, max_new_tokens=NEW, n=1, seed=3, eos_ids=(EOS,)))
    report(name="T05", lp_err=lp_err(model, t), tokens=t.tokens, logprob_mask=t.logprob_mask.long())

    from megatron_eaopd.rollout import MegatronGenerator

    gen = MegatronGenerator(ro, max_new_tokens=8, temperature=1.0, top_p=0.8, eos_ids=(EOS,), batch_size=1)
    g1 = gen.generate(["5 17 42", "7 1"], n=2, seed=3)
    g2 = gen.generate(["5 17 42", "7 1"], n=2, seed=3)
    report(name="GEN", sample_type=type(g1[0][0]).__module__ + "." + type(g1[0][0]).__name__,
           shape=[len(g) for g in g1], same=[[s.text for s in g] for g in g1] == [[s.text for s in g] for g in g2],
           samples=[[[s.text, s.num_tokens, s.truncated] for s in g] for g in g1])
    destroy()


if __name__ == "__main__":
    main()
