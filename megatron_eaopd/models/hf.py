"""Hugging Face ``config.json`` -> megatron-core ``TransformerConfig`` + ``GPTModel`` arguments.

The per-family differences live in one table, :data:`FAMILIES`. Everything else (GQA, tied
embeddings, RoPE base and scaling, norms) is read from the HF config itself.

Also holds the light-weight folder inspection used by the converter before anything heavy is
imported: :func:`inspect_hf_dir` (which weight files an HF folder has, missing shards) and
:func:`looks_like_megatron_checkpoint`.

Source: the field correspondences follow Megatron-Bridge's ``Qwen3/Qwen2/LlamaBridge``
``provider_bridge`` and mbridge's ``LLMBridge._build_config`` (read, not copied); RoPE scaling
follows ``transformers.modeling_rope_utils`` (``_compute_llama3_parameters``,
``_compute_linear_scaling_rope_parameters``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_eaopd.dtypes import DTYPES, dtype_name, parse_dtype  # noqa: F401  (re-exported)
from megatron_eaopd.models.backend import te_available

__all__ = [
    "Family",
    "FAMILIES",
    "RopeSpec",
    "GPTArgs",
    "load_hf_config",
    "family_for",
    "rope_spec",
    "hf_to_gpt_args",
    "hf_to_transformer_config",
    "HFWeightFiles",
    "inspect_hf_dir",
    "looks_like_megatron_checkpoint",
    "DTYPES",
    "parse_dtype",
    "dtype_name",
]


@dataclass(frozen=True)
class Family:
    """Architecture facts that are not spelled out in an HF config.

    Attributes:
        qk_layernorm: per-head RMSNorm on q and k (Qwen3).
        qkv_bias: bias on q/k/v projections; ``None`` = read ``config.attention_bias``.
        hf_prefix: prefix of the decoder in HF parameter names.
    """

    qk_layernorm: bool
    qkv_bias: bool | None
    hf_prefix: str = "model"


#: Supported HF architectures. SmolLM2 is a ``LlamaForCausalLM``; Qwen2.5 a ``Qwen2ForCausalLM``.
FAMILIES: dict[str, Family] = {
    "Qwen3ForCausalLM": Family(qk_layernorm=True, qkv_bias=None),
    "Qwen2ForCausalLM": Family(qk_layernorm=False, qkv_bias=True),
    "LlamaForCausalLM": Family(qk_layernorm=False, qkv_bias=None),
}

#: RoPE types this converter reproduces exactly.
SUPPORTED_ROPE = ("default", "linear", "llama3")


def load_hf_config(src: Any):
    """Load an HF config from a folder, a ``config.json`` path, a dict or a ``PretrainedConfig``.

    Returns:
        ``transformers.PretrainedConfig``.
    Raises:
        FileNotFoundError: no ``config.json`` (also says when ``src`` is a Megatron checkpoint).
    """
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(src, PretrainedConfig):
        return src
    if isinstance(src, dict):
        d = dict(src)
        mt = d.pop("model_type")
        return AutoConfig.for_model(mt, **d)
    p = Path(src)
    if p.is_file():
        p = p.parent
    if not (p / "config.json").is_file():
        if looks_like_megatron_checkpoint(p):
            raise FileNotFoundError(
                f"{p} is a Megatron checkpoint, not a Hugging Face folder; its HF config lives in "
                f"<checkpoint>/iter_*/hf_assets (or export it: python tools/convert_hf.py export --ckpt {p} --out HF_DIR)"
            )
        raise FileNotFoundError(f"no config.json in {p}; pass a Hugging Face model folder")
    return AutoConfig.from_pretrained(str(p))


def family_for(cfg) -> tuple[str, Family]:
    """Return ``(architecture, Family)`` for an HF config.

    Raises:
        NotImplementedError: the architecture is not in :data:`FAMILIES` (lists the supported ones).
    """
    archs = list(getattr(cfg, "architectures", None) or [])
    for a in archs:
        if a in FAMILIES:
            return a, FAMILIES[a]
    by_type = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
    mt = getattr(cfg, "model_type", None)
    if not archs and mt in by_type:
        return by_type[mt], FAMILIES[by_type[mt]]
    raise NotImplementedError(
        f"unsupported architecture {archs or mt!r}; supported: {', '.join(FAMILIES)} "
        f"(SmolLM2 and Llama 2/3 are LlamaForCausalLM, Qwen2.5 is Qwen2ForCausalLM). "
        f"MoE and multimodal models are not supported."
    )


@dataclass(frozen=True)
class RopeSpec:
    """RoPE parameters, normalised across transformers 4.x (``rope_theta``/``rope_scaling``) and 5.x
    (``rope_parameters``).

    Attributes:
        theta: base (``rotary_base``).
        rope_type: ``"default" | "linear" | "llama3"``.
        factor: scaling factor (linear: position interpolation; llama3: low-frequency divisor).
        low_freq_factor, high_freq_factor, original_max_position_embeddings: llama3 parameters.
    """

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def rope_spec(cfg) -> RopeSpec:
    """Read RoPE base and scaling from an HF config.

    transformers 5.x keeps ``rope_theta`` inside ``config.rope_parameters`` (``config.rope_theta``
    may be ``None``); 4.x has ``config.rope_theta`` and ``config.rope_scaling``. Both are handled.

    Raises:
        NotImplementedError: a rope type other than default/linear/llama3 (e.g. yarn, dynamic).
        ValueError: partial rotary (``partial_rotary_factor`` != 1).
    """
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    scaling = getattr(cfg, "rope_scaling", None) or {}
    if isinstance(scaling, dict):
        for k, v in scaling.items():
            params.setdefault(k, v)
    theta = params.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0
    rtype = params.get("rope_type") or params.get("type") or "default"
    if rtype not in SUPPORTED_ROPE:
        raise NotImplementedError(
            f"rope type {rtype!r} is not supported; supported: {', '.join(SUPPORTED_ROPE)}. "
            f"Remove or change rope_scaling/rope_parameters in config.json only if the checkpoint was trained without it."
        )
    prf = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0
    if float(prf) != 1.0:
        raise ValueError(f"partial_rotary_factor={prf} is not supported (only 1.0)")
    if rtype == "default":
        return RopeSpec(theta=float(theta))
    if rtype == "linear":
        return RopeSpec(theta=float(theta), rope_type="linear", factor=float(params["factor"]))
    return RopeSpec(
        theta=float(theta),
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


@dataclass(frozen=True)
class GPTArgs:
    """Everything needed to build a GPTModel for an HF config, independent of parallelism.

    Shapes: ``hidden_size`` h, ``num_heads`` n, ``num_query_groups`` g, ``head_dim`` d,
    ``ffn_hidden_size`` f, ``vocab_size`` V (true, unpadded).
    """

    architecture: str
    family: Family
    num_layers: int
    hidden_size: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    norm_eps: float
    qkv_bias: bool
    qk_layernorm: bool
    tie_word_embeddings: bool
    rope: RopeSpec
    init_std: float
    attention_dropout: float
    source_dtype: torch.dtype | None
    extra: dict = field(default_factory=dict)


def hf_to_gpt_args(cfg) -> GPTArgs:
    """Map an HF config to :class:`GPTArgs` (parallelism-independent).

    Raises:
        NotImplementedError: unknown architecture, unsupported rope type, non-SiLU activation, MLP bias,
            sliding-window attention.
    """
    cfg = load_hf_config(cfg)
    arch, fam = family_for(cfg)
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise NotImplementedError(f"hidden_act={act!r} is not supported (only silu / SwiGLU)")
    if getattr(cfg, "mlp_bias", False):
        raise NotImplementedError("mlp_bias=True is not supported")
    if getattr(cfg, "use_sliding_window", False):
        raise NotImplementedError("use_sliding_window=True is not supported; set it to false for full attention")
    n = cfg.num_attention_heads
    g = getattr(cfg, "num_key_value_heads", None) or n
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // n
    qkv_bias = fam.qkv_bias if fam.qkv_bias is not None else bool(getattr(cfg, "attention_bias", False))
    dt = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    src_dtype = parse_dtype(dt) if isinstance(dt, (str, torch.dtype)) else None
    return GPTArgs(
        architecture=arch,
        family=fam,
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_heads=n,
        num_query_groups=g,
        head_dim=d,
        ffn_hidden_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=getattr(cfg, "max_position_embeddings", 4096),
        norm_eps=float(cfg.rms_norm_eps),
        qkv_bias=qkv_bias,
        qk_layernorm=fam.qk_layernorm,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        rope=rope_spec(cfg),
        init_std=float(getattr(cfg, "initializer_range", 0.02)),
        attention_dropout=float(getattr(cfg, "attention_dropout", 0.0) or 0.0),
        source_dtype=src_dtype,
    )


def hf_to_transformer_config(
    cfg,
    *,
    tp: int = 1,
    pp: int = 1,
    params_dtype: torch.dtype = torch.float32,
    on_gpu: bool | None = None,
    perform_initialization: bool = True,
    use_te: bool | None = None,
    **overrides,
):
    """Build a megatron-core ``TransformerConfig`` for an HF config.

    CPU (no CUDA): ``use_cpu_initialization=True``, ``sequence_parallel=False`` and every fusion off
    (bias_activation, bias_dropout, masked_softmax, apply_rope, gradient_accumulation,
    persist_layer_norm; docs/cpu.md). GPU: fusions on,
    ``sequence_parallel = tp > 1`` (needs Transformer Engine).

    Args:
        cfg: anything :func:`load_hf_config` accepts.
        tp, pp: tensor / pipeline parallel sizes.
        params_dtype: parameter storage dtype.
        on_gpu: force the GPU/CPU settings; default ``torch.cuda.is_available()``.
        perform_initialization: False skips random init (conversion loads every weight anyway).
        **overrides: any ``TransformerConfig`` field, applied last.
    Returns:
        ``(TransformerConfig, GPTArgs)``.
    Raises:
        ValueError: heads / query groups not divisible by ``tp`` or layers by ``pp`` (names the fix).
    """
    a = hf_to_gpt_args(cfg)
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if a.num_heads % tp or a.num_query_groups % tp:
        raise ValueError(
            f"tensor parallel size {tp} must divide num_attention_heads ({a.num_heads}) and "
            f"num_key_value_heads ({a.num_query_groups}); pick tp from the common divisors"
        )
    if a.num_layers % pp:
        raise ValueError(f"pipeline parallel size {pp} must divide num_hidden_layers ({a.num_layers})")
    from megatron.core.transformer import TransformerConfig

    kw: dict[str, Any] = dict(
        num_layers=a.num_layers,
        hidden_size=a.hidden_size,
        num_attention_heads=a.num_heads,
        num_query_groups=a.num_query_groups,
        kv_channels=a.head_dim,
        ffn_hidden_size=a.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=a.norm_eps,
        qk_layernorm=a.qk_layernorm,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=a.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=a.attention_dropout,
        init_method_std=a.init_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        perform_initialization=perform_initialization,
        attention_softmax_in_fp32=True,
    )
    if use_te is None:
        use_te = bool(on_gpu) and te_available()
    if on_gpu and use_te:
        kw.update(sequence_parallel=tp > 1, use_cpu_initialization=False)
    elif on_gpu:
        # CUDA without Transformer Engine: parameters on the GPU, local spec; sequence parallel and the
        # fused kernels need TE/Apex (the torch norm asserts under sequence parallel)
        kw.update(sequence_parallel=False, use_cpu_initialization=False, masked_softmax_fusion=False,
                  apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False)
    else:
        kw.update(
            sequence_parallel=False,
            use_cpu_initialization=True,
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            persist_layer_norm=False,
        )
    kw.update(overrides)
    return TransformerConfig(**kw), a


# --------------------------------------------------------------------------------------------
# Folder inspection (no megatron import)

_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class HFWeightFiles:
    """The weight files of an HF folder.

    Attributes:
        root: the folder.
        files: weight files in load order.
        weight_map: tensor name -> file (only for sharded folders with an index; else empty).
        fmt: ``"safetensors"`` or ``"bin"``.
    """

    root: Path
    files: tuple[Path, ...]
    weight_map: dict
    fmt: str


def looks_like_megatron_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` is a checkpoint written by :mod:`megatron_eaopd.checkpoint` (a ``latest``
    pointer, an ``iter_*`` folder, or a torch_dist folder with ``.metadata``)."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / "latest").is_file() or (p / ".metadata").is_file() or (p / "eaopd_checkpoint.json").is_file():
        return True
    return any(c.name.startswith("iter_") and c.is_dir() for c in p.iterdir())


def inspect_hf_dir(path: str | os.PathLike) -> HFWeightFiles:
    """Find the weights of an HF model folder (safetensors or .bin, sharded via an index or single).

    Raises:
        FileNotFoundError: not a folder, no config.json, no weights, a Megatron checkpoint given
            instead (names the ``export`` command), or shards listed in the index are missing
            (names them).
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"Hugging Face folder {p} does not exist")
    if looks_like_megatron_checkpoint(p) and not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{p} is a Megatron checkpoint, not a Hugging Face folder. To convert it to HF run:\n"
            f"  python tools/convert_hf.py export --ckpt {p} --out HF_DIR"
        )
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {p}; expected a Hugging Face model folder (save_pretrained output)")
    for idx in _WEIGHT_INDEXES:
        if (p / idx).is_file():
            wm = json.loads((p / idx).read_text())["weight_map"]
            names = sorted(set(wm.values()))
            missing = [n for n in names if not (p / n).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{p}: {len(missing)} of {len(names)} weight shards listed in {idx} are missing: "
                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; re-download the model"
                )
            return HFWeightFiles(p, tuple(p / n for n in names), dict(wm), "safetensors" if "safetensors" in idx else "bin")
    for f in _SINGLE_FILES:
        if (p / f).is_file():
            return HFWeightFiles(p, (p / f,), {}, "safetensors" if f.endswith("safetensors") else "bin")
    sts = sorted(p.glob("*.safetensors"))
    if sts:
        return HFWeightFiles(p, tuple(sts), {}, "safetensors")
    ggufs = sorted(p.glob("*.gguf"))
    hint = " (a GGUF file: prepare it with megatron_eaopd.models.gguf.gguf_to_hf first)" if ggufs else ""
    raise FileNotFoundError(f"no model weights (*.safetensors / pytorch_model.bin) in {p}{hint}")
