"""Answer grading with math-verify, in worker processes with a hard per-item timeout.

Protocol (docs/method.md, "Evaluation protocol"): the model is asked to "put your final answer within \\boxed{}";
the answer is the content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``) of the output, and it is
checked against the gold answer with math-verify: ``verify(parse(gold), parse(answer))``.

Timeouts. math-verify's own timeouts use ``signal.alarm`` (main thread only) and cannot interrupt
long C-level computations (e.g. sympy evaluating ``9^{9^{9^9}}``). Here every item is graded in a
worker process (in that worker's main thread, with math-verify's signal timeouts DISABLED) and the
parent enforces the per-item wall-clock timeout: a worker that runs past it is killed and replaced,
and the item is reported as ``timed_out`` (and counted as wrong). A worker that dies is also replaced
and the item reported with ``error``.

This module does not import math_verify at import time (the parent only needs ``last_boxed``, which
lives in :mod:`megatron_eaopd.answers` and is re-exported here).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import re
import time
from collections import deque
from dataclasses import asdict, dataclass
from multiprocessing.connection import wait as _mp_wait
from typing import Any, Callable, Iterable, Sequence

from megatron_eaopd.answers import last_boxed

logger = logging.getLogger(__name__)

__all__ = [
    "GradeResult",
    "GradingPool",
    "last_boxed",
    "grade_one",
    "grade_answers",
]

def _wrap_gold(gold: str) -> str:
    """Gold answer -> a string math-verify's LaTeX extractor parses (``$\\boxed{gold}$``)."""
    g = str(gold).strip()
    if "\\boxed" in g or re.search(r"(?<!\\)\$", g):  # already delimited (an escaped \$ is not)
        return g
    return "$\\boxed{" + g + "}$"


@dataclass
class GradeResult:
    """Verdict for one (gold, output) pair.

    Fields: correct (bool; False on timeout/error/no answer), extracted (str | None: the last-box
    content), timed_out (bool), error (str | None: worker crash or exception text), seconds (float:
    wall time spent grading, as seen by the worker or the parent for timeouts).
    """

    correct: bool
    extracted: str | None
    timed_out: bool = False
    error: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """Plain-dict view (JSON-serialisable)."""
        return asdict(self)


def grade_one(gold: str, output: str, require_boxed: bool = True) -> GradeResult:
    """Grade one output against one gold answer with math-verify, in the CURRENT process.

    ``verify(parse(gold), parse(answer))`` where answer = ``last_boxed(output)`` wrapped as
    ``$\\boxed{answer}$``; gold is wrapped the same way unless it already contains ``\\boxed``/``$``.
    math-verify's signal-based timeouts are disabled (``parsing_timeout=None``,
    ``timeout_seconds=None``): callers must bound the time themselves (``GradingPool`` does).
    Args: gold (str): reference answer; output (str): full model output; require_boxed (bool): when
        True (default) an output with no ``\\boxed{}`` is wrong; when False the whole output is parsed.
    Returns: GradeResult (never raises for bad input: parse/verify exceptions become ``error``).
    Source: math-verify (HuggingFace) ``parse``/``verify``.
    """
    from math_verify import parse, verify

    t0 = time.perf_counter()
    extracted = last_boxed(output)
    if extracted is None and require_boxed:
        return GradeResult(False, None, seconds=time.perf_counter() - t0)
    try:
        gold_parsed = parse(_wrap_gold(gold), parsing_timeout=None)
        pred_text = ("$\\boxed{" + extracted + "}$") if extracted is not None else (output or "")
        pred_parsed = parse(pred_text, parsing_timeout=None)
        ok = bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))
        return GradeResult(ok, extracted, seconds=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - math-verify may raise anything from sympy
        return GradeResult(False, extracted, error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)


def _grade_task(task: tuple) -> dict:
    """Worker-side default task: ``(gold, output, require_boxed)`` -> GradeResult dict."""
    gold, output, require_boxed = task
    return grade_one(gold, output, require_boxed).to_dict()


def _worker_main(conn, fn: Callable[[Any], dict]) -> None:
    """Worker loop: receive ``(idx, task)``, send ``(idx, result_dict)``; ``None`` stops it."""
    import logging as _logging

    _logging.getLogger("math_verify").setLevel(_logging.ERROR)
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            idx, task = msg
            try:
                res = fn(task)
            except Exception as e:  # noqa: BLE001
                res = {"correct": False, "extracted": None, "timed_out": False,
                       "error": f"{type(e).__name__}: {e}", "seconds": 0.0}
            conn.send((idx, res))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass


class _Worker:
    """One worker process with its own duplex pipe; at most one task in flight."""

    def __init__(self, ctx, fn):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, fn), daemon=True)
        self.proc.start()
        child.close()
        self.task_idx: int | None = None
        self.started = 0.0

    def kill(self) -> None:
        """Terminate (then SIGKILL) the process and close the pipe."""
        try:
            self.proc.terminate()
            self.proc.join(1.0)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(1.0)
        finally:
            self.conn.close()

    def stop(self) -> None:
        """Ask the worker to exit; kill it if it does not within 2 s."""
        try:
            self.conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(2.0)
        if self.proc.is_alive():
            self.kill()
        else:
            self.conn.close()


