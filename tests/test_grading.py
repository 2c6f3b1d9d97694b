"""math-verify grading: last-\\boxed extraction, an equivalence table, worker processes, timeouts."""

from __future__ import annotations

import time

import pytest

from megatron_eaopd.evaluation.grading import GradingPool, grade_answers, grade_one, last_boxed

# (gold, model output, expected verdict, expected extracted answer: the last box's content, written out)
TABLE = [
    ("\\frac{1}{2}", "So the answer is \\boxed{0.5}.", True, "0.5"),                  # fraction vs decimal
    ("0.5", "\\boxed{\\dfrac{1}{2}}", True, "\\dfrac{1}{2}"),
    ("\\frac{1}{3}", "\\boxed{0.34}", False, "0.34"),
    ("[1,2)", "The set is \\boxed{[1, 2)}", True, "[1, 2)"),                          # interval
    ("[1,2)", "\\boxed{(1,2]}", False, "(1,2]"),
    ("(-\\infty, 3]", "\\boxed{(-\\infty,3]}", True, "(-\\infty,3]"),
    ("(3, 4)", "Point \\boxed{(3,4)}", True, "(3,4)"),                                # tuple / point
    ("(3, 4)", "\\boxed{(4,3)}", False, "(4,3)"),
    ("10", "The length is \\boxed{10\\text{ cm}}", True, "10\\text{ cm}"),             # units
    ("90^\\circ", "\\boxed{90}", True, "90"),
    ("\\sqrt{2}/2", "\\boxed{\\frac{\\sqrt{2}}{2}}", True, "\\frac{\\sqrt{2}}{2}"),     # nested braces
    ("x^2+1", "\\boxed{1 + x^{2}}", True, "1 + x^{2}"),
    ("\\{1,2\\}", "\\boxed{\\{2, 1\\}}", True, "\\{2, 1\\}"),                          # escaped braces in a box
    ("3", "first \\boxed{5} then corrected: \\boxed{3}", True, "3"),                  # LAST box wins
    ("5", "first \\boxed{5} then corrected: \\boxed{3}", False, "3"),
    ("\\$36", "\\boxed{36}", True, "36"),                                             # escaped $ in gold
    ("7", "the answer is 7", False, None),                                            # no box: wrong
    ("7", "", False, None),
    ("7", "cut off inside \\boxed{\\frac{7}{", False, None),                          # unterminated box
]


