"""The GPU path: what is selected automatically, and checks that need CUDA.

CPU part (runs everywhere): the platform selection picks the CPU path here (local spec, fp32, no
sequence parallel, no distributed optimizer, static engine, no teacher offload), the GPU switches
of the pure selection functions, the benchmark's MFU arithmetic, and ``bench/gpu_suite.sh
--dry-run`` end to end (it must leave its result file even when a step fails).

GPU part (``@pytest.mark.gpu``, skipped without CUDA by conftest; run on a GPU node by
``bench/gpu_suite.sh``): TE spec vs local spec logits on the same weights, bf16 EOPD loss vs an
fp64 reference at V = 151,936, the GPU selection, the dynamic-engine rollout's log-probs vs a full
forward, and a distributed-optimizer checkpoint save/resume round trip. These run in this process
(one rank, NCCL) on tiny Qwen3 shapes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_gpu_train as bgt  # noqa: E402

SUITE = ROOT / "bench" / "gpu_suite.sh"
CUDA = torch.cuda.is_available()
TINY = {**bgt.TINY_STUDENT, "tie_word_embeddings": False, "vocab_size": 512, "eos_token_id": 511}


def _env() -> dict:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for k in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "OUT"):
        env.pop(k, None)
    return env


# ================================================================================================
# CPU: selection logic and the suite's dry run
# ================================================================================================
def test_pure_selection_functions():
    """hf_to_transformer_config / Config.resolve_runtime switch on the GPU path only when asked."""
    from megatron_eaopd.config import load_config
    from megatron_eaopd.models.hf import hf_to_transformer_config
    from megatron_eaopd.models.provider import te_available

    if not CUDA:
        assert te_available() is False
    cfg2 = {**TINY, "num_attention_heads": 4, "num_key_value_heads": 2}
    gpu_tp2, _ = hf_to_transformer_config(cfg2, tp=2, on_gpu=True, use_te=True, params_dtype=torch.bfloat16)
    assert gpu_tp2.sequence_parallel is True and gpu_tp2.use_cpu_initialization is False and gpu_tp2.bf16
    # CUDA without Transformer Engine: parameters on the GPU, but no sequence parallel / TE fusions
    gpu_no_te, _ = hf_to_transformer_config(cfg2, tp=2, on_gpu=True, use_te=False, params_dtype=torch.bfloat16)
    assert gpu_no_te.sequence_parallel is False and gpu_no_te.use_cpu_initialization is False
    assert not any(getattr(gpu_no_te, k) for k in ("masked_softmax_fusion", "apply_rope_fusion",
                                                    "gradient_accumulation_fusion", "persist_layer_norm"))
    gpu_tp1, _ = hf_to_transformer_config(cfg2, tp=1, on_gpu=True, use_te=True)
    assert gpu_tp1.sequence_parallel is False
    cpu_tp2, _ = hf_to_transformer_config(cfg2, tp=2, on_gpu=False)
    assert cpu_tp2.sequence_parallel is False and cpu_tp2.use_cpu_initialization is True
    assert not any(getattr(cpu_tp2, k) for k in ("bias_activation_fusion", "masked_softmax_fusion", "apply_rope_fusion",
                                                  "gradient_accumulation_fusion", "persist_layer_norm"))
    default, _ = hf_to_transformer_config(cfg2, tp=2)  # on_gpu defaults to torch.cuda.is_available()
    assert default.sequence_parallel is (CUDA and te_available())

    c = load_config(data={"student": {"hf_path": "s"}, "teacher": {"hf_path": "t"}, "data": {"train_files": ["x.jsonl"]},
                          "parallel": {"tp": 2}, "train": {"prompts_per_iteration": 8, "micro_batch_size": 1,
                                                           "mini_batches": 1}})
    on_gpu, on_cpu = c.resolve_runtime(4, cuda=True), c.resolve_runtime(4, cuda=False)
    assert (on_gpu.sequence_parallel, on_gpu.use_distributed_optimizer) == (True, True)
    assert (on_cpu.sequence_parallel, on_cpu.use_distributed_optimizer) == (False, False)


def test_cpu_path_components():
    """Trainer dtype fallback, rollout engine choice and teacher offload pick the CPU path here."""
    if CUDA:
        pytest.skip("checks the CPU path")
    from megatron_eaopd.loss import EOPDConfig, build_objective
    from megatron_eaopd.rollout.factory import select_engine_kind
    from megatron_eaopd.teacher import Teacher
    from megatron_eaopd.trainer import model_dtype

    assert model_dtype("bf16") == torch.float32 and model_dtype("fp32") == torch.float32
    assert Teacher([], build_objective(EOPDConfig()), offload=True).offload is False
    with pytest.raises(ValueError, match="needs CUDA"):
        select_engine_kind("dynamic", 1, cuda=False)
    kind, why = select_engine_kind("static", 2, cuda=False)
    assert kind == "recompute" and "pipeline_model_parallel_size == 1" in why
    assert select_engine_kind("auto", 1, cuda=False) == ("static", "")
    assert select_engine_kind("auto", 2, cuda=False) == ("recompute", "")
    # CUDA without a flash-attn that megatron-core's dynamic batching accepts: static, with the reason
    kind, why = select_engine_kind("auto", 1, cuda=True)
    assert kind == "static" and "using the static engine" in why


def test_mfu_arithmetic_and_batch_shape():
    assert bgt.train_flops(1_000_000, 4096) == 6 * 1_000_000 * 4096
    assert bgt.mfu(989e12 * 2, 2.0) == pytest.approx(1.0)
    assert bgt.mfu(989e12 * 0.4, 1.0) == pytest.approx(0.4)
    assert bgt.attention_flops(2, 64, 10, 100) == 6 * 2 * 64 * 10 * 100
    assert bgt.batch_shape(4096, 4, 512) == (4, 512)
    with pytest.raises(ValueError, match="not divisible"):
        bgt.batch_shape(4096, 3, 512)
    with pytest.raises(ValueError, match="no response tokens"):
        bgt.batch_shape(64, 2, 32)
    with pytest.raises(ValueError):
        bgt.mfu(1.0, 0.0)
    tok = bgt.SyntheticTokenizer(100, 99)
    assert len(tok) == 100 and tok.encode("1 2") == [1, 2] and tok.decode([3, 4]) == "3 4"
    # the 6N convention at the real shapes: about 1.7B (tied) student and 8.2B teacher parameters
    from megatron_eaopd.models.hf import hf_to_gpt_args

    s, t = hf_to_gpt_args(bgt.QWEN3_1P7B), hf_to_gpt_args(bgt.QWEN3_8B)
    assert (s.num_layers, s.hidden_size, s.tie_word_embeddings, t.num_layers, t.hidden_size) == (28, 2048, True, 36, 4096)


def test_shellcheck_clean():
    sc = shutil.which("shellcheck")
    if sc is None:  # make test installs it first (make system-deps -> tests/system_deps.sh)
        pytest.fail("shellcheck not installed: run 'make system-deps' (root or sudo) before the tests", pytrace=False)
    proc = subprocess.run([sc, str(SUITE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _suite(tmp: Path, *args: str, env_extra: dict | None = None, timeout: float = 1000):
    env = {**_env(), **(env_extra or {})}
    proc = subprocess.run(["bash", str(SUITE), "--dry-run", "--results", str(tmp), *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd="/")
    data = json.loads((tmp / "gpu_suite.json").read_text()) if (tmp / "gpu_suite.json").exists() else None
    return proc, data


def test_suite_leaves_result_file_when_a_step_fails(tmp_path):
    """A failing step is recorded, the next step still runs, the summary is printed last, rc = 1;
    results are copied to $OUT (the device tool's folder) too."""
    out = tmp_path / "OUT"
    out.mkdir()
    proc, d = _suite(tmp_path / "res", "--steps", "pytest,loss", timeout=120,
                     env_extra={"GPU_SUITE_FAIL_STEP": "pytest", "OUT": str(out),
                                "PYTHON": "/nonexistent/python"})  # every python step fails: nothing may hang
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log
    assert d is not None and d["dry_run"] is True and d["finished"] is True, log
    assert d["steps"]["pytest"]["status"] == "failed" and d["steps"]["loss"]["status"] == "failed", d["steps"]
    assert set(d["steps"]) == {"pytest", "loss"}
    assert proc.stdout.rstrip().splitlines()[-1] == "SUITE NOT OK: pytest, loss"
    assert "GPU SUITE SUMMARY" in proc.stdout
    assert (out / "gpu_suite.json").exists() and (out / "gpu_suite.log").exists()


def test_suite_bad_argument():
    proc = subprocess.run(["bash", str(SUITE), "--bogus"], capture_output=True, text=True, env=_env())
    assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr


@pytest.mark.slow
def test_suite_dry_run_end_to_end(tmp_path):
    """``gpu_suite.sh --dry-run`` on CPU: all four steps pass at tiny sizes, the result files exist,
    and the training benchmark recorded the CPU path as selected (about 2 minutes on 2 cores)."""
    res = tmp_path / "res"
    proc, d = _suite(res)
    log = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert d is not None and d["finished"] and d["dry_run"], log
    assert {k: v["status"] for k, v in d["steps"].items()} == {"env": "ok", "pytest": "ok", "loss": "ok", "train": "ok"}
    for f in ("gpu_suite.json", "gpu_env.json", "gpu_loss.json", "gpu_train.json", "gpu_suite.log"):
        assert (res / f).exists(), f
    assert proc.stdout.rstrip().splitlines()[-1] == "SUITE OK"
    env = d["results"]["env"]
    assert env["cuda_available"] is False and env["megatron_core"].startswith("0.19")
    loss = d["results"]["loss"]
    assert {r["method"] for r in loss["results"]} == {"megatron_ce", "eopd_topk"} and "tp1_bf16" in loss["ratios"]
    tr = d["results"]["train"]
    assert tr["dry_run"] and tr["ok"] and not tr["errors"], tr["errors"]
    sel = tr["selection"]
    assert sel["spec"] == "local" and sel["te_available"] is False and sel["params_dtype"] == "float32"
    assert sel["sequence_parallel"] is False and sel["use_cpu_initialization"] is True
    assert sel["use_distributed_optimizer"] is False and sel["overlap_grad_reduce"] is False
    assert sel["rollout_engine"] == "static" and sel["teacher_offload"] is False
    assert sel["provider_default_param_device"] == "cpu"
    for ph in ("rollout", "teacher", "old_logprobs", "train"):
        assert tr["phases"][ph]["tokens_per_s"] > 0 if ph != "old_logprobs" else tr["phases"][ph]["seconds"] > 0
    assert tr["phases"]["train"]["mfu"] >= 0 and math.isfinite(tr["phases"]["train"]["loss"])
    assert tr["phases"]["train"]["loss"] != 0.0 and tr["phases"]["train"]["grad_norm"] > 0
    s = d["summary"]
    assert s["rollout_engine"] == "static" and s["train_tokens_per_s"] > 0 and s["train_mfu_target_met"] is False


# ================================================================================================
# GPU (CUDA only)
# ================================================================================================
@pytest.fixture(scope="module")
def mp1():
    """One-rank process group (NCCL) and Megatron parallel state, in this process."""
    from megatron_eaopd.distributed import destroy, init_distributed, init_model_parallel
    from megatron_eaopd.models.provider import seed_model_rng

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):  # a world of one on an in-process store (no port)
        os.environ.pop(k, None)
    init_distributed(timeout_s=300)
    init_model_parallel(1, 1)
    seed_model_rng(1234)
    yield
    destroy()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.gpu
