"""The user's path, rehearsed: the README's cluster commands, run as written, on a local SLURM cluster,
with a scaled-down Qwen3 pair built from the real Qwen3 parts.

The README block "Using it on a GPU cluster" is read from README.md and run command by command in a
copy of the repository (so that its relative paths, ``data/`` and ``checkpoints/``, are the user's):
``convert_hf.py import --verify`` of the hub ids ``Qwen/Qwen3-8B`` / ``Qwen/Qwen3-4B-Base`` (found in
a local Hugging Face cache that holds the scaled-down pair: random weights, the REAL tokenizer,
config.json and generation_config.json, the real 151,936-row vocabulary) -> ``sbatch
slurm/qwen3_4b.sh`` (the recipe's TP = 2: the vocabulary is padded to 152,064 rows) -> ``evaluate.py``
-> ``convert_hf.py export --verify``. Only size and device options are added: CPU (``ALLOW_CPU=1``),
one node x 2 tasks, 2 iterations of 4 prompts with short responses, two benchmarks with 2 problems.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SHARED_DATA
from qwen3.build_models import ENDOFTEXT, IM_END, QWEN3_VOCAB_ROWS, build_pair
from test_slurm import cluster, wait_done  # noqa: F401  (the local cluster fixture)

pytestmark = pytest.mark.slow

#: Size options added to the README's commands (the only changes): trainer overrides for the sbatch job.
TRAIN_SIZE = ("train.iterations=2 train.prompts_per_iteration=4 train.mini_batches=2 rollout.max_new_tokens=16 "
              "data.max_prompt_tokens=512 checkpoint.save_interval=1 logging.tensorboard=false")
EVAL_SIZE = ["--benchmarks", "MATH500", "AMC23", "--limit", "2", "--n", "2", "--k", "1", "2", "--max-new-tokens", "8",
             "--grading-workers", "1", "--no-progress"]
SBATCH_OPTIONS = ["--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2"]
BENCHMARK_FILES = ("math500.jsonl", "amc23.jsonl", "minerva_math.jsonl", "olympiadbench.jsonl", "aime24.jsonl",
                   "aime25.jsonl")


def readme_commands() -> list[str]:
    """The shell commands of the README's cluster block, in order (comments dropped, continuations joined)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Using it on a GPU cluster"):]
    block = section[section.index("```bash") + len("```bash"):]
    block = block[:block.index("```")]
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.strip().startswith("#")]


def _hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """Put ``folder`` into a Hugging Face cache as ``repo`` (the layout huggingface_hub writes)."""
    commit = "1" * 40
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(folder, root / "snapshots" / commit)


