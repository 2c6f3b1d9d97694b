"""Helpers for scripts run under torchrun by the tests: report results as JSON lines."""

import json
import os

import torch


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.detach().double().cpu().tolist()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def report(**values):
    """Record one result tagged with this process's global rank.

    Appends a JSON line to ``$RESULT_DIR/rank<r>.jsonl`` when the test harness sets ``RESULT_DIR``
    (ranks share one stdout pipe, where lines can interleave); prints ``RESULT {json}`` otherwise.
    """
    rank = int(os.environ.get("RANK", 0))
    line = json.dumps({"rank": rank, **_plain(values)})
    out_dir = os.environ.get("RESULT_DIR")
    if out_dir:
        with open(os.path.join(out_dir, f"rank{rank}.jsonl"), "a") as f:
            f.write(line + "\n")
    else:
        print("RESULT " + line, flush=True)
