"""Command lines of the package (also installed as console scripts, see pyproject.toml):

* ``eaopd-convert`` = ``python tools/convert_hf.py``: :mod:`megatron_eaopd.cli.convert`;
* ``eaopd-evaluate`` = ``python tools/evaluate.py``: :mod:`megatron_eaopd.cli.evaluate`;
* ``eaopd-train`` = ``python -m megatron_eaopd.train``: :mod:`megatron_eaopd.train`;
* ``eaopd-plot`` = ``python tools/plot_metrics.py``: :mod:`megatron_eaopd.cli.plot` (``[plot]`` extra).

Each parses arguments and calls the package; no logic lives only in a script.
"""
