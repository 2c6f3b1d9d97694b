"""World of one: for each tiny model, import (verify) -> export (verify); TP1 logits vs HF on
fixed ids; store HF reference logits for the TP2/PP2 script. Args: WORKDIR KIND..."""

import sys
from pathlib import Path

import torch
from _report import report
from models_tiny import fixed_ids, hf_logits


def main():
    work, kinds = Path(sys.argv[1]), sys.argv[2:]
    from megatron_eaopd.checkpoint import load_checkpoint
    from megatron_eaopd.models.convert import export_hf, import_hf
    from megatron_eaopd.models.provider import build_gpt_model, forward_logits

    for kind in kinds:
        hf = work / "hf" / kind
        ref = hf_logits(hf)
        torch.save(ref, work / f"ref_{kind}.pt")
        s_imp = import_hf(hf, work / "ckpt" / kind, verify=True, progress=False)
        chunks, info = build_gpt_model(work / "ckpt" / kind / "iter_0000000" / "hf_assets", perform_initialization=False)
        load_checkpoint(work / "ckpt" / kind, chunks)
        out = forward_logits(chunks, fixed_ids())
        s_exp = export_hf(work / "ckpt" / kind, work / "export" / kind, verify=True, max_shard_size="150KB", progress=False)
        report(kind=kind, import_verify=s_imp["verify"], export_verify=s_exp["verify"], dtype=s_imp["dtype"],
               tp1_diff=(out - ref).abs().max().item(), padded=info.padded_vocab_size, true_vocab=info.true_vocab_size)


if __name__ == "__main__":
    main()
