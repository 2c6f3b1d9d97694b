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

Workers. Each worker is a fresh interpreter (``python -c`` running :func:`_worker_main`) that
imports this module (with its package, :mod:`megatron_eaopd.evaluation`: no torch model code, no
megatron-core) and math_verify, never the parent's ``__main__``: multiprocessing's
spawn/forkserver children re-import the launching script (``python -m megatron_eaopd.train`` pulls in
megatron-core, ~16 s), and forking the trainer (CUDA, NCCL and dataloader threads) is unsafe. A
worker says "ready" once its imports are done and only then receives items, so the per-item clock
starts when a READY worker takes the item: neither start-up nor a replacement's start-up counts
against an item's timeout. A worker that does not become ready within ``start_timeout`` (or exits
first) is replaced; after 3 such failures in a row the pending items are reported with ``error``.

This module does not import math_verify at import time (the parent only needs ``last_boxed``, which
lives in :mod:`megatron_eaopd.answers` and is re-exported here).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import socket
import subprocess
import sys
import time
import weakref
from collections import deque
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
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


#: The worker's bootstrap (``python -c``; argv[1] = its socket's fd): the parent's ``sys.path`` first,
#: so this package and the task function import as in the parent, then the worker loop.
_BOOTSTRAP = (
    "import sys\n"
    "from multiprocessing.connection import Connection\n"
    "conn = Connection(int(sys.argv[1]))\n"
    "sys.path[:] = conn.recv()\n"
    "from megatron_eaopd.evaluation.grading import _worker_main\n"
    "_worker_main(conn)\n"
)


def _worker_main(conn) -> None:
    """Worker loop: load the task function, say ``("ready", pid)``, then receive ``(idx, task)`` and send
    ``(idx, result_dict)``; ``None`` stops it. A function that cannot be loaded is reported as
    ``("failed", message)``."""
    import logging as _logging

    _logging.getLogger("math_verify").setLevel(_logging.ERROR)
    try:
        try:
            fn = pickle.loads(conn.recv_bytes())
            if fn is _grade_task:
                try:  # import and warm up math-verify now: start-up time, not an item's
                    grade_one("1", "\\boxed{1}")
                except Exception:  # noqa: BLE001 - e.g. math_verify missing: each item reports it
                    pass
        except Exception as e:  # noqa: BLE001
            conn.send(("failed", f"{type(e).__name__}: {e}"))
            return
        conn.send(("ready", os.getpid()))
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
    except (EOFError, KeyboardInterrupt, BrokenPipeError, ConnectionResetError):
        pass


class _Worker:
    """One worker interpreter with its own socket connection; at most one task in flight.

    ``ready`` turns True when the worker reports its imports done; ``spawned`` is when it was
    started (for the start-up timeout), ``started`` when its current task was sent."""

    def __init__(self, fn_payload: bytes):
        parent_sock, child_sock = socket.socketpair()
        try:
            fd = child_sock.fileno()
            self.proc = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, str(fd)], pass_fds=(fd,),
                                         stdin=subprocess.DEVNULL)
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.ready = False
        self.spawned = time.monotonic()
        self.task_idx: int | None = None
        self.started = 0.0
        try:  # both fit in the socket buffer: the worker reads them once it runs
            self.conn.send(list(sys.path))
            self.conn.send_bytes(fn_payload)
        except OSError:
            pass  # it died already: seen as a start failure

    def kill(self) -> None:
        """Terminate (then SIGKILL) the process and close the connection."""
        try:
            _kill_proc(self.proc)
        finally:
            self.conn.close()

    def stop(self) -> None:
        """Ask the worker to exit; kill it if it does not within 2 s."""
        try:
            self.conn.send(None)
        except OSError:
            pass
        try:
            self.proc.wait(2.0)
        except subprocess.TimeoutExpired:
            _kill_proc(self.proc)
        self.conn.close()


