"""Mutation testing of ``megatron_eaopd/loss/`` with mutmut (``make mutation``; not part of ``make test``).

Phase 1: ``mutmut run`` mutates every function of loss/ (configuration: ``[tool.mutmut]`` in
pyproject.toml) and, per mutant, runs the in-process loss tests that execute the mutated function
(one forked worker per mutant from an interpreter that has imported torch once).
Phase 2: every survivor that is not listed as equivalent is run against the TP = 2, then the TP = 4
torchrun test (``tests/test_loss.py::test_tensor_parallel_against_fp64_reference[2|4]``); survivors in
quantile.py (the data-parallel gather of ``tau_quantile``, which a single process never runs) also against
``tests/test_objectives.py::test_quantile_gathers_every_rank[3]``, survivors in objective.py against
``tests/test_objectives.py::test_variants_tensor_and_data_parallel[2]``. mutmut
cannot select these tests itself (the loss runs in torchrun's worker processes, which it does not
trace). Phase 2 forks the ranks of each of these tests from one interpreter that has imported the mutated
copy under ``mutants/`` once (bench/mutation_tp.py; ranks follow ``MUTANT_UNDER_TEST``) and applies the
test's own assertions (``check_*_results``) to their records; the fresh-process metrics test runs as a
pytest subprocess per mutant.

Writes ``bench/results/mutation.json``: the score, the counts per file and every surviving mutant with
its diff and, when it is equivalent, the reason (``bench/mutation_equivalents.json``). Exits 1 when a
survivor is neither killed nor explained there.

    python bench/mutation.py                  # both phases and the report (on 2 cores: see README)
    python bench/mutation.py --report-only    # phase 2 where not yet run, then the report of mutants/
    python bench/mutation.py --resume         # phase 1 for the mutants an interrupted run left and for the
                                              # survivors (tests added since), then as above
    python bench/mutation.py --report-only --no-phase2   # the report only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutation_tp import FORKABLE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "mutation.json"
EQUIVALENTS = ROOT / "bench" / "mutation_equivalents.json"
#: Phase 2 runs the TP = 2 test, then the TP = 4 test (which adds TP groups of 2 inside 4 ranks) on what is left,
#: then, for survivors in the files each adds coverage for (None: every file), the quantile's and the objectives'
#: torchrun tests.
#: Last, metrics.py's survivors run its reduction test in a fresh process: ``_variance`` builds the
#: ``DERIVED_METRICS`` closures at import, before mutmut's phase-1 workers fork, so only a process that
#: imports the module with ``MUTANT_UNDER_TEST`` already set sees those mutants.
TP_TESTS = ("tests/test_loss.py::test_tensor_parallel_against_fp64_reference[2]",
            "tests/test_loss.py::test_tensor_parallel_against_fp64_reference[4]",
            "tests/test_objectives.py::test_quantile_gathers_every_rank[3]",
            "tests/test_objectives.py::test_variants_tensor_and_data_parallel[2]",
            "tests/test_objectives.py::test_reduce_metric_sums_at_its_edges")
TP_TEST_FILES = {TP_TESTS[2]: ("megatron_eaopd/loss/quantile.py",),
                 TP_TESTS[3]: ("megatron_eaopd/loss/objective.py",),
                 TP_TESTS[4]: ("megatron_eaopd/loss/metrics.py",)}
TP_LABELS = {TP_TESTS[2]: "3-quantile", TP_TESTS[3]: "2-objectives", TP_TESTS[4]: "1-import"}
KILLED = {"killed", "timeout", "caught by type check", "segfault"}
#: Equivalence categories that hold on CPU only (bench/mutation_equivalents.json).
CPU_ONLY = {"device", "shard_check_device"}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run_mutmut(max_children: int, fresh: bool = True) -> float:
    """Phase 1 in a fresh ``mutants/`` directory (or, ``fresh=False``, the mutants the last run has not
    checked yet); returns its wall time in seconds."""
    if fresh:
        subprocess.run(["rm", "-rf", str(ROOT / "mutants")], check=True)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children)],
                          cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"mutmut run failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return time.monotonic() - t0


def function_of(mutant: str) -> str:
    """``megatron_eaopd.loss.eopd.xǁEOPDConfigǁ__post_init____mutmut_3`` -> ``EOPDConfig.__post_init__``."""
    name = re.sub(r"__mutmut_\d+$", "", mutant.rsplit(".", 1)[-1])
    if name.startswith("xǁ"):
        cls, fn = name[2:].split("ǁ", 1)
        return f"{cls}.{fn}"
    return name[2:] if name.startswith("x_") else name


def collect() -> list[dict]:
    """Every mutant of the last phase-1 run: name, file, function, status, changed lines."""
    os.chdir(ROOT)  # mutmut reads its configuration and mutants/ relative to the working directory
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code
    from mutmut.utils.file_utils import walk_mutatable_files

    out = []
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        for name, code in data.exit_code_by_key.items():
            status = status_by_exit_code[code]
            rec = dict(name=name, file=str(path), function=function_of(name), status=status)
            if status not in KILLED and code is not None:  # None: phase 1 has not run this mutant yet
                diff = get_diff_for_mutant(name, path=path).splitlines()
                rec["change"] = [ln[0] + ln[1:].strip() for ln in diff
                                 if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
            out.append(rec)
    return out


def reset_survivors() -> int:
    """Clear the phase-1 verdicts 'survived' and 'no tests' in ``mutants/`` so the next ``mutmut run`` tests
    those mutants again (mutmut keeps every verdict it has; tests added since would not be tried on them).
    Returns how many verdicts were cleared."""
    os.chdir(ROOT)
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.stats import status_by_exit_code
    from mutmut.utils.file_utils import walk_mutatable_files

    cleared = 0
    for path in walk_mutatable_files():
        if not (ROOT / "mutants" / f"{path}.meta").exists():
            continue
        data = SourceFileMutationData(path=path)
        data.load()
        stale = [k for k, c in data.exit_code_by_key.items()
                 if c is not None and status_by_exit_code[c] in ("survived", "no tests")]
        for k in stale:
            data.exit_code_by_key[k] = None
        if stale:
            data.save()
            cleared += len(stale)
    return cleared


def key(rec: dict) -> str:
    return f"{rec['file']}::{rec['function']}::{' | '.join(rec['change'])}"


def load_equivalents() -> dict[str, dict]:
    entries = json.loads(EQUIVALENTS.read_text())["equivalent"] if EQUIVALENTS.exists() else []
    return {f"{e['file']}::{e['function']}::{' | '.join(e['change'])}": e for e in entries}


def run_tp_test(mutant: str, test: str, timeout: float) -> str:
    """Phase 2 for one mutant: 'killed' when the torchrun ``test`` fails with the mutant switched on."""
    env = {**_env(), "MUTANT_UNDER_TEST": mutant, "PYTHONPATH": str(ROOT / "mutants")}
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test],
                              cwd=ROOT / "mutants", env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed"  # a hang (collectives out of step) fails the real test too, by its timeout
    return "survived" if proc.returncode == 0 else "killed"


def run_forked_batch(test: str, names: list[str], timeout: float, record) -> None:
    """Phase 2 for ``names`` against a torchrun ``test`` from one warm interpreter (bench/mutation_tp.py, in a
    subprocess that imports the mutated copy). The driver itself runs no mutated code but the judge, so if it
    dies, the mutant it was on is decided by the torchrun test itself (:func:`run_tp_test`) and the driver is
    started again for the rest; a driver that dies before judging anything is an error of the environment."""
    left = list(names)
    while left:
        proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "mutation_tp.py"), test, str(timeout), *left],
                                cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        judged, tail = 0, []
        for line in proc.stdout:
            if line.startswith("{"):
                r = json.loads(line)
                record(r["mutant"], r["status"], r["why"])
                left.remove(r["mutant"])
                judged += 1
            else:
                tail = (tail + [line])[-200:]
        if proc.wait() == 0 or not left:
            continue
        if not judged:
            raise SystemExit(f"phase 2 driver for {test} failed before judging a mutant (rc={proc.returncode}):\n"
                             + "".join(tail)[-4000:])
        name = left.pop(0)
        record(name, run_tp_test(name, test, timeout), "(decided by torchrun: the forking driver died on it)")


def report(muts: list[dict], seconds: dict) -> int:
    equivalents = load_equivalents()
    by_file: dict[str, Counter] = {}
    survivors = []
    not_checked = sum(1 for m in muts if "change" not in m and m["status"] not in KILLED)
    muts = [m for m in muts if "change" in m or m["status"] in KILLED]
    for m in muts:
        st = m["status"]
        if st in ("survived", "no tests") and key(m) in equivalents:
            st = "equivalent"
        m["final"] = st if st not in KILLED else "killed"
        by_file.setdefault(m["file"], Counter())[m["final"]] += 1
        if m["final"] not in ("killed",):
            e = equivalents.get(key(m), {})
            survivors.append(dict(name=m["name"], file=m["file"], function=m["function"], status=m["final"],
                                  change=m["change"], category=e.get("category"), reason=e.get("reason")))
    total = Counter(m["final"] for m in muts)
    n = len(muts)
    killed = total["killed"]
    unexplained = [s for s in survivors if s["status"] != "equivalent"]
    result = {
        "tool": "mutmut 3.8.1",
        "mutated": "megatron_eaopd/loss/*.py ([tool.mutmut] in pyproject.toml)",
        "tests_phase1": "in-process: tests/test_loss.py, test_loss_metrics.py, test_loss_inputs.py, "
                        "test_loss_numerics.py, test_objectives.py (without the torchrun tests, the recipe and the "
                        "plot tests); per mutant only the tests that run the mutated function",
        "tests_phase2": " then ".join(f"{t} (survivors in {', '.join(TP_TEST_FILES[t])} only)" if t in TP_TEST_FILES
                                      else t for t in TP_TESTS) + " (torchrun, gloo), for survivors not listed as "
                                                                  "equivalent",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "seconds": seconds,
        "complete": not_checked == 0 and not unexplained,
        "not_checked": not_checked,
        "mutants": n + not_checked,
        "checked": n,
        "killed": killed,
        "killed_by_torchrun": dict(Counter(m["killed_by"] for m in muts if m.get("killed_by"))),
        "equivalent": total["equivalent"],
        "equivalent_by_category": dict(Counter(s["category"] for s in survivors if s["status"] == "equivalent")
                                       .most_common()),
        "equivalent_cpu_only": sum(1 for s in survivors if s["category"] in CPU_ONLY),
        "survived_unexplained": len(unexplained),
        "no_tests": total["no tests"],
        "score": round(killed / max(1, n), 4),
        "score_excluding_equivalent": round(killed / max(1, n - total["equivalent"]), 4),
        "score_note": "score = killed / checked; score_excluding_equivalent = killed / (checked - equivalent). "
                      "'equivalent_cpu_only' survivors (a buffer created without the input's device) compute the "
                      "same on CPU but would fail on CUDA: they need a GPU run to be killed.",
        "per_file": {f: dict(c) for f, c in sorted(by_file.items())},
        "survivors": survivors,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    if not_checked:
        print(f"INCOMPLETE: phase 1 has not run {not_checked} mutants yet (resume: python bench/mutation.py --resume)")
    print(f"mutation score {result['score']:.1%} ({killed} of {n} mutants killed); {total['equivalent']} survivors "
          f"equivalent ({result['equivalent_cpu_only']} of them on CPU only), {len(unexplained)} unexplained; "
          f"{RESULT.relative_to(ROOT)}")
    for s in unexplained:
        print(f"  SURVIVED {s['name']} ({s['status']}): {' | '.join(s['change'])}")
    return 1 if unexplained or not_checked else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report-only", action="store_true", help="report on the last run in mutants/")
    ap.add_argument("--max-children", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--resume", action="store_true",
                    help="phase 1 for the mutants the last run in mutants/ has not checked and for its survivors "
                         "(tests may have been added since), then phase 2 and the report")
    ap.add_argument("--no-phase2", action="store_true",
                    help="report without running phase 2 for the survivors it has not run yet")
    ap.add_argument("--tp-timeout", type=float, default=120.0,
                    help="seconds per mutant and phase-2 test (the unmutated TP = 4 test takes ~10 s on 2 cores)")
    args = ap.parse_args(argv)
    timing = ROOT / "mutants" / "timing.json"
    if args.resume:
        seconds = json.loads(timing.read_text()) if timing.exists() else {}
        print(f"resume: {reset_survivors()} survivors of the last run are tested again with the current tests", flush=True)
        # mutmut maps tests to the functions they run once per test name: a test changed since then may run other
        # functions now, so the map is rebuilt (one traced run of the phase-1 tests)
        (ROOT / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
        secs = round(run_mutmut(args.max_children, fresh=False), 1)
        seconds["phase1_mutmut"] = round(seconds.get("phase1_mutmut", 0.0) + secs, 1)
        timing.write_text(json.dumps(seconds))
    elif not args.report_only:
        secs = round(run_mutmut(args.max_children), 1)
        timing.write_text(json.dumps({"phase1_mutmut": secs, "max_children": args.max_children}))
    seconds = json.loads(timing.read_text()) if timing.exists() else {}
    muts = collect()
    if not muts:
        raise SystemExit("no mutation results in mutants/: run without --report-only first")
    equivalents = load_equivalents()
    pending = [m for m in muts if m["status"] not in KILLED and "change" in m and key(m) not in equivalents]
    phase2_file = ROOT / "mutants" / "phase2.json"
    shutil.copytree(ROOT / "tests", ROOT / "mutants" / "tests", dirs_exist_ok=True)  # phase 2 judges with today's tests
    done = json.loads(phase2_file.read_text()) if phase2_file.exists() else {}
    t0 = time.monotonic()
    for test in TP_TESTS:
        label = TP_LABELS.get(test) or test.rsplit("[", 1)[-1].rstrip("]")
        files = TP_TEST_FILES.get(test)
        mine = [m for m in pending if files is None or m["file"] in files]
        todo = [m["name"] for m in mine if f"{m['name']}@tp{label}" not in done]
        if todo and not args.no_phase2:
            print(f"phase 2 TP={label}: {len(todo)} survivors against {test}", flush=True)

            def record(name: str, status: str, why: str = "", label=label) -> None:
                done[f"{name}@tp{label}"] = status
                phase2_file.write_text(json.dumps(done, indent=0))
                why = " ".join(why.split())[:160]
                print(f"  phase 2 TP={label} [{len(done)}] {name}: {status} {why}".rstrip(), flush=True)

            if test in FORKABLE:
                run_forked_batch(test, todo, args.tp_timeout, record)
            else:
                for name in todo:
                    record(name, run_tp_test(name, test, args.tp_timeout))
        for m in mine:
            k = f"{m['name']}@tp{label}"
            if done.get(k) == "killed":
                m["status"], m["killed_by"] = "killed", ("fresh process" if label == "1-import" else f"torchrun TP={label}")
        pending = [m for m in pending if m["status"] not in KILLED]
    ran = round(time.monotonic() - t0, 1)
    if ran > 1.0:  # accumulate over interrupted and resumed invocations
        seconds["phase2_torchrun"] = round(seconds.get("phase2_torchrun", 0.0) + ran, 1)
        timing.write_text(json.dumps(seconds))
    return report(muts, seconds)


if __name__ == "__main__":
    sys.exit(main())
