"""Loss benchmark: fwd+bwd time and peak memory of the EOPD loss on Megatron vocab-parallel logits.

    python bench/bench_loss.py [--tokens 4096] [--vocab 151936] [--dtypes fp32 bf16] [--tp 1 2]

Methods, all on the same logits ``[N, V_local]`` in one run (each measured in its own process, so
peak memory is that method's alone):

* ``megatron_ce``  Megatron's ``tensor_parallel.vocab_parallel_cross_entropy`` (the baseline);
* ``eopd_topk``    our ``eopd_loss`` mode="topk" (the paper's objective);
* ``eopd_full``    our ``eopd_loss`` mode="full" (exact full-vocabulary KLs; reads teacher logits too);
* ``naive_topk`` / ``naive_full``  plain autograd (log_softmax + gather + KL on full tensors).

Time: wall seconds of one forward+backward after a small warm-up. Peak memory: bytes above what the
inputs occupy (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS). TP = 2 runs over gloo
(2 processes, V/2 columns each). Results go to ``bench/results/loss.json``; the last line printed
holds the ratios against Megatron CE and against the naive versions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("megatron_ce", "eopd_topk", "eopd_full", "naive_topk", "naive_full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------
# worker: one method, one dtype, this process's TP rank
# ----------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux ``clear_refs`` value 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not permitted: the peak then includes earlier allocations
        pass


def _peak_rss_bytes() -> int:
    """Peak RSS since the last :func:`_reset_peak_rss` (VmHWM), else since process start."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _naive(student, teacher_full_or_none, sig, old, mask, cfg, tp_group):
    """Plain autograd EOPD on FULL (gathered) logits: what one writes without a vocab-parallel kernel."""
    import torch.distributed as dist

    if tp_group is not None and dist.get_world_size(tp_group) > 1:  # gather the shards (autograd-aware)
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        student = gather_from_tensor_model_parallel_region(student)
    lps = torch.log_softmax(student.float(), dim=-1)
    m = mask.float()
    if cfg.mode == "topk":
        lp = lps.gather(-1, sig.target_ids[..., None])[..., 0]
        adv = sig.target_log_probs - old
        r = torch.exp(lp - old)
        rkl = torch.maximum(-r * adv, -r.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv)
        lq = torch.log_softmax(sig.topk_log_probs, -1)
        fkl = (lq.exp() * (lq - lps.gather(-1, sig.topk_ids))).sum(-1)
    else:
        lpt = torch.log_softmax(teacher_full_or_none.float(), dim=-1)
        ps, pt = lps.exp(), lpt.exp()
        rkl = (ps * (lps - lpt)).sum(-1)
        fkl = (pt * (lpt - lps)).sum(-1)
    gate = (sig.entropy > cfg.tau).float()
    return ((rkl + cfg.alpha * gate * fkl) * m).sum(), m.sum()


def worker(method: str, dtype_name: str, n_tokens: int, vocab: int, out_file: str) -> None:
    from megatron_eaopd.distributed import init_distributed, init_model_parallel
    from megatron_eaopd.loss import EOPDConfig, eopd_loss, teacher_signals

    env = init_distributed(timeout_s=1800)
    tp = env.world_size
    init_model_parallel(tp=tp)
    from megatron.core import parallel_state, tensor_parallel

    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = DTYPES[dtype_name]
    v_local = vocab // tp
    b, s = 1, n_tokens
    g = torch.Generator().manual_seed(0)

    def make(n):
        student = (torch.randn(b, n, v_local, generator=g) * 2).to(dtype).to(dev)
        teacher = (torch.randn(b, n, v_local, generator=g) * 2).to(dtype).to(dev)
        target = torch.randint(0, vocab, (b, n), generator=g).to(dev)
        old = torch.full((b, n), -11.0, device=dev)
        mask = torch.ones(b, n, device=dev)
        return student, teacher, target, old, mask

    mode = "full" if method.endswith("full") else "topk"
    cfg = EOPDConfig(mode=mode, top_k=16, tau=0.8)

    def prepare(student, teacher, target):
        """Inputs of the timed step: Megatron CE gets its own copy (it edits its input in place); the
        teacher signals come from the teacher phase, so they are computed outside the timed region."""
        x = student.detach().clone().requires_grad_(True) if method == "megatron_ce" else student
        sig = None if method == "megatron_ce" else teacher_signals(teacher, target, cfg, group=group)
        tfull = teacher
        if method == "naive_full" and tp > 1:
            from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

            tfull = gather_from_tensor_model_parallel_region(teacher)
        return x, sig, tfull

    def step(x, sig, tfull, target, old, mask):
        if method == "megatron_ce":  # [s, b, v] layout
            loss = tensor_parallel.vocab_parallel_cross_entropy(x.transpose(0, 1), target.transpose(0, 1)).sum()
        elif method.startswith("eopd"):
            loss, _, _ = eopd_loss(x, sig, old, mask, cfg, group=group)
        else:
            loss, _ = _naive(x, tfull, sig, old, mask, cfg, group)
        loss.backward()

    # warm-up on a small slice, then one timed step at full size
    st, te, ta, ol, ma = make(64)
    st.requires_grad_(True)
    step(*prepare(st, te, ta), ta, ol, ma)
    del st, te, ta, ol, ma
    student, teacher, target, old, mask = make(n_tokens)
    student.requires_grad_(True)
    t_sig0 = time.perf_counter()
    x, sig, tfull = prepare(student, teacher, target)
    t_sig = time.perf_counter() - t_sig0
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
        _reset_peak_rss()
    t0 = time.perf_counter()
    step(x, sig, tfull, target, old, mask)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else _peak_rss_bytes()) - base
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    if rank == 0:
        Path(out_file).write_text(json.dumps(dict(
            method=method, dtype=dtype_name, tp=tp, tokens=n_tokens, vocab=vocab, seconds=elapsed,
            prepare_seconds=t_sig, peak_extra_bytes=int(peak), device=dev.type,
            input_bytes=int(student.numel() * student.element_size()),
        )))


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s_:
        s_.bind(("127.0.0.1", 0))
        return s_.getsockname()[1]


