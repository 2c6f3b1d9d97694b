"""Config schema: clear errors for bad configs, dotted overrides, extends, resolved-config round trip,
runtime layout checks, and every recipe in recipes/ validating."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megatron_eaopd.config import (
    PAPER_PROMPT_SUFFIX,
    RESOLVED_CONFIG_NAME,
    Config,
    ConfigError,
    apply_overrides,
    load_config,
    parse_cli,
    write_resolved_config,
)

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
BASE = {
    "student": {"hf_path": "Qwen/Qwen3-1.7B-Base"},
    "teacher": {"hf_path": "Qwen/Qwen3-8B"},
    "data": {"train_files": ["math.jsonl"]},
}


def err(*overrides, data=None) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(data=BASE if data is None else data, overrides=overrides)
    return str(exc.value)


def test_defaults_are_the_papers():
    c = load_config(data=BASE)
    assert (c.loss.tau, c.loss.alpha, c.loss.top_k, c.loss.mode) == (0.8, 1.0, 16, "topk")
    assert (c.train.prompts_per_iteration, c.train.mini_batches, c.rollout.n) == (128, 4, 1)
    assert (c.rollout.temperature, c.rollout.top_p, c.rollout.max_new_tokens) == (1.0, 1.0, 4096)
    assert (c.optimizer.lr, c.optimizer.weight_decay, c.optimizer.clip_grad, c.optimizer.warmup_steps) == (
        3e-6, 0.1, 1.0, 10)
    assert c.optimizer.decay == "cosine" and c.data.max_prompt_tokens == 1024 and c.data.epochs == 3
    assert c.data.prompt_suffix == PAPER_PROMPT_SUFFIX
    assert c.data.render_prompt(" 1+1? ") == "1+1? Please reason step by step, and put your final answer within \\boxed{}."
    assert c.total_iterations(7500) == 175 and c.total_optimizer_steps(7500) == 700


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["loss.mode=fulll"], ["config error at loss.mode: 'fulll' is not one of ['topk', 'full']", "did you mean 'full'"]),
        (["optimizer.lrr=1e-5"], ["unknown key 'optimizer.lrr'", "allowed: name, lr, min_lr", "did you mean 'optimizer.lr'"]),
        (["optimiser.lr=1e-5"], ["unknown key 'optimiser'", "did you mean 'optimizer'"]),
        (["loss.fkl_support=tial"], ["loss.fkl_support: 'tial' is not one of ['renormalize', 'raw', 'tail']"]),
        (["rollout.top_p=0"], ["rollout.top_p", "greater than 0"]),
        (["rollout.top_p=1.5"], ["rollout.top_p", "less than or equal to 1"]),
        (["loss.tau=-0.1"], ["loss.tau", "greater than or equal to 0"]),
        (["train.mini_batches=3"], ["128", "not divisible by train.mini_batches = 3"]),
        (["train.micro_batch_size=5"], ["mini-batch of 32", "train.micro_batch_size = 5"]),
        (["loss.temperature=0.7"], ["loss.temperature (0.7) must equal rollout.temperature (1.0)"]),
        (["parallel.sequence_parallel=maybe"], ["parallel.sequence_parallel: 'maybe' is not one of ['auto', True, False]"]),
        (["parallel.tp=0"], ["parallel.tp", "greater than or equal to 1"]),
        (["student.hf_path=null"], ["config error at student: needs a weight source"]),
        (["data.train_files=[]"], ["data.train_files", "at least 1 item"]),
        (["data.train_files=[a.jsonl, 3]"], ["data.train_files[1]", "valid string"]),
        (["data.answer_transform=gsm"], ["data.answer_transform: 'gsm' is not one of ['last_boxed', 'gsm8k']"]),
        (["eval.k=[1,16]"], ["config error at eval: k values [16] must be in [1, n=8]"]),
        (["eval.interval=10"], ["eval", "needs at least one file"]),
        (["optimizer.min_lr=1e-3"], ["optimizer: min_lr (0.001) must be <= lr"]),
        (["optimizer.betas=[0.9, 1.5]"], ["optimizer.betas", "[0, 1)"]),
        (["rollout.n=two"], ["rollout.n", "valid integer", "'two'"]),
        (["loss.top_k=64", "loss.vocab_size=32"], ["config error at loss: top_k (64) exceeds vocab_size (32)"]),
        (["parallel.sequence_parallel=true"], ["sequence_parallel true needs parallel.tp > 1"]),
    ],
)
def test_bad_config_gives_clear_error(overrides, expected):
    msg = err(*overrides)
    for part in expected:
        assert part in msg, f"{part!r} not in:\n{msg}"


def test_missing_section_and_several_errors_at_once():
    assert "config error at teacher: required key is missing" in err(data={k: v for k, v in BASE.items() if k != "teacher"})
    msg = err("loss.mode=x", "rollout.n=0")
    assert "loss.mode" in msg and "rollout.n" in msg and len(msg.splitlines()) == 2


def test_overrides_parse_yaml_scalars_and_bad_overrides():
    c = load_config(data=BASE, overrides=[
        "loss.alpha=0", "optimizer.lr=3e-6", "data.train_files=[a.jsonl, b.jsonl]", "logging.wandb_project=eopd",
        "parallel.use_distributed_optimizer=false", "checkpoint.keep_last=null", "train.iterations=5",
    ])
    assert c.loss.alpha == 0.0 and c.optimizer.lr == 3e-6 and c.data.train_files == ["a.jsonl", "b.jsonl"]
    assert c.logging.wandb_project == "eopd" and c.parallel.use_distributed_optimizer is False
    assert c.checkpoint.keep_last is None and c.total_iterations() == 5
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}
    with pytest.raises(ConfigError, match="not of the form key.sub=value"):
        load_config(data=BASE, overrides=["loss.alpha"])
    with pytest.raises(ConfigError, match="loss.alpha: is a int, not a section"):
        load_config(data=BASE, overrides=["loss.alpha=1", "loss.alpha.x=1"])
    assert parse_cli(["--config", "r.yaml", "loss.tau=1", "--train.seed=3"]) == ("r.yaml", ["loss.tau=1", "train.seed=3"])
    # a recipe path with "=" in it (a sweep folder) is the path, not an override
    assert parse_cli(["/sweep/lr=1e-5/cfg.yaml", "loss.tau=1"]) == ("/sweep/lr=1e-5/cfg.yaml", ["loss.tau=1"])
    assert parse_cli(["sweep/lr=1e-5/cfg.yaml", "data.train_files=[a/b.jsonl]"]) == (
        "sweep/lr=1e-5/cfg.yaml", ["data.train_files=[a/b.jsonl]"])
    with pytest.raises(ConfigError, match="two config files"):
        parse_cli(["a.yaml", "b.yaml"])


def test_yaml_file_extends_and_bad_yaml(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**BASE, "loss": {"tau": 0.5, "top_k": 8}}))
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nloss:\n  alpha: 0.0\n")
    c = load_config(tmp_path / "child.yaml", overrides=["loss.top_k=4"])
    assert (c.loss.tau, c.loss.alpha, c.loss.top_k) == (0.5, 0.0, 4)
    (tmp_path / "cyc.yaml").write_text("extends: cyc.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "cyc.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("loss: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trip(tmp_path):
    c = load_config(data=BASE, overrides=["loss.alpha=0.5", "optimizer.betas=[0.9, 0.95]", "eval.files=[m.jsonl]"])
    layout = c.resolve_runtime(world_size=8, cuda=True)
    out = write_resolved_config(c, tmp_path / "run", layout)
    assert out.name == RESOLVED_CONFIG_NAME and "# runtime.dp: 8" in out.read_text()
    again = load_config(out)
    assert again == c and again.optimizer.betas == (0.9, 0.95)
    assert isinstance(again, Config)


def test_runtime_layout_checks():
    c = load_config(data=BASE, overrides=["parallel.tp=2"])
    lay = c.resolve_runtime(world_size=8, cuda=True)
    assert (lay.dp, lay.teacher_tp, lay.teacher_dp, lay.sequence_parallel, lay.use_distributed_optimizer) == (
        4, 2, 4, True, True)
    assert (lay.global_batch, lay.mini_batch, lay.micro_batches_per_step) == (128, 32, 8)
    cpu = c.resolve_runtime(world_size=2, cuda=False)
    assert not cpu.sequence_parallel and not cpu.use_distributed_optimizer
    with pytest.raises(ConfigError, match=r"tp x pp = 2 x 1 = 2 does not divide the world size 3"):
        c.resolve_runtime(world_size=3, cuda=True)
    with pytest.raises(ConfigError, match="teacher_tp x teacher_pp = 4 x 1"):
        load_config(data=BASE, overrides=["parallel.teacher_tp=4"]).resolve_runtime(world_size=2, cuda=True)
    with pytest.raises(ConfigError, match=r"micro_batch_size x DP = 4 x 16"):
        load_config(data=BASE, overrides=["train.micro_batch_size=4"]).resolve_runtime(world_size=16, cuda=True)
    with pytest.raises(ConfigError, match="sequence_parallel: true needs CUDA"):
        c.model_copy(update={"parallel": c.parallel.model_copy(update={"sequence_parallel": True})}).resolve_runtime(2, False)
    with pytest.raises(ConfigError, match="dataset size is needed"):
        c.total_iterations()


def test_loss_section_is_the_loss_config():
    from megatron_eaopd.loss import EOPDConfig

    loss = load_config(data=BASE, overrides=["loss.alpha=0", "loss.fkl_support=tail"]).loss
    assert isinstance(loss, EOPDConfig)
    e = loss.with_vocab_size(151669)
    assert (e.mode, e.tau, e.alpha, e.top_k, e.fkl_support, e.vocab_size) == ("topk", 0.8, 0.0, 16, "tail", 151669)
    with pytest.raises(ValueError, match=r"top_k \(16\) exceeds vocab_size \(8\)"):
        loss.with_vocab_size(8)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_validates(recipe):
    c = load_config(recipe)
    if recipe.name.startswith("demo"):
        lay = c.resolve_runtime(world_size=1, cuda=False)
        assert c.student.dtype == "fp32" and c.total_iterations() <= 20 and c.rollout.max_new_tokens <= 64
        assert lay.global_batch == 4 and c.data.problem_field == "question"
    else:
        large = recipe.stem.endswith("_32b")  # a Qwen3-32B teacher in its own layout on 2 nodes of 8 GPUs
        lay = c.resolve_runtime(world_size=16 if large else 8, cuda=True)
        assert lay.global_batch == 128 and lay.mini_batch == 32
        assert (c.rollout.temperature, c.rollout.top_p, c.rollout.max_new_tokens) == (1.0, 1.0, 4096)
        # the converted checkpoints carry their HF assets: no hub id needed at run time
        assert c.optimizer.lr == 3e-6
        assert c.teacher.checkpoint == ("checkpoints/mcore/Qwen3-32B" if large else "checkpoints/mcore/Qwen3-8B")
        assert c.teacher.hf_path is None and c.student.hf_path is None
        assert c.loss.alpha == (0.0 if recipe.stem.endswith("_opd") else 1.0)
        if large:
            assert (lay.tp, lay.dp, lay.teacher_tp, lay.teacher_pp, lay.teacher_dp) == (1, 16, 4, 1, 4)
            assert lay.micro_batches_per_step == 2 and lay.teacher_sequence_parallel


def test_recipes_present():
    names = {p.name for p in RECIPES}
    assert {"qwen3_0.6b.yaml", "qwen3_1.7b.yaml", "qwen3_4b.yaml", "qwen3_4b_opd.yaml", "demo_cpu.yaml",
            "qwen3_1.7b_32b.yaml"} <= names
