"""Trainer phases on their own at TP=2: rollout shapes, teacher signals vs full teacher logits,
old log-probs (trainer forward) vs the inference engine's sampling log-probs for the same weights.

    torchrun --nproc-per-node 2 tests/scripts/trainer_stages.py MODELS_DIR key=value ...
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loss_reference as ref  # noqa: E402
from _report import report  # noqa: E402


def main():
    from megatron_eaopd.config import load_config
    from megatron_eaopd.models.provider import forward_logits
    from megatron_eaopd.phases import old_log_probs_phase, teacher_phase
    from megatron_eaopd.rollout import RolloutParams
    from megatron_eaopd.trainer import Trainer

    overrides = sys.argv[2:] + ["parallel.tp=2", "logging.jsonl=false"]
    cfg = load_config(Path(__file__).resolve().parents[1] / "trainer_recipe.yaml", overrides)
    os.environ["EAOPD_PROGRESS"] = "0"
    t = Trainer(cfg)
    t.setup()
    prompts = t.loader.next_batch()
    params = RolloutParams(temperature=1.0, top_p=1.0, max_new_tokens=10, n=2, seed=5)
    batch = t.engine.generate([list(p.input_ids) for p in prompts], params, call_index=3, return_log_probs=True)
    b, s = batch.tokens.shape
    ok = (b == 2 * len(prompts) and batch.loss_mask.shape == (b, s - 1)
          and bool((batch.response_lengths <= params.max_new_tokens + 1).all())
          and int(batch.loss_mask.sum()) == int(batch.response_lengths.sum()))
    report(check="rollout_shapes", ok=bool(ok), shape=[b, s])
    mbs = batch.micro_batches(cfg.train.micro_batch_size)
    old_by_mb = old_log_probs_phase(t.student, t.objective, mbs)
    old = torch.cat([old_by_mb[i] for i in range(len(mbs))])
    m = batch.logprob_mask
    report(check="old_vs_sampling_logprobs", err=float((old[m] - batch.raw_logprobs[m]).abs().max()), n=int(m.sum()))
    scores = teacher_phase(t.teacher, mbs)
    sig = [scores.for_micro_batch(mb) for mb in mbs]
    full = forward_logits(t.teacher.model_chunks, batch.inputs, gather=True, trim_vocab=True).double()
    targets = batch.targets
    lp = ref.log_probs(full, targets.unsqueeze(-1))[..., 0]
    ent = ref.entropy(full)
    tk, ti = ref.masked_log_softmax(full).topk(cfg.loss.top_k, dim=-1)
    mine_lp = torch.cat([x.target_log_probs for x in sig])
    mine_ent = torch.cat([x.entropy for x in sig])
    mine_tk = torch.cat([x.topk_log_probs for x in sig])
    mine_ti = torch.cat([x.topk_ids for x in sig])
    err = max(ref.rel_err(mine_lp, lp), ref.rel_err(mine_ent, ent), ref.rel_err(mine_tk, tk))
    report(check="teacher_signals", err=err)
    report(check="teacher_topk_ids_equal", err=float((mine_ti != ti).float().mean()))


if __name__ == "__main__":
    main()
