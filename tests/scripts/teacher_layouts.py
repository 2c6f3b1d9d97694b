"""A teacher in its own layout against the same teacher in the student's layout, on the trainer's tiny models.

    torchrun --nproc-per-node N tests/scripts/teacher_layouts.py MODELS_DIR CASE [CASE ...]

CASE = ``s_tp,s_pp,t_tp,t_pp[,wide]`` (student TP/PP, teacher TP/PP; DP is what remains of the world;
``wide``: the teacher with more output rows than the shared tokenizer, from its HF folder). For each
case and each loss mode (topk, full) this builds the student (weights from its checkpoint), a reference
teacher in the student's layout (weights from the HF folder, global process groups) and the teacher in
its own layout (weights from its Megatron checkpoint, resharded on load; its own process groups), scores
the same micro-batches with both (student DP ranks hold different sequence widths, so the union is
padded) and reports, per rank on the student's last stage: the largest difference of every teacher
signal, the share of top-k ids that differ, the loss and the student's gradients (one backward over
all micro-batches; student PP = 1 only), and in full mode the teacher logits on the student's vocabulary shards against the
reference teacher's own output layer. Signal and logit differences are relative to the largest teacher
logit (the scale of fp32 rounding in a log-softmax: a TP=2 teacher sums its matmuls in another order
than a TP=1 one); loss and gradient differences to the reference loss and largest gradient.
"""

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report  # noqa: E402

TOP_K = 8


def batches(dp_rank: int, vocab: int, mbs: int = 2, rows: int = 4):
    """This student DP rank's micro-batches: different widths per DP rank, a response mask from position 4."""
    from megatron_eaopd.pipeline import split_micro_batches

    g = torch.Generator().manual_seed(100 + dp_rank)
    width = 13 + 4 * dp_rank
    tokens = torch.randint(0, vocab, (rows, width), generator=g)
    mask = torch.zeros(rows, width - 1, dtype=torch.bool)
    mask[:, 3:] = True
    return split_micro_batches(tokens, mask, mbs)


def loss_and_grads(model, objective, scores, mbs):
    """Token-mean loss over the micro-batches (old log-probs = the current policy's, shifted so the ratio
    is not 1) and the gradients of the student's parameters (this rank's shards)."""
    model.zero_grad(set_to_none=True)
    total, tokens = 0.0, 0
    for mb in mbs:
        logits = model(mb.inputs, mb.position_ids, None)
        with torch.no_grad():
            old = objective.sampled_log_probs(logits, mb.targets) - 0.05
        loss_sum, n, _ = objective.loss(logits, scores.for_micro_batch(mb), old, mb.loss_mask)
        total = total + loss_sum
        tokens += int(n)
    (total / tokens).backward()
    return float(total) / tokens, {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def gathered(x, vocab: int):
    """Logits ``[b, s, V_local]`` gathered over the student's TP group, cut to the shared vocabulary."""
    from megatron.core import parallel_state as ps

    g = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(g))]
    dist.all_gather(parts, x.contiguous(), group=g)
    return torch.cat(parts, dim=-1)[..., :vocab]


