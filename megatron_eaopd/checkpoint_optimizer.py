"""The optimizer's part of a checkpoint: which sharding the distributed optimizer is written with, and
loading it back.

megatron-core 0.19.2's ``DistributedOptimizer.sharded_state_dict`` offers these shardings (bytes per
parameter of a rank's TP x PP shard; 12 = fp32 main param + Adam exp_avg + exp_avg_sq):

* ``dp_reshardable`` (written here, Megatron-LM's default): no gather, no communication. Each rank's
  sharded tensors are views of its own resident 12/DP bytes; the writer stages only those to host, and a
  load reads only them. A resume may change the DP size, not TP/PP.
* ``fully_reshardable`` (what this recipe wrote before): the save gathers all 12 bytes into the host memory
  of EVERY DP rank over NCCL (with ``distrib_optim_fully_reshardable_mem_efficient``: of DP rank 0 only, over
  gloo), and every rank's load allocates and reads all 12 bytes (48 GB per rank for a 4B model at TP = 1).
  A resume may change TP, PP and DP.
* ``fully_sharded_model_space`` (megatron-core's default when no sharding is named) fails on save:
  dist_checkpointing rejects its ``flattened_range`` tensors. ``fsdp_dtensor`` is for Megatron-FSDP only;
  ``dp_zero_gather_scatter`` is deprecated (gathers on DP rank 0, fixed TP x PP).

Loading reads the sharding a checkpoint was written with, so ``fully_reshardable`` checkpoints still load.

Source: megatron-core 0.19.2 ``megatron/core/optimizer/distrib_optimizer.py`` (``sharded_state_dict``,
``sharded_param_state_*``, ``load_parameter_state_from_*``); Megatron-LM
``megatron.training.checkpointing._build_sharded_state_dict_metadata``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from megatron_eaopd.checkpoint import read_checkpoint_metadata, resolve_checkpoint

__all__ = ["OPTIMIZER_SHARDING", "optimizer_sharded_state_dict", "saved_optimizer_sharding", "load_optimizer_state"]

#: how the distributed optimizer's state is written (megatron-core ``distrib_optim_sharding_type``)
OPTIMIZER_SHARDING = "dp_reshardable"
_OPTIMIZER_SHARDINGS = ("dp_reshardable", "fully_reshardable")


def saved_optimizer_sharding(ckpt_dir: str | os.PathLike, iteration: int | None = None) -> str | None:
    """The distributed-optimizer sharding a checkpoint was written with (``"dp_reshardable"``,
    ``"fully_reshardable"``...), or ``None`` when its optimizer state is a plain (non-distributed)
    optimizer's or absent. Read from the common part (``common.pt``), where megatron-core's
    ``DistributedOptimizer.sharded_state_dict`` stores ``param_state_sharding_type``.

    Raises:
        FileNotFoundError: see :func:`megatron_eaopd.checkpoint.resolve_checkpoint`.
        ValueError: the optimizer's sub-states disagree (a corrupt checkpoint).
    """
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(resolve_checkpoint(ckpt_dir, iteration)))
    found: set[str] = set()

    def walk(x):
        if isinstance(x, dict):
            if isinstance(x.get("param_state_sharding_type"), str):
                found.add(x["param_state_sharding_type"])
            for v in x.values():
                walk(v)

    walk(common.get("optimizer"))
    if len(found) > 1:
        raise ValueError(f"checkpoint {ckpt_dir} mixes optimizer shardings {sorted(found)}")
    return found.pop() if found else None


def optimizer_sharded_state_dict(optimizer, model_sharded_sd: dict, *, use_distributed_optimizer: bool,
                                 is_loading: bool, checkpoint: str | os.PathLike | None = None,
                                 sharding_type: str | None = None) -> dict:
    """The optimizer's sharded state dict for ``save_checkpoint`` / ``load_checkpoint`` (``extra_sharded``).

    A plain optimizer gives its model-space state as always. The distributed optimizer is written
    ``dp_reshardable`` (:data:`OPTIMIZER_SHARDING`; see the module doc for what each sharding costs).

    Args:
        optimizer: from ``get_megatron_optimizer`` (a ``ChainedOptimizer`` or one optimizer).
        model_sharded_sd: the model's sharded state dict (``model_sharded_state_dict(chunks)["model"]``), whose
            tensors are the live parameters.
        use_distributed_optimizer: the run's ``DistributedDataParallelConfig.use_distributed_optimizer``.
        is_loading: build a template to load into (call after the optimizer state exists, e.g. after
            ``_init_optimizer_states_with_dummy_values``).
        checkpoint: loading: the checkpoint (root or ``iter_*``) to be loaded; its sharding is used, so
            checkpoints written ``fully_reshardable`` by earlier versions still load.
        sharding_type: saving with the distributed optimizer: ``"dp_reshardable"`` (default) or
            ``"fully_reshardable"`` (memory-efficient variant; lets a later resume change TP/PP).
    Returns:
        the sharded state dict (pass as ``extra_sharded={"optimizer": ...}``).
    Raises:
        ValueError: unknown ``sharding_type``; loading a distributed optimizer without ``checkpoint``; the
            checkpoint's optimizer state was written with(out) the distributed optimizer and this run differs;
            a ``dp_reshardable`` checkpoint loaded at another TP/PP (names both sizes and the fix).
    Source: megatron-core 0.19.2 ``DistributedOptimizer.sharded_state_dict``; Megatron-LM
    ``megatron.training.checkpointing._build_sharded_state_dict_metadata``.
    """
    saved = saved_optimizer_sharding(checkpoint) if is_loading and checkpoint is not None else None
    if not use_distributed_optimizer:
        if saved is not None:
            raise ValueError(f"checkpoint {checkpoint} holds distributed-optimizer state ({saved}); resume with "
                             f"parallel.use_distributed_optimizer: true, or start a new checkpoint.dir")
        return optimizer.sharded_state_dict(model_sharded_sd, is_loading=is_loading)
    if is_loading:
        if checkpoint is None:
            raise ValueError("loading the distributed optimizer needs checkpoint= (its sharding is read from it)")
        if saved is None:
            raise ValueError(f"checkpoint {checkpoint} holds a plain (non-distributed) optimizer's state; resume with "
                             f"parallel.use_distributed_optimizer: false, or start a new checkpoint.dir")
        if saved == "dp_reshardable":
            _check_same_model_parallel(checkpoint)
        sharding_type = saved
    sharding_type = sharding_type or OPTIMIZER_SHARDING
    if not is_loading and sharding_type not in _OPTIMIZER_SHARDINGS:
        raise ValueError(f"optimizer sharding {sharding_type!r} is not supported; use one of {_OPTIMIZER_SHARDINGS}")
    metadata: dict[str, Any] = {"distrib_optim_sharding_type": sharding_type}
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    if sharding_type == "fully_reshardable" and not is_loading and all(
            getattr(o, "data_parallel_group_gloo", True) is not None for o in inner):
        metadata["distrib_optim_fully_reshardable_mem_efficient"] = True  # gather to DP rank 0 only
    sd = optimizer.sharded_state_dict(model_sharded_sd, is_loading=is_loading, metadata=metadata)
    if is_loading and sharding_type == "dp_reshardable":
        _keep_loaded_step(sd)
    return sd


def _keep_loaded_step(template) -> None:
    """Blank the per-parameter Adam ``step`` of a ``dp_reshardable`` load template (torch Adam only).

    With torch's Adam (megatron-core's fallback without TE / Apex) each parameter's state holds a ``step``.
    ``DistributedOptimizer.load_state_dict`` restores it from the checkpoint's param groups, then
    ``load_parameter_state_from_dp_reshardable`` copies the template's own ``step`` (a non-persistent copy of
    the step before loading) over it, so a resumed run restarts Adam's bias correction. A non-tensor there is
    skipped by ``_set_main_param_and_optimizer_states``. TE / Apex fused Adam keep the step in the param
    groups: nothing to blank.
    """
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

    if isinstance(template, dict):
        for k, v in template.items():
            if k == "step" and isinstance(v, LocalNonpersistentObject):
                template[k] = LocalNonpersistentObject(None)
            else:
                _keep_loaded_step(v)
    elif isinstance(template, list):
        for v in template:
            _keep_loaded_step(v)


def _check_same_model_parallel(checkpoint) -> None:
    """A ``dp_reshardable`` optimizer state follows the TP x PP layout it was written with."""
    from megatron.core import parallel_state as ps

    saved = read_checkpoint_metadata(checkpoint).get("saved_with") or {}
    now = {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size()}
    then = {k: saved.get(k) for k in now}
    if None not in then.values() and then != now:
        raise ValueError(
            f"checkpoint {checkpoint} holds distributed-optimizer state for tp={then['tp']} pp={then['pp']} "
            f"(dp_reshardable: only the data-parallel size may change), but this run has tp={now['tp']} pp={now['pp']}; "
            f"resume with the saved TP/PP, or load only the weights (student.checkpoint) into a new run"
        )


def load_optimizer_state(optimizer, state) -> None:
    """``optimizer.load_state_dict(state)`` (``state``: what ``load_checkpoint`` returned for the template of
    :func:`optimizer_sharded_state_dict`), with two repairs of megatron-core 0.19.2's distributed optimizer:

    * under ``torch.no_grad()``: ``load_parameter_state_from_dp_reshardable`` copies in place into the main
      params, and for fp32 model parameters those are views of the parameters themselves (leaves that
      require grad); outside ``no_grad`` the copy raises "a view of a leaf Variable that requires grad is
      being used in an in-place operation".
    * with torch's Adam (no TE / Apex), ``DistributedOptimizer.load_state_dict`` gives every parameter the
      SAME ``step`` tensor, which Adam then increments in place once per parameter and step, so bias
      correction runs ahead after a resume; each parameter gets its own copy back.

    Raises:
        whatever ``optimizer.load_state_dict`` raises (KeyError / ValueError: other parameter groups).
    """
    with torch.no_grad():
        optimizer.load_state_dict(state)
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(o, "optimizer", None)
        for st in getattr(inner, "state", {}).values():
            if isinstance(st, dict) and isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()
