"""2 ranks: load the TP1 checkpoints at TP2 and at PP2 (resharding, vocab padding 384 -> 512), compare
logits with HF; tied PP2: last-stage output weight == embedding; direct HF load at TP2/PP2; save a
TP2 checkpoint for the export test; the converter's collectives (verify_logits' max-reduce, the
parameter count's sum) over the process group. Args: WORKDIR KIND..."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _report import report
from models_tiny import fixed_ids


def main():
    work, kinds = Path(sys.argv[1]), sys.argv[2:]
    from megatron.core import parallel_state as ps

    from megatron_eaopd.checkpoint import load_checkpoint, save_checkpoint
    from megatron_eaopd.distributed import init_distributed, init_model_parallel
    from megatron_eaopd.models.convert import _allreduce_sum, load_hf_weights, verify_logits
    from megatron_eaopd.models.provider import build_gpt_model, forward_logits, seed_model_rng

    init_distributed()
    for tp, pp in ((2, 1), (1, 2)):
        init_model_parallel(tp, pp)
        seed_model_rng(1)
        for kind in kinds:
            ref = torch.load(work / f"ref_{kind}.pt")
            for source in ("ckpt", "hf"):
                chunks, info = build_gpt_model(work / "ckpt" / kind / "iter_0000000" / "hf_assets", perform_initialization=source == "hf")
                if source == "ckpt":
                    load_checkpoint(work / "ckpt" / kind, chunks)
                else:
                    load_hf_weights(chunks, work / "hf" / kind, progress=False)
                out = forward_logits(chunks, fixed_ids())
                diff = (out - ref).abs().max().item() if out is not None else None
                rec = dict(kind=kind, tp=tp, pp=pp, source=source, diff=diff, padded=info.padded_vocab_size)
                m = chunks[0]
                if pp == 2 and info.tied and ps.is_pipeline_last_stage():
                    from safetensors import safe_open  # noqa: F401
                    from megatron_eaopd.models.convert import HFTensorReader

                    emb = HFTensorReader(work / "hf" / kind).get("model.embed_tokens.weight")
                    w = m.output_layer.weight if m.output_layer.weight is not None else m.shared_embedding_or_output_weight()
                    rec["tied_out_vs_emb"] = (w[: emb.shape[0]] - emb).abs().max().item()
                    rec["tied_pad_rows_zero"] = bool((w[emb.shape[0]:] == 0).all())
                if source == "hf" and kind == kinds[0]:
                    # verify_logits: only the last stage holds logits at PP2; the max-reduce gives every rank its result
                    rec["verify"] = verify_logits(chunks, work / "hf" / kind, atol=1e-4)
                    local = sum(p.numel() for p in m.parameters())
                    counts = [None] * dist.get_world_size()
                    dist.all_gather_object(counts, local)
                    rec["count_local"], rec["count_all"], rec["count_sum"] = local, counts, _allreduce_sum(local)
                report(**rec)
                if tp == 2 and source == "ckpt" and kind == kinds[0]:
                    save_checkpoint(work / "ckpt_tp2" / kind, 5, chunks, extra_common={"note": "tp2"})
                    dist.barrier()
    report(done=True)


if __name__ == "__main__":
    main()
