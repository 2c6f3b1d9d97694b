"""Build megatron-core ``GPTModel`` chunks from a Hugging Face config.

The trainer, the evaluator and the converter all call :func:`build_gpt_model`. Parallel sizes
come from ``megatron.core.parallel_state`` (call :func:`megatron_eaopd.distributed.init_model_parallel`
first); ``pre_process``/``post_process`` follow the pipeline stage.

Spec: Transformer Engine's ``get_gpt_layer_with_transformer_engine_spec`` when CUDA is present and
``transformer_engine`` imports, else the local ``get_gpt_layer_local_spec`` (the only one on CPU).

Source: follows Megatron-LM ``pretrain_gpt.model_provider`` and ``megatron.training.arguments``
``_vocab_size_with_padding``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_eaopd.distributed import seed_everything, unwrap
from megatron_eaopd.models.backend import te_available
from megatron_eaopd.models.hf import GPTArgs, hf_to_transformer_config, load_hf_config
from megatron_eaopd.models.mapping import MappingSpec

__all__ = ["ModelInfo", "pad_vocab_size", "te_available", "build_gpt_model", "forward_logits", "unwrap", "seed_model_rng"]


@dataclass
class ModelInfo:
    """Facts about a built model the rest of the recipe needs.

    Attributes:
        architecture: HF architecture name (e.g. ``"Qwen3ForCausalLM"``).
        true_vocab_size: V, the tokenizer's vocabulary (rows ``>= V`` of logits are padding; mask them).
        padded_vocab_size: Megatron's padded size (multiple of ``make_vocab_size_divisible_by * tp``).
        eos_token_ids: all EOS ids from config/generation_config (tuple of int).
        bos_token_id, pad_token_id: may be ``None``.
        tied: embeddings shared with the output layer.
        params_dtype: parameter dtype.
        use_te: Transformer Engine spec in use.
        hf_config: the HF config as a dict (``config.to_dict()``).
        hf_assets_dir: folder holding config.json / tokenizer / generation_config (copied into
            checkpoints by :func:`megatron_eaopd.checkpoint.save_checkpoint`), or ``None``.
        args: the :class:`~megatron_eaopd.models.hf.GPTArgs`.
    """

    architecture: str
    true_vocab_size: int
    padded_vocab_size: int
    eos_token_ids: tuple
    bos_token_id: int | None
    pad_token_id: int | None
    tied: bool
    params_dtype: torch.dtype
    use_te: bool
    hf_config: dict
    hf_assets_dir: str | None
    args: GPTArgs = field(repr=False)

    @property
    def mapping_spec(self) -> MappingSpec:
        """The :class:`~megatron_eaopd.models.mapping.MappingSpec` for this model."""
        return MappingSpec.from_args(self.args, self.padded_vocab_size)


def pad_vocab_size(vocab_size: int, tp: int = 1, divisible_by: int = 128) -> int:
    """Megatron's padded vocabulary: ``ceil(V / (divisible_by * tp)) * divisible_by * tp``.

    Source: ``megatron.training.arguments._vocab_size_with_padding``.
    Raises:
        ValueError: non-positive arguments.
    """
    if vocab_size <= 0 or tp <= 0 or divisible_by <= 0:
        raise ValueError(f"pad_vocab_size needs positive sizes, got V={vocab_size}, tp={tp}, divisible_by={divisible_by}")
    m = divisible_by * tp
    return int(math.ceil(vocab_size / m) * m)


def _eos_ids(hf_cfg, assets: Path | None) -> tuple:
    ids: list[int] = []

    def add(x):
        if x is None:
            return
        for v in (x if isinstance(x, (list, tuple)) else [x]):
            if int(v) not in ids:
                ids.append(int(v))

    add(getattr(hf_cfg, "eos_token_id", None))
    if assets is not None and (assets / "generation_config.json").is_file():
        import json

        add(json.loads((assets / "generation_config.json").read_text()).get("eos_token_id"))
    return tuple(ids)


def build_gpt_model(
    hf_config: Any,
    *,
    params_dtype: torch.dtype = torch.float32,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    parallel_output: bool = True,
    make_vocab_size_divisible_by: int = 128,
    use_te: bool | None = None,
    perform_initialization: bool = True,
    max_sequence_length: int | None = None,
    pg_collection=None,
    **config_overrides,
):
    """Build this rank's ``GPTModel`` for an HF config, at the current TP/PP (or a collection's).

    Args:
        hf_config: HF model folder, ``config.json`` path, dict or ``PretrainedConfig``
            (a checkpoint's ``hf_assets`` folder works too).
        params_dtype: parameter dtype (CPU training: fp32; GPU: bf16 allowed).
        pre_process / post_process: default = first / last pipeline stage.
        parallel_output: True keeps logits vocab-sharded ``[b, s, V_padded/tp]``; False gathers
            ``[b, s, V_padded]``.
        make_vocab_size_divisible_by: vocabulary padding unit (Megatron default 128).
        use_te: force the TE (True) or local (False) spec; default :func:`te_available`.
        perform_initialization: False leaves weights uninitialised (use when loading right after).
        max_sequence_length: default HF ``max_position_embeddings``.
        pg_collection: a ``ProcessGroupCollection`` (``tp``, ``pp``, ``cp`` set) to build the model on its
            own groups (a teacher in its own layout, :mod:`megatron_eaopd.teacher.groups`): TP/PP sizes and
            the pipeline stage come from it instead of the global ``parallel_state``. Load its weights
            afterwards (random initialisation would not differ between its TP ranks: megatron-core's
            one global RNG tracker).
        **config_overrides: ``TransformerConfig`` fields (e.g. ``recompute_granularity``).
    Returns:
        ``(model_chunks, info)``: a list with one ``GPTModel`` (virtual pipeline not supported) and a
        :class:`ModelInfo`. Each model also carries ``model.model_info`` and ``model.true_vocab_size``.
    Raises:
        RuntimeError: ``parallel_state`` not initialised (call ``init_model_parallel`` first).
        NotImplementedError / ValueError: from :func:`megatron_eaopd.models.hf.hf_to_transformer_config`.

    With PP>1 and tied embeddings the last stage holds a copy of the embedding as
    ``output_layer.weight``; megatron-core syncs it at construction over the embedding group and
    the checkpoint maps it to the embedding key, so it always equals the embedding.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel_state is not initialised; call megatron_eaopd.distributed.init_model_parallel(tp, pp) first")
    if (ps.get_virtual_pipeline_model_parallel_world_size() or 1) > 1:
        raise NotImplementedError("virtual pipeline parallelism is not supported by build_gpt_model")
    if pg_collection is None:
        tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        first, last = ps.is_pipeline_first_stage(ignore_virtual=True), ps.is_pipeline_last_stage(ignore_virtual=True)
    else:
        tp, pp = pg_collection.tp.size(), pg_collection.pp.size()
        first, last = pg_collection.pp.rank() == 0, pg_collection.pp.rank() == pp - 1
    cfg_hf = load_hf_config(hf_config)
    assets = None
    if isinstance(hf_config, (str, os.PathLike)):
        p = Path(hf_config)
        assets = p.parent if p.is_file() else p
    use_te = te_available() if use_te is None else use_te
    config, args = hf_to_transformer_config(
        cfg_hf, tp=tp, pp=pp, params_dtype=params_dtype, on_gpu=torch.cuda.is_available(), use_te=use_te,
        perform_initialization=perform_initialization, **config_overrides,
    )
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=args.qk_layernorm)
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        spec = get_gpt_layer_local_spec(qk_layernorm=args.qk_layernorm, normalization="RMSNorm")
    padded = pad_vocab_size(args.vocab_size, tp, make_vocab_size_divisible_by)
    if pre_process is None:
        pre_process = first
    if post_process is None:
        post_process = last
    r = args.rope
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded,
        max_sequence_length=max_sequence_length or args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=args.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=r.theta,
        rope_scaling=r.rope_type == "llama3",
        rope_scaling_factor=r.factor if r.rope_type == "llama3" else 8.0,
        seq_len_interpolation_factor=r.factor if r.rope_type == "linear" else None,
        pg_collection=pg_collection,
    )
    if r.rope_type == "llama3":
        # megatron-core hard-codes low/high_freq_factor=1/4 and original_max_position_embeddings=8192;
        # recompute inv_freq with the config's values (HF _compute_llama3_parameters).
        rot = model.rotary_pos_emb
        d = config.kv_channels
        base = 1.0 / (r.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        rot.inv_freq = rot._apply_scaling(
            base.to(rot.inv_freq.device), factor=r.factor, low_freq_factor=r.low_freq_factor,
            high_freq_factor=r.high_freq_factor, original_max_position_embeddings=r.original_max_position_embeddings,
        )
    info = ModelInfo(
        architecture=args.architecture,
        true_vocab_size=args.vocab_size,
        padded_vocab_size=padded,
        eos_token_ids=_eos_ids(cfg_hf, assets),
        bos_token_id=getattr(cfg_hf, "bos_token_id", None),
        pad_token_id=getattr(cfg_hf, "pad_token_id", None),
        tied=args.tie_word_embeddings,
        params_dtype=params_dtype,
        use_te=use_te,
        hf_config=cfg_hf.to_dict(),
        hf_assets_dir=str(assets) if assets is not None else None,
        args=args,
    )
    model.model_info = info
    model.true_vocab_size = args.vocab_size
    return [model], info


@torch.no_grad()
def forward_logits(model_chunks: list, input_ids: torch.Tensor, *, gather: bool = True, trim_vocab: bool = True):
    """Forward-only pass through any TP/PP layout; full-vocabulary logits on the last stage.

    Args:
        model_chunks: from :func:`build_gpt_model` (one chunk).
        input_ids: ``[b, s]`` int64 token ids (same on every rank of a TP/PP group).
        gather: all-gather vocab-sharded logits across TP (needed when ``parallel_output=True``).
        trim_vocab: drop padded rows, returning ``[b, s, V]``.
    Returns:
        fp32 logits ``[b, s, V or V_padded]`` on the last pipeline stage, ``None`` elsewhere.

    Source: ``megatron.core.pipeline_parallel.get_forward_backward_func`` with ``forward_only=True``.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model = unwrap(model_chunks[0])
    b, s = input_ids.shape
    dev = next(model.parameters()).device
    ids = input_ids.to(dev)
    pos = torch.arange(s, device=dev).unsqueeze(0).expand(b, s).contiguous()
    for m in model_chunks:
        m.eval()
    if ps.get_pipeline_model_parallel_world_size() == 1:
        out = model(ids, pos, None)
        logits = out
    else:
        store = {}

        def step(it, mdl):
            o = mdl(ids, pos, None)

            def loss_fn(t):
                store["logits"] = t
                return t.float().sum() * 0.0, {}

            return o, loss_fn

        get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([None]), model=model_chunks, num_microbatches=1,
            seq_length=s, micro_batch_size=b, forward_only=True,
        )
        logits = store.get("logits")
    if logits is None:
        return None
    logits = logits.float()
    if gather and model.parallel_output and ps.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    if trim_vocab:
        logits = logits[..., : model.model_info.true_vocab_size] if hasattr(model, "model_info") else logits
    return logits


def seed_model_rng(seed: int = 1234) -> None:
    """Seed torch and Megatron's model-parallel RNG tracker (needed before any forward: attention
    forks the tracker for dropout). Same as :func:`megatron_eaopd.distributed.seed_everything`."""
    seed_everything(seed)
