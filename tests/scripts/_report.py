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
    """Print one ``RESULT {json}`` line tagged with this process's global rank."""
    rank = int(os.environ.get("RANK", 0))
    print("RESULT " + json.dumps({"rank": rank, **_plain(values)}), flush=True)
