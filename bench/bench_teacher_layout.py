"""Teacher layout benchmark: bytes moved per iteration and teacher-phase time, same layout vs a teacher in its
own layout, signals / hidden-state payloads vs a logits payload.

    python bench/bench_teacher_layout.py [--nproc 2] [--reps 3]

Two parts, written to ``bench/results/teacher_layout.json``:

* ``computed``: Qwen3-32B teacher -> Qwen3-1.7B-Base student on 16 ranks (2 nodes x 8 GPUs, student TP=1
  DP=16; ``recipes/qwen3_1.7b_32b.yaml``'s batch: 128 rollouts of up to 1,024 + 4,096 tokens per
  iteration) for several teacher layouts: teacher weights per GPU, and per rank and iteration the bytes
  of the sequence gather, of the routed signals (topk) or hidden states (full), of what a logits payload
  would move instead (each rank's rows as full-vocabulary bf16 logits on its student shard), the host
  memory of the staged hidden states, and once per run the output-layer rows each rank receives.
  Arithmetic from the public model shapes, no device needed.
* ``measured``: tiny random models (a 4-layer teacher, hidden 256, 8 heads / 2 KV groups, vocabulary
  32,000; 8 sequences per student DP rank, different widths per DP rank) under ``torchrun`` on this
  machine (CPU, gloo): for each layout and payload, the teacher phase's wall time (median of
  ``--reps``), the bytes it moved (``Teacher.stats``, all ranks summed) and the full-mode payload held on
  the host, plus the bytes a logits payload would have moved for the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Qwen3-32B (Qwen/Qwen3-32B config.json) and Qwen3-1.7B-Base.
QWEN3_32B = dict(layers=64, hidden=5120, heads=64, kv_heads=8, head_dim=128, ffn=25600, vocab=151_936, tied=False)
QWEN3_1P7B = dict(layers=28, hidden=2048, heads=16, kv_heads=8, head_dim=128, ffn=6144, vocab=151_936, tied=True)
TOP_K = 16
#: (teacher TP, teacher PP) layouts computed for 16 ranks; (1, 1) is the student's own layout.
LAYOUTS_16 = [(1, 1), (4, 1), (8, 1), (4, 2), (8, 2)]
#: (student TP, student PP, teacher TP, teacher PP) measured on 2 processes.
LAYOUTS_2 = [(1, 1, 1, 1), (1, 1, 2, 1), (2, 1, 2, 1), (2, 1, 1, 1), (1, 1, 1, 2)]


def params(m: dict) -> int:
    """Parameters of a Qwen3-shaped model (q/k norms ignored: 2 x head_dim per layer)."""
    h, q, kv = m["hidden"], m["heads"] * m["head_dim"], m["kv_heads"] * m["head_dim"]
    layer = h * q + 2 * h * kv + q * h + 3 * h * m["ffn"] + 2 * h + 2 * m["head_dim"]
    return m["layers"] * layer + m["vocab"] * h * (1 if m["tied"] else 2) + h


def computed(world: int = 16, rows_per_iteration: int = 128, seq: int = 5120) -> dict:
    """Per-rank bytes of one iteration for each teacher layout of :data:`LAYOUTS_16` (student TP=1, PP=1)."""
    from megatron_eaopd.teacher.exchange import route_plan
    from megatron_eaopd.teacher.groups import GridLayout, TeacherGroups

    t, h, v = QWEN3_32B, QWEN3_32B["hidden"], QWEN3_32B["vocab"]
    rows = rows_per_iteration // world  # per student DP rank
    tokens = rows * seq
    signal_b = 4 + 4 + TOP_K * (8 + 4)  # target log-prob, entropy, top-k ids (int64) and log-probs (fp32)
    out = {"teacher": "Qwen3-32B", "student": "Qwen3-1.7B-Base", "world": world, "student_layout": "TP=1 PP=1 DP=16",
           "teacher_params": params(t), "student_params": params(QWEN3_1P7B), "rows_per_rank": rows,
           "tokens_per_row": seq, "tokens_per_rank": tokens, "bytes_per_token": {
               "signals_topk16": signal_b, "hidden_bf16": 2 * h, "logits_bf16": 2 * v},
           "layouts": []}
    for ttp, tpp in LAYOUTS_16:
        tdp = world // (ttp * tpp)
        per = {"teacher_tp": ttp, "teacher_pp": tpp, "teacher_dp": tdp,
               "teacher_weights_gb_per_gpu": round(params(t) * 2 / (ttp * tpp) / 1e9, 2)}
        recv_tok, recv_sig, recv_hid, recv_logits, head = [], [], [], [], []
        for rank in range(world):
            g = TeacherGroups(GridLayout(ttp, tpp, tdp), GridLayout(1, 1, world), rank, None if (ttp, tpp) == (1, 1)
                              else object(), None, None, None, None)
            plan = route_plan(g)
            replica = len(g.replica)
            recv_tok.append(0 if replica == 1 else (replica - 1) * tokens * 8)  # int64 ids from every member
            remote = plan.sources.get(rank, rank) != rank
            recv_sig.append(tokens * signal_b if remote else 0)
            recv_hid.append(tokens * 2 * h if remote else 0)
            # a logits payload: the rank's rows as bf16 logits over its (whole, TP=1) vocabulary; a last-stage
            # teacher rank holds 1/TP of the vocabulary itself
            recv_logits.append(tokens * 2 * v * (1.0 if remote else (ttp - 1) / ttp))
            head.append(v * h * 2 * (1.0 if remote else (ttp - 1) / ttp))
        per.update(
            token_gather_bytes_per_rank=max(recv_tok), signals_bytes_per_rank=max(recv_sig),
            hidden_bytes_per_rank=max(recv_hid), logits_payload_bytes_per_rank=max(recv_logits),
            hidden_host_bytes_per_rank=tokens * 2 * h, head_bytes_once_per_rank=max(head),
            head_device_bytes_per_rank=v * h * 2,
            iteration_bytes_total={"topk": sum(recv_tok) + sum(recv_sig), "full_hidden": sum(recv_tok) + sum(recv_hid),
                                   "full_logits_payload": sum(recv_tok) + sum(recv_logits)})
        out["layouts"].append(per)
    out["note"] = ("bytes are what each rank receives (the largest over ranks). At teacher PP = 1 every rank is on "
                   "the teacher's last stage, keeps its own rows' results and receives no payload; only the int64 "
                   "sequences of its replica move. At PP > 1 the first stage's ranks receive their rows' signals or "
                   "hidden states. A logits payload would move [rows, S, V] per rank instead; the hidden-state "
                   "payload moves [rows, S, H] and each student rank applies the teacher's output rows of its vocab "
                   "shard (received once) itself.")
    return out


# ------------------------------------------------------------------------------------------------
# measured (torchrun worker)
# ------------------------------------------------------------------------------------------------
def _write_models(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    for name, layers, hidden in (("teacher", 4, 256), ("student", 2, 128)):
        cfg = LlamaConfig(vocab_size=32_000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=8, num_key_value_heads=2, head_dim=hidden // 8, max_position_embeddings=1024,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(len(name))
        LlamaForCausalLM(cfg).save_pretrained(out / name)


def _held_fraction(g, student_vocab: int, teacher_vocab: int) -> float:
    """Share of this rank's student vocabulary shard that its own teacher logits cover (teacher last stage)."""
    if not g.is_last_stage:
        return 0.0
    vs, vt = student_vocab // g.student.tp, teacher_vocab // g.teacher.tp
    j, t = g.student_tp(g.rank), g.tp_rank
    return max(0, min((j + 1) * vs, (t + 1) * vt) - max(j * vs, t * vt)) / vs


