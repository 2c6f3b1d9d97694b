"""Checkpoint checks on a real tiny GPTModel (local spec, CPU, gloo). Args: WORKDIR MODE.

* ``extra_state`` (1 rank): every layer's core attention behaves as Transformer Engine's does under
  megatron-core 0.19.2 (an ``_extra_state`` in ``state_dict()``, nothing in ``sharded_state_dict()``):
  a save -> load round trip must work at ``strict=True``; a real weight left out of the sharded
  state dict (a learnable softmax offset) must still fail, naming it.
* ``opt_save`` (2 ranks, DP = 2): bf16 student + megatron DDP + distributed optimizer (Adam), two steps,
  saved through ``optimizer_sharded_state_dict`` (``dp_reshardable``); the full optimizer state at save
  time (fp32 main params, exp_avg, exp_avg_sq, step; assembled from both DP shards) and the weights after
  an uninterrupted third step are written as references.
* ``opt_resume`` (1 or 2 ranks): a fresh student loads that checkpoint the way the trainer resumes; its
  assembled optimizer state must equal the reference, and at DP = 2 the third step must give the same weights;
  then (2 ranks) at TP = 2 the template must refuse the checkpoint.
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


def _student(seed: int):
    """bf16 GPTModel in megatron DDP with the distributed optimizer (as the trainer builds it on a GPU)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_eaopd.models.provider import build_gpt_model, seed_model_rng

    seed_model_rng(seed)
    chunks, _ = build_gpt_model(_config(), params_dtype=torch.bfloat16)
    ddp = DistributedDataParallel(chunks[0].config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), chunks[0])
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.0, bf16=True,
                                                 params_dtype=torch.bfloat16, use_distributed_optimizer=True), [ddp])
    return ddp, opt


def _step(ddp, opt, k: int) -> None:
    """One optimizer step on this DP rank's half of a fixed global batch of 4 sequences (step ``k``)."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(100 + k)
    ids = torch.randint(0, COMMON["vocab_size"], (4, 16), generator=g)
    dp, r = dist.get_world_size(), dist.get_rank()
    ids = ids[r * 4 // dp:(r + 1) * 4 // dp]
    pos = torch.arange(16).expand(ids.shape[0], 16)
    ddp.zero_grad_buffer()
    opt.zero_grad()
    ddp(ids, pos, None, labels=ids).float().mean().backward()
    ddp.finish_grad_sync()
    ok, _, _ = opt.step()
    assert ok


def _full_state(ddp, opt) -> dict:
    """Every parameter's optimizer state as full tensors (name -> {param, exp_avg, exp_avg_sq}, fp32), assembled
    from the DP shards (each element lives on exactly one rank: zeros elsewhere, then a sum), plus Adam's step."""
    import torch.distributed as dist

    from megatron_eaopd.distributed import unwrap

    inner = [o for o in getattr(opt, "chained_optimizers", [opt])]
    assert [type(o).__name__ for o in inner] == ["DistributedOptimizer"], inner
    dopt = inner[0]
    ranges = {}
    for gbuf_range_maps in dopt.gbuf_ranges:
        for per_bucket in gbuf_range_maps.values():
            for bucket in per_bucket:
                for p, rmap in bucket["param_map"].items():
                    ranges[p] = rmap["param"]
    out, steps = {}, set()
    for name, p in unwrap(ddp).named_parameters():
        full = {k: torch.zeros(p.numel(), dtype=torch.float32) for k in ("param", "exp_avg", "exp_avg_sq")}
        if p in ranges:
            st = dopt._get_main_param_and_optimizer_states(p)
            for k in full:
                full[k][ranges[p].start:ranges[p].end] = st[k].float()
            steps.add(float(st["step"]) if "step" in st else float(dopt.optimizer.state[
                dopt.optimizer.param_groups[dopt.model_param_group_index_map[p][0]]["params"][
                    dopt.model_param_group_index_map[p][1]]]["step"]))
        for k in full:
            dist.all_reduce(full[k])
        out[name] = full
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, sorted(steps))
    return {"state": out, "steps": sorted({s for g in got for s in g})}


