"""One EOPD training iteration at real model shapes, random weights: throughput, MFU and memory per phase.

    python bench/bench_gpu_train.py [--tokens 4096] [--rows 4] [--output bench/results/gpu_train.json]
    python bench/bench_gpu_train.py --dry-run      # tiny shapes, CPU, fp32 (seconds; used by the CPU tests)

Student = Qwen3-1.7B shape, teacher = Qwen3-8B shape, both built from HF-like config dicts through
:func:`megatron_eaopd.models.provider.build_gpt_model` (random init, nothing downloaded), in the
layout the trainer uses on this machine (world of one: TP = PP = DP = 1). Phases, in trainer order:

* ``rollout``   the student samples ``--rows`` responses of ``--gen`` tokens to ``--prompt``-token
  random prompts with the rollout engine of :func:`megatron_eaopd.rollout.factory.make_engine`
  (``engine=auto``: dynamic with CUDA; when the dynamic engine fails, e.g. no flash-attn on the
  image, the static engine is timed instead and the failure is recorded). Reported: generated tokens/s.
* ``teacher``   :func:`megatron_eaopd.phases.teacher_phase` over the iteration's micro-batches
  (forward + TeacherSignals). Reported: tokens/s.
* ``old_logprobs``  :func:`megatron_eaopd.phases.old_log_probs_phase` (student forward, no grad).
* ``train``     :func:`megatron_eaopd.phases.update_phase`: one optimizer step of EOPD (topk) over all
  micro-batches, with the student of :func:`megatron_eaopd.student.build_student` (bf16 params,
  fp32 grads, overlapped grad reduce and the distributed optimizer on CUDA), as the trainer builds it.
  Reported: tokens/s and MFU = 6 * N * tokens / seconds / peak, N = student parameters,
  peak = 989e12 FLOP/s (H200 SXM dense bf16 datasheet; ``--peak-tflops``). Also reported against
  the bf16 matmul rate measured here (8192^3, random data) as ``mfu_vs_measured_matmul``.

The phases after the rollout run on a fixed synthetic batch of ``--rows`` x (``--prompt`` +
``--gen``) tokens (= ``--tokens``), so their numbers do not depend on where random weights stop.
Every phase is timed after a warm-up, with the device synchronised; ``peak_gib`` is
``torch.cuda.max_memory_allocated`` since the phase began (CPU: not measured). Results (also partial
ones, written after every phase) go to ``--output``; the exit code is 1 when a phase failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: H200 SXM dense bf16 peak (datasheet, H200.md: "about 990 TFLOP/s"); the MFU denominator.
H200_BF16_PEAK_FLOPS = 989e12
#: Targets this benchmark is read against (issue 7).
TARGETS = {"train_mfu": ">= 0.40"}

_QWEN3 = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936, max_position_embeddings=40960,
              rms_norm_eps=1e-6, rope_theta=1000000.0, head_dim=128, hidden_act="silu", attention_bias=False,
              bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16")
#: Qwen3-1.7B (config.json of Qwen/Qwen3-1.7B).
QWEN3_1P7B = {**_QWEN3, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
              "num_attention_heads": 16, "num_key_value_heads": 8, "tie_word_embeddings": True}
#: Qwen3-8B (config.json of Qwen/Qwen3-8B).
QWEN3_8B = {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False}
#: --dry-run shapes (CPU-sized, same family and features: GQA, qk-norm, tied student embeddings).
_TINY = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=512, max_position_embeddings=256,
             rms_norm_eps=1e-6, rope_theta=10000.0, head_dim=16, bos_token_id=1, eos_token_id=511)
TINY_STUDENT = {**_TINY, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "tie_word_embeddings": True}
TINY_TEACHER = {**_TINY, "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 6,
                "num_key_value_heads": 2, "tie_word_embeddings": False}


# ----------------------------------------------------------------------------------------------
# pure helpers (unit-tested on CPU)
# ----------------------------------------------------------------------------------------------
def train_flops(n_params: int, tokens: int) -> float:
    """Model FLOPs of one training pass (forward + backward): ``6 * N * tokens``."""
    return 6.0 * float(n_params) * float(tokens)


def attention_flops(num_layers: int, attn_width: int, seq_len: int, tokens: int) -> float:
    """Extra causal-attention FLOPs of a training pass, ``6 * L * (heads * head_dim) * S * tokens``
    (QK^T and PV, forward + backward, halved for the causal mask); not in ``6 N``."""
    return 6.0 * num_layers * attn_width * seq_len * tokens


def mfu(flops: float, seconds: float, peak_flops: float = H200_BF16_PEAK_FLOPS) -> float:
    """Model FLOPs utilisation: ``flops / seconds / peak_flops``."""
    if seconds <= 0 or peak_flops <= 0:
        raise ValueError(f"mfu needs positive seconds and peak, got {seconds}, {peak_flops}")
    return flops / seconds / peak_flops


def batch_shape(tokens: int, rows: int, prompt: int) -> tuple[int, int]:
    """``(rows, gen)`` such that ``rows * (prompt + gen) == tokens``.

    Raises:
        ValueError: ``tokens`` not divisible by ``rows`` or no room for a response.
    """
    if tokens % rows:
        raise ValueError(f"--tokens {tokens} is not divisible by --rows {rows}")
    gen = tokens // rows - prompt
    if gen < 1:
        raise ValueError(f"--prompt {prompt} leaves no response tokens in {tokens // rows}-token rows")
    return rows, gen


class SyntheticTokenizer:
    """The tokenizer interface :class:`~megatron_eaopd.rollout.Rollout` needs, over plain ids (no files)."""

    def __init__(self, vocab_size: int, eos_token_id: int):
        self.vocab_size, self.eos_token_id = int(vocab_size), int(eos_token_id)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [int(x) for x in text.split()]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(str(int(i)) for i in ids)


def selection_report(model, info, ddp_cfg=None, rollout=None, teacher=None) -> dict:
    """What the platform logic actually selected for a built model (recorded in the results).

    Keys: ``cuda``, ``te_available``, ``spec`` (``"transformer_engine"``/``"local"``, from the class of
    the first layer's QKV projection), ``params_dtype``, ``sequence_parallel``,
    ``use_cpu_initialization``, ``fusions`` (the TransformerConfig fusion flags), DDP's
    ``overlap_grad_reduce``/``overlap_param_gather``/``use_distributed_optimizer``/``grad_reduce_in_fp32``,
    ``rollout_engine`` and ``teacher_offload`` (None when not given).
    """
    from megatron_eaopd.models.provider import te_available, unwrap

    m = unwrap(model)
    cfg = m.config
    qkv = m.decoder.layers[0].self_attention.linear_qkv
    mod = type(qkv).__module__
    out = {
        "cuda": torch.cuda.is_available(),
        "te_available": te_available(),
        "spec": "transformer_engine" if "transformer_engine" in mod or "te_" in mod.rsplit(".", 1)[-1] else "local",
        "qkv_class": f"{mod}.{type(qkv).__name__}",
        "info_use_te": bool(info.use_te),
        "params_dtype": str(next(m.parameters()).dtype).replace("torch.", ""),
        "config_params_dtype": str(cfg.params_dtype).replace("torch.", ""),
        "bf16": bool(cfg.bf16),
        "sequence_parallel": bool(cfg.sequence_parallel),
        "tensor_model_parallel_size": int(cfg.tensor_model_parallel_size),
        "use_cpu_initialization": bool(cfg.use_cpu_initialization),
        "fusions": {k: bool(getattr(cfg, k, False)) for k in (
            "bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion", "apply_rope_fusion",
            "gradient_accumulation_fusion", "persist_layer_norm")},
        "param_device": str(next(m.parameters()).device.type),
    }
    if ddp_cfg is not None:
        out.update({k: bool(getattr(ddp_cfg, k)) for k in (
            "overlap_grad_reduce", "overlap_param_gather", "use_distributed_optimizer", "grad_reduce_in_fp32")})
    out["rollout_engine"] = getattr(rollout, "kind", None)
    out["teacher_offload"] = None if teacher is None else bool(teacher.offload)
    return out


# ----------------------------------------------------------------------------------------------
# timing helpers
# ----------------------------------------------------------------------------------------------
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None


def _alloc_gib() -> float | None:
    return round(torch.cuda.memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None


def _timed(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return times


def _err(e: BaseException) -> str:
    return "".join(traceback.format_exception(e))[-2500:]


def measured_matmul_tflops(n: int = 8192, reps: int = 10) -> float | None:
    """bf16 ``n x n x n`` product rate on random data (CUDA events, mean of ``reps`` after 3 warm-ups)."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    sec = start.elapsed_time(end) / 1e3 / reps
    del a, b
    torch.cuda.empty_cache()
    return round(2.0 * n**3 / sec / 1e12, 1)


# ----------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------
def build_student(cfg_dict: dict, dtype: torch.dtype, cuda: bool, use_distributed_optimizer: bool, lr: float = 1e-6):
    """The student as the trainer builds it (:func:`megatron_eaopd.student.build_student`), with a constant LR."""
    from megatron_eaopd.config import OptimizerConfig
    from megatron_eaopd.student import build_student as build

    opt = OptimizerConfig(lr=lr, min_lr=lr, weight_decay=0.0, clip_grad=1.0, warmup_steps=0, decay="constant")
    # on CUDA initialise on the device (8B parameters initialised on the host take minutes)
    overrides = {"use_cpu_initialization": False} if cuda else {}
    return build(cfg_dict, params_dtype=dtype, opt_cfg=opt, total_steps=1000,
                 use_distributed_optimizer=use_distributed_optimizer, cuda=cuda, **overrides)


def run(a) -> dict:
    from megatron_eaopd.distributed import init_distributed, init_model_parallel
    from megatron_eaopd.models.provider import build_gpt_model, seed_model_rng, te_available, unwrap

    init_distributed(timeout_s=600)  # without torchrun: a world of one on an in-process store
    init_model_parallel(1, 1)
    seed_model_rng(1234)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    s_cfg, t_cfg = (TINY_STUDENT, TINY_TEACHER) if a.dry_run else (QWEN3_1P7B, QWEN3_8B)
    rows, gen = batch_shape(a.tokens, a.rows, a.prompt)
    seq = a.prompt + gen
    res: dict = dict(
        benchmark="gpu_train", dry_run=bool(a.dry_run), device=torch.cuda.get_device_name() if cuda else "cpu",
        torch=torch.__version__, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        student="tiny-qwen3" if a.dry_run else "Qwen3-1.7B shape", teacher="tiny-qwen3" if a.dry_run else "Qwen3-8B shape",
        dtype=str(dtype).replace("torch.", ""), tokens=rows * seq, rows=rows, prompt=a.prompt, gen=gen,
        micro_batch_size=a.micro_batch_size, peak_flops=a.peak_tflops * 1e12, targets=TARGETS,
        phases={}, errors={}, te_available=te_available(),
    )
    out_path = Path(a.output)

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(res, indent=2, default=str) + "\n")

    save()
    try:
        res["matmul_tflops_measured"] = measured_matmul_tflops() if (cuda and not a.no_matmul) else None
    except Exception as e:  # noqa: BLE001
        res["errors"]["matmul"] = _err(e)

    # ---- build --------------------------------------------------------------------------------
    from megatron_eaopd.loss import EOPDConfig, build_objective
    from megatron_eaopd.teacher import Teacher

    t0 = time.perf_counter()
    _reset_peak()
    student = build_student(s_cfg, dtype, cuda, use_distributed_optimizer=cuda)
    info, ddp_cfg = student.info, student.ddp_config
    model = unwrap(student.chunks[0])
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.embedding.word_embeddings.weight.numel()
    res["student_params"] = n_params
    res["student_params_non_embedding"] = n_params - n_embed - (0 if info.tied else model.output_layer.weight.numel())
    res["phases"]["build_student"] = dict(seconds=round(time.perf_counter() - t0, 3), peak_gib=_peak_gib(),
                                          allocated_gib=_alloc_gib())
    save()
    objective = build_objective(EOPDConfig(mode="topk", top_k=16, vocab_size=info.true_vocab_size))
    t0 = time.perf_counter()
    _reset_peak()
    t_overrides = {"use_cpu_initialization": False} if cuda else {}
    t_chunks, t_info = build_gpt_model(t_cfg, params_dtype=dtype, **t_overrides)
    teacher = Teacher(t_chunks, objective, offload=a.teacher_offload)
    res["teacher_params"] = sum(p.numel() for p in t_chunks[0].parameters())
    res["phases"]["build_teacher"] = dict(seconds=round(time.perf_counter() - t0, 3), peak_gib=_peak_gib(),
                                          allocated_gib=_alloc_gib())
    res["selection"] = selection_report(student.chunks[0], info, ddp_cfg, None, teacher)
    # what build_gpt_model does with no overrides (the trainer's call): where do the parameters land?
    probe, _ = build_gpt_model(TINY_STUDENT, params_dtype=dtype)
    res["selection"]["provider_default_param_device"] = next(probe[0].parameters()).device.type
    del probe
    save()

    # ---- rollout -------------------------------------------------------------------------------
    from megatron_eaopd.rollout import RolloutParams
    from megatron_eaopd.rollout.dynamic import dynamic_max_requests
    from megatron_eaopd.rollout.factory import make_engine

    eos = int(s_cfg["eos_token_id"])
    tok = SyntheticTokenizer(info.true_vocab_size, eos)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, eos, (rows, a.prompt), generator=g).tolist()
    params = RolloutParams(temperature=1.0, top_p=1.0, max_new_tokens=gen, n=1, seed=1)
    order = [a.engine] if a.engine != "auto" else (["dynamic", "static"] if cuda else ["static"])
    res["rollout_attempts"] = {}
    for eng in order:
        ro = None
        try:
            t0 = time.perf_counter()
            ro = make_engine(student.chunks, tok, stop_ids=(eos,), kind=eng, max_batch_size=rows, kv_buffer_gb=a.kv_gb)
            # build the engine once at its full size, so the timed call does not rebuild it
            ro._engine(dynamic_max_requests(rows, 1) if ro.kind == "dynamic" else rows, a.prompt + gen + 1)
            build_s = time.perf_counter() - t0
            ro.generate(prompts, params.model_copy(update={"max_new_tokens": min(4, gen)}), call_index=0)  # warm-up
            _reset_peak()
            box = {}
            dt = _timed(lambda: box.__setitem__("b", ro.generate(prompts, params, call_index=1)), 1)[0]
            b = box["b"]
            new_tokens = int(b.response_lengths.sum())
            res["phases"]["rollout"] = dict(
                engine=ro.kind, seconds=round(dt, 4), generated_tokens=new_tokens, tokens_per_s=round(new_tokens / dt, 1),
                finished_rows=int(b.finished.sum()), engine_build_seconds=round(build_s, 3), peak_gib=_peak_gib(),
            )
            res["rollout_attempts"][eng] = "ok"
            res["selection"]["rollout_engine"] = ro.kind
            break
        except Exception as e:  # noqa: BLE001
            res["rollout_attempts"][eng] = _err(e)
            res["errors"][f"rollout_{eng}"] = res["rollout_attempts"][eng]
        finally:
            if ro is not None:
                ro.release()
            del ro
            if cuda:
                torch.cuda.empty_cache()
            student.train()
            save()

    # ---- the synthetic iteration batch -----------------------------------------------------------
    from megatron_eaopd.phases import old_log_probs_phase, teacher_phase, update_phase
    from megatron_eaopd.pipeline import split_micro_batches

    tokens = torch.randint(0, eos, (rows, seq), generator=g)
    loss_mask = torch.zeros(rows, seq - 1, dtype=torch.bool)
    loss_mask[:, a.prompt - 1:] = True
    mbs = split_micro_batches(tokens, loss_mask, a.micro_batch_size, device=dev)
    n_in = rows * (seq - 1)
    box = {}

    def phase(name, fn, tokens_count, warmup=1):
        try:
            for _ in range(warmup):
                fn()
            _reset_peak()
            times = _timed(fn, a.reps)
            sec = statistics.median(times)
            res["phases"][name] = dict(seconds=round(sec, 4), all_seconds=[round(x, 4) for x in times],
                                       tokens=tokens_count, tokens_per_s=round(tokens_count / sec, 1), peak_gib=_peak_gib())
            return True
        except Exception as e:  # noqa: BLE001
            res["errors"][name] = _err(e)
            return False
        finally:
            save()

    ok_t = phase("teacher", lambda: box.__setitem__("t", teacher_phase(teacher, mbs)), n_in)
    ok_o = phase("old_logprobs", lambda: box.__setitem__("o", old_log_probs_phase(student, objective, mbs)), n_in)
    if ok_t and ok_o:
        def train_step():
            box["u"] = update_phase(student, objective, mbs, box["t"], box["o"], mini_batches=1)

        if phase("train", train_step, n_in):
            p = res["phases"]["train"]
            sec = p["seconds"]
            f6 = train_flops(n_params, n_in)
            fa = attention_flops(info.args.num_layers, info.args.num_heads * info.args.head_dim, seq - 1, n_in)
            u = box["u"]
            p["loss"] = objective.reduce({k: float(v) for k, v in u.sums.items()})["loss"]
            p["grad_norm"] = u.grad_norms[-1] if u.grad_norms else None
            p["model_tflops_per_s"] = round(f6 / sec / 1e12, 2)
            p["mfu"] = round(mfu(f6, sec, a.peak_tflops * 1e12), 4)
            p["mfu_with_attention"] = round(mfu(f6 + fa, sec, a.peak_tflops * 1e12), 4)
            mm = res.get("matmul_tflops_measured")
            p["mfu_vs_measured_matmul"] = round(mfu(f6, sec, mm * 1e12), 4) if mm else None
            p["meets_target"] = p["mfu"] >= 0.40
    res["peak_gib_total"] = round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None
    res["ok"] = not res["errors"] or set(res["errors"]) <= {"rollout_dynamic", "matmul"} and "rollout" in res["phases"]
    save()
    return res