def worker(models: Path, reps: int) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_eaopd.distributed import init_distributed, init_model_parallel, seed_everything
    from megatron_eaopd.loss import EOPDConfig, build_objective
    from megatron_eaopd.models.provider import build_gpt_model
    from megatron_eaopd.models.sources import resolve_model_source
    from megatron_eaopd.pipeline import split_micro_batches
    from megatron_eaopd.teacher.build import build_teacher

    init_distributed()
    torch.set_num_threads(1)
    src = resolve_model_source(str(models / "teacher"), key="teacher.hf_path", kinds=("hf_dir",))
    results = []
    for s_tp, s_pp, t_tp, t_pp in LAYOUTS_2:
        init_model_parallel(s_tp, s_pp)
        seed_everything(0)
        _, sinfo = build_gpt_model(str(models / "student"), perform_initialization=False)
        d = ps.get_data_parallel_rank()
        g = torch.Generator().manual_seed(d)
        tokens = torch.randint(0, 32_000, (8, 193 + 64 * d), generator=g)
        mbs = split_micro_batches(tokens, torch.ones(8, tokens.shape[1] - 1, dtype=torch.bool), 2)
        for mode in ("topk", "full"):
            objective = build_objective(EOPDConfig(mode=mode, top_k=TOP_K, vocab_size=32_000))
            teacher = build_teacher(src, str(src.assets), objective, tp=t_tp, pp=t_pp, params_dtype=torch.float32,
                                    student_info=sinfo)
            times = []
            for _ in range(reps):
                dist.barrier()
                t0 = time.perf_counter()
                scores = teacher.score(mbs)
                dist.barrier()
                times.append(time.perf_counter() - t0)
            logit_s = 0.0
            if mode == "full" and ps.is_pipeline_last_stage():
                t0 = time.perf_counter()
                for mb in mbs:
                    scores.for_micro_batch(mb)
                logit_s = time.perf_counter() - t0
            st = teacher.stats
            v_local = sinfo.padded_vocab_size // s_tp
            mine = sum(mb.inputs.numel() for mb in mbs) if ps.is_pipeline_last_stage() else 0
            # a logits payload for this rank's rows: fp32 over its student shard, less the part it computed itself
            held = _held_fraction(teacher.groups, sinfo.padded_vocab_size, teacher.model_chunks[0].vocab_size)
            local = [st["token_bytes_received"], st["payload_bytes_received"], st["payload_host_bytes"],
                     teacher.head_bytes_received, logit_s, st["time_forward"], st["time_exchange"],
                     mine * v_local * 4 * (1.0 - held)]
            vec = torch.tensor(local, dtype=torch.float64)
            dist.all_reduce(vec)
            peak = torch.tensor([st["payload_host_bytes"]], dtype=torch.float64)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            results.append(dict(
                layout=f"student TP={s_tp} PP={s_pp} / teacher TP={t_tp} PP={t_pp}", mode=mode,
                same_layout=teacher.groups.same_layout, teacher_phase_seconds=statistics.median(times),
                forward_seconds_sum_ranks=vec[5].item(), exchange_seconds_sum_ranks=vec[6].item(),
                token_gather_bytes=vec[0].item(), payload_bytes=vec[1].item(), logits_payload_bytes=vec[7].item(),
                hidden_host_bytes_total=vec[2].item(), hidden_host_bytes_max_rank=peak.item(),
                head_bytes_once=vec[3].item(), full_logits_seconds_sum_ranks=vec[4].item(),
                logits_bytes_per_micro_batch=2 * mbs[0].inputs.shape[1] * v_local * 4))
            del teacher, scores
    if dist.get_rank() == 0:
        print("BENCH " + json.dumps(results), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "teacher_layout.json"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(Path(a.worker), a.reps)
        return 0
    res = {"benchmark": "teacher_layout", "computed": computed()}
    with tempfile.TemporaryDirectory() as tmp:
        _write_models(Path(tmp))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        env.pop("MASTER_PORT", None)
        with socket.socket() as sock:  # a free port for the rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={a.nproc}", "--master-addr=127.0.0.1",
               f"--master-port={port}", str(Path(__file__).resolve()), "--worker", tmp, "--reps", str(a.reps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            print(proc.stdout[-3000:] + proc.stderr[-6000:], file=sys.stderr)
            return 1
        line = next(x for x in proc.stdout.splitlines() if x.startswith("BENCH "))
    res["measured"] = {"device": "cpu", "nproc": a.nproc, "threads_per_rank": 1, "reps": a.reps,
                       "teacher": "Llama 4 layers, hidden 256, 8 heads / 2 KV, vocab 32,000, fp32",
                       "rows_per_student_dp_rank": 8, "micro_batch_size": 2,
                       "widths": "193 + 64 x student DP rank tokens", "runs": json.loads(line[6:])}
    Path(a.output).write_text(json.dumps(res, indent=2) + "\n")
    for r in res["computed"]["layouts"]:
        print(f"32B->1.7B teacher TP={r['teacher_tp']} PP={r['teacher_pp']}: weights {r['teacher_weights_gb_per_gpu']} "
              f"GB/GPU, per rank per iteration: tokens {r['token_gather_bytes_per_rank'] / 1e6:.2f} MB, signals "
              f"{r['signals_bytes_per_rank'] / 1e6:.1f} MB, hidden {r['hidden_bytes_per_rank'] / 1e9:.2f} GB, "
              f"logits payload {r['logits_payload_bytes_per_rank'] / 1e9:.1f} GB")
    for r in res["measured"]["runs"]:
        print(f"{r['layout']:40s} {r['mode']:4s}: {r['teacher_phase_seconds']:.3f} s, tokens "
              f"{r['token_gather_bytes'] / 1e3:.1f} kB, payload {r['payload_bytes'] / 1e3:.1f} kB (logits payload "
              f"{r['logits_payload_bytes'] / 1e6:.1f} MB), host {r['hidden_host_bytes_max_rank'] / 1e6:.2f} MB")
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
