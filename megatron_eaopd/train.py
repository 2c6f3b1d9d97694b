"""Entry point: ``torchrun ... -m megatron_eaopd.train --config recipes/NAME.yaml [key.sub=value ...]``.

Also launched directly by ``srun`` (one task per GPU; ``MASTER_ADDR``/``MASTER_PORT`` exported by the
SLURM launcher) or as a single process. Exit codes: 0 finished or preempted with a checkpoint saved,
2 configuration or data error, 1 anything else.
"""

from __future__ import annotations

import sys

from megatron_eaopd.config import ConfigError, load_config, parse_cli
from megatron_eaopd.data import DataError
from megatron_eaopd.distributed import destroy

USAGE = "python -m megatron_eaopd.train [--config] RECIPE.yaml [key.sub=value ...]  (or torchrun ... -m megatron_eaopd.train ...)"


def main(argv: list[str] | None = None) -> int:
    """Parse ``[--config] PATH key=value ...``, train, and return the exit code (0 / 2 config or data error)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    if not argv:
        print(f"usage: {USAGE}\n(-h for more)", file=sys.stderr)
        return 2
    try:
        path, overrides = parse_cli(argv)
        cfg = load_config(path, overrides)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    # imported after the configuration is checked: megatron-core's import takes seconds and prints warnings, and a
    # typo in a key should be reported at once
    from megatron_eaopd.trainer import train

    try:
        train(cfg)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
