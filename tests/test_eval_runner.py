"""The benchmark pipeline end to end with scripted generators whose metrics are known exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_eaopd.data import PROMPT_SUFFIX, DataError
from megatron_eaopd.evaluation.runner import (
    STANDARD_BENCHMARKS,
    EvalConfig,
    ReplayGenerator,
    Sample,
    ScriptedGenerator,
    resolve_benchmarks,
    run_evaluation,
)

ROOT = Path(__file__).resolve().parents[1]
from conftest import SHARED_DATA as SHARED  # noqa: E402


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def R(ans, ntok=10, trunc=False):
    return Sample(text=f"Reasoning... so the answer is $\\boxed{{{ans}}}$.", num_tokens=ntok, truncated=trunc)


@pytest.fixture
def two_benchmarks(tmp_path):
    a = _write(tmp_path / "alpha.jsonl", [
        {"id": "a0", "problem": "What is 1/2 as a decimal?", "answer": "0.5"},
        {"id": "a1", "problem": "Give the interval.", "answer": "[1,2)"},
        {"id": "a2", "problem": "Compute 2+2.", "answer": "4"},
    ])
    b = _write(tmp_path / "beta.jsonl", [
        {"id": "b0", "problem": "Name the point.", "answer": "(3, 4)"},
        {"id": "b1", "problem": "Hard one.", "answer": "\\frac{\\sqrt{3}}{2}"},
    ])
    script = {
        # alpha: c = 3, 0, 4 of n = 4 ; lengths and truncation known
        "What is 1/2 as a decimal?": [R("\\frac{1}{2}", 8), R("0.5", 12), R("1/2", 10), R("0.6", 30, True)],
        "Give the interval.": [R("(1,2)", 5), R("[1,2]", 5), "no box at all", R("[2,1)", 5)],
        "Compute 2+2.": [R("4", 1), R("4.0", 1), R("\\boxed{4}", 1), R("4", 1)],
        # beta: c = 1, 2
        "Name the point.": [R("(4,3)", 20, True), R("(3,4)", 20), R("(4, 3)", 20), R("3,4", 20)],
        "Hard one.": [R("\\sqrt{3}/2", 2), R("0.8660254", 2), R("1/2", 2), R("\\frac{1}{2}", 2)],
    }
    return [("alpha", a), ("beta", b)], script


def _cfg(**kw):
    base = dict(n=4, ks=[1, 2, 4], grading_workers=2, grading_timeout=20.0, progress=False, batch_problems=2)
    base.update(kw)
    return EvalConfig(**base)


def test_pipeline_exact_metrics(two_benchmarks, tmp_path):
    benches, script = two_benchmarks
    gen = ScriptedGenerator(script)
    out = tmp_path / "run"
    s = run_evaluation(gen, benches, out, _cfg())
    # "no box at all" (plain str) gets num_tokens = word count = 4
    a, b = s["benchmarks"]["alpha"], s["benchmarks"]["beta"]
    recs = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    c_b0 = 2  # "3,4" without parentheses: math-verify reads it as the tuple (3, 4) too
    assert [r["correct"] for r in recs if r["id"] == "a0"] == [True, True, True, False]
    assert [r["correct"] for r in recs if r["id"] == "a1"] == [False, False, False, False]
    assert [r["correct"] for r in recs if r["id"] == "a2"] == [True, True, True, True]
    assert [r["correct"] for r in recs if r["id"] == "b1"] == [True, True, False, False]
    assert [r["correct"] for r in recs if r["id"] == "b0"] == [False, True, False, True]

    def p(n, c, k):
        from math import comb
        return 1 - comb(n - c, k) / comb(n, k)

    assert a["avg"] == pytest.approx(100 * (3 + 0 + 4) / 12)
    assert a["pass@1"] == pytest.approx(a["avg"])
    assert a["pass@2"] == pytest.approx(100 * (p(4, 3, 2) + 0 + 1) / 3)
    assert a["pass@4"] == pytest.approx(100 * 2 / 3)
    assert a["mean_length"] == pytest.approx((8 + 12 + 10 + 30 + 5 + 5 + 4 + 5 + 4) / 12)
    assert a["truncation_rate"] == pytest.approx(100 / 12)
    assert b["avg"] == pytest.approx(100 * (c_b0 + 2) / 8)
    assert b["pass@2"] == pytest.approx(100 * (p(4, c_b0, 2) + p(4, 2, 2)) / 2)
    assert b["pass@4"] == 100.0
    assert b["mean_length"] == pytest.approx(11.0) and b["truncation_rate"] == pytest.approx(12.5)
    assert s["mean"]["avg"] == pytest.approx((a["avg"] + b["avg"]) / 2)
    assert s["mean"]["pass@4"] == pytest.approx((a["pass@4"] + 100.0) / 2)

    # per-sample records
    assert len(recs) == 20
    r0 = recs[0]
    assert r0["benchmark"] == "alpha" and r0["id"] == "a0" and r0["sample"] == 0
    assert r0["prompt"] == "What is 1/2 as a decimal? " + PROMPT_SUFFIX
    assert r0["extracted"] == "\\frac{1}{2}" and r0["num_tokens"] == 8
    assert next(r for r in recs if r["id"] == "a1" and r["sample"] == 2)["extracted"] is None
    # summary + table written
    assert json.loads((out / "summary.json").read_text())["benchmarks"]["alpha"]["avg"] == a["avg"]
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "| benchmark | Avg@4 | Pass@1 | Pass@2 | Pass@4 | mean length (tokens) | truncated % |"
    assert table[2].startswith(f"| alpha | {a['avg']:.2f} |")
    assert table[-1].startswith(f"| mean | {s['mean']['avg']:.2f} |")
    # generation calls: 2 problems per call, seeds derived from seed/benchmark/position
    assert [len(c[0]) for c in gen.calls] == [2, 1, 2]
    assert all(c[1] == 4 for c in gen.calls)


def test_resume_skips_complete_problems(two_benchmarks, tmp_path):
    benches, script = two_benchmarks
    out = tmp_path / "run"
    first = run_evaluation(ScriptedGenerator(script), benches, out, _cfg())
    # simulate an interrupted run: drop beta's last problem entirely and half of b0
    lines = (out / "samples.jsonl").read_text().splitlines()
    keep = [l for l in lines if json.loads(l)["id"] != "b1"
            and not (json.loads(l)["id"] == "b0" and json.loads(l)["sample"] >= 2)]
    (out / "samples.jsonl").write_text("\n".join(keep) + "\n" + '{"truncated json')
    gen = ScriptedGenerator(script)
    second = run_evaluation(gen, benches, out, _cfg())
    assert [c[0] for c in gen.calls] == [["Name the point. " + PROMPT_SUFFIX, "Hard one. " + PROMPT_SUFFIX]]
    assert second["run"]["resumed_problems"] == 3
    assert second["benchmarks"] == first["benchmarks"]
    assert len((out / "samples.jsonl").read_text().splitlines()) == 20
    # a third run generates nothing
    gen3 = ScriptedGenerator(script)
    run_evaluation(gen3, benches, out, _cfg())
    assert gen3.calls == []
    # fewer samples per problem reuses the first n and keeps the rest on disk
    gen4 = ScriptedGenerator(script)
    s4 = run_evaluation(gen4, benches, out, _cfg(n=2, ks=[2]))
    assert gen4.calls == [] and s4["benchmarks"]["alpha"]["avg"] == pytest.approx(100 * (2 + 0 + 2) / 6)
    assert len((out / "samples.jsonl").read_text().splitlines()) == 20
    # other generation settings must not be mixed into the same folder
    with pytest.raises(ValueError, match="other settings .*temperature"):
        run_evaluation(ScriptedGenerator(script), benches, out, _cfg(temperature=0.6))


def test_replay_generator_regrades_a_samples_file(two_benchmarks, tmp_path):
    benches, script = two_benchmarks
    first = run_evaluation(ScriptedGenerator(script), benches, tmp_path / "a", _cfg())
    replay = ReplayGenerator(tmp_path / "a" / "samples.jsonl")
    second = run_evaluation(replay, benches, tmp_path / "b", _cfg())
    assert second["benchmarks"] == first["benchmarks"]


def test_errors(two_benchmarks, tmp_path):
    benches, script = two_benchmarks
    with pytest.raises(ValueError, match="k must satisfy 1 <= k <= n=4; got k=\\[8\\]"):
        run_evaluation(ScriptedGenerator(script), benches, tmp_path / "x", _cfg(ks=[8]))
    bad = _write(tmp_path / "bad.jsonl", [{"id": "1", "problem": "p", "answer": "1"}, {"id": "2", "problem": "q"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing or empty answer field 'answer'"):
        run_evaluation(ScriptedGenerator(script), [("bad", bad)], tmp_path / "x", _cfg())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        run_evaluation(ScriptedGenerator(script), [("empty", empty)], tmp_path / "x", _cfg())
    with pytest.raises(FileNotFoundError, match="neither a standard name"):
        resolve_benchmarks(["nope.jsonl"], tmp_path)
    with pytest.raises(FileNotFoundError, match="AIME24: file not found"):
        resolve_benchmarks(["aime24"], tmp_path)
    with pytest.raises(ValueError, match="needs --data-dir"):
        resolve_benchmarks(["MATH500"], None)
    short = ScriptedGenerator(lambda p, i, s: "x")
    short.generate = lambda prompts, n, seed: [[Sample("x")] for _ in prompts]  # wrong n
    with pytest.raises(ValueError, match="expected 4 each"):
        run_evaluation(short, benches, tmp_path / "y", _cfg())


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared benchmark files not present")
def test_standard_names_resolve_to_shared_files_and_gold_is_correct(tmp_path):
    benches = resolve_benchmarks(["all"], SHARED)
    assert [n for n, _ in benches] == list(STANDARD_BENCHMARKS)
    # the gold answer as output: every sample correct -> Avg = Pass = 100
    from megatron_eaopd.data import load_records, FieldMap
    gold = {}
    for _, path in benches:
        for r in load_records(path, FieldMap(id="id"), limit=3):
            gold[r.problem] = [R(r.answer)] * 2
    s = run_evaluation(ScriptedGenerator(gold), benches, tmp_path / "g", _cfg(n=2, ks=[1, 2], limit=3))
    assert s["mean"]["avg"] == 100.0 and s["mean"]["pass@2"] == 100.0
    assert all(m["problems"] == 3 for m in s["benchmarks"].values())


def test_cli_replay_and_errors(two_benchmarks, tmp_path):
    benches, script = two_benchmarks
    run_evaluation(ScriptedGenerator(script), benches, tmp_path / "a", _cfg())
    cmd = [sys.executable, str(ROOT / "tools" / "evaluate.py"), "--replay", str(tmp_path / "a" / "samples.jsonl"),
           "--benchmarks", str(benches[0][1]), str(benches[1][1]), "--n", "4", "--k", "1", "4",
           "--out", str(tmp_path / "cli"), "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "| alpha |" in p.stdout and "| mean |" in p.stdout
    p = subprocess.run(cmd[:-3] + ["--k", "9", "--out", str(tmp_path / "cli2")], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "k must satisfy" in p.stderr
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), "--model", str(tmp_path),
                        "--benchmarks", str(benches[0][1]), "--out", str(tmp_path / "m")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "is not a model folder" in p.stderr and str(tmp_path) in p.stderr


def _ident(path, iteration, fp):
    return {"kind": "megatron", "path": path, "iteration": iteration, "fingerprint": fp}


def test_resume_refuses_samples_of_another_checkpoint_behind_the_same_path(two_benchmarks, tmp_path):
    benches, script = two_benchmarks
    out = tmp_path / "run"
    a = _ident("/runs/x/checkpoints/iter_0000010", 10, "aa")
    run_evaluation(ScriptedGenerator(script), benches, out, _cfg(limit=1), model_name="ck", model_identity=a)
    before = (out / "samples.jsonl").read_text()
    assert json.loads((out / "run_config.json").read_text())["model_identity"] == a
    # the same --model string now resolving to another iteration: refused, nothing generated or rewritten
    b = _ident("/runs/x/checkpoints/iter_0000020", 20, "bb")
    gen = ScriptedGenerator(script)
    with pytest.raises(ValueError) as e:
        run_evaluation(gen, benches, out, _cfg(), model_name="ck", model_identity=b)
    msg = str(e.value)
    assert "holds samples of another model" in msg
    assert "saved /runs/x/checkpoints/iter_0000010 (iteration 10), now /runs/x/checkpoints/iter_0000020 (iteration 20)" in msg
    assert f"delete {out / 'samples.jsonl'} to start this folder afresh" in msg
    assert gen.calls == [] and (out / "samples.jsonl").read_text() == before
    # same folder and iteration, other content (a checkpoint replaced in place)
    with pytest.raises(ValueError, match="same folder, but its files changed since"):
        run_evaluation(gen, benches, out, _cfg(), model_name="ck", model_identity=_ident(a["path"], 10, "cc"))
    # the same checkpoint under another spelling of --model resumes
    s = run_evaluation(gen, benches, out, _cfg(), model_name="ck/iter_0000010", model_identity=dict(a))
    assert s["run"]["resumed_problems"] == 2 and len(gen.calls) == 2
    # deleting the samples, as the message says, starts afresh with the new model
    (out / "samples.jsonl").unlink()
    s = run_evaluation(ScriptedGenerator(script), benches, out, _cfg(), model_name="ck", model_identity=b)
    assert s["run"]["resumed_problems"] == 0
    assert json.loads((out / "run_config.json").read_text())["model_identity"] == b


def test_bad_benchmark_writes_nothing_and_settings_without_samples_do_not_block(two_benchmarks, tmp_path):
    benches, script = two_benchmarks
    out = tmp_path / "run"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        run_evaluation(ScriptedGenerator(script), [benches[0], ("empty", empty)], out, _cfg())
    assert not out.exists()
    # a run_config.json without samples (e.g. written by an older version before it failed) is replaced
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps({"model": "m", "temperature": 1.0}))
    s = run_evaluation(ScriptedGenerator(script), benches, out, _cfg(temperature=0.7), model_name="m")
    assert s["run"]["resumed_problems"] == 0
    assert json.loads((out / "run_config.json").read_text())["temperature"] == 0.7


def test_cli_bad_benchmark_then_fixed_rerun_with_other_settings(two_benchmarks, tmp_path):
    benches, script = two_benchmarks
    run_evaluation(ScriptedGenerator(script), benches, tmp_path / "a", _cfg())
    replay = tmp_path / "a" / "samples.jsonl"
    bad = _write(tmp_path / "bad.jsonl", [{"id": "1", "problem": "What is 1/2 as a decimal?"}])
    out = tmp_path / "cli"
    base = [sys.executable, str(ROOT / "tools" / "evaluate.py"), "--replay", str(replay), "--n", "4", "--out", str(out),
            "--no-progress"]
    p = subprocess.run(base + ["--benchmarks", str(bad)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "bad.jsonl:1: missing or empty answer field 'answer'" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not out.exists()
    p = subprocess.run(base + ["--benchmarks", str(benches[0][1]), "--temperature", "0.5"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads((out / "summary.json").read_text())["benchmarks"]["alpha"]["avg"] == pytest.approx(100 * 7 / 12)
    # the replay file is part of the identity: another file into the same folder is refused
    other = tmp_path / "other.jsonl"
    other.write_text(replay.read_text())
    p = subprocess.run(base[:3] + [str(other)] + base[4:] + ["--benchmarks", str(benches[0][1]), "--temperature", "0.5"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "holds samples of another model" in p.stderr and str(other) in p.stderr


@pytest.mark.parametrize("flag,value,needle", [
    ("--temperature", "0", "--temperature must be > 0, got 0: greedy decoding (temperature 0) is not supported"),
    ("--temperature", "-1", "--temperature must be > 0, got -1"),
    ("--temperature", "nan", "--temperature must be a finite number, got nan"),
    ("--top-p", "0", "--top-p must be in (0, 1], got 0"),
    ("--top-p", "1.5", "--top-p must be in (0, 1], got 1.5"),
    ("--max-batch-size", "0", "--max-batch-size must be >= 1 sequences, got 0"),
    ("--kv-buffer-gb", "0", "--kv-buffer-gb must be > 0 GiB, got 0"),
    ("--grading-timeout", "-2", "--grading-timeout must be > 0 seconds per sample, got -2"),
])
def test_cli_rejects_impossible_settings_before_loading_anything(tmp_path, capsys, monkeypatch, flag, value, needle):
    from megatron_eaopd.cli import evaluate as cli

    def no_load(*a, **k):  # the model must not be touched
        raise AssertionError("model loaded before the arguments were checked")

    monkeypatch.setattr(cli, "build_model_generator", no_load)
    monkeypatch.setattr(cli, "resolve_prompt_format", no_load)
    rc = cli.main(["--model", str(tmp_path / "no_model_needed"), "--benchmarks", str(tmp_path / "nope.jsonl"),
                   "--out", str(tmp_path / "o"), flag, value])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"error: {needle}") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
