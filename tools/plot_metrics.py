#!/usr/bin/env python
"""Plot one or more runs' metrics.jsonl to an image; ``--help`` for the options.

A thin wrapper over :mod:`megatron_eaopd.cli.plot` (installed also as ``eaopd-plot``; needs the
``plot`` extra: ``pip install 'megatron_eaopd[plot]'``)::

    python tools/plot_metrics.py runs/qwen3_1.7b_opd runs/qwen3_1.7b_eopd --out opd_vs_eopd.png
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_eaopd.cli.plot import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