def _kill_proc(proc: subprocess.Popen) -> None:
    """Terminate ``proc``, SIGKILL it if it is still there after 1 s, and reap it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(1.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.wait(1.0)
        except subprocess.TimeoutExpired:
            pass


def _kill_all(workers: list) -> None:
    """Finalizer: no worker outlives its pool (or the parent's normal exit)."""
    for w in workers:
        _kill_proc(w.proc)


class GradingPool:
    """A pool of grading worker processes with a hard per-item timeout enforced by the parent.

    Usage::

        with GradingPool(workers=2, timeout=10.0) as pool:
            results = pool.grade([(gold, output), ...])

    Args: workers (int >= 1): number of processes; timeout (float, seconds): wall-clock limit per
        item, counted from when a ready worker takes it (a worker past it is killed and replaced; the
        item is ``timed_out``); require_boxed (bool): see ``grade_one``; fn (callable, module level in
        an importable module, not ``__main__``): the per-item function, taking a task tuple and returning
        a GradeResult dict (default: math-verify grading; tests may inject one); start_timeout (float,
        seconds): how long a worker may take to start (never charged to an item).
    Raises: ValueError for workers < 1, timeout <= 0, start_timeout <= 0, an ``fn`` defined in
        ``__main__`` (a worker never imports the parent's ``__main__``) or one that cannot be pickled by
        name (a lambda, a nested function).
    Workers are fresh interpreters that import only this module (see the module doc): no
    ``if __name__ == "__main__":`` guard is needed, and a slow-to-import launching script does not
    slow them down.
    """

    #: start failures in a row (no worker became ready in between) after which pending items fail
    MAX_START_FAILURES = 3

    def __init__(self, workers: int = 2, timeout: float = 10.0, require_boxed: bool = True,
                 fn: Callable[[Any], dict] | None = None, start_timeout: float = 120.0):
        if workers < 1:
            raise ValueError(f"GradingPool needs workers >= 1, got {workers}")
        if timeout <= 0:
            raise ValueError(f"GradingPool needs timeout > 0 seconds, got {timeout}")
        if start_timeout <= 0:
            raise ValueError(f"GradingPool needs start_timeout > 0 seconds, got {start_timeout}")
        self.n_workers = int(workers)
        self.timeout = float(timeout)
        self.start_timeout = float(start_timeout)
        self.require_boxed = require_boxed
        self.fn = fn or _grade_task
        if getattr(self.fn, "__module__", None) == "__main__":
            raise ValueError("GradingPool fn must be defined in an importable module, not __main__ "
                             "(grading workers do not import the launching script)")
        try:
            self._payload = pickle.dumps(self.fn)
        except (pickle.PicklingError, AttributeError, TypeError) as e:  # a lambda or a nested function
            raise ValueError(f"GradingPool fn must be a module-level function (workers import it by name): {e}") from None
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)
        self.n_timeouts = 0
        self.n_restarts = 0
        self._start_failures = 0

    def __enter__(self) -> "GradingPool":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Start the worker processes (idempotent; does not wait for them to be ready)."""
        while len(self._workers) < self.n_workers:
            self._workers.append(_Worker(self._payload))

    def close(self) -> None:
        """Stop all workers (killing any that do not exit)."""
        for w in self._workers:
            if w.task_idx is not None or not w.ready:
                w.kill()
            else:
                w.stop()
        self._workers.clear()

    def _replace(self, w: _Worker) -> _Worker:
        w.kill()
        self.n_restarts += 1
        nw = _Worker(self._payload)
        self._workers[self._workers.index(w)] = nw
        return nw

    def map(self, tasks: Sequence[Any], on_result: Callable[[int, dict], None] | None = None) -> list[dict]:
        """Run ``fn`` on every task; returns result dicts in task order.

        Items go only to workers that reported ready. Each item gets at most ``timeout`` seconds of
        wall time from then; past it the worker is killed and replaced and the result is
        ``{"correct": False, "timed_out": True, ...}``. ``on_result(i, result)`` is called as results
        arrive (e.g. to advance a progress bar).
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

        def start_failed(w: _Worker, why: str) -> None:
            self._start_failures += 1
            logger.warning("grading worker failed to start (%s); replacing it", why)
            self._replace(w)
            if self._start_failures >= self.MAX_START_FAILURES:
                logger.error("grading workers failed to start %d times in a row (%s); %d item(s) not graded",
                             self._start_failures, why, len(pending))
                while pending:
                    finish(pending.popleft(), {"correct": False, "extracted": None, "timed_out": False,
                                               "error": f"grading worker failed to start: {why}", "seconds": 0.0})

        while remaining:
            for w in list(self._workers):
                if w.ready and w.task_idx is None and pending:
                    i = pending.popleft()
                    try:
                        w.conn.send((i, tasks[i]))
                    except OSError:
                        pending.appendleft(i)
                        self._replace(w)
                        continue
                    w.task_idx, w.started = i, time.monotonic()
            waiting = [w for w in self._workers if w.task_idx is not None or not w.ready]
            if not waiting:  # pragma: no cover - remaining > 0 means an item is pending or in flight
                raise RuntimeError("GradingPool: no worker busy or starting with items left")
            now = time.monotonic()
            next_deadline = min(w.started + self.timeout if w.ready else w.spawned + self.start_timeout
                                for w in waiting)
            ready = _mp_wait([w.conn for w in waiting], timeout=max(0.0, next_deadline - now))
            by_conn = {id(w.conn): w for w in waiting}
            for conn in ready:
                w = by_conn[id(conn)]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    try:  # the pipe closes a moment before the process is reaped: wait briefly for its code
                        code = w.proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        code = None
                    if not w.ready:
                        start_failed(w, f"exit code {code}")
                        continue
                    i = w.task_idx
                    self._replace(w)
                    finish(i, {"correct": False, "extracted": None, "timed_out": False,
                               "error": f"grading worker died (exit code {code})",
                               "seconds": time.monotonic() - w.started})
                    continue
                if not w.ready:
                    if isinstance(msg, tuple) and msg and msg[0] == "ready":
                        w.ready = True
                        self._start_failures = 0
                    else:
                        start_failed(w, str(msg[1] if isinstance(msg, tuple) and len(msg) > 1 else msg))
                    continue
                idx, res = msg
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
                elif not w.ready and now - w.spawned >= self.start_timeout:
                    start_failed(w, f"not ready after {self.start_timeout:.0f} s")
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
