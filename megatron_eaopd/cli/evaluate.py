"""Evaluate a model (or replayed outputs) on math benchmarks: Avg@n / Pass@k with math-verify.

``python tools/evaluate.py ...`` and the console script ``eaopd-evaluate`` run :func:`main`.

Defaults are the paper's protocol (docs/method.md, "Evaluation protocol"): n=8 samples, temperature 1.0, top-p 0.8,
8192 new tokens, the six benchmarks MATH500 AMC23 Minerva OlympiadBench AIME24 AIME25.

Examples::

    python tools/evaluate.py --model ckpt/ --data-dir data/ --out eval/run1
    python tools/evaluate.py --model hf_model/ --data-dir data/ --benchmarks MATH500 AIME24 --out eval/run2
    torchrun --nproc-per-node 4 tools/evaluate.py --model ckpt/ --tp 2 --data-dir data/ --out eval/run3
    python tools/evaluate.py --replay outputs.jsonl --data-dir data/ --benchmarks MATH500 --out eval/r

``--model`` is a Megatron checkpoint (saved at any TP/PP; resharded to ``--tp/--pp`` on load), a
Hugging Face folder (converted on the fly) or a hub id in the local Hugging Face cache. Under
torchrun, ``tp*pp`` must divide the number of processes; the data-parallel replicas split the
problems and rank 0 gathers, grades and writes.

Prompt format: by default the one the checkpoint was trained with (chat template or not, suffix,
separator, template options: ``"prompt_format"`` in the checkpoint's ``eaopd_checkpoint.json``).
A Hugging Face folder or a converted checkpoint records none: then plain text with the paper's
suffix and no chat template, and a one-line notice says so. ``--chat-template`` /
``--no-chat-template`` and ``--prompt-suffix`` override it.

Writes ``samples.jsonl``, ``summary.json`` and ``table.md`` under ``--out``; rerunning the same
command resumes (problems already complete in ``samples.jsonl`` are skipped). ``--model`` is resolved
once (a checkpoint root through its ``latest``) and ``run_config.json`` records what it resolved to
(folder, iteration, a fingerprint of its metadata and weight files): a folder holding samples of
another checkpoint, e.g. after ``latest`` moved, or made with other sampling settings is refused.
Arguments and benchmark files are checked before the model loads or anything is written; errors
print one ``error: ...`` line and exit 2. Temperature 0 (greedy) is not supported by the engines.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
from pathlib import Path

from megatron_eaopd.evaluation.runner import (
    STANDARD_BENCHMARKS,
    EvalConfig,
    ReplayGenerator,
    check_resume,
    load_benchmark,
    resolve_benchmarks,
    run_evaluation,
)
from megatron_eaopd.prompts import PromptFormat


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 or negative counts are always a mistake here)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def check_args(args: argparse.Namespace) -> None:
    """Reject impossible numeric settings before anything is loaded or written.

    Raises: ValueError with one line naming the option, the value and the fix.
    """
    def finite(name: str, v: float | None) -> None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v}")

    for name in ("temperature", "top_p", "kv_buffer_gb", "grading_timeout"):
        finite("--" + name.replace("_", "-"), getattr(args, name))
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature:g}: greedy decoding (temperature 0) is not "
                         f"supported by the rollout engines; pass a positive --temperature (the paper's protocol: 1.0)")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p:g} (1.0 = no nucleus filter)")
    if args.max_batch_size is not None and args.max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be >= 1 sequences, got {args.max_batch_size} "
                         f"(omit it to batch all of a --batch-problems call)")
    if args.kv_buffer_gb <= 0:
        raise ValueError(f"--kv-buffer-gb must be > 0 GiB, got {args.kv_buffer_gb:g}")
    if args.grading_timeout <= 0:
        raise ValueError(f"--grading-timeout must be > 0 seconds per sample, got {args.grading_timeout:g}")


def _replay_identity(path: str) -> dict:
    """What a ``--replay`` file is (resolved path, size, mtime), compared on resume like a model's identity."""
    p = Path(path).resolve()
    st = p.stat()
    return {"kind": "replay", "path": str(p), "iteration": None, "fingerprint": f"{st.st_size}:{st.st_mtime_ns}"}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (paper defaults)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Megatron checkpoint (root or iter_* folder), Hugging Face model folder, or a "
                                     "hub id in the local Hugging Face cache")
    src.add_argument("--replay", help="grade existing outputs from a JSONL (prompt|problem, text[, sample, "
                                      "num_tokens, truncated]) instead of generating")
    p.add_argument("--data-dir", help="folder with math500.jsonl amc23.jsonl minerva_math.jsonl "
                                      "olympiadbench.jsonl aime24.jsonl aime25.jsonl")
    p.add_argument("--benchmarks", nargs="+", default=list(STANDARD_BENCHMARKS),
                   help=f"standard names ({', '.join(STANDARD_BENCHMARKS)}, or 'all') or JSONL paths")
    p.add_argument("--n", "--num-samples", dest="n", type=_positive_int, default=8,
                   help="samples per problem (under torchrun spell it --num-samples: torchrun rejects --n as an "
                        "ambiguous prefix of its own options)")
    p.add_argument("--k", type=int, nargs="+", default=None, help="pass@k values (default: n)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--max-new-tokens", type=_positive_int, default=8192)
    p.add_argument("--tp", type=_positive_int, default=1, help="tensor-parallel size for generation")
    p.add_argument("--pp", type=_positive_int, default=1, help="pipeline-parallel size for generation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (resumable)")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N problems of each benchmark")
    p.add_argument("--batch-problems", type=_positive_int, default=64, help="problems per generate() call")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap prompts in the tokenizer's chat template (thinking disabled); default: as the "
                        "checkpoint was trained (no chat template when the model records no training format)")
    p.add_argument("--prompt-suffix", default=None,
                   help="instruction appended to each problem ('' for none); default: the checkpoint's training "
                        "format, else the paper's")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="parameter dtype (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--engine", choices=["auto", "static", "dynamic"], default="auto",
                   help="inference engine at PP=1 (auto: dynamic on GPU, static on CPU); PP>1 recomputes")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="sequences (problems x n) per engine batch (default: all of a --batch-problems call); the "
                        "static engine preallocates a KV cache of this many x (prompt + max new tokens) positions, "
                        "so set it on CPU with long generations")
    p.add_argument("--kv-buffer-gb", type=float, default=20.0, help="dynamic engine KV-cache buffer (GPU)")
    p.add_argument("--grading-workers", type=_positive_int, default=2)
    p.add_argument("--grading-timeout", type=float, default=10.0, help="seconds per sample")
    p.add_argument("--no-progress", action="store_true")
    return p


