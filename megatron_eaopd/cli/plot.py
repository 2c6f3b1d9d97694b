"""Plot runs' ``metrics.jsonl`` to an image (``python tools/plot_metrics.py``, ``eaopd-plot``).

    eaopd-plot runs/qwen3_1.7b_eopd --out eopd.png
    eaopd-plot runs/qwen3_1.7b_opd runs/qwen3_1.7b_eopd runs/qwen3_1.7b_rkl_baseline --out cmp.png
    eaopd-plot runs/a/metrics.jsonl --panels entropy high_entropy advantage_var tau loss --smooth 5 --out a.png

Each RUN is a run directory (its ``metrics.jsonl`` is read) or a ``metrics.jsonl`` file. Every panel
is one quantity against the training iteration, one colour per run, so runs are compared side by
side. Default panels: ``entropy`` (teacher: dashed, student: solid), ``gate_fraction``, ``fkl_gated``
(the forward KL on gated tokens; exact over the full vocabulary in mode full) and ``reward`` (the
rollouts' answer accuracy). A panel is a group name below or any key of the files (e.g. ``loss``,
``advantage_var``, ``val/mean/avg@8``). The image format follows ``--out``'s extension (PNG, PDF, SVG);
the file is written whole or not at all.

Needs matplotlib (``pip install 'megatron_eaopd[plot]'``). Exit code 0, or 1 with the reason (a run
without metrics, a panel no run has, matplotlib missing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

__all__ = ["PANELS", "read_metrics", "plot_runs", "main"]

#: Panel name -> (title, [(metric key, line style, label suffix)]); any other name is one metric key.
PANELS: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "entropy": ("mean entropy (nats)", [("teacher_entropy", "--", " teacher"), ("student_entropy", "-", " student")]),
    "gate_fraction": ("gate fraction", [("gate_fraction", "-", "")]),
    "fkl_gated": ("forward KL on gated tokens (nats)", [("fkl_gated", "-", "")]),
    "reward": ("rollout accuracy (reward)", [("rollout_accuracy", "-", "")]),
    "high_entropy": ("fraction with entropy > tau",
                     [("teacher_high_entropy_fraction", "--", " teacher"), ("student_high_entropy_fraction", "-", " student")]),
    "advantage_var": ("sampled-token advantage variance",
                      [("advantage_var", "--", " no baseline"), ("advantage_var_baselined", "-", " baselined")]),
    "kl_terms": ("loss terms (nats)", [("rkl_term", "-", " rkl"), ("fkl_term", "--", " fkl")]),
}
DEFAULT_PANELS = ("entropy", "gate_fraction", "fkl_gated", "reward")


def read_metrics(run: str | os.PathLike) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (a run directory or the file itself), in file order.

    A last line cut short (a run still writing, or killed mid-write) is skipped; any other line that is
    not a JSON object is an error.
    Raises:
        FileNotFoundError: no ``metrics.jsonl`` there. ValueError: a malformed line (file and line number).
    """
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a run directory holding metrics.jsonl, or the file")
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                print(f"[plot] {path}: last line incomplete, skipped", file=sys.stderr)
                continue
            raise ValueError(f"{path}:{i} is not valid JSON") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i} is not a JSON object")
        out.append(rec)
    return out