def test_gpu_default_build_selects_gpu_path(mp1):
    """build_gpt_model with defaults (the trainer's call) on CUDA: parameters on the GPU, bf16 when asked,
    TE spec iff TE imports."""
    from megatron_eaopd.models.provider import build_gpt_model, te_available

    chunks, info = build_gpt_model(TINY, params_dtype=torch.bfloat16)
    sel = bgt.selection_report(chunks[0], info)
    assert sel["param_device"] == "cuda", (
        f"build_gpt_model left the parameters on the host on a CUDA machine: {sel}")
    assert sel["params_dtype"] == "bfloat16" and sel["bf16"]
    assert sel["spec"] == ("transformer_engine" if te_available() else "local") and sel["info_use_te"] == te_available()
    assert sel["sequence_parallel"] is False  # TP = 1 here; TP > 1 is checked function-level below


@pytest.mark.gpu
def test_gpu_trainer_setup_selection(mp1):
    """The student as the trainer sets it up: bf16 parameters with fp32 grad reduce, overlapped grad
    reduce / param gather, distributed optimizer; rollout ``auto`` -> dynamic when flash-attn is usable
    (else static); teacher offload honoured (pinned host copy, no device copy between phases)."""
    from megatron_eaopd.loss import EOPDConfig, build_objective
    from megatron_eaopd.models.backend import flash_attn_available
    from megatron_eaopd.models.provider import build_gpt_model
    from megatron_eaopd.rollout.factory import make_engine
    from megatron_eaopd.teacher import Teacher

    student = bgt.build_student(TINY, torch.bfloat16, cuda=True, use_distributed_optimizer=True)
    tchunks, _ = build_gpt_model(TINY, params_dtype=torch.bfloat16, use_cpu_initialization=False)
    teacher = Teacher(tchunks, build_objective(EOPDConfig(vocab_size=512)), offload=True)
    ro = make_engine(student.chunks, bgt.SyntheticTokenizer(512, 511), stop_ids=(511,), kind="auto")
    sel = bgt.selection_report(student.chunks[0], student.info, student.ddp_config, ro, teacher)
    assert sel["overlap_grad_reduce"] and sel["overlap_param_gather"] and sel["use_distributed_optimizer"]
    assert sel["grad_reduce_in_fp32"] and sel["params_dtype"] == "bfloat16"
    assert sel["rollout_engine"] == ("dynamic" if flash_attn_available() else "static")
    assert sel["teacher_offload"] is True
    p = next(tchunks[0].parameters())
    assert p.device.type == "cpu" and p.is_pinned()  # offloaded between phases, pinned for async copies


