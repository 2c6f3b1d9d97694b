"""Several short trainings in one torchrun launch (one ``Trainer`` after another, same processes), to compare
a teacher in its own layout with the same-layout run on the same seed.

    torchrun --nproc-per-node N tests/scripts/teacher_layouts_train.py RUN_ROOT NAME=k=v,k=v [NAME=...] -- BASE_OVERRIDES...

Each ``NAME=overrides`` (comma-separated ``key=value``) trains ``tests/trainer_recipe.yaml`` with the base
overrides plus its own into ``RUN_ROOT/NAME``; rank 0 reports every logged iteration's metrics.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "trainer_recipe.yaml"


def main():
    import torch.distributed as dist

    from megatron_eaopd.config import load_config
    from megatron_eaopd.trainer import Trainer

    os.environ["EAOPD_PROGRESS"] = "0"
    args = sys.argv[1:]
    cut = args.index("--")
    root, runs, base = Path(args[0]), args[1:cut], args[cut + 1:]
    for spec in runs:
        name, _, extra = spec.partition("=")
        run_dir = root / name
        cfg = load_config(RECIPE, base + [f"logging.run_dir={run_dir}"] + [x for x in extra.split(",") if x])
        t = Trainer(cfg)
        t.setup()
        t.run()
        dist.barrier()
        if dist.get_rank() == 0:
            rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
            report(check="train", name=name, rows=rows, teacher_own_groups=not t.teacher.groups.same_layout)
        else:
            report(check="train", name=name, teacher_own_groups=not t.teacher.groups.same_layout)
        del t


if __name__ == "__main__":
    main()