class GradingPool:
    """A pool of grading worker processes with a hard per-item timeout enforced by the parent.

    Usage::

        with GradingPool(workers=2, timeout=10.0) as pool:
            results = pool.grade([(gold, output), ...])

    Args: workers (int >= 1): number of processes; timeout (float, seconds): wall-clock limit per
        item (a worker past it is killed and replaced; the item is ``timed_out``); require_boxed
        (bool): see ``grade_one``; start_method (str): multiprocessing start method, default
        ``"forkserver"`` (preloading math_verify so replacements start fast) where available, else
        ``"spawn"``; fn (callable, picklable, module level): the per-item function, taking a task
        tuple and returning a GradeResult dict (default: math-verify grading; tests may inject one).
    Raises: ValueError for workers < 1 or timeout <= 0.
    Note: with the ``forkserver``/``spawn`` start methods a script that creates a pool must guard its
    entry point with ``if __name__ == "__main__":`` (standard multiprocessing rule).
    """

    def __init__(self, workers: int = 2, timeout: float = 10.0, require_boxed: bool = True,
                 start_method: str | None = None, fn: Callable[[Any], dict] | None = None):
        if workers < 1:
            raise ValueError(f"GradingPool needs workers >= 1, got {workers}")
        if timeout <= 0:
            raise ValueError(f"GradingPool needs timeout > 0 seconds, got {timeout}")
        self.n_workers = int(workers)
        self.timeout = float(timeout)
        self.require_boxed = require_boxed
        self.fn = fn or _grade_task
        if start_method is None:
            start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        self.ctx = mp.get_context(start_method)
        if start_method == "forkserver" and fn is None:
            self.ctx.set_forkserver_preload(["math_verify", "megatron_eaopd.evaluation.grading"])
        self._workers: list[_Worker] = []
        self.n_timeouts = 0
        self.n_restarts = 0

    def __enter__(self) -> "GradingPool":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Start the worker processes (idempotent)."""
        while len(self._workers) < self.n_workers:
            self._workers.append(_Worker(self.ctx, self.fn))

    def close(self) -> None:
        """Stop all workers (killing any that do not exit)."""
        for w in self._workers:
            if w.task_idx is not None:
                w.kill()
            else:
                w.stop()
        self._workers = []

    def _replace(self, w: _Worker) -> _Worker:
        w.kill()
        self.n_restarts += 1
        nw = _Worker(self.ctx, self.fn)
        self._workers[self._workers.index(w)] = nw
        return nw

    def map(self, tasks: Sequence[Any], on_result: Callable[[int, dict], None] | None = None) -> list[dict]:
        """Run ``fn`` on every task; returns result dicts in task order.

        Each item gets at most ``timeout`` seconds of wall time from dispatch; past it the worker is
        killed and replaced and the result is ``{"correct": False, "timed_out": True, ...}``.
        ``on_result(i, result)`` is called as results arrive (e.g. to advance a progress bar).
        """
        self.start()
        results: list[dict | None] = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        remaining = len(tasks)

        def finish(i: int, res: dict) -> None:
            nonlocal remaining
            results[i] = res
            remaining -= 1
            if on_result is not None:
                on_result(i, res)

        while remaining:
            for w in self._workers:
                if w.task_idx is None and pending:
                    i = pending.popleft()
                    try:
                        w.conn.send((i, tasks[i]))
                    except (OSError, BrokenPipeError):
                        pending.appendleft(i)
                        self._replace(w)
                        continue
                    w.task_idx, w.started = i, time.monotonic()
            busy = [w for w in self._workers if w.task_idx is not None]
            if not busy:
                continue
            now = time.monotonic()
            next_deadline = min(w.started + self.timeout for w in busy)
            ready = _mp_wait([w.conn for w in busy], timeout=max(0.0, next_deadline - now))
            by_conn = {id(w.conn): w for w in busy}
            for conn in ready:
                w = by_conn[id(conn)]
                try:
                    idx, res = conn.recv()
                except (EOFError, OSError):
                    i = w.task_idx
                    code = w.proc.exitcode
                    self._replace(w)
                    finish(i, {"correct": False, "extracted": None, "timed_out": False,
                               "error": f"grading worker died (exit code {code})",
                               "seconds": time.monotonic() - w.started})
                    continue
                w.task_idx = None
                finish(idx, res)
            now = time.monotonic()
            for w in list(self._workers):
                if w.task_idx is not None and now - w.started >= self.timeout:
                    i = w.task_idx
                    self.n_timeouts += 1
                    logger.warning("grading item %d timed out after %.1f s; replacing worker", i, self.timeout)
                    self._replace(w)
                    finish(i, {"correct": False, "extracted": None, "timed_out": True, "error": None,
                               "seconds": now - w.started})
        return results  # type: ignore[return-value]

    def grade(self, pairs: Iterable[tuple[str, str]],
              on_result: Callable[[int, dict], None] | None = None) -> list[GradeResult]:
        """Grade ``(gold, output)`` pairs; returns GradeResults in input order.

        On timeout the ``extracted`` field is filled in by the parent (``last_boxed``) so it is still
        reported. See ``GradingPool.map`` for timeout/crash behaviour.
        """
        pairs = list(pairs)
        tasks = [(g, o, self.require_boxed) for g, o in pairs]
        raw = self.map(tasks, on_result=on_result)
        out = []
        for (g, o), r in zip(pairs, raw):
            res = GradeResult(**r)
            if res.extracted is None and (res.timed_out or res.error):
                res.extracted = last_boxed(o)
            out.append(res)
        return out


def grade_answers(golds: Sequence[str], outputs: Sequence[str], workers: int = 2, timeout: float = 10.0,
                  require_boxed: bool = True) -> list[GradeResult]:
    """Grade ``outputs[i]`` against ``golds[i]`` in a fresh ``GradingPool`` (convenience wrapper).

    Args: golds, outputs: equal-length sequences of str; workers (int); timeout (float, seconds per
        item). Returns: list[GradeResult]. Raises: ValueError if the lengths differ.
    """
    if len(golds) != len(outputs):
        raise ValueError(f"grade_answers: {len(golds)} gold answers but {len(outputs)} outputs")
    with GradingPool(workers=workers, timeout=timeout, require_boxed=require_boxed) as pool:
        return pool.grade(zip(golds, outputs))
