"""HF <-> Megatron converter: round trips, logits at TP1/TP2/PP2, tied embeddings at PP2, the CLI,
error messages, and the real SmolLM2-135M-Instruct (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from models_tiny import KINDS, make_tiny  # noqa: E402

FP32_TOL = 1e-5


def _cli(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    return subprocess.run([sys.executable, str(ROOT / "tools" / "convert_hf.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def _summary(proc) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("SUMMARY ")][-1]
    return json.loads(line[len("SUMMARY "):])


def _load_st(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    if not out and (d / "pytorch_model.bin").is_file():
        out = torch.load(d / "pytorch_model.bin", weights_only=True)
    return out


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    w = tmp_path_factory.mktemp("convert")
    for k in KINDS:
        make_tiny(k, w / "hf" / k)
    return w


@pytest.fixture(scope="session")
def roundtrip(work):
    from conftest import run_torchrun

    res = run_torchrun("convert_roundtrip.py", 1, str(work), *KINDS, timeout=600)
    return {r["kind"]: r for r in res[0]}


@pytest.fixture(scope="session")
def parallel(work, roundtrip):
    from conftest import run_torchrun

    return run_torchrun("convert_parallel.py", 2, str(work), *KINDS, timeout=600)


@pytest.mark.parametrize("kind", KINDS)
def test_import_export_bit_exact(work, roundtrip, kind):
    r = roundtrip[kind]
    assert r["dtype"] == "float32"  # source dtype kept
    assert r["true_vocab"] == 300 and r["padded"] == 384
    src, dst = _load_st(work / "hf" / kind), _load_st(work / "export" / kind)
    if json.loads((work / "hf" / kind / "config.json").read_text()).get("tie_word_embeddings"):
        src.pop("lm_head.weight", None)  # .bin sources may carry the tied copy; HF safetensors store it once
        assert "lm_head.weight" not in dst
    else:
        assert "lm_head.weight" in dst
    assert set(src) == set(dst)
    for k in src:
        assert src[k].dtype == dst[k].dtype and torch.equal(src[k], dst[k]), k
    assert json.loads((work / "hf" / kind / "config.json").read_text()) == json.loads((work / "export" / kind / "config.json").read_text())
    assert (work / "export" / kind / "generation_config.json").is_file()
    assert (work / "export" / kind / "model.safetensors.index.json").is_file()  # 150KB shards -> index


@pytest.mark.parametrize("kind", KINDS)
def test_tp1_logits_match_hf(roundtrip, kind):
    r = roundtrip[kind]
    assert r["tp1_diff"] <= FP32_TOL
    for v in (r["import_verify"], r["export_verify"]):
        assert v["passed"] and v["max_abs_diff"] <= FP32_TOL and v["top1_agreement"] == 1.0


def test_exported_loads_with_transformers(work, roundtrip):
    from transformers import AutoModelForCausalLM

    from models_tiny import hf_logits

    for kind in ("qwen3_tied", "llama_rope"):
        m = AutoModelForCausalLM.from_pretrained(str(work / "export" / kind))  # no shared-tensor errors (B22)
        assert m.config.tie_word_embeddings == (kind == "qwen3_tied")
        assert torch.equal(hf_logits(work / "export" / kind), torch.load(work / f"ref_{kind}.pt"))


def test_tp2_pp2_logits_and_tied_pp2(parallel):
    recs = [r for rank in parallel.values() for r in rank if "kind" in r]
    seen = set()
    for r in recs:
        if r["diff"] is not None:
            assert r["diff"] <= FP32_TOL, r
            seen.add((r["kind"], r["tp"], r["pp"], r["source"]))
        if r["tp"] == 2:
            assert r["padded"] == 512  # resharded across a vocabulary-padding change
        if "tied_out_vs_emb" in r:  # B25
            assert r["tied_out_vs_emb"] == 0.0 and r["tied_pad_rows_zero"], r
    assert seen == {(k, tp, pp, s) for k in KINDS for tp, pp in ((2, 1), (1, 2)) for s in ("ckpt", "hf")}
    tied_checked = {r["kind"] for r in recs if "tied_out_vs_emb" in r}
    assert tied_checked == {"qwen3_tied", "qwen2_bias_bin"}


def test_collectives_over_gloo(parallel):
    """verify_logits' max-reduce and the parameter count's sum run on the collective device (CPU under gloo)
    and give every rank the same answer: at PP2 only the last stage computes logits."""
    for tp, pp in ((2, 1), (1, 2)):
        recs = [r for rank in (0, 1) for r in parallel[rank] if r.get("tp") == tp and r.get("pp") == pp and "verify" in r]
        assert len(recs) == 2, recs
        v0, v1 = recs[0]["verify"], recs[1]["verify"]
        assert v0 == v1 and v0["passed"] and v0["tokens"] == 16, (v0, v1)
        assert 0.0 < v0["max_abs_diff"] <= FP32_TOL and v0["top1_agreement"] == 1.0, v0
        counts = recs[0]["count_all"]
        assert counts == recs[1]["count_all"] and [r["count_local"] for r in recs] == counts
        assert recs[0]["count_sum"] == recs[1]["count_sum"] == sum(counts)  # model-parallel group = both ranks


def test_export_of_tp2_checkpoint_via_cli(work, parallel):
    out = work / "export_tp2"
    s = _summary(_cli("export", "--ckpt", work / "ckpt_tp2" / KINDS[0], "--out", out, "--no-progress"))
    meta = json.loads((work / "ckpt_tp2" / KINDS[0] / "iter_0000005" / "eaopd_checkpoint.json").read_text())
    assert meta["saved_with"]["tp"] == 2 and meta["iteration"] == 5 and meta["padded_vocab_size"] == 512
    assert s["dtype"] == "float32"
    src, dst = _load_st(work / "hf" / KINDS[0]), _load_st(out)
    assert set(src) == set(dst) and all(torch.equal(src[k], dst[k]) for k in src)


def test_export_bf16_and_atomic_layout(work, roundtrip, tmp_path):
    from megatron_eaopd.checkpoint import read_checkpoint_metadata

    meta = read_checkpoint_metadata(work / "ckpt" / "qwen3_untied")
    assert meta["dtype"] == "float32" and meta["true_vocab_size"] == 300 and meta["architecture"] == "Qwen3ForCausalLM"
    assert (Path(meta["hf_assets"]) / "config.json").is_file()
    root = work / "ckpt" / "qwen3_untied"
    assert (root / "latest").read_text().strip() == "iter_0000000"
    assert not list(root.glob(".*tmp"))  # no half-written folders left behind
    s = _summary(_cli("export", "--ckpt", root, "--out", tmp_path / "bf16", "--dtype", "bf16", "--verify", "--no-progress"))
    assert s["verify"]["passed"]
    st = _load_st(tmp_path / "bf16")
    assert all(t.dtype == torch.bfloat16 for t in st.values())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


# ------------------------------------------------------------------ errors


def test_cli_errors(work, tmp_path):
    p = _cli("export", "--ckpt", work / "hf" / "qwen3_tied", "--out", tmp_path / "x")
    assert p.returncode == 2 and "Hugging Face model folder, not a Megatron checkpoint" in p.stderr and "convert_hf.py import" in p.stderr
    fake = tmp_path / "ckpt"
    (fake / "iter_0000003").mkdir(parents=True)
    (fake / "latest").write_text("iter_0000003\n")
    p = _cli("import", "--hf", fake, "--out", tmp_path / "y")
    assert p.returncode == 2 and "is a Megatron checkpoint" in p.stderr and "convert_hf.py export" in p.stderr
    p = _cli("import", "--hf", work / "hf" / "qwen3_tied", "--out", tmp_path / "z", "--tp", "2")
    assert p.returncode == 2 and "needs a multiple of 2 processes but this run has 1" in p.stderr


def test_error_messages(work, tmp_path):
    from megatron_eaopd.checkpoint import resolve_checkpoint
    from megatron_eaopd.models.convert import HFTensorReader
    from megatron_eaopd.models.hf import hf_to_gpt_args, inspect_hf_dir, parse_dtype
    from megatron_eaopd.models.mapping import MappingSpec, to_megatron

    # missing shard
    d = tmp_path / "partial"
    shutil.copytree(work / "hf" / "qwen3_tied", d)
    (d / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 5 weight shards .* missing: model-00002-of-00005.safetensors"):
        inspect_hf_dir(d)
    # untied model whose lm_head is absent (B23)
    d = tmp_path / "nohead"
    shutil.copytree(work / "hf" / "qwen3_untied", d)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "model.safetensors"))
    del sd["lm_head.weight"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    spec = MappingSpec.from_args(hf_to_gpt_args(d), 384)
    with pytest.raises(KeyError, match="'lm_head.weight' is missing"):
        to_megatron("output_layer.weight", HFTensorReader(d).get, spec)
    # shape mismatch: config says 4 KV heads, weights have 2
    d = tmp_path / "shape"
    shutil.copytree(work / "hf" / "qwen3_untied", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_key_value_heads"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    spec = MappingSpec.from_args(hf_to_gpt_args(d), 384)
    with pytest.raises(ValueError, match=r"shape mismatch for model.layers.0.self_attn.k_proj.weight: checkpoint has \(32, 64\), config.json implies \(64, 64\)"):
        to_megatron("decoder.layers.0.self_attention.linear_qkv.weight", HFTensorReader(d).get, spec)
    # unsupported architecture
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(NotImplementedError, match=r"unsupported architecture \['GPT2LMHeadModel'\]; supported: Qwen3ForCausalLM, Qwen2ForCausalLM, LlamaForCausalLM"):
        hf_to_gpt_args(d)
    # no weights / not a checkpoint / foreign checkpoint / bad dtype
    with pytest.raises(FileNotFoundError, match="no model weights"):
        inspect_hf_dir(d)
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        resolve_checkpoint(tmp_path / "shape" / "..")
    foreign = tmp_path / "mlm"
    foreign.mkdir()
    (foreign / "latest_checkpointed_iteration.txt").write_text("10")
    with pytest.raises(FileNotFoundError, match="from another tool"):
        resolve_checkpoint(foreign)
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; use one of bf16, fp16, fp32"):
        parse_dtype("fp8")


# ------------------------------------------------------------------ real model (slow)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    from megatron_eaopd.models.gguf import default_cache_dir, prepare_smollm2

    hf = prepare_smollm2(default_cache_dir())
    ckpt = tmp_path_factory.mktemp("smol") / "ckpt"
    s = _summary(_cli("import", "--hf", hf, "--out", ckpt, "--verify", "--no-progress", "--atol", "1e-3", timeout=600))
    return hf, ckpt, s


@pytest.mark.slow
def test_smollm2_convert_verify_and_greedy(smollm2, torchrun):
    hf, ckpt, s = smollm2
    assert s["dtype"] == "float32" and s["verify"]["passed"] and s["verify"]["top1_agreement"] == 1.0
    assert s["verify"]["max_abs_diff"] < 1e-3, s["verify"]
    meta = json.loads((ckpt / "iter_0000000" / "eaopd_checkpoint.json").read_text())
    assert meta["true_vocab_size"] == 49152 and meta["tied_embeddings"] and meta["eos_token_ids"][0] == 2
    assert (ckpt / "iter_0000000" / "hf_assets" / "tokenizer.json").is_file()
    res = torchrun("models_greedy.py", 1, str(hf), str(ckpt), "16")[0][0]
    assert res["megatron_tokens"] == res["hf_tokens"], res
    assert len(res["hf_tokens"]) == 16


def test_converter_refuses_destructive_targets(tmp_path):
    """Review finding: export --out must never delete unrelated data or the checkpoint; import must not
    move a training run's 'latest' back to iteration 0."""
    from megatron_eaopd.models.targets import check_export_target, check_import_target

    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000004").mkdir(parents=True)
    (ckpt / "iter_0000004" / "eaopd_checkpoint.json").write_text(json.dumps({"kind": "training"}))
    (ckpt / "latest").write_text("iter_0000004\n")
    home = tmp_path / "home"
    home.mkdir()
    (home / "important.txt").write_text("precious")
    with pytest.raises(ValueError, match="is \\(or contains\\) the checkpoint being exported"):
        check_export_target(ckpt, ckpt)
    with pytest.raises(ValueError, match="is \\(or contains\\) the checkpoint being exported"):
        check_export_target(ckpt / "iter_0000004", ckpt)
    with pytest.raises(ValueError, match="non-empty folder that this exporter did not write"):
        check_export_target(ckpt, home)
    with pytest.raises(ValueError, match="holds a Megatron checkpoint"):
        check_export_target(tmp_path / "elsewhere", ckpt)
    prev = tmp_path / "prev_export"
    prev.mkdir()
    (prev / "config.json").write_text("{}")
    (prev / "model.safetensors").write_text("")
    with pytest.raises(ValueError, match="did not write \\(no .eaopd_export.json"):  # a downloaded model looks the same
        check_export_target(ckpt, prev)
    (prev / ".eaopd_export.json").write_text("{}")
    check_export_target(ckpt, prev)  # re-export over a previous export (it carries the marker) is fine
    check_export_target(ckpt, tmp_path / "new")  # as is a new folder
    with pytest.raises(ValueError, match="holds training checkpoints \\(iter_0000004\\)"):
        check_import_target(ckpt)
    check_import_target(tmp_path / "fresh")
    assert (home / "important.txt").read_text() == "precious"