def _repo_copy(dst: Path) -> Path:
    """The repository's tracked (and untracked, not ignored) files, copied; the venv linked."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    (dst / ".venv").symlink_to(ROOT / ".venv")
    return dst


def test_readme_cluster_commands_with_qwen3_parts(cluster, tmp_path):  # noqa: F811
    cmds = readme_commands()
    assert [c.split()[0] for c in cmds] == ["python", "python", "export", "sbatch", "python", "python"], cmds
    repo = _repo_copy(tmp_path / "repo")
    pair = build_pair(tmp_path / "models")
    cache = tmp_path / "hf_cache"
    _hub_cache(cache, "Qwen/Qwen3-4B-Base", pair["student"])
    _hub_cache(cache, "Qwen/Qwen3-8B", pair["teacher"])
    (repo / "data" / "math").mkdir(parents=True)
    lines = (SHARED_DATA / "math_train.jsonl").read_text().splitlines()[:64]
    (repo / "data" / "math" / "train.jsonl").write_text("\n".join(lines) + "\n")
    (repo / "data" / "eval").mkdir()
    for f in BENCHMARK_FILES:
        shutil.copy2(SHARED_DATA / f, repo / "data" / "eval" / f)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RUN_DIR"))}
    env.update(PATH=f"{repo / '.venv' / 'bin'}:{env['PATH']}", HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1",
               HF_ENDPOINT="http://127.0.0.1:9", SLURM_CONF=cluster["conf"], ALLOW_CPU="1", EXTRA_ARGS=TRAIN_SIZE,
               OMP_NUM_THREADS="1", PYTHONPATH=str(repo), EAOPD_PROGRESS="0")
    logs = {}
    for i, cmd in enumerate(cmds):
        argv = shlex.split(cmd)
        if argv[0] == "export":
            k, v = argv[1].split("=", 1)
            env[k] = v
            continue
        argv = [a.replace("$RUN_DIR", env.get("RUN_DIR", "$RUN_DIR")) for a in argv]
        if argv[0] == "python":
            argv[0] = sys.executable
            if "evaluate.py" in argv[1]:
                argv += EVAL_SIZE
            p = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
            logs[i] = p.stdout + p.stderr
            assert p.returncode == 0, f"{cmd}\n{logs[i][-5000:]}"
        else:  # sbatch: the cluster's options, then the script as the README gives it
            argv = [argv[0], *SBATCH_OPTIONS, f"--output={tmp_path}/job.out", f"--error={tmp_path}/job.err", *argv[1:]]
            p = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, p.stderr
            job = p.stdout.strip().split(";")[0]
            info = wait_done(cluster["conf"], job, 1200)
            logs[i] = (tmp_path / "job.out").read_text() + (tmp_path / "job.err").read_text()
            assert info["JobState"] == "COMPLETED", logs[i][-8000:]

    run_dir = repo / env["RUN_DIR"]
    train_log = next(v for k, v in logs.items() if cmds[k].startswith("sbatch"))
    # the recipe's layout on the real vocabulary: TP = 2 pads 151,936 rows to 152,064
    assert "TP=2 PP=1 DP=1" in train_log and "vocab 151936 (padded 152064; compared over 151936)" in train_log, \
        re.findall(r"\[eopd\] world=.*", train_log) or train_log[-6000:]
    # Qwen3-Base's config says <|endoftext|> only; with the chat template the rollout also stops at <|im_end|>
    assert f"stop ids [{ENDOFTEXT}, {IM_END}]" in train_log
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["iteration"] for r in rows] == [1, 2] and all(r["num_tokens"] > 0 for r in rows)
    # a sampled padded id would have stopped the run ("target_ids must lie in [0, vocab_size)")
    assert "target_ids must lie" not in train_log
    meta = json.loads(next((run_dir / "checkpoints").glob("iter_0000002/eaopd_checkpoint.json")).read_text())
    assert meta["prompt_format"]["chat_template"] is True
    # evaluation ran in the training prompt format (chat template) on the two benchmarks
    eval_log = next(v for k, v in logs.items() if "evaluate.py" in cmds[k])
    assert "chat template on" in eval_log, eval_log[-3000:]
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert sorted(summary["benchmarks"]) == ["AMC23", "MATH500"]
    # the export: 151,936 rows, the source model's config.json, logits verified against the checkpoint
    from safetensors import safe_open

    hf = run_dir / "hf"
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape()[0] == QWEN3_VOCAB_ROWS
    src_cfg = json.loads((pair["student"] / "config.json").read_text())
    out_cfg = json.loads((hf / "config.json").read_text())
    assert {k: v for k, v in out_cfg.items() if k not in ("dtype", "torch_dtype")} == {
        k: v for k, v in src_cfg.items() if k not in ("dtype", "torch_dtype")}
    export = json.loads(next(x for x in logs[len(cmds) - 1].splitlines() if x.startswith("SUMMARY "))[len("SUMMARY "):])
    assert export["verify"]["passed"] and export["verify"]["max_abs_diff"] <= 1e-3, export
    # the HF reload gives the checkpoint's logits (export --verify compared them; check it here too)
    from transformers import AutoModelForCausalLM

    import torch

    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    ids = torch.tensor([[IM_END - 1, 785, 4226, 11, 13, ENDOFTEXT]])
    assert torch.isfinite(model(ids).logits).all() and model.get_input_embeddings().weight.shape[0] == QWEN3_VOCAB_ROWS
