"""Model-backed evaluation: tools/evaluate.py on real (tiny, random) Megatron/HF models, and run_validation.

The models come from ``tests/scripts/trainer_models.py`` (2-layer student / 4-layer teacher with the
real SmolLM2 tokenizer; ~20 s to build, once per session). The problems are the first 5 of the real
GSM8K test set in the benchmark schema. Random models answer nothing correctly: these tests check the
pipeline (files, fields, lengths, resume, layouts, errors), not accuracy.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import free_port
from megatron_eaopd.prompts import PROMPT_SUFFIX

ROOT = Path(__file__).resolve().parents[1]
from conftest import SHARED_DATA  # noqa: E402

GSM8K = SHARED_DATA / "gsm8k_test.jsonl"
EVAL = ROOT / "tools" / "evaluate.py"


def _env(threads: int = 1) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads)}
    env.pop("MASTER_PORT", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_models")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "trainer_models.py"), str(out)],
                          capture_output=True, text=True, env=_env(2), timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


@pytest.fixture(scope="session")
def gsm5(tmp_path_factory):
    if not GSM8K.is_file():
        pytest.skip(f"{GSM8K} not available")
    d = tmp_path_factory.mktemp("gsm5")
    lines = GSM8K.read_text().splitlines()[:5]
    (d / "gsm8k5.jsonl").write_text("\n".join(lines) + "\n")
    return d / "gsm8k5.jsonl"


def evaluate(*args: str, nproc: int = 1, timeout: float = 300.0) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, str(EVAL), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", str(EVAL), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT)


def _ok(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-6000:]


SAMPLE_FIELDS = {"benchmark", "id", "sample", "prompt", "text", "answer", "extracted", "correct", "timed_out",
                 "error", "num_tokens", "truncated"}


def check_outputs(out: Path, stdout: str, n: int, ks: list[int], max_new: int, problems: int = 5) -> list[dict]:
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines() if x.strip()]
    assert len(recs) == problems * n
    gold = [json.loads(x) for x in GSM8K.read_text().splitlines()[:problems]]
    assert sorted({r["id"] for r in recs}) == sorted(g["id"] for g in gold)
    for r in recs:
        assert SAMPLE_FIELDS <= set(r), set(r)
        assert r["benchmark"] == "gsm8k5"
        assert 0 <= r["sample"] < n
        assert "Please reason step by step" in r["prompt"]
        assert isinstance(r["text"], str) and isinstance(r["correct"], bool) and isinstance(r["truncated"], bool)
        assert 0 <= r["num_tokens"] <= max_new
        assert not r["timed_out"] and r["error"] is None  # math-verify workers really graded it
        assert r["truncated"] == (r["num_tokens"] == max_new) or not r["truncated"]
        assert r["answer"] == next(g["answer"] for g in gold if g["id"] == r["id"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["n"] == n and summary["config"]["ks"] == ks
    assert summary["config"]["temperature"] == 1.0 and summary["config"]["top_p"] == 0.8
    assert summary["config"]["max_new_tokens"] == max_new
    m = summary["benchmarks"]["gsm8k5"]
    assert m["problems"] == problems and m["n"] == n
    for key in ["avg", "mean_length", "truncation_rate"] + [f"pass@{k}" for k in ks]:
        assert math.isfinite(m[key]) and math.isfinite(summary["mean"][key])
    assert m["mean_length"] == pytest.approx(sum(r["num_tokens"] for r in recs) / len(recs))
    table = (out / "table.md").read_text()
    assert table.splitlines()[0].startswith(f"| benchmark | Avg@{n} | " + " | ".join(f"Pass@{k}" for k in ks))
    assert "| gsm8k5 |" in table and "| mean |" in table
    assert table.strip() in stdout and f"mean Avg@{n}" in stdout
    return recs


def test_cli_megatron_checkpoint_and_resume(tiny, gsm5, tmp_path):
    out = tmp_path / "ckpt"
    args = ["--model", str(tiny / "student"), "--benchmarks", str(gsm5), "--n", "2", "--k", "1", "2",
            "--max-new-tokens", "16", "--out", str(out)]
    p = evaluate(*args)
    _ok(p)
    check_outputs(out, p.stdout, 2, [1, 2], 16)
    assert "eval" in p.stderr and "problem" in p.stderr  # the progress bar
    before = (out / "samples.jsonl").read_text()
    p2 = evaluate(*args, "--no-progress")  # everything done: nothing regenerated
    _ok(p2)
    assert (out / "samples.jsonl").read_text() == before
    assert json.loads((out / "summary.json").read_text())["run"]["resumed_problems"] == 5
    # other sampling settings in the same folder: refused, not mixed
    p3 = evaluate(*args[:-2], "--out", str(out), "--temperature", "0.5", "--no-progress")
    assert p3.returncode == 2 and "other settings" in p3.stderr


def test_cli_resume_refuses_another_checkpoint_behind_the_same_model_path(tiny, gsm5, tmp_path):
    """--model CKPT_ROOT resolves through 'latest', which moves while training saves: samples of the new
    checkpoint must not be appended to those of the old one in the same --out."""
    ck = tmp_path / "checkpoints"
    shutil.copytree(tiny / "student", ck)
    out = tmp_path / "eval"
    common = ["--benchmarks", str(gsm5), "--n", "1", "--k", "1", "--max-new-tokens", "4", "--out", str(out),
              "--no-progress"]
    _ok(evaluate("--model", str(ck), *common, "--limit", "1"))
    first = (out / "samples.jsonl").read_text()
    ident = json.loads((out / "run_config.json").read_text())["model_identity"]
    assert ident["path"] == str((ck / "iter_0000000").resolve()) and ident["iteration"] == 0
    # training saves a newer checkpoint: 'latest' now names it
    shutil.copytree(tiny / "teacher" / "iter_0000000", ck / "iter_0000005")
    (ck / "latest").write_text("iter_0000005\n")
    p = evaluate("--model", str(ck), *common)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-4000:]
    assert (f"holds samples of another model: saved {ck.resolve()}/iter_0000000 (iteration 0), now "
            f"{ck.resolve()}/iter_0000005") in p.stderr, p.stderr[-3000:]
    assert f"delete {out / 'samples.jsonl'}" in p.stderr and "Traceback" not in p.stderr
    assert (out / "samples.jsonl").read_text() == first
    # the original checkpoint, named by its iteration folder, resumes
    _ok(evaluate("--model", str(ck / "iter_0000000"), *common))
    assert json.loads((out / "summary.json").read_text())["run"]["resumed_problems"] == 1
    assert len((out / "samples.jsonl").read_text().splitlines()) == 5


def test_cli_hf_folder_with_chat_template(tiny, gsm5, tmp_path):
    out = tmp_path / "hf"
    p = evaluate("--model", str(tiny / "hf_student"), "--benchmarks", str(gsm5), "--n", "1", "--max-new-tokens", "8",
                 "--chat-template", "--seed", "3", "--out", str(out), "--no-progress")
    _ok(p)
    recs = check_outputs(out, p.stdout, 1, [1], 8)
    assert all(r["prompt"].startswith("<|im_start|>") and r["prompt"].endswith("<|im_start|>assistant\n") for r in recs)


@pytest.mark.parametrize("layout", ["pp2", "dp2"])
def test_cli_two_processes(tiny, gsm5, tmp_path, layout):
    """torchrun with 2 ranks: PP=2 (4-layer teacher saved at PP=1, resharded on load; sample_with_recompute)
    or DP=2 (the replicas split the 5 problems 3/2; rank 0 gathers, grades and writes)."""
    out = tmp_path / layout
    model, extra = (tiny / "teacher", ["--pp", "2"]) if layout == "pp2" else (tiny / "student", [])
    p = evaluate("--model", str(model), *extra, "--benchmarks", str(gsm5), "--num-samples", "2",
                 "--k", "1", "2", "--max-new-tokens", "6", "--out", str(out), "--no-progress", nproc=2)
    _ok(p)
    recs = check_outputs(out, p.stdout, 2, [1, 2], 6)
    assert [r["id"] for r in recs[::2]] == [json.loads(x)["id"] for x in GSM8K.read_text().splitlines()[:5]]
    assert p.stdout.count("| benchmark |") == 1  # rank 0 alone prints and writes


@pytest.mark.parametrize("case", ["missing", "not_a_model", "k_gt_n", "tp_world", "hf_no_weights"])
def test_cli_clear_errors(tiny, gsm5, tmp_path, case, monkeypatch, capsys):
    model = str(tiny / "student")
    extra: list[str] = []
    if case == "missing":
        model, needle = str(tmp_path / "nope"), "does not exist"
    elif case == "not_a_model":
        (tmp_path / "empty").mkdir()
        model, needle = str(tmp_path / "empty"), "is not a model folder"
    elif case == "k_gt_n":
        extra, needle = ["--n", "2", "--k", "4"], "k must satisfy"
    elif case == "tp_world":
        extra, needle = ["--tp", "2"], "does not divide the world size 1"
    else:
        d = tmp_path / "hf"
        d.mkdir()
        (d / "config.json").write_text((tiny / "hf_student" / "config.json").read_text())
        model, needle = str(d), "no model weights"
    # in-process: each of these fails before any process group or model is built
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_cli", EVAL)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    rc = cli.main(["--model", model, "--benchmarks", str(gsm5), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error:" in err and needle in err, err[-2000:]
    if case in ("missing", "not_a_model"):
        assert model in err


def _with_prompt_format(src: Path, dst: Path, fmt: dict) -> Path:
    """A copy of checkpoint ``src`` whose metadata records ``fmt`` as the training prompt format (what the
    trainer writes into eaopd_checkpoint.json)."""
    shutil.copytree(src, dst)
    it = dst / (dst / "latest").read_text().strip()
    meta = json.loads((it / "eaopd_checkpoint.json").read_text())
    meta["prompt_format"] = fmt
    (it / "eaopd_checkpoint.json").write_text(json.dumps(meta))
    return dst


def test_cli_defaults_to_the_checkpoint_prompt_format(tiny, gsm5, tmp_path):
    """No prompt flag: the checkpoint's training format (chat template + its own suffix) is used; the
    explicit flags override it; a model without one gets plain prompts and a notice."""
    fmt = {"chat_template": True, "suffix": "Answer in \\boxed{}.", "separator": "\n",
           "chat_template_kwargs": {"enable_thinking": False}}
    ckpt = _with_prompt_format(tiny / "student", tmp_path / "ckpt", fmt)
    gold = [json.loads(x)["problem"] for x in GSM8K.read_text().splitlines()[:2]]
    common = ["--benchmarks", str(gsm5), "--n", "1", "--limit", "2", "--max-new-tokens", "2", "--no-progress"]
    p = evaluate("--model", str(ckpt), "--out", str(tmp_path / "a"), *common)
    _ok(p)
    assert "prompt format of the checkpoint's training run: chat template on {'enable_thinking': False}" in p.stderr
    recs = [json.loads(x) for x in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    # an independent rendering of the same format with the model's own tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(next((ckpt).glob("iter_*")) / "hf_assets"))
    want = [tok.apply_chat_template([{"role": "user", "content": g.strip() + "\n" + fmt["suffix"]}], tokenize=False,
                                    add_generation_prompt=True, enable_thinking=False) for g in gold]
    assert [r["prompt"] for r in recs] == want
    run_cfg = json.loads((tmp_path / "a" / "run_config.json").read_text())
    assert run_cfg["chat_template"] is True and run_cfg["prompt_suffix"] == fmt["suffix"]
    # explicit flags win over the checkpoint
    p = evaluate("--model", str(ckpt), "--out", str(tmp_path / "b"), "--no-chat-template", "--prompt-suffix", "", *common)
    _ok(p)
    recs = [json.loads(x) for x in (tmp_path / "b" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in recs] == [g.strip() for g in gold]
    # a checkpoint without a recorded format: the plain paper prompt, and the notice says why
    p = evaluate("--model", str(tiny / "student"), "--out", str(tmp_path / "c"), *common)
    _ok(p)
    assert "records no training prompt format" in p.stderr and "pass --chat-template for a chat model" in p.stderr
    recs = [json.loads(x) for x in (tmp_path / "c" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in recs] == [g.strip() + " " + PROMPT_SUFFIX for g in gold]


def test_prompt_format_resolution(tiny, tmp_path):
    from megatron_eaopd.cli.evaluate import resolve_prompt_format
    from megatron_eaopd.prompts import PromptFormat

    ckpt = _with_prompt_format(tiny / "student", tmp_path / "ckpt", {"chat_template": True})
    fmt, note = resolve_prompt_format(str(ckpt))
    assert fmt == PromptFormat(chat_template=True) and "training run" in note
    assert resolve_prompt_format(str(ckpt), chat_template=False)[0] == PromptFormat(chat_template=False)
    fmt, note = resolve_prompt_format(str(tiny / "hf_student"))
    assert fmt == PromptFormat() and "records no training prompt format" in note
    fmt, note = resolve_prompt_format(str(tiny / "hf_student"), chat_template=True)
    assert fmt.chat_template and note.startswith("prompt format from the flags")
    bad = _with_prompt_format(tiny / "student", tmp_path / "bad", {"chat_template": "yes"})
    with pytest.raises(ValueError, match=r"eaopd_checkpoint.json: prompt_format.chat_template = 'yes' has the wrong type"):
        resolve_prompt_format(str(bad))


VALIDATION_SCRIPT = textwrap.dedent("""
    import json, math, os, sys
    from pathlib import Path
    import torch.distributed as dist
    from megatron_eaopd.config import EvalConfig
    from megatron_eaopd.evaluation.model_generator import load_eval_model, setup_eval_parallel
    from megatron_eaopd.evaluation.validation import run_validation


    def main():
        model_dir, data, out, res_dir, tp = sys.argv[1:6]
        setup_eval_parallel(int(tp), 1)
        lm = load_eval_model(model_dir)
        for c in lm.chunks:
            c.train()
        cfg = EvalConfig(interval=2, files=[data], n=2, k=[1, 2], limit=3, max_new_tokens=6)
        m1 = run_validation(lm.chunks, lm.tokenizer, cfg, 4, Path(out), lm.stop_ids(), False)
        m2 = run_validation(lm.chunks, lm.tokenizer, cfg, 6, Path(out), lm.stop_ids(), False)
        try:
            run_validation(lm.chunks, lm.tokenizer, cfg.model_copy(update={"files": [data + ".missing"]}), 8, Path(out),
                           lm.stop_ids(), False)
            err = None
        except Exception as e:
            err = type(e).__name__ + ": " + str(e)
        rank = dist.get_rank()
        Path(res_dir, f"rank{rank}.json").write_text(json.dumps(
            {"m1": m1, "m2": m2, "training": [c.training for c in lm.chunks], "err": err}))



    if __name__ == "__main__":
        main()
