"""megatron_eaopd: Entropy-Aware On-Policy Distillation (EOPD) on Megatron-core.

Subpackages: ``loss`` (vocab-parallel EOPD objective), ``models`` (GPTModel from Hugging Face
configs, HF <-> Megatron mapping); modules: ``platform`` (CPU layer), ``distributed``.
"""

__version__ = "0.1.0"
