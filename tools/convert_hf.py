#!/usr/bin/env python
"""Hugging Face <-> Megatron checkpoint converter; ``--help`` for the options.

A thin wrapper over :mod:`megatron_eaopd.cli.convert` (installed also as ``eaopd-convert``)::

    python tools/convert_hf.py import --hf /models/Qwen3-8B --out /ckpt/qwen3-8b --verify
    python tools/convert_hf.py export --ckpt /runs/eopd/checkpoints --out /models/eopd --verify
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_eaopd.cli.convert import main  # noqa: E402

if __name__ == "__main__":  # required: dist_checkpointing's writer uses a spawn-context helper
    sys.exit(main())
