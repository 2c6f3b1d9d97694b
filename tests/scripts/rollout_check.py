"""Rollout checks on a tiny random GPTModel (TP = world size, PP = 1); run under torchrun.

Usage: rollout_check.py [static|dynamic|recompute]. Reports (per rank): run A (4 prompts of 6/2/10/4 tokens,
n=2), its log-prob error against a full forward, reproducibility runs, a run with two stop ids, a
T=0.5/top-p run, the evaluation adaptor, and (static) the padded-vocabulary check for the static and
recompute engines. The asserts live in tests/test_rollout.py.
"""

import sys

import torch
import torch.nn.functional as F
from _report import report

VOCAB, NEW, EOS = 128, 12, 127
TRUE_V = 120  # for the padded-vocabulary check: ids 120..127 are padding
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


def tiny_model(tp, dtype=torch.float32):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=2, kv_channels=8,
        ffn_hidden_size=128, normalization="RMSNorm", layernorm_epsilon=1e-6, qk_layernorm=True,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
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


class _ForcePaddedLogits:
    """A forward hook on the output layer that makes the padded vocabulary rows (ids >= TRUE_V) the
    largest logits by +100: an engine that does not mask them samples nothing else."""

    def __init__(self, model, true_v):
        from megatron.core import parallel_state as ps

        self.true_v, self.tp_rank = true_v, ps.get_tensor_model_parallel_rank()
        self.handle = model.output_layer.register_forward_hook(self)

    def __call__(self, module, args, output):
        logits, bias = output
        width = logits.shape[-1]
        lo = 0 if width == VOCAB else self.tp_rank * width
        cols = torch.arange(lo, lo + width, device=logits.device) >= self.true_v
        return logits + 100.0 * cols.to(logits.dtype), bias


def main():
    from megatron_eaopd.distributed import destroy, init_distributed, init_model_parallel, seed_everything
    from megatron_eaopd.evaluation.model_generator import MegatronGenerator
    from megatron_eaopd.rollout import RolloutParams
    from megatron_eaopd.rollout.factory import make_engine

    env = init_distributed()
    init_model_parallel(tp=env.world_size, pp=1)
    seed_everything(1234)
    engine = sys.argv[1] if len(sys.argv) > 1 else "static"
    # the dynamic engine's flash-attn kernels need fp16/bf16
    model = tiny_model(env.world_size, torch.bfloat16 if engine == "dynamic" else torch.float32)
    if torch.cuda.is_available():
        model = model.cuda()
    tok = ToyTokenizer()
    ro = make_engine([model], tok, stop_ids=(EOS,), kind=engine)
    p = RolloutParams(temperature=1.0, top_p=1.0, max_new_tokens=NEW, n=2, seed=7)

    rng_before = torch.get_rng_state()
    a = ro.generate(PROMPTS, p, return_log_probs=True)  # call index 0
    report(name="A", engine=ro.kind, lp_err=lp_err(model, a), global_rng_kept=bool(torch.equal(rng_before, torch.get_rng_state())),
           **as_dict(a))

    b = ro.generate(PROMPTS, p, return_log_probs=True)  # call index 1: a different stream
    report(name="B_next_call", tokens=b.tokens)
    c = make_engine([model], tok, stop_ids=(EOS,), kind=engine).generate(PROMPTS, p, call_index=0,
                                                                        return_log_probs=True)  # fresh object, same seed
    report(name="C_repeat", tokens=c.tokens, raw_logprobs=c.raw_logprobs)

    # stops: a token that row 0 sampled at step k >= 3 (not earlier) becomes the FIRST stop id, EOS the second:
    # the engine must stop at either, and append the one it met
    r0 = a.response_tokens(0)
    k = next((i for i in range(3, len(r0)) if r0[i] not in r0[:i] and r0[i] != EOS), None)
    if k is not None:
        stop = r0[k]
        e = make_engine([model], tok, stop_ids=(stop, EOS), kind=engine).generate(PROMPTS, p, call_index=0,
                                                                                return_log_probs=True)
        report(name="EOS", stop=stop, k=k, lp_err=lp_err(model, e), **as_dict(e))

    t = ro.generate(PROMPTS, RolloutParams(temperature=0.5, top_p=0.9, max_new_tokens=NEW, n=1, seed=3),
                    return_log_probs=True)
    report(name="T05", lp_err=lp_err(model, t), tokens=t.tokens, logprob_mask=t.logprob_mask.long())

    gen = MegatronGenerator(ro, max_new_tokens=8, temperature=1.0, top_p=0.8, batch_size=1)
    g1 = gen.generate(["5 17 42", "7 1"], n=2, seed=3)
    g2 = gen.generate(["5 17 42", "7 1"], n=2, seed=3)
    report(name="GEN", sample_type=type(g1[0][0]).__module__ + "." + type(g1[0][0]).__name__,
           shape=[len(g) for g in g1], same=[[s.text for s in g] for g in g1] == [[s.text for s in g] for g in g2],
           samples=[[[s.text, s.num_tokens, s.truncated] for s in g] for g in g1])

    # padded vocabulary: the model's true vocabulary is TRUE_V < VOCAB; rows >= TRUE_V get +100 logits
    if engine == "static":
        model.true_vocab_size = TRUE_V
        force = _ForcePaddedLogits(model, TRUE_V)
        for kind in ("static", "recompute"):
            eng = make_engine([model], tok, stop_ids=(EOS,), kind=kind)
            pb = eng.generate(PROMPTS, RolloutParams(temperature=1.0, top_p=1.0, max_new_tokens=NEW, n=2, seed=11))
            resp = [pb.response_tokens(i) for i in range(pb.tokens.shape[0])]
            report(name=f"PAD_{kind}", engine=eng.kind, max_id=max(max(r) for r in resp),
                   n_tokens=sum(len(r) for r in resp))
        force.handle.remove()
        del model.true_vocab_size
        # without the engine's mask the forced rows are all that gets sampled (the check can fail)
        eng = make_engine([model], tok, stop_ids=(EOS,), kind="static")
        force = _ForcePaddedLogits(model, TRUE_V)
        pb = eng.generate(PROMPTS[:1], RolloutParams(max_new_tokens=4, n=1, seed=11))
        report(name="PAD_unmasked", min_id=min(pb.response_tokens(0)))
        force.handle.remove()
    destroy()


if __name__ == "__main__":
    main()