def build_model_generator(args: argparse.Namespace, chat_template: bool = False):
    """Set up TP/PP, load ``--model`` and build the model-backed Generator (collective: every rank).

    Args: args: parsed CLI arguments (model, tp, pp, seed, dtype, engine, max_batch_size,
        max_new_tokens, temperature, top_p, kv_buffer_gb); chat_template: prompts use the chat template
        (its end-of-turn token then stops a response too).
    Returns: ``(generator, tokenizer)``: a ``DistributedGenerator`` (rank 0 leads, other ranks
        ``serve()``) and the HF tokenizer built from the checkpoint's ``hf_assets`` (or the HF folder).
    Raises: ValueError: tp*pp does not divide the world size (names the torchrun fix);
        FileNotFoundError: ``--model`` is not a checkpoint / HF folder (names the path and the fix);
        RuntimeError: megatron-core missing or the checkpoint does not match its assets.
    Source: megatron_eaopd.evaluation.model_generator.
    """
    try:
        from megatron_eaopd.evaluation.model_generator import (
            DistributedGenerator,
            load_eval_model,
            local_generator,
            resolve_model_source,
            setup_eval_parallel,
        )
    except ImportError as e:
        raise RuntimeError(f"model generation needs megatron-core ({e}); grade existing outputs with --replay FILE") from e
    import torch

    resolve_model_source(args.model)  # fail fast, before process groups, with a clear message
    setup_eval_parallel(args.tp, args.pp, seed=args.seed)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:  # every rank loads the folder rank 0 resolved
        box = [args.model]
        dist.broadcast_object_list(box, src=0)
        args.model = box[0]
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    lm = load_eval_model(args.model, params_dtype=dtype, progress=not args.no_progress)
    local = local_generator(lm.chunks, lm.tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, stop_ids=lm.stop_ids(chat_template), engine=args.engine,
                            max_batch_size=args.max_batch_size, kv_buffer_gb=args.kv_buffer_gb)
    return DistributedGenerator(local), lm.tokenizer