def run_one(method, dtype, tp, tokens, vocab, threads) -> dict:
    out = Path(f"/tmp/bench_loss_{os.getpid()}_{method}_{dtype}_{tp}.json")
    out.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": str(max(1, threads // tp))}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp}", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", str(Path(__file__).resolve()), "--worker", method, dtype,
           "--tokens", str(tokens), "--vocab", str(vocab), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        return dict(method=method, dtype=dtype, tp=tp, error=f"rc={proc.returncode}: {tail}")
    res = json.loads(out.read_text())
    out.unlink()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "loss.json"))
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "DTYPE"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker[0], a.worker[1], a.tokens, a.vocab, a.out)
        return

    results = []
    for tp in a.tp:
        for dtype in a.dtypes:
            for method in a.methods:
                r = run_one(method, dtype, tp, a.tokens, a.vocab, a.threads)
                results.append(r)
                if "error" in r:
                    print(f"tp={tp} {dtype:4s} {method:12s} ERROR {r['error'][-400:]}", flush=True)
                else:
                    print(f"tp={tp} {dtype:4s} {method:12s} {r['seconds']:8.3f} s  peak +{r['peak_extra_bytes'] / 2**30:6.2f} GiB"
                          f"  (inputs {r['input_bytes'] / 2**30:.2f} GiB/rank)", flush=True)
    ratios = {}
    for tp in a.tp:
        for dtype in a.dtypes:
            by = {r["method"]: r for r in results if r.get("tp") == tp and r.get("dtype") == dtype and "error" not in r}
            if "megatron_ce" not in by:
                continue
            key = f"tp{tp}_{dtype}"
            ce = by["megatron_ce"]
            row = {}
            for mode in ("topk", "full"):
                ours = by.get(f"eopd_{mode}")
                naive = by.get(f"naive_{mode}")
                if ours:
                    row[f"{mode}_time_vs_ce"] = round(ours["seconds"] / ce["seconds"], 3)
                if ours and naive:
                    row[f"{mode}_speedup_vs_naive"] = round(naive["seconds"] / ours["seconds"], 3)
                    row[f"{mode}_memory_reduction_vs_naive"] = round(
                        naive["peak_extra_bytes"] / max(1, ours["peak_extra_bytes"]), 3)
            ratios[key] = row
    payload = dict(
        benchmark="loss", tokens=a.tokens, vocab=a.vocab, device="cuda" if torch.cuda.is_available() else "cpu",
        threads=a.threads, torch=torch.__version__, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        targets=dict(topk_time_vs_ce="<= 1.3", full_time_vs_ce="<= 2.2", speedup_vs_naive=">= 2",
                     memory_reduction_vs_naive=">= 3"),
        results=results, ratios=ratios,
    )
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {a.output}")
    print("RATIOS " + json.dumps(ratios, separators=(",", ":")))


if __name__ == "__main__":
    main()
