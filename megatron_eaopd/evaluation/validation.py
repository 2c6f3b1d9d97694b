"""Validation during training: the evaluation pipeline on a small held-out set, every ``eval.interval``.

The trainer calls :func:`run_validation` on EVERY rank (it is collective). It runs the same code path
as ``tools/evaluate.py``: global rank 0 drives :func:`~megatron_eaopd.evaluation.runner.run_evaluation`
(prompts, math-verify grading, ``samples.jsonl`` / ``summary.json`` / ``table.md`` under
``out_dir/iter_XXXXXXX``) through a :class:`~megatron_eaopd.evaluation.model_generator.DistributedGenerator`
while the other ranks serve its generate calls (each data-parallel replica samples a share of the
problems, collective over its TP/PP group). Rank 0 then broadcasts the flat metrics, so every rank
returns the same dict.

Metrics (percent, as in the paper's tables; ``<bench>`` = file stem, n = ``eval.n``)::

    val/<bench>/avg@<n>   val/<bench>/pass@<k> (each k)   val/<bench>/mean_length   val/<bench>/truncation_rate
    val/mean/avg@<n>      val/mean/pass@<k>               val/mean/mean_length      val/mean/truncation_rate
    val/seconds           val/grading_timeouts

Grading runs in a ``GradingPool`` on rank 0: its workers are fresh interpreters that import only the
grading module (never the launching script), and a worker's start-up is not charged to any sample's
timeout; ``val/grading_timeouts`` counts only samples whose grading itself ran past the timeout.

Source: docs/method.md, "Evaluation protocol" (Avg@n, unbiased pass@k, unweighted mean over benchmarks).
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch.distributed as dist

from megatron_eaopd.prompts import PromptFormat

__all__ = ["run_validation", "flatten_summary"]


def flatten_summary(summary: dict, prefix: str = "val") -> dict[str, float]:
    """``run_evaluation``'s summary -> ``{"val/<bench>/avg@<n>": ..., "val/mean/pass@<k>": ...}``.

    Args: summary: from :func:`~megatron_eaopd.evaluation.runner.run_evaluation`; prefix: key prefix.
    Returns: flat ``{str: float}`` with Avg@n, every pass@k, mean_length and truncation_rate per
        benchmark and for the unweighted ``mean``, plus ``<prefix>/grading_timeouts`` (samples whose
        math-verify grading timed out, counted wrong).
    Raises: KeyError on a malformed summary.
    """
    n = summary["config"]["n"]
    ks = summary["config"]["ks"]
    keys = [("avg", f"avg@{n}")] + [(f"pass@{k}", f"pass@{k}") for k in ks] + \
        [("mean_length", "mean_length"), ("truncation_rate", "truncation_rate")]
    out: dict[str, float] = {}
    for name, m in list(summary["benchmarks"].items()) + [("mean", summary["mean"])]:
        for src, dst in keys:
            out[f"{prefix}/{name}/{dst}"] = float(m[src])
    out[f"{prefix}/grading_timeouts"] = float(sum(m.get("timeouts", 0) for m in summary["benchmarks"].values()))
    return out


def _chunks(model: Any) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def run_validation(model: Any, tokenizer: Any, eval_cfg: Any, iteration: int, out_dir: str | Path,
                   stop_ids: Sequence[int], chat_template: bool = False, *, rollout_engine: Any = None,
                   seed: int = 0, grading_workers: int = 1, grading_timeout: float = 10.0,
                   engine: str = "auto", max_batch_size: int | None = None,
                   prompt_format: PromptFormat | None = None) -> dict[str, float]:
    """Evaluate the current model on the held-out files of ``eval_cfg``; collective over ALL ranks.

    Args:
        model: the student's model chunks (list, DDP-wrapped or not) or one model, at the current
            TP/PP (Megatron parallel state initialised). Left in the train/eval mode it had.
        tokenizer: the HF tokenizer (chat template and decoding).
        eval_cfg: the ``eval`` config section (:class:`megatron_eaopd.config.EvalConfig`; duck-typed:
            ``files``, ``n``, ``k``, ``limit``, ``max_new_tokens``, ``temperature``, ``top_p``).
        iteration: the training iteration (names the output folder).
        out_dir: parent folder; this call writes ``out_dir/iter_%07d/`` (recreated from scratch).
        stop_ids: ids that end a response (:func:`megatron_eaopd.rollout.stop_token_ids`).
        chat_template: wrap prompts in the tokenizer's chat template (thinking off), as in training.
        rollout_engine: an existing rollout engine over the same model to reuse (the trainer's),
            instead of building a second one.
        seed: sampling seed (the same every call, so iterations are compared on the same draws).
        grading_workers, grading_timeout: math-verify worker processes / seconds per sample.
        engine, max_batch_size: passed to :func:`~megatron_eaopd.evaluation.model_generator.local_generator`.
        prompt_format: the training run's :class:`~megatron_eaopd.prompts.PromptFormat` (chat template,
            suffix, separator, template options); default: the paper's suffix and ``chat_template``.
    Returns:
        flat metrics (see the module doc), identical on every rank.
    Raises:
        ValueError: no ``eval.files``, or some k > n. FileNotFoundError: a missing file.
        RuntimeError: on the other ranks, when evaluation failed on rank 0 (names the error there;
            rank 0 re-raises the original exception).
    Source: docs/method.md, "Evaluation protocol"; same pipeline as ``tools/evaluate.py``.
    """
    from megatron_eaopd.evaluation.model_generator import DistributedGenerator, local_generator
    from megatron_eaopd.evaluation.runner import EvalConfig, resolve_benchmarks, run_evaluation

    files = list(getattr(eval_cfg, "files", None) or [])
    if not files:
        raise ValueError("run_validation needs eval.files (held-out JSONL files with problem/answer fields)")
    ks = list(getattr(eval_cfg, "k", None) or [eval_cfg.n])
    cfg = EvalConfig(n=int(eval_cfg.n), ks=ks, temperature=float(eval_cfg.temperature), top_p=float(eval_cfg.top_p),
                     max_new_tokens=int(eval_cfg.max_new_tokens), seed=int(seed), limit=getattr(eval_cfg, "limit", None),
                     grading_workers=grading_workers, grading_timeout=grading_timeout,
                     chat_template=bool(chat_template), tokenizer=tokenizer, progress=False)
    if prompt_format is not None:
        cfg.chat_template, cfg.suffix = prompt_format.chat_template, prompt_format.suffix
        cfg.separator, cfg.chat_template_kwargs = prompt_format.separator, dict(prompt_format.chat_template_kwargs)
    cfg.resolved_ks()  # k > n: the same error on every rank, before any collective
    chunks = _chunks(model)
    modes = [c.training for c in chunks]
    local = local_generator(chunks, tokenizer, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p, stop_ids=tuple(stop_ids), engine=engine, max_batch_size=max_batch_size,
                            rollout_engine=rollout_engine)
    gen = DistributedGenerator(local)
    rank0 = not gen.distributed or dist.get_rank() == 0
    t0 = time.perf_counter()
    result: Any = None
    exc: Exception | None = None
    try:
        if rank0:
            try:
                benchmarks = resolve_benchmarks(files, None)
                out = Path(out_dir) / f"iter_{int(iteration):07d}"
                if out.exists():
                    shutil.rmtree(out)  # a fresh evaluation of these weights, never a mix with older samples
                summary = run_evaluation(gen, benchmarks, out, cfg, model_name=f"iteration {int(iteration)}")
                result = flatten_summary(summary)
                result["val/seconds"] = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - re-raised here, reported on the other ranks
                exc, result = e, f"{type(e).__name__}: {e}"
            finally:
                gen.close()
        else:
            gen.serve()
        if gen.distributed:
            box = [result]
            dist.broadcast_object_list(box, src=0)
            result = box[0]
    finally:
        for c, m in zip(chunks, modes):
            c.train(m)
    if exc is not None:
        raise exc
    if isinstance(result, str):
        raise RuntimeError(f"validation at iteration {iteration} failed on rank 0: {result}")
    bad = [k for k, v in result.items() if not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"validation at iteration {iteration} produced non-finite metrics {bad}")
    return result
