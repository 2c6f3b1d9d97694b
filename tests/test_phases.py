"""Each phase of an iteration on its own, on tiny random models, in this process (world of one, gloo),
without ``Trainer.setup()``; plus the student's ordering rules (weights loaded after the optimizer,
fp16 loss scaling, param sync) and the micro-batch padding for sequence parallelism.

References are independent: full-vocabulary float64 log-softmax / entropy / top-k of a plain forward
(``tests/loss_reference.py``), and the weights written to a checkpoint.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch

import loss_reference as ref
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_gpu_train as bgt  # noqa: E402

STUDENT = {**bgt.TINY_STUDENT, "vocab_size": 500, "eos_token_id": 499}  # 500 rows: padded to 512
TEACHER = {**bgt.TINY_TEACHER, "vocab_size": 500, "eos_token_id": 499}
EOS = 499


@pytest.fixture(scope="module")
def world1():
    """One-rank process group (gloo on CPU) and Megatron parallel state, in this process."""
    from megatron_eaopd.distributed import destroy, init_distributed, init_model_parallel
    from megatron_eaopd.models.provider import seed_model_rng

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):  # a world of one on an in-process store (no port)
        os.environ.pop(k, None)
    init_distributed(timeout_s=300)
    init_model_parallel(1, 1)
    seed_model_rng(1234)
    yield
    destroy()


def _opt(lr=1e-2):
    from megatron_eaopd.config import OptimizerConfig

    fields = dict(lr=lr, min_lr=0.0, weight_decay=0.0, clip_grad=0.0, warmup_steps=0, decay="constant")
    # lr = 0 (outside the schema's rule lr > 0) isolates what a step writes back from what it learns
    return OptimizerConfig(**fields) if lr > 0 else OptimizerConfig.model_construct(**{**OptimizerConfig().model_dump(),
                                                                                    **fields})


def _student(dtype=torch.float32, lr=1e-2):
    from megatron_eaopd.student import build_student

    return build_student(STUDENT, params_dtype=dtype, opt_cfg=_opt(lr), total_steps=10, use_distributed_optimizer=False)


@pytest.fixture(scope="module")
def parts(world1):
    """A student, a teacher, the topk objective, a rollout batch and its micro-batches."""
    from megatron_eaopd.loss import EOPDConfig, build_objective
    from megatron_eaopd.models.provider import build_gpt_model
    from megatron_eaopd.phases import rollout_phase
    from megatron_eaopd.rollout import RolloutParams
    from megatron_eaopd.rollout.factory import make_engine
    from megatron_eaopd.teacher import Teacher

    student = _student()
    objective = build_objective(EOPDConfig(top_k=8, vocab_size=500, tau=0.5))
    tchunks, _ = build_gpt_model(TEACHER)
    teacher = Teacher(tchunks, objective)
    engine = make_engine(student.chunks, bgt.SyntheticTokenizer(500, EOS), stop_ids=(EOS,), kind="static")
    released = []
    engine.release = lambda: released.append(True)
    prompts = [[5, 17, 42, 99, 3, 8], [7, 1, 9], [11, 12, 13, 14], [100, 3, 3, 9, 4]]
    batch = rollout_phase(engine, prompts, RolloutParams(max_new_tokens=10, n=2, seed=3), call_index=0)
    return SimpleNamespace(student=student, objective=objective, teacher=teacher, engine=engine, batch=batch,
                           mbs=batch.micro_batches(2), released=released, prompts=prompts)


def test_rollout_phase_returns_a_batch_and_releases_the_engine(parts):
    b = parts.batch
    assert parts.released == [True]
    assert b.tokens.shape[0] == 8 and b.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert int(b.loss_mask.sum()) == int(b.response_lengths.sum()) > 0
    assert int(b.tokens.max()) < 500  # padded vocabulary rows (500..511) are never sampled
    assert len(parts.mbs) == 4 and all(mb.inputs.shape == parts.mbs[0].inputs.shape for mb in parts.mbs)


def test_micro_batches_pad_the_sequence_for_sequence_parallelism(parts):
    b = parts.batch
    s = b.tokens.shape[1] - 1
    for mult in (1, 3, 4):
        mbs = b.micro_batches(4, seq_multiple=mult)
        width = -(-s // mult) * mult
        for mb in mbs:
            assert mb.inputs.shape == mb.targets.shape == mb.position_ids.shape == mb.loss_mask.shape == (4, width)
            assert torch.equal(mb.inputs[:, :s], b.inputs[mb.rows]) and torch.equal(mb.loss_mask[:, :s], b.loss_mask[mb.rows])
            assert not mb.loss_mask[:, s:].any() and bool((mb.targets[:, s:] == b.pad_id).all())
            assert mb.position_ids[0].tolist() == list(range(width))


def test_teacher_phase_equals_a_float64_reference(parts):
    from megatron_eaopd.models.provider import forward_logits
    from megatron_eaopd.phases import teacher_phase

    scores = teacher_phase(parts.teacher, parts.mbs)
    full = forward_logits(parts.teacher.model_chunks, parts.batch.inputs).double()  # [B, S, 500]
    lp = ref.log_probs(full, parts.batch.targets.unsqueeze(-1))[..., 0]
    ent = ref.entropy(full)
    tk, ti = ref.masked_log_softmax(full).topk(8, dim=-1)
    sig = [scores.for_micro_batch(mb) for mb in parts.mbs]
    assert ref.rel_err(torch.cat([x.target_log_probs for x in sig]), lp) < 1e-5
    assert ref.rel_err(torch.cat([x.entropy for x in sig]), ent) < 1e-5
    assert ref.rel_err(torch.cat([x.topk_log_probs for x in sig]), tk) < 1e-5
    assert torch.equal(torch.cat([x.topk_ids for x in sig]), ti)
    assert all(x.logits is None for x in sig)  # topk: the logits are not kept


def test_old_log_probs_phase_equals_a_float64_reference(parts):
    from megatron_eaopd.models.provider import forward_logits
    from megatron_eaopd.phases import old_log_probs_phase

    old = old_log_probs_phase(parts.student, parts.objective, parts.mbs)
    assert all(m.training for m in parts.student.chunks)  # left in training mode
    full = forward_logits(parts.student.chunks, parts.batch.inputs).double()
    parts.student.train()
    want = ref.log_probs(full, parts.batch.targets.unsqueeze(-1))[..., 0]
    got = torch.cat([old[i] for i in range(len(parts.mbs))])
    assert got.dtype == torch.float32 and ref.rel_err(got, want) < 1e-5


def test_update_phase_steps_and_sums(parts):
    from megatron_eaopd.models.provider import unwrap
    from megatron_eaopd.phases import old_log_probs_phase, teacher_phase, update_phase

    scores = teacher_phase(parts.teacher, parts.mbs)
    old = old_log_probs_phase(parts.student, parts.objective, parts.mbs)
    before = {k: v.detach().clone() for k, v in unwrap(parts.student.chunks[0]).named_parameters()}
    synced = []
    parts.student.sync_params = lambda: synced.append(True)
    res = update_phase(parts.student, parts.objective, parts.mbs, scores, old, mini_batches=2)
    del parts.student.sync_params
    assert res.steps_taken == 2 and len(res.grad_norms) == 2 and all(g > 0 for g in res.grad_norms)
    assert synced == [True]  # parameters synced once the steps are done
    assert float(res.sums["num_tokens"]) == float(parts.batch.loss_mask.sum())
    m = parts.objective.reduce({k: float(v) for k, v in res.sums.items()})
    assert m["num_tokens"] == float(parts.batch.loss_mask.sum()) and 0.0 <= m["gate_fraction"] <= 1.0
    # the first step's loss is the old policy's: ratio 1, so the reverse-KL term is -mean(A) exactly
    changed = sum(float((v - before[k]).abs().sum()) for k, v in unwrap(parts.student.chunks[0]).named_parameters())
    assert changed > 0
    with pytest.raises(ValueError, match="do not split into 3 optimizer steps"):
        update_phase(parts.student, parts.objective, parts.mbs, scores, old, mini_batches=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loaded_weights_survive_the_first_step(world1, tmp_path, dtype):
    """Reduced-precision parameters: the optimizer's fp32 main weights are cloned at build time; weights
    loaded afterwards must be pushed into them, or the first step writes the random init back."""
    from megatron_eaopd.checkpoint import load_checkpoint, save_checkpoint
    from megatron_eaopd.models.provider import build_gpt_model, seed_model_rng, unwrap

    seed_model_rng(7)
    src, _ = build_gpt_model(STUDENT, params_dtype=dtype)
    save_checkpoint(tmp_path / "ck", 0, src)
    loaded = {k: v.detach().clone() for k, v in src[0].named_parameters()}
    seed_model_rng(8)
    st = _student(dtype, lr=0.0)
    init = {k: v.detach().clone() for k, v in unwrap(st.chunks[0]).named_parameters()}
    st.load_weights(checkpoint=str(tmp_path / "ck"))

    one_step(st)
    now = dict(unwrap(st.chunks[0]).named_parameters())
    moved = [k for k in loaded if not torch.equal(now[k].detach(), loaded[k]) and loaded[k].dtype == dtype]
    assert not moved, f"lr=0 step changed loaded weights: {moved[:3]}"
    assert any(not torch.equal(init[k], loaded[k]) for k in loaded)  # the check can fail: init differs
    # without the reload the random init comes back (the defect this guards against)
    st2 = _student(dtype, lr=0.0)
    load_checkpoint(tmp_path / "ck", st2.chunks)
    one_step(st2)
    now2 = dict(unwrap(st2.chunks[0]).named_parameters())
    assert [k for k in loaded if loaded[k].dtype == dtype and not torch.equal(now2[k].detach(), loaded[k])], \
        "expected the unreloaded optimizer to overwrite the loaded weights"


def one_step(st) -> None:
    """One forward/backward of a fixed batch and one optimizer step."""
    st.zero_grad()
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    out = st.chunks[0](ids, torch.arange(12).expand(2, 12), None)
    out.float().logsumexp(-1).sum().backward()
    st.step()


def test_fp16_scales_the_loss_by_the_optimizers_loss_scale(world1):
    st = _student(torch.float16)
    assert st.chunks[0].config.grad_scale_func == st.optimizer.scale_loss
    assert float(st.optimizer.get_loss_scale()) > 1.0


def test_sync_params_only_with_an_overlapped_param_gather():
    from megatron_eaopd.student import Student

    calls = []

    class Chunk:
        def disable_forward_pre_hook(self, param_sync=True):
            calls.append(("disable", param_sync))

        def enable_forward_pre_hook(self):
            calls.append(("enable",))

    for dist_opt, overlap, want in ((True, True, [("disable", True), ("enable",)]), (True, False, []), (False, False, [])):
        calls.clear()
        st = Student(chunks=[Chunk()], optimizer=None, scheduler=None, info=None, num_params=0,
                     ddp_config=SimpleNamespace(use_distributed_optimizer=dist_opt, overlap_param_gather=overlap))
        st.sync_params()
        assert calls == want


def test_dynamic_engine_request_slots_divide_by_tp():
    from megatron_eaopd.rollout.dynamic import dynamic_max_requests

    assert [dynamic_max_requests(r, 4) for r in (1, 4, 5, 31, 32)] == [4, 4, 8, 32, 32]
    assert dynamic_max_requests(7, 1) == 7