@pytest.mark.gpu
def test_gpu_sequence_parallel_selected_when_tp_gt_1(mp1):
    """Single GPU: TP = 1, so check the selection function-level, as build_gpt_model calls it."""
    from megatron_eaopd.models.hf import hf_to_transformer_config
    from megatron_eaopd.models.provider import te_available

    te = te_available()
    cfg_tp2, _ = hf_to_transformer_config(TINY, tp=2, on_gpu=True, use_te=te)  # what build_gpt_model passes
    assert cfg_tp2.sequence_parallel is te and cfg_tp2.use_cpu_initialization is False
    cfg_tp1, _ = hf_to_transformer_config(TINY, tp=1, on_gpu=True, use_te=te)
    assert cfg_tp1.sequence_parallel is False


@pytest.mark.gpu
def test_gpu_te_spec_matches_local_spec(mp1):
    """Transformer Engine layer spec builds and gives the local spec's logits on the same weights."""
    from megatron_eaopd.models.mapping import canonical_name
    from megatron_eaopd.models.provider import build_gpt_model, forward_logits, te_available

    if not te_available():
        pytest.skip("transformer_engine does not import here (pip install -e '.[gpu]'; see bench/GPU.md)")
    te_chunks, te_info = build_gpt_model(TINY, params_dtype=torch.float32, use_te=True)
    loc_chunks, _ = build_gpt_model(TINY, params_dtype=torch.float32, use_te=False, use_cpu_initialization=False)
    assert te_info.use_te and "transformer_engine" in type(te_chunks[0].decoder.layers[0].self_attention.linear_qkv).__module__
    loc = dict(loc_chunks[0].named_parameters())
    copied = 0
    with torch.no_grad():
        for name, p in te_chunks[0].named_parameters():
            src = loc[canonical_name(name)]
            assert src.shape == p.shape, name
            p.copy_(src.to(p.device))
            copied += 1
    assert copied == len(loc)
    ids = torch.randint(0, 511, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
    a, b = forward_logits(te_chunks, ids), forward_logits(loc_chunks, ids)
    assert a.shape == b.shape == (2, 24, 512)
    assert _rel(a, b) < 2e-3, _rel(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["topk", "full"])
def test_gpu_bf16_eopd_loss_matches_fp64_reference(mp1, mode):
    """eopd_loss on bf16 logits (CUDA, V = 151,936) vs the fp64 reference on the same bf16 values."""
    import loss_reference as ref

    from megatron_eaopd.loss import EOPDConfig, eopd_loss, teacher_signals

    v, n = 151936, 256
    g = torch.Generator(device="cuda").manual_seed(3)
    scale = torch.where(torch.arange(n, device="cuda") % 3 == 0, 12.0, 2.0)[None, :, None]  # some low-entropy rows
    s = (torch.randn(1, n, v, device="cuda", generator=g) * scale).to(torch.bfloat16)
    # teacher: 16 distinct top logits per row above everything else, so that the top-k set has no
    # bf16 ties (tie-breaking may differ between our kernel and torch.topk)
    t = torch.randn(1, n, v, device="cuda", generator=g).clamp(-4.5, 4.5)
    top = torch.rand(1, n, v, device="cuda", generator=g).topk(16, dim=-1).indices
    t.scatter_(-1, top, (5.0 + 0.25 * torch.arange(16, device="cuda", dtype=torch.float32)).expand(1, n, 16).contiguous())
    t = (t * scale).to(torch.bfloat16)
    target = torch.randint(0, v, (1, n), device="cuda", generator=g)
    mask = (torch.rand(1, n, device="cuda", generator=g) > 0.1).float()
    with torch.no_grad():
        lp_y = torch.log_softmax(s.double(), -1).gather(-1, target[..., None])[..., 0]
    old = (lp_y + 0.3 * torch.randn(1, n, device="cuda", generator=g, dtype=torch.float64)).float()
    cfg = EOPDConfig(mode=mode, top_k=16, tau=0.8, vocab_size=v)

    x = s.detach().clone().requires_grad_(True)
    sig = teacher_signals(t, target, cfg)
    loss, ntok, _ = eopd_loss(x, sig, old, mask, cfg)
    loss.backward()
    xr = s.detach().double().clone().requires_grad_(True)
    rloss, rn, _, _ = ref.eopd(xr, t.double(), target, old.double(), mask.double(), mode=mode, tau=0.8, top_k=16)
    rloss.backward()
    assert int(ntok) == int(rn)
    assert x.grad.dtype == torch.bfloat16 and bool(torch.isfinite(x.grad).all())
    # the same bf16 values on both sides: the loss differs only by fp32 accumulation (the gradient is bf16)
    assert abs(float(loss) - float(rloss)) / abs(float(rloss)) < 1e-5, (float(loss), float(rloss))
    assert _rel(x.grad, xr.grad) < 1e-2, _rel(x.grad, xr.grad)


@pytest.mark.gpu
def test_gpu_dynamic_rollout_logprobs_match_full_forward(mp1):
    """The dynamic engine samples; its raw log-probs equal a full forward's log-softmax; it frees its
    KV cache on release and resumes for the next call with the same samples for the same seed."""
    from megatron_eaopd.models.provider import build_gpt_model, forward_logits
    from megatron_eaopd.rollout import RolloutParams
    from megatron_eaopd.rollout.factory import make_engine

    from megatron_eaopd.models.backend import flash_attn_unavailable_reason

    reason = flash_attn_unavailable_reason()
    if reason:
        pytest.skip(f"megatron-core's dynamic inference engine cannot run: {reason}")
    chunks, _ = build_gpt_model(TINY, params_dtype=torch.bfloat16, use_cpu_initialization=False)
    ro = make_engine(chunks, bgt.SyntheticTokenizer(512, 511), stop_ids=(511,), kind="dynamic", kv_buffer_gb=1.0)
    prompts = [[5, 17, 42, 99, 3, 8], [7, 1], [11, 12, 13, 14, 15]]
    params = RolloutParams(temperature=1.0, top_p=1.0, max_new_tokens=12, n=2, seed=5)
    b = ro.generate(prompts, params, return_log_probs=True)
    assert ro.kind == "dynamic" and b.tokens.shape[0] == 6 and int(b.logprob_mask.sum()) > 0
    assert (b.response_lengths >= 1).all() and (b.response_lengths <= 12).all()
    logits = forward_logits(chunks, b.tokens.cuda())  # [B, S, V] fp32
    full = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, b.targets.cuda()[..., None])[..., 0].cpu()
    m = b.logprob_mask
    err = float((full[m] - b.raw_logprobs[m]).abs().max())
    assert err < 5e-2, err  # bf16 weights: KV-cached decode vs one full forward
    before = torch.cuda.memory_allocated()
    ro.release()
    assert torch.cuda.memory_allocated() < before  # the KV buffer is freed between rollouts
    again = ro.generate(prompts, params, call_index=0, return_log_probs=True)
    assert torch.equal(again.tokens, b.tokens)  # same seed and call index -> same samples


