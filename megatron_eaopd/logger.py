"""Run logging on global rank 0: console progress bar and per-iteration table, JSONL, TensorBoard, W&B.

Metric names: plain keys (``loss``, ``gate_fraction``) are training metrics and appear in TensorBoard
under ``train/<key>``; keys that already carry a namespace (``val/mean/avg@8`` from validation) keep
it (``val/...``). W&B: one run per run directory, across preemptions and requeues: its id is kept in
``<run_dir>/wandb_run.json`` and a resumed process continues it (``resume="allow"``); the run is named
after the run directory unless a name is given; the x-axis is the training iteration.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from pathlib import Path

from tqdm import tqdm

from megatron_eaopd.distributed import is_rank0

__all__ = ["MetricsLogger", "TABLE_COLUMNS", "format_table", "WANDB_RUN_FILE", "wandb_run_identity", "tb_tag"]

#: File in the run directory that keeps the W&B run id (and name) across restarts.
WANDB_RUN_FILE = "wandb_run.json"

#: (metric key, column header, format) of the console table.
TABLE_COLUMNS = (
    ("iteration", "iter", "{:>5d}"),
    ("loss", "loss", "{:>8.4f}"),
    ("rkl_term", "rkl", "{:>8.4f}"),
    ("fkl_term", "fkl", "{:>7.4f}"),
    ("gate_fraction", "gate", "{:>6.3f}"),
    ("teacher_entropy", "H_teach", "{:>7.3f}"),
    ("student_entropy", "H_stud", "{:>7.3f}"),
    ("response_length", "resp_len", "{:>8.1f}"),
    ("rollout_accuracy", "acc", "{:>5.2f}"),
    ("time_rollout", "t_roll", "{:>6.1f}"),
    ("time_teacher", "t_teach", "{:>7.1f}"),
    ("time_train", "t_train", "{:>7.1f}"),
    ("tokens_per_second", "tok/s", "{:>7.1f}"),
)


def _cell(fmt: str, v) -> str:
    m = re.search(r":[<>^]?(\d+)", fmt)  # the field width of "{:>8.4f}" is 8
    width = int(m.group(1)) if m else 6
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-".rjust(width)
    try:
        return fmt.format(int(v) if fmt.endswith("d}") else float(v))
    except (TypeError, ValueError):
        return str(v).rjust(width)


def format_table(rows: list[dict]) -> str:
    """The console table (header + one line per metrics dict), fixed-width columns."""
    header = " ".join(_cell("{:>" + str(len(_cell(f, 0))) + "}", h) for _, h, f in TABLE_COLUMNS)
    lines = [header]
    for r in rows:
        lines.append(" ".join(_cell(f, r.get(k)) for k, _, f in TABLE_COLUMNS))
    return "\n".join(lines)


def tb_tag(key: str) -> str:
    """TensorBoard tag of a metric: ``train/<key>`` for plain keys, the key itself when it already has a
    namespace (``val/mean/avg@8``)."""
    return key if "/" in key else f"train/{key}"


def wandb_run_identity(run_dir: str | Path, name: str | None = None) -> tuple[str, str]:
    """The W&B ``(run id, run name)`` of a run directory, created once and kept in ``WANDB_RUN_FILE``.

    The first call writes the file (a fresh 8-character id; the name defaults to the run directory's
    name) atomically; later calls, e.g. after a requeue, return what it holds, so every restart
    continues the same W&B run. An explicit ``name`` replaces the stored one (the id never changes).
    Raises: ValueError when the file exists but is not valid (names the file; delete it to start a new run).
    """
    path = Path(run_dir) / WANDB_RUN_FILE
    if path.exists():
        try:
            d = json.loads(path.read_text())
            run_id, stored = str(d["id"]), str(d.get("name") or Path(run_dir).name)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a valid W&B run file ({e}); delete it to start a new W&B run") from None
        if name is None or name == stored:
            return run_id, stored
    else:
        run_id = uuid.uuid4().hex[:8]
    name = name or Path(run_dir).name
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"id": run_id, "name": name}) + "\n")
    os.replace(tmp, path)
    return run_id, name


class MetricsLogger:
    """Writes one record per iteration; does nothing on ranks other than global rank 0.

    Args:
        run_dir: run directory; ``metrics.jsonl`` and ``tensorboard/`` go there.
        total_iterations: length of the run (progress bar).
        start_iteration: first iteration of this process (after a resume).
        jsonl, tensorboard: sinks to enable. wandb_project: W&B project (needs ``wandb``), or None.
        wandb_name: W&B run name (default: the run directory's name); the run id is kept in the run
            directory (:func:`wandb_run_identity`).
        log_interval: print a table row every this many iterations.
        progress: show a tqdm progress bar on stderr.
        config: the resolved configuration (recorded by W&B).
    """

    def __init__(self, run_dir: str | Path, total_iterations: int, start_iteration: int = 0, *, jsonl: bool = True,
                 tensorboard: bool = True, wandb_project: str | None = None, log_interval: int = 1,
                 progress: bool = True, config: dict | None = None, wandb_name: str | None = None):
        self.enabled = is_rank0()
        self.rows: list[dict] = []
        self.log_interval = log_interval
        self._printed = 0
        if not self.enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if jsonl and path.exists():  # a resumed run: drop rows logged after the checkpoint it resumes from
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("iteration", 0) <= start_iteration]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
        self.jsonl = open(path, "a") if jsonl else None
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("logging.wandb_project is set but wandb is not installed: pip install wandb") from e
            run_id, run_name = wandb_run_identity(self.run_dir, wandb_name)
            self.wandb = wandb.init(project=wandb_project, dir=str(self.run_dir), config=config, id=run_id,
                                    name=run_name, resume="allow")
            # the iteration is the x-axis: after a resume from an earlier checkpoint, W&B's own step
            # counter has moved past it, and logging with step=iteration would drop those rows
            self.wandb.define_metric("iteration")
            self.wandb.define_metric("*", step_metric="iteration")
        self.bar = tqdm(total=total_iterations, initial=start_iteration, desc="EOPD", unit="it", dynamic_ncols=True,
                        disable=not progress)

    def log(self, iteration: int, metrics: dict) -> None:
        """Record the metrics of one iteration (all values plain floats/ints)."""
        if not self.enabled:
            return
        rec = {"iteration": iteration, "time": time.time(), **metrics}
        self.rows.append(rec)
        if self.jsonl:
            self.jsonl.write(json.dumps(rec) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(tb_tag(k), v, iteration)
            self.tb.flush()
        if self.wandb:
            self.wandb.log({"iteration": iteration, **metrics})
        if iteration % self.log_interval == 0:
            if self._printed % 20 == 0:
                self.bar.write(format_table([]))
            self.bar.write(format_table([rec]).splitlines()[1])
            self._printed += 1
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}")

    def message(self, text: str) -> None:
        """Print a line above the progress bar (rank 0)."""
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        """Close the progress bar and every sink (rank 0)."""
        if not self.enabled:
            return
        self.bar.close()
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
