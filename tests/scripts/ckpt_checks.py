"""Checkpoint checks on a real tiny GPTModel (local spec, CPU, gloo). Args: WORKDIR MODE.

* ``extra_state`` (1 rank): every layer's core attention behaves as Transformer Engine's does under
  megatron-core 0.19.2 (an ``_extra_state`` in ``state_dict()``, nothing in ``sharded_state_dict()``):
  a save -> load round trip must work at ``strict=True``; a real weight left out of the sharded
  state dict (a learnable softmax offset) must still fail, naming it.
"""

import sys
from pathlib import Path

import torch
from _report import report
from models_tiny import COMMON


def _config():
    from transformers import Qwen3Config

    return Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=False, rope_theta=1e6)


def _te_style(model, *, with_offset: bool = False):
    """Give each core attention TE's state-dict behaviour (see module doc)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class TEStyleCoreAttention(DotProductAttention):
        def get_extra_state(self):
            return torch.tensor([7.0])  # TE: serialized FP8 metadata

        def set_extra_state(self, state):
            self.loaded_extra_state = state

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return {}  # TEDotProductAttention.sharded_state_dict without a learnable softmax offset

    for layer in model.decoder.layers:
        ca = layer.self_attention.core_attention
        ca.__class__ = TEStyleCoreAttention
        if with_offset:
            ca.softmax_offset = torch.nn.Parameter(torch.zeros(COMMON["num_attention_heads"]))


def extra_state(work: Path):
    from megatron.core import dist_checkpointing

    from megatron_eaopd.checkpoint import load_checkpoint, model_sharded_state_dict, resolve_checkpoint, save_checkpoint
    from megatron_eaopd.models.provider import build_gpt_model, seed_model_rng

    seed_model_rng(1)
    src, _ = build_gpt_model(_config())
    _te_style(src[0])
    path = save_checkpoint(work / "ck", 3, src)
    seed_model_rng(2)
    dst, _ = build_gpt_model(_config())
    _te_style(dst[0])
    extra_keys = sorted(k for k in dst[0].state_dict() if k.endswith("_extra_state") and "core_attention" in k)
    differs_before = any(not torch.equal(a, b) for a, b in zip(src[0].parameters(), dst[0].parameters()))
    # what a strict torch load says about the same loaded state (the defect)
    loaded = dist_checkpointing.load(model_sharded_state_dict(dst), str(resolve_checkpoint(work / "ck")))["model"]
    try:
        dst[0].load_state_dict(loaded, strict=True)
        torch_strict = None
    except RuntimeError as e:
        torch_strict = str(e)
    it, _, _ = load_checkpoint(work / "ck", dst, strict=True)
    same_after = all(torch.equal(a, b) for a, b in zip(src[0].parameters(), dst[0].parameters()))
    seed_model_rng(3)
    bad, _ = build_gpt_model(_config())
    _te_style(bad[0], with_offset=True)
    try:
        load_checkpoint(work / "ck", bad, strict=True)
        bad_error = None
    except RuntimeError as e:
        bad_error = str(e)
    load_checkpoint(work / "ck", bad, strict=False)  # loads what matches
    bad_same = all(torch.equal(a, b) for a, b in zip(src[0].parameters(), [p for n, p in bad[0].named_parameters()
                                                                          if "softmax_offset" not in n]))
    report(mode="extra_state", iteration=it, path=str(path), extra_keys=extra_keys, differs_before=differs_before,
           torch_strict=torch_strict, same_after=same_after, bad_error=bad_error, bad_nonstrict_same=bad_same)


def main():
    from megatron_eaopd.distributed import destroy, init_distributed, init_model_parallel

    work, mode = Path(sys.argv[1]), sys.argv[2]
    init_distributed()
    init_model_parallel(1, 1)
    {"extra_state": extra_state}[mode](work)
    destroy()


if __name__ == "__main__":  # the dist_checkpointing writer uses a spawn-context manager
    main()