def run_case(models: Path, s_tp: int, s_pp: int, t_tp: int, t_pp: int, wide: bool = False) -> None:
    from megatron.core import parallel_state as ps
    from megatron_eaopd.checkpoint import load_checkpoint
    from megatron_eaopd.distributed import init_model_parallel, seed_everything
    from megatron_eaopd.loss import EOPDConfig, build_objective
    from megatron_eaopd.models.provider import build_gpt_model, forward_logits
    from megatron_eaopd.models.sources import resolve_model_source
    from megatron_eaopd.teacher.build import build_teacher

    init_model_parallel(s_tp, s_pp)
    seed_everything(3)
    s_src = resolve_model_source(str(models / "student"), key="student.checkpoint", kinds=("megatron",))
    (student,), sinfo = build_gpt_model(str(s_src.assets), perform_initialization=False)
    load_checkpoint(models / "student", [student])
    vocab = sinfo.true_vocab_size
    mbs = batches(ps.get_data_parallel_rank(), vocab)
    if wide:  # 160 more teacher rows than the shared tokenizer: both from the HF folder, compared over 49,152
        ref_src = own_src = resolve_model_source(str(models / "hf_teacher_wide"), key="teacher.hf_path", kinds=("hf_dir",))
    else:
        ref_src = resolve_model_source(str(models / "hf_teacher"), key="teacher.hf_path", kinds=("hf_dir",))
        own_src = resolve_model_source(str(models / "teacher"), key="teacher.checkpoint", kinds=("megatron",))
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    case = f"s{s_tp}x{s_pp}_t{t_tp}x{t_pp}" + ("_wide" if wide else "")
    for mode in ("topk", "full"):
        objective = build_objective(EOPDConfig(mode=mode, top_k=TOP_K, tau=0.5, vocab_size=vocab))
        kw = dict(params_dtype=torch.float32, student_info=sinfo)
        ref = build_teacher(ref_src, str(ref_src.assets), objective, tp=s_tp, pp=s_pp, **kw)
        own = build_teacher(own_src, str(own_src.assets), objective, tp=t_tp, pp=t_pp, **kw)
        t0 = time.perf_counter()
        s_ref = ref.score(mbs)
        t1 = time.perf_counter()
        s_own = own.score(mbs)
        t2 = time.perf_counter()
        rec = dict(check="layout", case=case, mode=mode, same_layout_groups=own.groups.same_layout,
                   time_ref=t1 - t0, time_own=t2 - t1)
        # the reference teacher's own logits (gathered over TP, through its pipeline): the scale of fp32 rounding
        # in log-probs and entropy is the largest teacher logit
        direct = {mb.index: forward_logits(ref.model_chunks, mb.inputs, gather=True, trim_vocab=False) for mb in mbs}
        if last:
            errs, abs_errs = {}, {}
            ids_diff = 0.0
            logit_err = 0.0
            scale = torch.stack([d.abs().max() for d in direct.values()]).max()
            for mb in mbs:
                a, b = s_ref.for_micro_batch(mb), s_own.for_micro_batch(mb)
                for k in ("target_log_probs", "entropy", "topk_log_probs"):
                    e = float((getattr(a, k) - getattr(b, k)).abs().max())
                    abs_errs[k] = max(abs_errs.get(k, 0.0), e)
                    errs[k] = max(errs.get(k, 0.0), e / float(scale))
                ids_diff = max(ids_diff, float((a.topk_ids != b.topk_ids).float().mean()))
                rec["max_topk_id"] = max(rec.get("max_topk_id", 0), int(b.topk_ids.max()))
                if mode == "full":
                    logit_err = max(logit_err, float((b.logits - a.logits).abs().max() / scale))
                    # the hidden-state path against the teacher's own output layer (same weights, same layout)
                    rec["direct_logits_err"] = max(rec.get("direct_logits_err", 0.0), float(
                        (gathered(a.logits, vocab) - direct[mb.index][..., :vocab]).abs().max() / scale))
            rec.update(signal_err=errs, signal_abs_err=abs_errs, logit_scale=float(scale), topk_ids_diff=ids_diff,
                       logits_err=logit_err)
            if s_pp == 1:  # the student's loss and gradients by a plain forward/backward (no pipeline schedule)
                loss_a, g_a = loss_and_grads(student, objective, s_ref, mbs)
                loss_b, g_b = loss_and_grads(student, objective, s_own, mbs)
                g_scale = max(float(g.abs().max()) for g in g_a.values())
                rec.update(loss_ref=loss_a, loss=loss_b, loss_err=abs(loss_a - loss_b) / abs(loss_a),
                           grad_err=max(float((g_a[k] - g_b[k]).abs().max()) for k in g_a) / g_scale,
                           same_grads=sorted(g_a) == sorted(g_b))
        report(**rec)
        del ref, own, s_ref, s_own
    dist.barrier()


def main():
    from megatron_eaopd.distributed import init_distributed

    init_distributed(timeout_s=300)
    models = Path(sys.argv[1])
    for case in sys.argv[2:]:
        wide = case.endswith(",wide")
        run_case(models, *(int(x) for x in case.removesuffix(",wide").split(",")), wide=wide)


if __name__ == "__main__":
    main()