# ------------------------------------------------------------------ review: data safety, argument checks


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny model imported through the CLI: (hf folder, checkpoint root)."""
    w = tmp_path_factory.mktemp("tinyckpt")
    hf = make_tiny("qwen3_tied", w / "hf")
    _summary(_cli("import", "--hf", hf, "--out", w / "ckpt", "--no-progress"))
    return hf, w / "ckpt"


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


def _bad_input(p, needle: str) -> None:
    """Exit 2, one error line naming the problem, no traceback."""
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("[convert_hf] error:")]
    assert len(lines) == 1 and needle in lines[0], p.stderr[-3000:]


def test_export_replaces_only_its_own_earlier_exports(tiny_ckpt, tmp_path):
    """Review finding 1+2: export deleted any folder with config.json + safetensors (a downloaded base model
    with its README and subfolders) and any sibling '<out>.tmp'."""
    hf, ckpt = tiny_ckpt
    dl = tmp_path / "Qwen3-4B-Base"
    shutil.copytree(hf, dl)
    (dl / "README.md").write_text("model card")
    (dl / "original").mkdir()
    (dl / "original" / "params.json").write_text("{}")
    before = _tree(dl)
    p = _cli("export", "--ckpt", ckpt, "--out", dl, "--no-progress")
    _bad_input(p, "did not write (no .eaopd_export.json")
    assert f"--out {dl}-export" in p.stderr and f"remove {dl} yourself" in p.stderr
    assert _tree(dl) == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["Qwen3-4B-Base"]  # nothing half-written

    out = tmp_path / "exp"
    (tmp_path / "exp.tmp").mkdir()
    (tmp_path / "exp.tmp" / "keep.txt").write_text("someone else's")
    _summary(_cli("export", "--ckpt", ckpt, "--out", out, "--max-shard-size", "150KB", "--no-progress"))
    assert (tmp_path / "exp.tmp" / "keep.txt").read_text() == "someone else's"
    marker = json.loads((out / ".eaopd_export.json").read_text())
    assert marker["checkpoint"] == str(ckpt.resolve()) and marker["iteration"] == 0
    assert (out / "model.safetensors.index.json").is_file()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["Qwen3-4B-Base", "exp", "exp.tmp"]
    # an earlier export (it carries the marker) is replaced as a whole: one shard now, no stale index
    _summary(_cli("export", "--ckpt", ckpt, "--out", out, "--no-progress"))
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert (out / ".eaopd_export.json").is_file()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["Qwen3-4B-Base", "exp", "exp.tmp"]
    assert (tmp_path / "exp.tmp" / "keep.txt").read_text() == "someone else's"


def test_failed_export_leaves_nothing(tiny_ckpt, tmp_path):
    """Review finding 2: a failure after the temp folder exists removes it (and the folders this run created)."""
    _, ckpt = tiny_ckpt
    code = ("import sys\nimport megatron_eaopd.models.convert as c\n"
            "def boom(*a, **k):\n    raise RuntimeError('boom')\n"
            "c.copy_hf_assets = boom\n"
            "try:\n    c.export_hf(sys.argv[1], sys.argv[2], progress=False)\nexcept RuntimeError as e:\n    print('RAISED', e)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    env.pop("MASTER_PORT", None)
    p = subprocess.run([sys.executable, "-c", code, str(ckpt), str(tmp_path / "a" / "b" / "exp")], capture_output=True,
                       text=True, env=env, timeout=300, cwd=tmp_path)
    assert "RAISED boom" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


def test_staging_folders_of_killed_exports_are_removed(tmp_path):
    """A SIGKILLed export cannot clean up: the next export beside the same --out removes staging folders whose
    owner process on this host is gone, and only names the others (a live owner, another host, no owner file)."""
    import socket

    from megatron_eaopd.models.staging import OWNER_FILE, make_staging_dir, remove_stale_staging, replace_folder

    out = tmp_path / "hf"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = make_staging_dir(out)
    (stale / "model-00001.safetensors").write_text("partial")
    (stale / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    live = make_staging_dir(out)  # this process: alive
    remote = make_staging_dir(out)
    (remote / OWNER_FILE).write_text(json.dumps({"host": "another-node", "pid": 1}))
    moved_aside = tmp_path / ".hf.old-abc"  # a previous export a killed run moved aside: the user's to judge
    moved_aside.mkdir()
    unrelated = tmp_path / ".hf.tmp"
    unrelated.mkdir()
    assert remove_stale_staging(out) == sorted([live, remote]) + [moved_aside]
    assert not stale.exists() and unrelated.exists()
    (live / "config.json").write_text("{}")
    replace_folder(live, out)
    assert sorted(x.name for x in out.iterdir()) == ["config.json"]  # the owner file does not travel


def test_failed_verify_leaves_no_checkpoint_and_keeps_the_previous_export(tiny_ckpt, tmp_path):
    """A conversion that fails --verify must not look complete (slurm/convert.sh would skip it and training start
    on it): import removes what it wrote; export checks before replacing --out, so an earlier export stays."""
    hf, ckpt = tiny_ckpt
    prev = tmp_path / "exp"
    code = ("import sys\nimport megatron_eaopd.models.convert as c\n"
            "c.export_hf(sys.argv[1], sys.argv[2], progress=False)\n"
            "c.verify_logits = lambda *a, **k: {'passed': False, 'max_abs_diff': 9.0, 'top1_agreement': 0.5}\n"
            "for f, kw in ((c.export_hf, dict(ckpt=sys.argv[1], out=sys.argv[2])), "
            "(c.import_hf, dict(hf_dir=sys.argv[3], out=sys.argv[4]))):\n"
            "    try:\n        f(**kw, verify=True, progress=False)\n    except RuntimeError as e:\n"
            "        print('RAISED', e)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    env.pop("MASTER_PORT", None)
    p = subprocess.run([sys.executable, "-c", code, str(ckpt), str(prev), str(hf), str(tmp_path / "m" / "imp")],
                       capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    raised = [ln for ln in p.stdout.splitlines() if ln.startswith("RAISED verification failed")]
    assert len(raised) == 2 and "was removed" in raised[1], p.stdout[-2000:] + p.stderr[-3000:]
    marker = json.loads((prev / ".eaopd_export.json").read_text())
    assert marker["converted_by"] == "megatron_eaopd.export_hf" and (prev / "config.json").is_file()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["exp"]  # no staging folder, no import folder


def test_parse_size_rejects_non_positive_and_non_finite():
    from megatron_eaopd.models.convert import parse_size

    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(1000) == 1000
    for bad, needle in (("infGB", "not a finite size"), ("nanMB", "not a finite size"), ("1e400GB", "not a finite size"),
                        ("0", "must be a positive"), ("-5GB", "must be a positive"), ("0.5B", "must be a positive"),
                        (0, "must be a positive"), ("2XB", "cannot parse"), ("", "cannot parse")):
        with pytest.raises(ValueError, match=needle) as e:
            parse_size(bad)
        assert "2GB" in str(e.value)
    with pytest.raises(ValueError, match="--max-shard-size '-5GB' must be a positive"):
        parse_size("-5GB", "--max-shard-size")


def test_cli_bad_arguments_exit_2_before_loading(tiny_ckpt, tmp_path):
    """Review finding 3: tracebacks (FileExistsError after a whole conversion, ZeroDivisionError, OverflowError),
    checks after loading the model, temp folders left behind, negative / zero shard sizes accepted."""
    hf, ckpt = tiny_ckpt
    f = tmp_path / "afile"
    f.write_text("data")
    _bad_input(_cli("import", "--hf", hf, "--out", f, "--no-progress"), f"--out {f} is a file")
    _bad_input(_cli("import", "--hf", hf, "--out", f / "sub", "--no-progress"), f"is under {f}, which is a file")
    assert f.read_text() == "data"
    _bad_input(_cli("import", "--hf", hf, "--out", tmp_path / "m", "--tp", "0"), "--tp and --pp must be >= 1, got --tp 0 --pp 1")
    for size, needle in (("infGB", "not a finite size"), ("2XB", "cannot parse --max-shard-size '2XB'"),
                         ("0", "must be a positive"), ("-5GB", "must be a positive")):
        _bad_input(_cli("export", "--ckpt", ckpt, "--out", tmp_path / "e", f"--max-shard-size={size}"), needle)
    assert [x.name for x in tmp_path.iterdir()] == ["afile"]  # no checkpoint, export or temp folder


def test_import_refuses_source_and_foreign_folders(tiny_ckpt, tmp_path):
    """Review finding 4: import into the HF source folder (or any folder holding other data) mixed the files."""
    from megatron_eaopd.models.targets import check_import_target

    hf, _ = tiny_ckpt
    src = tmp_path / "src"
    shutil.copytree(hf, src)
    before = _tree(src)
    _bad_input(_cli("import", "--hf", src, "--out", src, "--no-progress"), f"--out {src} is the Hugging Face source folder")
    assert _tree(src) == before
    other = tmp_path / "other"
    (other / "notes").mkdir(parents=True)
    (other / "README.md").write_text("x")
    _bad_input(_cli("import", "--hf", src, "--out", other, "--no-progress"), "not a checkpoint written by this project")
    assert sorted(x.name for x in other.iterdir()) == ["README.md", "notes"]
    with pytest.raises(ValueError, match="inside the Hugging Face source folder"):
        check_import_target(src / "mcore", src)
    with pytest.raises(ValueError, match="contains the Hugging Face source folder"):
        check_import_target(tmp_path, src)
    crashed = tmp_path / "crashed"  # a crashed import's leftovers: converted again (the save clears them)
    (crashed / ".iter_0000000.tmp").mkdir(parents=True)
    check_import_target(crashed, src)
    check_import_target(tmp_path / "new", src)


@pytest.mark.parametrize("args,needle", [
    (["import", "--hf", "HF", "--out", "OUT", "--atol", "-1"],
     "--atol must be a finite number >= 0 (the largest |logit diff| --verify accepts), got -1"),
    (["export", "--ckpt", "HF", "--out", "OUT", "--verify", "--atol", "nan"], "--atol must be a finite number >= 0"),
    (["import", "--hf", "HF", "--out", "OUT", "--tp", "0"], "--tp and --pp must be >= 1, got --tp 0 --pp 1"),
    (["export", "--ckpt", "HF", "--out", "OUT", "--iteration", "-3"], "--iteration must be >= 0, got -3"),
])
def test_cli_rejects_impossible_numbers_first(tmp_path, capsys, args, needle):
    from megatron_eaopd.cli.convert import main

    # the path checks would fail too (HF does not exist): the number is named first, nothing is written
    argv = [str(tmp_path / a) if a in ("HF", "OUT") else a for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"[convert_hf] error: {needle}") and err.count("\n") == 1, err
    assert not (tmp_path / "OUT").exists()


def test_cli_failure_after_the_checks_is_exit_1_not_bad_input(tiny_ckpt, tmp_path):
    """Exit 2 means "bad input, found before anything was loaded"; a checkpoint whose weight files vanish
    after the checks passed (here: missing from the start, which only loading finds) is exit 1, and the
    export leaves nothing behind."""
    hf, ckpt = tiny_ckpt
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt, broken)
    shards = list(broken.rglob("*.distcp"))
    assert shards, sorted(p.name for p in broken.rglob("*"))
    for f in shards:
        f.unlink()
    out = tmp_path / "hf_out"
    p = _cli("export", "--ckpt", broken, "--out", out, "--no-progress")
    assert p.returncode == 1, (p.returncode, p.stderr[-3000:])
    # torch's CheckpointException is a BaseException with every rank's traceback: one line names the cause
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("[convert_hf] error:")]
    assert len(lines) == 1 and f"cannot read checkpoint {broken}/iter_0000000: FileNotFoundError" in lines[0], lines
    assert shards[0].name in lines[0]
    assert not out.exists() and sorted(x.name for x in tmp_path.iterdir()) == ["ckpt"]  # no staging folder left


def test_export_refuses_a_symlinked_out_before_loading(tmp_path):
    """The export is renamed into place at the end, which would fail on (or replace) a symbolic link: it is
    refused by the checks before anything is loaded, naming the folder to give instead."""
    from megatron_eaopd.models.targets import check_export_target

    real = tmp_path / "exports" / "v3"
    real.mkdir(parents=True)
    (real / ".eaopd_export.json").write_text("{}")
    (real / "config.json").write_text("{}")
    link = tmp_path / "latest"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(ValueError, match=rf"--out {link} is a symbolic link \(to {real}\); give the folder itself"):
        check_export_target(tmp_path / "ckpt", link)
    check_export_target(tmp_path / "ckpt", real)  # the folder itself: an earlier export, replaced as a whole
    assert sorted(p.name for p in real.iterdir()) == [".eaopd_export.json", "config.json"]


def test_cli_os_errors_in_the_checks_are_one_line(tiny_ckpt, tmp_path, capsys):
    """An OSError while checking (a name too long for the file system, a cache path under a file) is one error
    line, not a traceback: exit 2 for the import/export checks, 1 for prepare-smollm2."""
    from megatron_eaopd.cli.convert import main

    hf, ckpt = tiny_ckpt
    long_out = tmp_path / ("a" * 300)
    for argv in (["import", "--hf", str(hf), "--out", str(long_out)], ["export", "--ckpt", str(ckpt), "--out", str(long_out)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("[convert_hf] error: ") and "File name too long" in err and err.count("\n") == 1, err
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["prepare-smollm2", "--cache", str(afile / "sub")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("[convert_hf] error: ") and err.count("\n") == 1, err
    assert not os.path.exists(long_out) and afile.read_text() == "x"  # os.path.exists: False on ENAMETOOLONG
