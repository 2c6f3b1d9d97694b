"""HF <-> Megatron parameter names and shapes for dense GPT models (Qwen3, Qwen2, Llama).

Megatron names come in two spellings and both are accepted:

========================================================  ====================================================
local spec (``get_gpt_layer_local_spec``)                 Transformer Engine spec
========================================================  ====================================================
``decoder.layers.i.input_layernorm.weight``               ``decoder.layers.i.self_attention.linear_qkv.layer_norm_weight``
``decoder.layers.i.pre_mlp_layernorm.weight``             ``decoder.layers.i.mlp.linear_fc1.layer_norm_weight``
========================================================  ====================================================

:func:`canonical_name` turns either into the local spelling; the mapping works on those
*canonical global* names (layer index ``i`` is the global, 0-based layer number, whatever the
pipeline stage).

Fused tensors (full = not TP-sharded; h hidden, n heads, g query groups, d head dim, f ffn):

* ``linear_qkv.weight`` ``[g*(n/g+2)*d, h]``: per query group, its ``n/g`` query heads then one key
  head then one value head (``qkv_fuse``). Sharding dim 0 into TP pieces gives each rank whole groups.
* ``linear_fc1.weight`` ``[2f, h]``: ``[gate; up]`` (``fc1_fuse``). Under TP each rank holds
  ``[gate_r; up_r]``, so it is sharded by :func:`tp_shard`, not by a plain chunk.
* embedding / output layer: ``[V_padded, h]``; rows ``V..V_padded`` are padding (zeros on import,
  dropped on export).

Source: layout as in megatron-core ``SelfAttention.get_query_key_value_tensors`` (split of
``mixed_qkv``) and ``apply_swiglu_sharded_factory``; the same as Megatron-Bridge's ``QKVMapping`` /
``GatedMLPMapping``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

__all__ = [
    "MappingSpec",
    "canonical_name",
    "qkv_fuse",
    "qkv_split",
    "fc1_fuse",
    "fc1_split",
    "pad_vocab_rows",
    "megatron_names",
    "hf_names_for",
    "hf_keys",
    "to_megatron",
    "to_hf",
    "tp_shard",
]


@dataclass(frozen=True)
class MappingSpec:
    """Shapes the mapping needs. Build with :meth:`from_args`."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int
    tied: bool
    qkv_bias: bool
    qk_layernorm: bool
    hf_prefix: str = "model"

    @classmethod
    def from_args(cls, args, padded_vocab_size: int) -> "MappingSpec":
        """From :class:`megatron_eaopd.models.hf.GPTArgs` and the padded vocabulary size."""
        return cls(
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            num_heads=args.num_heads,
            num_query_groups=args.num_query_groups,
            head_dim=args.head_dim,
            vocab_size=args.vocab_size,
            padded_vocab_size=padded_vocab_size,
            tied=args.tie_word_embeddings,
            qkv_bias=args.qkv_bias,
            qk_layernorm=args.qk_layernorm,
            hf_prefix=args.family.hf_prefix,
        )


_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def canonical_name(name: str, layer_offset: int = 0) -> str:
    """Normalise a Megatron parameter name: strip DDP/Float16Module ``module.`` prefixes, TE norm
    names -> local-spec names, and add ``layer_offset`` to the layer index (local -> global)."""
    while name.startswith("module."):
        name = name[len("module."):]
    for te, loc in _TE_TO_LOCAL.items():
        if name.endswith(te):
            name = name[: -len(te)] + loc
    if layer_offset:
        name = re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", name)
    return name


# ------------------------------------------------------------------ fused-tensor helpers


def qkv_fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int, head_dim: int) -> torch.Tensor:
    """Interleave HF q/k/v projections per query group into Megatron's ``linear_qkv``.

    Args:
        q: ``[n*d, h]`` (or ``[n*d]`` for a bias); k, v: ``[g*d, h]`` (or ``[g*d]``).
    Returns:
        ``[g*(n/g+2)*d, h]`` (or 1-D), same dtype.
    Raises:
        ValueError: shapes inconsistent with n, g, d.
    """
    hpg = num_heads // num_groups
    tail = q.shape[1:]
    if q.shape[0] != num_heads * head_dim or k.shape[0] != num_groups * head_dim or v.shape != k.shape:
        raise ValueError(
            f"q/k/v shapes {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} do not match "
            f"{num_heads} heads, {num_groups} kv heads, head_dim {head_dim}"
        )
    qg = q.reshape(num_groups, hpg * head_dim, *tail)
    kg = k.reshape(num_groups, head_dim, *tail)
    vg = v.reshape(num_groups, head_dim, *tail)
    return torch.cat([qg, kg, vg], dim=1).reshape(num_groups * (hpg + 2) * head_dim, *tail)