def _series(records: list[dict], key: str, smooth: int) -> tuple[list[float], list[float]]:
    pts = [(float(r["iteration"]), float(r[key])) for r in records
           if "iteration" in r and isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if smooth > 1 and ys:  # trailing moving average over the last `smooth` points
        ys = [sum(ys[max(0, i - smooth + 1):i + 1]) / (i + 1 - max(0, i - smooth + 1)) for i in range(len(ys))]
    return xs, ys


#: image formats ``--out`` may end in (matplotlib's common ones).
_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")


def plot_runs(runs: list[str | os.PathLike], out: str | os.PathLike, *, panels=DEFAULT_PANELS,
              labels: list[str] | None = None, smooth: int = 1, title: str | None = None) -> dict[str, list[str]]:
    """Draw ``panels`` for every run into the image ``out`` (format from its extension).

    Args:
        runs: run directories or ``metrics.jsonl`` files.
        out: image path; written to a temporary file first, then renamed.
        panels: names from :data:`PANELS` or metric keys.
        labels: one legend label per run (default: the run directory's name).
        smooth: trailing moving average over this many iterations (1 = raw values).
        title: figure title.
    Returns:
        ``{panel title: [line labels drawn]}``.
    Raises:
        ImportError: matplotlib is not installed (says how to install it).
        ValueError: ``out`` is a directory or has no image extension, no runs, labels of the wrong length,
            smooth < 1, or a panel that no run has data for (lists the keys the runs have).
    """
    try:
        import matplotlib  # deferred: an optional extra, only this command needs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("eaopd-plot needs matplotlib: pip install 'megatron_eaopd[plot]'") from e
    if Path(out).is_dir() or Path(out).suffix.lower().lstrip(".") not in _FORMATS:
        raise ValueError(f"--out {str(out)!r} must be an image file ending in {', '.join('.' + f for f in _FORMATS)} "
                         f"(e.g. {Path(out) / 'metrics.png' if Path(out).is_dir() else Path(out).with_suffix('.png')})")
    if not runs:
        raise ValueError("no runs given")
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1 iteration, got {smooth}")
    paths = [Path(r) for r in runs]
    names = labels or [(p.parent.name if p.is_file() else p.name) or str(p) for p in paths]
    if len(names) != len(paths):
        raise ValueError(f"{len(names)} labels for {len(paths)} runs")
    data = [read_metrics(p) for p in paths]
    specs = [PANELS.get(p, (p, [(p, "-", "")])) for p in panels]
    keys_seen = sorted({k for recs in data for r in recs for k, v in r.items() if isinstance(v, (int, float))})
    for name, (_, lines) in zip(panels, specs):
        if not any(_series(recs, key, 1)[0] for recs in data for key, _, _ in lines):
            raise ValueError(f"no run has data for panel {name!r} (keys: {', '.join(k for k, _, _ in lines)}); "
                             f"keys in these runs: {', '.join(keys_seen)}")
    ncols = 2 if len(specs) > 1 else 1
    nrows = math.ceil(len(specs) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 3.6 * nrows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn: dict[str, list[str]] = {}
    for ax, (ptitle, lines) in zip(axes.flat, specs):
        drawn[ptitle] = []
        for i, (recs, run_name) in enumerate(zip(data, names)):
            for key, style, suffix in lines:
                xs, ys = _series(recs, key, smooth)
                if xs:
                    label = run_name + suffix
                    ax.plot(xs, ys, style, color=colours[i % len(colours)], label=label,
                            marker="o" if len(xs) < 12 else None, markersize=3)
                    drawn[ptitle].append(label)
        ax.set_title(ptitle)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(specs):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return drawn


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="eaopd-plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl) or metrics.jsonl files")
    ap.add_argument("--out", required=True, help="image to write (.png, .pdf, .svg)")
    ap.add_argument("--panels", nargs="+", default=list(DEFAULT_PANELS),
                    help=f"panels: {', '.join(PANELS)} or any metric key (default: {' '.join(DEFAULT_PANELS)})")
    ap.add_argument("--labels", nargs="+", default=None, help="one legend label per run")
    ap.add_argument("--smooth", type=int, default=1, help="moving average over this many iterations")
    ap.add_argument("--title", default=None, help="figure title")
    return ap


def main(argv=None) -> int:
    """Parse the arguments and plot; returns the exit code."""
    a = build_parser().parse_args(argv)
    try:
        drawn = plot_runs(a.runs, a.out, panels=a.panels, labels=a.labels, smooth=a.smooth, title=a.title)
    except (ImportError, FileNotFoundError, ValueError) as e:
        print(f"eaopd-plot: error: {e}", file=sys.stderr)
        return 1
    print(f"[plot] wrote {a.out}: {len(drawn)} panels, {len(a.runs)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