def resolve_prompt_format(model: str | None, chat_template: bool | None = None,
                          suffix: str | None = None) -> tuple[PromptFormat, str]:
    """The prompt format for ``--model``: the checkpoint's training format, then the explicit flags.

    Args: model: the ``--model`` value; chat_template: ``--chat-template`` (True) /
        ``--no-chat-template`` (False) / not given (None); suffix: ``--prompt-suffix`` ('' = none).
    Returns: ``(format, notice)``: the notice is one line saying where the format came from.
    Raises: FileNotFoundError for a bad ``--model`` (see ``model_generator.resolve_model_source``);
        ValueError for a malformed stored format.
    """
    from megatron_eaopd.evaluation.model_generator import training_prompt_format

    trained = training_prompt_format(model) if model else None
    fmt = trained or PromptFormat()
    if chat_template is not None:
        fmt = dataclasses.replace(fmt, chat_template=bool(chat_template))
    if suffix is not None:
        fmt = dataclasses.replace(fmt, suffix=suffix or None)
    shown = (f"chat template {'on ' + str(fmt.chat_template_kwargs) if fmt.chat_template else 'off'}, "
             f"suffix {fmt.suffix!r}")
    flags = chat_template is not None or suffix is not None
    if trained is not None:
        notice = f"prompt format of the checkpoint's training run: {shown}" + (" (flags override parts)" if flags else "")
    elif flags:
        notice = f"prompt format from the flags: {shown}"
    else:
        notice = (f"prompt format: {model} records no training prompt format (a Hugging Face folder or a converted "
                  f"checkpoint), so {shown}; pass --chat-template for a chat model")
    return fmt, notice


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (every rank under torchrun); returns the exit code (2 on a usage/data error).

    Rank 0 runs the benchmark pipeline (resume, grading, outputs, table); the other ranks serve its
    generation calls. Errors are printed as ``error: ...`` on stderr.
    """
    args = build_parser().parse_args(argv)
    rank0 = _rank() == 0
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING, format="%(levelname)s %(message)s")
    gen = None
    try:
        check_args(args)
        benchmarks = resolve_benchmarks(args.benchmarks, args.data_dir)
        cfg = EvalConfig(n=args.n, ks=args.k, temperature=args.temperature, top_p=args.top_p,
                         max_new_tokens=args.max_new_tokens, seed=args.seed, limit=args.limit,
                         batch_problems=args.batch_problems, grading_workers=args.grading_workers,
                         grading_timeout=args.grading_timeout, progress=not args.no_progress and rank0)
        cfg.resolved_ks()
        for _, path in benchmarks:  # a broken benchmark fails now: before the model loads or --out is written
            load_benchmark(path, cfg.fields, cfg.limit)
        model_name = args.model or args.replay
        if args.replay:
            if args.chat_template is not None or args.prompt_suffix is not None:
                raise ValueError("--chat-template/--no-chat-template/--prompt-suffix apply to --model generation only "
                                 "(replayed outputs keep their prompts)")
            gen = ReplayGenerator(args.replay)
            identity = _replay_identity(args.replay)
        else:
            from megatron_eaopd.models.sources import resolve_model_source, source_identity

            # resolve once (a checkpoint root's 'latest' moves while training saves): load exactly this folder,
            # and record what it is so that a resume never mixes samples of two checkpoints
            src = resolve_model_source(args.model, key="--model", need="weights")
            identity = source_identity(src)
            args.model = str(src.path)
            if rank0 and identity["path"] != str(Path(model_name).resolve()):
                print(f"[evaluate] --model {model_name} resolves to {identity['path']}", file=sys.stderr)
            fmt, notice = resolve_prompt_format(args.model, args.chat_template, args.prompt_suffix)
            if rank0:
                print(f"[evaluate] {notice}", file=sys.stderr)
            cfg.chat_template, cfg.suffix, cfg.separator = fmt.chat_template, fmt.suffix, fmt.separator
            cfg.chat_template_kwargs = dict(fmt.chat_template_kwargs)
            check_resume(args.out, cfg, model_name, identity)  # a refused resume fails now, before the model loads
            gen, cfg.tokenizer = build_model_generator(args, fmt.chat_template)
            if not rank0:
                gen.serve()
                return 0
        try:
            summary = run_evaluation(gen, benchmarks, args.out, cfg, model_name=model_name, model_identity=identity)
        finally:
            if hasattr(gen, "close"):
                gen.close()
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if gen is not None and not args.replay:
            from megatron_eaopd.distributed import destroy

            destroy()
    print((Path(args.out) / "table.md").read_text())
    print(f"mean Avg@{cfg.n} {summary['mean']['avg']:.2f}; wrote {args.out}/summary.json")
    return 0