def qkv_split(qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`qkv_fuse`: ``[g*(n/g+2)*d, h]`` -> q ``[n*d, h]``, k, v ``[g*d, h]`` (contiguous)."""
    hpg = num_heads // num_groups
    tail = qkv.shape[1:]
    if qkv.shape[0] != num_groups * (hpg + 2) * head_dim:
        raise ValueError(f"linear_qkv has {qkv.shape[0]} rows, expected {num_groups * (hpg + 2) * head_dim}")
    g = qkv.reshape(num_groups, (hpg + 2) * head_dim, *tail)
    q, k, v = torch.split(g, [hpg * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(num_heads * head_dim, *tail).contiguous(), k.reshape(num_groups * head_dim, *tail).contiguous(),
            v.reshape(num_groups * head_dim, *tail).contiguous())


def fc1_fuse(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``[f, h]`` gate and up -> Megatron ``linear_fc1`` ``[2f, h]`` (= ``[gate; up]``)."""
    if gate.shape != up.shape:
        raise ValueError(f"gate_proj {tuple(gate.shape)} and up_proj {tuple(up.shape)} differ in shape")
    return torch.cat([gate, up], dim=0)


def fc1_split(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fc1_fuse`: ``[2f, h]`` -> gate ``[f, h]``, up ``[f, h]`` (contiguous)."""
    g, u = torch.chunk(fc1, 2, dim=0)
    return g.contiguous(), u.contiguous()


def pad_vocab_rows(w: torch.Tensor, padded: int) -> torch.Tensor:
    """``[V, h]`` -> ``[padded, h]`` with zero rows appended (Megatron's padded vocabulary)."""
    if w.shape[0] == padded:
        return w
    if w.shape[0] > padded:
        raise ValueError(f"vocabulary {w.shape[0]} is larger than the padded size {padded}")
    out = w.new_zeros((padded, *w.shape[1:]))
    out[: w.shape[0]] = w
    return out


# ------------------------------------------------------------------ the mapping

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# per-layer canonical suffix -> HF suffixes (under {prefix}.layers.{i}.)
_SIMPLE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_QKV = {"self_attention.linear_qkv.weight": "weight", "self_attention.linear_qkv.bias": "bias"}


def megatron_names(spec: MappingSpec) -> list[str]:
    """All canonical global Megatron parameter names of a full (TP1/PP1) model, in HF order."""
    out = ["embedding.word_embeddings.weight"]
    for i in range(spec.num_layers):
        p = f"decoder.layers.{i}."
        out += [p + "input_layernorm.weight", p + "self_attention.linear_qkv.weight"]
        if spec.qkv_bias:
            out.append(p + "self_attention.linear_qkv.bias")
        if spec.qk_layernorm:
            out += [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"]
        out += [p + "self_attention.linear_proj.weight", p + "pre_mlp_layernorm.weight",
                p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
    out.append("decoder.final_layernorm.weight")
    if not spec.tied:
        out.append("output_layer.weight")
    return out


def hf_names_for(name: str, spec: MappingSpec) -> list[str]:
    """HF tensor names that make up one canonical Megatron parameter.

    Raises:
        KeyError: a name this mapping does not know.
    """
    pre = spec.hf_prefix
    if name == "embedding.word_embeddings.weight":
        return [f"{pre}.embed_tokens.weight"]
    if name == "decoder.final_layernorm.weight":
        return [f"{pre}.norm.weight"]
    if name == "output_layer.weight":
        return [f"{pre}.embed_tokens.weight"] if spec.tied else ["lm_head.weight"]
    m = _LAYER.match(name)
    if m:
        i, suf = int(m.group(1)), m.group(2)
        lp = f"{pre}.layers.{i}."
        if suf in _SIMPLE:
            return [lp + _SIMPLE[suf]]
        if suf in _QKV:
            t = _QKV[suf]
            return [lp + f"self_attn.{x}_proj.{t}" for x in "qkv"]
        if suf == "mlp.linear_fc1.weight":
            return [lp + "mlp.gate_proj.weight", lp + "mlp.up_proj.weight"]
    raise KeyError(f"no HF mapping for Megatron parameter {name!r}")


def hf_keys(spec: MappingSpec) -> list[str]:
    """The HF tensor names a model with ``spec`` has (tied: no ``lm_head.weight``), in HF order."""
    out: list[str] = []
    for n in megatron_names(spec):  # tied: megatron_names has no output_layer, so no lm_head
        out += hf_names_for(n, spec)
    return out


def _expected_hf_shape(hf_name: str, spec: MappingSpec) -> tuple[int, ...] | None:
    h, d = spec.hidden_size, spec.head_dim
    tab = {
        "embed_tokens.weight": (spec.vocab_size, h),
        "lm_head.weight": (spec.vocab_size, h),
        "q_proj.weight": (spec.num_heads * d, h),
        "k_proj.weight": (spec.num_query_groups * d, h),
        "v_proj.weight": (spec.num_query_groups * d, h),
        "q_proj.bias": (spec.num_heads * d,),
        "k_proj.bias": (spec.num_query_groups * d,),
        "v_proj.bias": (spec.num_query_groups * d,),
        "o_proj.weight": (h, spec.num_heads * d),
        "q_norm.weight": (d,),
        "k_norm.weight": (d,),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "norm.weight": (h,),
    }
    for k, v in tab.items():
        if hf_name.endswith(k):
            return v
    return None


def to_megatron(name: str, get: Callable[[str], torch.Tensor], spec: MappingSpec) -> torch.Tensor:
    """Build the full (TP-unsharded) Megatron tensor for canonical ``name`` from HF tensors.

    Args:
        name: canonical global Megatron name.
        get: ``hf_name -> Tensor`` (e.g. a lazy safetensors reader).
        spec: shapes.
    Returns:
        the tensor in Megatron layout (vocab rows padded to ``spec.padded_vocab_size``).
    Raises:
        ValueError: an HF tensor's shape differs from what the config implies (names both).
    """
    srcs = hf_names_for(name, spec)
    ts = []
    for s in srcs:
        t = get(s)
        exp = _expected_hf_shape(s, spec)
        if exp is not None and tuple(t.shape) != exp:
            raise ValueError(f"shape mismatch for {s}: checkpoint has {tuple(t.shape)}, config.json implies {exp}")
        ts.append(t)
    suf = name.split(".", 3)[-1] if name.startswith("decoder.layers.") else name
    if suf in _QKV:
        return qkv_fuse(*ts, spec.num_heads, spec.num_query_groups, spec.head_dim)
    if suf == "mlp.linear_fc1.weight":
        return fc1_fuse(*ts)
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return pad_vocab_rows(ts[0], spec.padded_vocab_size)
    return ts[0]


def to_hf(name: str, tensor: torch.Tensor, spec: MappingSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """Split one full Megatron tensor into its HF tensors (inverse of :func:`to_megatron`).

    Yields ``(hf_name, tensor)``; padded vocabulary rows are dropped. For tied models
    ``output_layer.weight`` yields nothing (HF stores only ``embed_tokens``).
    """
    srcs = hf_names_for(name, spec)
    suf = name.split(".", 3)[-1] if name.startswith("decoder.layers.") else name
    if name == "output_layer.weight" and spec.tied:
        return
    if suf in _QKV:
        yield from zip(srcs, qkv_split(tensor, spec.num_heads, spec.num_query_groups, spec.head_dim))
    elif suf == "mlp.linear_fc1.weight":
        yield from zip(srcs, fc1_split(tensor))
    elif name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if tensor.shape[0] < spec.vocab_size:
            raise ValueError(f"{name} has {tensor.shape[0]} rows, fewer than the vocabulary size {spec.vocab_size}")
        yield srcs[0], tensor[: spec.vocab_size]
    else:
        yield srcs[0], tensor


def tp_shard(name: str, full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's piece of a full Megatron tensor, following the parameter's own
    ``tensor_model_parallel`` / ``partition_dim`` attributes (set by megatron-core's parallel layers;
    inferred from the shapes when a layer leaves them unset).

    ``linear_fc1`` (SwiGLU) is sharded as ``[gate_r; up_r]``.

    Raises:
        ValueError: the piece's shape differs from ``param``'s (names both).
    """
    is_tp = getattr(param, "tensor_model_parallel", None)
    dim = getattr(param, "partition_dim", None)
    if tp_size > 1 and is_tp is None and tuple(full.shape) != tuple(param.shape):
        # a layer that does not tag its parameters (e.g. some TE versions): infer the split dimension
        dims = [i for i, (a, b) in enumerate(zip(full.shape, param.shape)) if a == b * tp_size and a != b]
        if len(dims) == 1 and full.dim() == param.dim():
            is_tp, dim = True, dims[0]
    if tp_size > 1 and is_tp:
        if name.endswith("mlp.linear_fc1.weight"):
            g, u = torch.chunk(full, 2, dim=0)
            piece = torch.cat([torch.chunk(g, tp_size, 0)[tp_rank], torch.chunk(u, tp_size, 0)[tp_rank]], 0)
        else:
            piece = torch.chunk(full, tp_size, dim=dim)[tp_rank]
    else:
        piece = full
    if tuple(piece.shape) != tuple(param.shape):
        raise ValueError(f"shape mismatch for {name}: mapped tensor {tuple(piece.shape)} vs model parameter {tuple(param.shape)}")
    return piece