def opt_save(work: Path):
    import torch.distributed as dist

    from megatron_eaopd.checkpoint import model_sharded_state_dict, save_checkpoint
    from megatron_eaopd.checkpoint_optimizer import optimizer_sharded_state_dict, saved_optimizer_sharding
    from megatron_eaopd.distributed import unwrap

    ddp, opt = _student(1)
    _step(ddp, opt, 1)
    _step(ddp, opt, 2)
    sd = optimizer_sharded_state_dict(opt, model_sharded_state_dict([ddp])["model"], use_distributed_optimizer=True,
                                      is_loading=False)
    # zero-copy: every saved parameter entry's tensors ARE the optimizer's own storage (no gathered host copy);
    # only the inter-parameter padding entries are new (a few elements each)
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    dopt = opt.chained_optimizers[0] if hasattr(opt, "chained_optimizers") else opt
    own = set()
    for gbuf_range_maps in dopt.gbuf_ranges:
        for per_bucket in gbuf_range_maps.values():
            for bucket in per_bucket:
                for p in bucket["param_map"]:
                    own.update(t.data_ptr() for t in dopt._get_main_param_and_optimizer_states(p).values()
                               if isinstance(t, torch.Tensor) and t.dim() > 0)
    entries = [e for gbuf in (v for k, v in sd["param_state"].items() if isinstance(k, int))
               for buckets in gbuf.values() for bucket in buckets for e in bucket]
    params = [e for e in entries if not e["padding"].obj]
    tensors = [t for e in params for t in e.values() if isinstance(t, ShardedTensor)]
    views = sum(t.data.data_ptr() in own for t in tensors)
    pad_elems = sum(t.data.numel() for e in entries if e["padding"].obj for t in e.values() if isinstance(t, ShardedTensor))
    ref = _full_state(ddp, opt)
    ref["weights"] = {n: p.detach().float().clone() for n, p in unwrap(ddp).named_parameters()}
    save_checkpoint(work / "ck", 2, [ddp], extra_sharded={"optimizer": sd}, extra_common={"note": "opt"})
    _step(ddp, opt, 3)
    after = {n: p.detach().float().clone() for n, p in unwrap(ddp).named_parameters()}
    if dist.get_rank() == 0:
        torch.save({"ref": ref, "after": after}, work / "opt_ref.pt")
    dist.barrier()
    report(mode="opt_save", sharding=sd["param_state_sharding_type"], saved=saved_optimizer_sharding(work / "ck"),
           n_tensors=len(tensors), n_views=views, n_params=len(params), pad_elems=pad_elems, steps=ref["steps"])


def opt_resume(work: Path):
    import torch.distributed as dist

    from megatron_eaopd.checkpoint import load_checkpoint, model_sharded_state_dict
    from megatron_eaopd.checkpoint_optimizer import load_optimizer_state, optimizer_sharded_state_dict
    from megatron_eaopd.distributed import unwrap

    ddp, opt = _student(7)
    for o in getattr(opt, "chained_optimizers", [opt]):  # the trainer does the same before loading
        o._init_optimizer_states_with_dummy_values()
    tpl = optimizer_sharded_state_dict(opt, model_sharded_state_dict([ddp])["model"], use_distributed_optimizer=True,
                                       is_loading=True, checkpoint=work / "ck")
    it, common, extra = load_checkpoint(work / "ck", [ddp], extra_sharded={"optimizer": tpl})
    load_optimizer_state(opt, extra["optimizer"])
    got = _full_state(ddp, opt)
    ref = torch.load(work / "opt_ref.pt")
    diff = max(float((got["state"][n][k] - ref["ref"]["state"][n][k]).abs().max())
               for n in ref["ref"]["state"] for k in ("param", "exp_avg", "exp_avg_sq"))
    nonzero = min(float(ref["ref"]["state"][n]["exp_avg_sq"].abs().max()) for n in ref["ref"]["state"])
    wdiff = max(float((p.detach().float() - ref["ref"]["weights"][n]).abs().max()) for n, p in unwrap(ddp).named_parameters())
    _step(ddp, opt, 3)
    step3 = max(float((p.detach().float() - ref["after"][n]).abs().max()) for n, p in unwrap(ddp).named_parameters())
    tp_error = None
    if dist.get_world_size() == 2:  # the same checkpoint at TP = 2: dp_reshardable state cannot follow
        from megatron_eaopd.distributed import init_model_parallel

        init_model_parallel(2, 1)
        ddp2, opt2 = _student(8)
        try:
            optimizer_sharded_state_dict(opt2, model_sharded_state_dict([ddp2])["model"], use_distributed_optimizer=True,
                                         is_loading=True, checkpoint=work / "ck")
        except ValueError as e:
            tp_error = str(e)
    report(mode="opt_resume", dp=dist.get_world_size(), tp_error=tp_error, iteration=it, note=common.get("note"), state_diff=diff,
           min_exp_avg_sq_max=nonzero, steps=got["steps"], ref_steps=ref["ref"]["steps"], weight_diff=wdiff,
           step3_diff=step3)


def main():
    from megatron_eaopd.distributed import destroy, init_distributed, init_model_parallel

    work, mode = Path(sys.argv[1]), sys.argv[2]
    init_distributed()
    init_model_parallel(1, 1)
    {"extra_state": extra_state, "opt_save": opt_save, "opt_resume": opt_resume}[mode](work)
    destroy()


if __name__ == "__main__":  # the dist_checkpointing writer uses a spawn-context manager
    main()