""")


def test_run_validation_tp2_identical_on_every_rank(tiny, gsm5, tmp_path):
    script = tmp_path / "val.py"
    script.write_text(VALIDATION_SCRIPT)
    res = tmp_path / "res"
    res.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(script), str(tiny / "student"), str(gsm5), str(tmp_path / "val"),
           str(res), "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    _ok(p)
    r0, r1 = (json.loads((res / f"rank{r}.json").read_text()) for r in (0, 1))
    keys = {f"val/{b}/{m}" for b in ("gsm8k5", "mean")
            for m in ("avg@2", "pass@1", "pass@2", "mean_length", "truncation_rate")} | {"val/seconds", "val/grading_timeouts"}
    assert set(r0["m1"]) == keys
    assert all(math.isfinite(v) for v in r0["m1"].values())
    assert r0["m1"]["val/grading_timeouts"] == 0  # graders really ran (a hung worker times out)
    assert r0["m1"] == r1["m1"] and r0["m2"] == r1["m2"]  # broadcast from rank 0
    assert 0 < r0["m1"]["val/gsm8k5/mean_length"] <= 6
    assert r0["training"] == [True] and r1["training"] == [True]  # train mode restored
    # same seed, same weights: iterations are compared on the same draws
    assert {k: v for k, v in r0["m1"].items() if k != "val/seconds"} == \
        {k: v for k, v in r0["m2"].items() if k != "val/seconds"}
    for it in (4, 6):
        d = tmp_path / "val" / f"iter_{it:07d}"
        assert len((d / "samples.jsonl").read_text().splitlines()) == 3 * 2
        assert (d / "summary.json").is_file() and (d / "table.md").is_file()
    assert r0["err"].startswith("FileNotFoundError") and r1["err"].startswith("RuntimeError")
    assert "failed on rank 0" in r1["err"]


def test_split_and_flatten_units():
    from megatron_eaopd.evaluation.model_generator import _split
    from megatron_eaopd.evaluation.validation import flatten_summary

    for n in range(0, 12):
        for parts in (1, 2, 3, 5):
            shares = [_split(n, parts, i) for i in range(parts)]
            assert shares[0][0] == 0 and shares[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
            assert max(e - s for s, e in shares) - min(e - s for s, e in shares) <= 1
    m = {"avg": 25.0, "pass@1": 25.0, "pass@4": 50.0, "mean_length": 10.0, "truncation_rate": 5.0, "timeouts": 1}
    flat = flatten_summary({"config": {"n": 4, "ks": [1, 4]}, "benchmarks": {"a": m, "b": {**m, "avg": 75.0}},
                            "mean": {**m, "avg": 50.0}})
    assert flat["val/a/avg@4"] == 25.0 and flat["val/b/avg@4"] == 75.0 and flat["val/mean/avg@4"] == 50.0
    assert flat["val/mean/pass@4"] == 50.0 and flat["val/grading_timeouts"] == 2.0
    assert len(flat) == 3 * 5 + 1
