"""Run logging (megatron_eaopd/logger.py): TensorBoard tags (training metrics under train/, validation
under val/), the W&B run identity kept in the run directory across restarts, and a real W&B run in
offline mode (no network) that a second process-like logger continues under the same id and name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from megatron_eaopd.logger import TABLE_COLUMNS, WANDB_RUN_FILE, MetricsLogger, format_table, tb_tag, wandb_run_identity


def test_tb_tags():
    assert tb_tag("loss") == "train/loss" and tb_tag("gate_fraction") == "train/gate_fraction"
    assert tb_tag("val/mean/avg@8") == "val/mean/avg@8" and tb_tag("val/seconds") == "val/seconds"


def test_console_table_keeps_its_columns_when_metrics_are_missing():
    table = format_table([{"iteration": 3, "loss": 1.25}, {"iteration": 4, "loss": float("nan"), "rkl_term": 0.5}])
    header, first, second = table.splitlines()
    assert len(header) == len(first) == len(second) == sum(len(h) if len(h) > w else w for h, w in (
        (h, len(f.format(0))) for _, h, f in TABLE_COLUMNS)) + len(TABLE_COLUMNS) - 1, table
    assert first.split() == ["3", "1.2500"] + ["-"] * (len(TABLE_COLUMNS) - 2)
    assert second.split()[:3] == ["4", "-", "0.5000"]


def test_tensorboard_train_and_val_namespaces(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lg = MetricsLogger(tmp_path, 2, jsonl=True, tensorboard=True, progress=False)
    lg.log(1, {"loss": 0.5, "gate_fraction": 0.2})
    lg.log(2, {"loss": 0.25, "val/mean/avg@8": 12.5, "val/math500/pass@8": 40.0})
    lg.close()
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert tags == {"train/loss", "train/gate_fraction", "val/mean/avg@8", "val/math500/pass@8"}, tags
    assert [(e.step, e.value) for e in ea.Scalars("train/loss")] == [(1, 0.5), (2, 0.25)]
    assert [(e.step, e.value) for e in ea.Scalars("val/mean/avg@8")] == [(2, 12.5)]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["val/mean/avg@8"] == 12.5  # JSONL keeps the names as they are


def test_wandb_run_identity_is_kept_in_the_run_dir(tmp_path):
    run = tmp_path / "qwen3_4b-1234"
    run.mkdir()
    rid, name = wandb_run_identity(run)
    assert len(rid) == 8 and name == "qwen3_4b-1234"
    assert json.loads((run / WANDB_RUN_FILE).read_text()) == {"id": rid, "name": name}
    assert wandb_run_identity(run) == (rid, name)                        # a requeue: same run
    assert wandb_run_identity(run, "eopd 4b") == (rid, "eopd 4b")         # renamed, same id
    assert wandb_run_identity(run) == (rid, "eopd 4b")
    other = tmp_path / "other"
    other.mkdir()
    assert wandb_run_identity(other)[0] != rid
    (other / WANDB_RUN_FILE).write_text("{oops")
    with pytest.raises(ValueError, match=r"wandb_run.json is not a valid W&B run file .* delete it"):
        wandb_run_identity(other)


def test_wandb_offline_run_continues_after_a_restart(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")  # optional extra (pip install ".[wandb]"); installed by the dev extra
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    run = tmp_path / "runs" / "eopd-77"
    first = MetricsLogger(run, 4, tensorboard=False, wandb_project="eaopd-test", progress=False, config={"a": 1})
    rid, name = first.wandb.id, first.wandb.name
    first.log(1, {"loss": 1.0})
    first.log(2, {"loss": 0.9})
    first.close()
    assert name == "eopd-77" and json.loads((run / WANDB_RUN_FILE).read_text()) == {"id": rid, "name": name}
    # the requeued process resumes from the checkpoint of iteration 1 and logs iteration 2 again
    second = MetricsLogger(run, 4, start_iteration=1, tensorboard=False, wandb_project="eaopd-test", progress=False)
    assert (second.wandb.id, second.wandb.name) == (rid, name)
    second.log(2, {"loss": 0.8})
    second.close()
    offline = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<id>, with "-1" appended by W&B when both starts fall in the same second
    assert len(offline) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{rid}(-\d+)?", p) for p in offline), offline
    assert wandb.run is None