@pytest.mark.parametrize("text,expected", [
    ("a \\boxed{1} b \\boxed{\\frac{a}{b^{2}}} c", "\\frac{a}{b^{2}}"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("\\fbox{4} and later \\boxed{5}", "5"),
    ("\\boxed{5} then \\fbox{6}", "6"),
    ("answer \\boxed 7 done", "7"),
    ("\\boxed{}", ""),
    ("no box", None),
    ("\\boxed{unterminated {", None),
    (None, None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("gold,output,expected,extracted", TABLE)
def test_grade_one_table(gold, output, expected, extracted):
    r = grade_one(gold, output)
    assert r.correct is expected, (gold, output, r)
    assert r.extracted == extracted, (output, r)
    assert not r.timed_out


def test_no_answer_reports_none():
    r = grade_one("7", "the answer is 7")
    assert r.extracted is None and r.correct is False
    # without require_boxed the whole text is parsed
    assert grade_one("7", "the answer is 7", require_boxed=False).correct is True


def test_table_in_worker_processes():
    golds = [row[0] for row in TABLE]
    outs = [row[1] for row in TABLE]
    res = grade_answers(golds, outs, workers=2, timeout=20.0)
    assert [r.correct for r in res] == [row[2] for row in TABLE]
    assert [r.extracted for r in res] == [row[3] for row in TABLE]


def test_hanging_item_times_out_and_worker_is_replaced():
    # sympy evaluates 10^(10^10) exactly: minutes of C-level big-int work that no signal interrupts.
    pairs = [("1", "\\boxed{10^{10^{10}}}"), ("2", "\\boxed{2}"), ("1/2", "\\boxed{0.5}"), ("3", "\\boxed{4}")]
    t0 = time.monotonic()
    with GradingPool(workers=2, timeout=2.0) as pool:
        res = pool.grade(pairs)
        assert pool.n_timeouts == 1 and pool.n_restarts == 1
        # the pool still works after the replacement
        assert pool.grade([("5", "\\boxed{5}")])[0].correct
    assert time.monotonic() - t0 < 30
    assert res[0].timed_out and not res[0].correct and res[0].extracted == "10^{10^{10}}"
    assert [r.correct for r in res[1:]] == [True, True, False]
    assert not any(r.timed_out for r in res[1:])


def test_pool_argument_errors():
    with pytest.raises(ValueError, match="workers"):
        GradingPool(workers=0)
    with pytest.raises(ValueError, match="timeout"):
        GradingPool(timeout=0)
    with pytest.raises(ValueError, match="2 gold answers but 1 outputs"):
        grade_answers(["1", "2"], ["\\boxed{1}"])


# A launching script whose import is slow (like ``python -m megatron_eaopd.train``, which imports
# megatron-core): grading workers must neither re-import it nor have its start-up charged to an item.
SLOW_DEP = """
import os, time
with open(os.environ["SLOW_DEP_MARKER"], "a") as f:
    f.write(f"{os.getpid()}\\n")
time.sleep(3.0)
"""

HEAVY_MAIN = """
import json
import slow_dep  # noqa: F401  (3 s at import, like megatron-core)
from megatron_eaopd.evaluation.grading import GradingPool

if __name__ == "__main__":
    with GradingPool(workers=1, timeout=1.0) as pool:
        first = pool.grade([("72", "so \\\\boxed{72}")] * 2)
        # a hanging item: its worker is killed and the replacement (one worker) grades the rest
        second = pool.grade([("1", "\\\\boxed{10^{10^{10}}}"), ("1/2", "\\\\boxed{0.5}"), ("3", "\\\\boxed{4}")])
        print(json.dumps({"first": [[r.correct, r.timed_out, r.error] for r in first],
                          "second": [[r.correct, r.timed_out, r.error] for r in second],
                          "timeouts": pool.n_timeouts, "restarts": pool.n_restarts}))
"""


def test_slow_main_module_start_up_is_not_charged_to_items(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "slow_dep.py").write_text(SLOW_DEP)
    (tmp_path / "heavy_main.py").write_text(HEAVY_MAIN)
    marker = tmp_path / "imports.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(tmp_path)]), "SLOW_DEP_MARKER": str(marker)}
    p = subprocess.run([sys.executable, "-m", "heavy_main"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["first"] == [[True, False, None], [True, False, None]], (out, p.stderr[-3000:])
    assert out["second"] == [[False, True, None], [True, False, None], [False, False, None]], (out, p.stderr[-3000:])
    assert out["timeouts"] == 1 and out["restarts"] == 1
    # only the launching process imported the slow module: no worker re-ran the parent's __main__
    assert len(marker.read_text().split()) == 1


def test_workers_that_cannot_start_fail_the_items_instead_of_hanging(monkeypatch):
    import megatron_eaopd.evaluation.grading as grading

    monkeypatch.setattr(grading, "_BOOTSTRAP", "import sys; sys.exit(3)")
    t0 = time.monotonic()
    with GradingPool(workers=1, timeout=1.0) as pool:
        res = pool.grade([("1", "\\boxed{1}"), ("2", "\\boxed{2}")])
    assert time.monotonic() - t0 < 60
    assert [(r.correct, r.timed_out, r.error) for r in res] == [
        (False, False, "grading worker failed to start: exit code 3")] * 2
    assert [r.extracted for r in res] == ["1", "2"]
    assert pool.n_restarts == GradingPool.MAX_START_FAILURES


def test_fn_from_main_is_rejected():
    def fn(task):  # noqa: ARG001
        return {}

    fn.__module__ = "__main__"
    with pytest.raises(ValueError, match="not __main__"):
        GradingPool(fn=fn)
    fn.__module__ = __name__  # a nested function of an importable module: cannot be pickled by name
    with pytest.raises(ValueError, match="must be a module-level function"):
        GradingPool(fn=fn)
