#!/usr/bin/env python
"""Evaluate a model on the math benchmarks (Avg@n / Pass@k, math-verify); ``--help`` for the options.

A thin wrapper over :mod:`megatron_eaopd.cli.evaluate` (installed also as ``eaopd-evaluate``)::

    python tools/evaluate.py --model runs/eopd/checkpoints --data-dir data/eval --out runs/eopd/eval
    torchrun --nproc-per-node 4 tools/evaluate.py --model CKPT --tp 2 --data-dir data/eval --out OUT
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_eaopd.cli.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