@pytest.mark.gpu
def test_gpu_distributed_optimizer_checkpoint_roundtrip(mp1, tmp_path):
    """Train 2 steps (bf16, distributed optimizer, DP = 1), save as the trainer does, train a 3rd; a fresh
    student that loads the checkpoint takes the same 3rd step (same loss, same weights)."""
    from megatron_eaopd.loss import EOPDConfig, build_objective
    from megatron_eaopd.models.provider import build_gpt_model, seed_model_rng, unwrap
    from megatron_eaopd.phases import old_log_probs_phase, teacher_phase, update_phase
    from megatron_eaopd.pipeline import split_micro_batches
    from megatron_eaopd.teacher import Teacher
    from megatron_eaopd.train_state import resume_train_state, save_train_state

    objective = build_objective(EOPDConfig(mode="topk", top_k=8, vocab_size=512))
    tchunks, _ = build_gpt_model(TINY, params_dtype=torch.bfloat16, use_cpu_initialization=False)
    teacher = Teacher(tchunks, objective)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 511, (4, 33), generator=g)
    mask = torch.zeros(4, 32, dtype=torch.bool)
    mask[:, 8:] = True
    mbs = split_micro_batches(tokens, mask, 2, device="cuda")

    class _Loader:  # the data position is not under test here
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    def make(seed):
        seed_model_rng(seed)
        return bgt.build_student(TINY, torch.bfloat16, cuda=True, use_distributed_optimizer=True, lr=1e-3)

    def step(st):
        scores = teacher_phase(teacher, mbs)
        old = old_log_probs_phase(st, objective, mbs)
        u = update_phase(st, objective, mbs, scores, old, mini_batches=1)
        return objective.reduce({k: float(v) for k, v in u.sums.items()})

    def weights(st):
        return {k: v.detach().float().cpu().clone() for k, v in unwrap(st.chunks[0]).named_parameters()}

    a = make(1)
    inner = getattr(a.optimizer, "chained_optimizers", [a.optimizer])
    assert any(type(o).__name__ == "DistributedOptimizer" for o in inner), [type(o).__name__ for o in inner]
    step(a)
    step(a)
    save_train_state(tmp_path / "ck", 2, a, _Loader())
    w_2 = weights(a)
    m3a = step(a)
    w_a = weights(a)

    b = make(2)
    assert resume_train_state(tmp_path / "ck", b, _Loader()) == 2
    m3b = step(b)
    # the loss of step 3 is computed before its update: the weights after step 2 were restored
    assert m3b["loss"] == pytest.approx(m3a["loss"], rel=1e-4, abs=1e-6), (m3a["loss"], m3b["loss"])
    w_b = weights(b)
    # step 3's update must match too (Adam moments and step count restored): a lost optimizer state
    # gives a first-step update (lr * sign(g)), as large as the update itself
    upd = sum(float((w_a[k] - w_2[k]).abs().sum()) for k in w_a)
    diff = sum(float((w_a[k] - w_b[k]).abs().sum()) for k in w_a)
    assert upd > 0 and diff < 0.02 * upd, f"resumed step differs: |w_a - w_b| = {diff:.3g} vs update {upd:.3g}"