def summary_lines(res: dict) -> list[str]:
    """Human-readable table of a result dict (printed last)."""
    ph = res.get("phases", {})
    lines = [f"{'phase':14s} {'seconds':>9s} {'tokens/s':>11s} {'peak GiB':>9s}  notes"]
    for name in ("build_student", "build_teacher", "rollout", "teacher", "old_logprobs", "train"):
        p = ph.get(name)
        if p is None:
            err = res.get("errors", {}).get(name) or res.get("errors", {}).get(f"rollout_{name}")
            lines.append(f"{name:14s} {'-':>9s} {'-':>11s} {'-':>9s}  {'FAILED' if err else 'not run'}")
            continue
        notes = []
        if name == "rollout":
            notes.append(f"engine={p['engine']}")
        if name == "train":
            notes.append(f"MFU={p['mfu']:.1%} (target >= 40%) vs-measured-matmul={p.get('mfu_vs_measured_matmul')}")
            notes.append(f"loss={p['loss']:.4g}")
        tps = p.get("tokens_per_s")
        peak = p.get("peak_gib")
        lines.append(f"{name:14s} {p['seconds']:9.3f} {tps if tps is not None else '-':>11} "
                     f"{peak if peak is not None else '-':>9}  {' '.join(notes)}")
    for k in res.get("errors", {}):
        lines.append(f"error[{k}]: {res['errors'][k].strip().splitlines()[-1][:200]}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny models, tiny batch (CPU-sized)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens in the iteration's batch (default 4096; dry-run 32)")
    ap.add_argument("--rows", type=int, default=None, help="sequences (default 4; dry-run 2)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens per sequence (default 512; dry-run 8)")
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per phase (median; default 3, dry-run 1)")
    ap.add_argument("--engine", default="auto", choices=["auto", "dynamic", "static"])
    ap.add_argument("--kv-gb", type=float, default=16.0, help="dynamic engine KV buffer (GiB)")
    ap.add_argument("--teacher-offload", action="store_true", help="score with teacher weights offloaded to host")
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_PEAK_FLOPS / 1e12)
    ap.add_argument("--no-matmul", action="store_true", help="skip the matmul ceiling measurement")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "gpu_train.json"))
    a = ap.parse_args(argv)
    d = a.dry_run
    a.tokens = a.tokens or (32 if d else 4096)
    a.rows = a.rows or (2 if d else 4)
    a.prompt = a.prompt or (8 if d else 512)
    a.reps = a.reps or (1 if d else 3)
    res = run(a)
    print(f"wrote {a.output}")
    for line in summary_lines(res):
        print(line)
    print("GPU_TRAIN " + json.dumps({k: res["phases"].get(k, {}).get("tokens_per_s") for k in ("rollout", "teacher", "train")}
                                    | {"mfu": res["phases"].get("train", {}).get("mfu")}, separators=(",", ":")))
    try:
        from megatron_eaopd.distributed import destroy

        destroy()
    except Exception:  # noqa: BLE001
        pass
    return 0 if res.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
