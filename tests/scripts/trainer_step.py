"""One trainer update step against an independent float64 computation, at TP=1, TP=2 or PP=2.

    torchrun --nproc-per-node N tests/scripts/trainer_step.py MODELS_DIR TP PP GRADS_FILE

The student and teacher are the tiny checkpoints of tests/scripts/trainer_models.py (loaded, so every
layout has the same weights). One ``update_phase`` call (one optimizer step over two micro-batches) runs
with old log-probs chosen so the PPO clip is active in both directions; its parameter gradients (after
Megatron's schedule and ``finalize_model_grads``: reduced and divided by the token count) are captured
where the optimizer step would apply them. The reference, written straight from docs/method.md
(tests/loss_reference.py), takes the gathered full-vocabulary logits in float64:

* the loss and every metric, with its own token weighting (``fkl_gated`` over gated tokens,
  ``num_gated`` a count), against ``objective.reduce`` of the phase's sums;
* at TP=1, the gradient of the reference mean loss, back-propagated through the model by plain torch
  autograd (no Megatron schedule, no per-token loss convention, no DDP), against the captured gradients;
  these gradients are written to GRADS_FILE;
* at TP=2 / PP=2, the captured gradient shards against the TP=1 gradients (GRADS_FILE), cut to this
  rank's shard and stage.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loss_reference as ref  # noqa: E402
from _report import report  # noqa: E402

ROWS, SEQ, MICRO = 4, 17, 2
TAU, TOP_K = 6.3, 8  # tau near the median teacher entropy of these random models: about half the tokens gated


def reference_metrics(s, t, target, old, mask):
    """The loss and every metric of the EOPD loss, float64, from full logits (independent of the package)."""
    loss_sum, n, per_tok, parts = ref.eopd(s, t, target, old, mask, mode="topk", tau=TAU, top_k=TOP_K)
    m = mask.double()
    lps, lpt = ref.masked_log_softmax(s), ref.masked_log_softmax(t)
    lp_y = lps.gather(-1, target[..., None])[..., 0]
    lt_y = lpt.gather(-1, target[..., None])[..., 0]
    adv = lt_y - old.double()
    r = torch.exp(lp_y - old.double())
    clipped_active = (-r.clamp(0.8, 1.2) * adv) > (-r * adv)
    topk_ids = lpt.topk(TOP_K, dim=-1).indices
    gate, fkl = parts["gate"], parts["fkl"]
    out = {
        "loss": loss_sum / n, "num_tokens": n,
        "rkl_term": (m * parts["rkl"]).sum() / n,
        "fkl_term": (m * gate * fkl).sum() / n,
        "gate_fraction": (m * gate).sum() / n,
        "teacher_entropy": (m * parts["h_t"]).sum() / n,
        "student_entropy": (m * ref.entropy(s)).sum() / n,
        "fkl_gated": (m * gate * fkl).sum() / (m * gate).sum().clamp(min=1),
        "log_ratio": (m * (lp_y - old.double())).sum() / n,
        "clip_fraction": (m * clipped_active.double()).sum() / n,
        "student_topk_mass": (m * lps.gather(-1, topk_ids).exp().sum(-1)).sum() / n,
        "teacher_student_log_ratio": (m * (lt_y - lp_y)).sum() / n,
        "num_gated": (m * gate).sum(),
    }
    return {k: float(v) for k, v in out.items()}, loss_sum / n, clipped_active, adv


def main():
    from megatron.core import parallel_state as ps

    from megatron_eaopd.checkpoint import ASSETS_DIR, load_checkpoint, resolve_checkpoint
    from megatron_eaopd.config import OptimizerConfig
    from megatron_eaopd.distributed import init_distributed, init_model_parallel, seed_everything, unwrap
    from megatron_eaopd.loss import EOPDConfig, build_objective
    from megatron_eaopd.models.mapping import canonical_name, tp_shard
    from megatron_eaopd.models.provider import build_gpt_model, forward_logits
    from megatron_eaopd.phases import teacher_phase, update_phase
    from megatron_eaopd.pipeline import is_last_stage, split_micro_batches
    from megatron_eaopd.student import build_student
    from megatron_eaopd.teacher import Teacher

    models, tp, pp, grads_file = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    init_distributed()
    init_model_parallel(tp, pp)
    seed_everything(5)
    opt = OptimizerConfig(lr=1e-3, min_lr=0.0, weight_decay=0.0, clip_grad=0.0, warmup_steps=0, decay="constant")
    assets = resolve_checkpoint(models / "student") / ASSETS_DIR
    student = build_student(str(assets), params_dtype=torch.float32, opt_cfg=opt, total_steps=4,
                            use_distributed_optimizer=False)
    student.load_weights(checkpoint=str(models / "student"))
    vocab = student.info.true_vocab_size
    objective = build_objective(EOPDConfig(top_k=TOP_K, tau=TAU, vocab_size=vocab))
    tchunks, _ = build_gpt_model(str(resolve_checkpoint(models / "teacher") / ASSETS_DIR), perform_initialization=False)
    load_checkpoint(models / "teacher", tchunks)
    teacher = Teacher(tchunks, objective)

    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(3, vocab, (ROWS, SEQ), generator=g)
    mask = torch.zeros(ROWS, SEQ - 1, dtype=torch.bool)
    for b, end in enumerate((SEQ - 1, SEQ - 4, SEQ - 1, SEQ - 7)):  # responses of different lengths
        mask[b, 5:end] = True
    mbs = split_micro_batches(tokens, mask, MICRO)
    scores = teacher_phase(teacher, mbs)
    s_full = forward_logits(student.chunks, tokens[:, :-1])  # [B, S, V] fp32 on the last stage, else None
    t_full = forward_logits(tchunks, tokens[:, :-1])
    student.train()
    targets = tokens[:, 1:]
    old = None
    if s_full is not None:
        # old log-probs = the current ones shifted by +-0.4 nats: ratios of e^-0.4 and e^0.4, outside [0.8, 1.2]
        shift = torch.where(torch.rand(ROWS, SEQ - 1, generator=g) < 0.5, -0.4, 0.4).double()
        lp_y = ref.log_probs(s_full.double(), targets[..., None])[..., 0]
        old = (lp_y + shift).float()
    old_by_mb = {mb.index: old[mb.rows] for mb in mbs} if old is not None else {}

    captured = {}

    def step():  # capture the gradients the step would apply; leave the weights as they are (the reference
        # below differentiates the same weights)
        for name, p in unwrap(student.chunks[0]).named_parameters():
            captured[name] = p.main_grad.detach().double().clone()
        return True, float(sum(float(v.norm() ** 2) for v in captured.values()) ** 0.5)

    student.step = step
    res = update_phase(student, objective, mbs, scores, old_by_mb, mini_batches=1)
    rank = torch.distributed.get_rank()

    if is_last_stage():
        want, ref_loss, clipped, adv = reference_metrics(s_full.double(), t_full.double(), targets, old, mask)
        got = objective.reduce({k: float(v) for k, v in res.sums.items()})
        valid = mask
        report(check="metrics", rank=rank, got=got, want=want,
               err={k: ref.rel_err(torch.tensor(got[k]), torch.tensor(want[k])) for k in want},
               clip_up=int((clipped & valid & (adv > 0)).sum()), clip_down=int((clipped & valid & (adv < 0)).sum()))

    model = unwrap(student.chunks[0])
    off = int(model.decoder.layers[0].layer_number) - 1 if len(model.decoder.layers) else 0
    tied = student.info.tied
    if tp == 1 and pp == 1:
        # the reference gradient: d(reference mean loss)/d(params), through the model by plain autograd (the
        # DDP wrapper's hooks move each gradient into param.main_grad: zeroed first, read after)
        student.zero_grad()
        logits = model(tokens[:, :-1], torch.arange(SEQ - 1).expand(ROWS, SEQ - 1), None)
        _, loss, _, _ = reference_metrics(logits.double(), t_full.double(), targets, old, mask)
        loss.backward()
        errs = {name: ref.rel_err(captured[name], p.main_grad) for name, p in model.named_parameters()}
        report(check="grads_vs_autograd", rank=rank, max_err=max(errs.values()), n=len(errs),
               norm=float(sum(float(v.norm() ** 2) for v in captured.values()) ** 0.5))
        torch.save({canonical_name(n): v for n, v in captured.items()}, grads_file)
    else:
        full = torch.load(grads_file)
        errs = {}
        for name, p in model.named_parameters():
            cn = canonical_name(name, off)
            key = "embedding.word_embeddings.weight" if (tied and cn == "output_layer.weight") else cn
            want = tp_shard(cn, full[key], p, ps.get_tensor_model_parallel_rank(), tp)
            errs[cn] = ref.rel_err(captured[name], want)
        report(check="grads_vs_tp1", rank=rank, max_err=max(errs.values()), n=len(errs),
               worst=max(errs, key=errs.get))


if __name__ == "__main__":
    main()
