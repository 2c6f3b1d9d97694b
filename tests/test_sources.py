"""Model sources (megatron_eaopd/models/sources.py): Megatron checkpoints, HF folders, hub ids from a
local Hugging Face cache laid out exactly as huggingface_hub writes it (models--org--name/refs,
snapshots), run directories, and the error messages a user acts on. Nothing touches the network:
HF_ENDPOINT points at a closed local port, so any attempted request would fail differently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_eaopd.models.sources import (
    ModelSourceError,
    download_command,
    hub_cache_dir,
    looks_like_hub_id,
    resolve_model_source,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # closed port: a request would raise a connection error
    monkeypatch.chdir(tmp_path)
    return cache


def cache_repo(cache: Path, repo: str, files: dict[str, str], commit: str = COMMIT, ref: str = "main") -> Path:
    """Write ``repo`` into a hub cache the way huggingface_hub does (blobs are plain files here)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (snap / name).write_text(text)
    return snap


def hf_folder(d: Path, weights: bool = True) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (d / "tokenizer.json").write_text("{}")
    if weights:
        (d / "model.safetensors").write_bytes(b"\0" * 16)
    return d


def megatron_ckpt(root: Path, iteration: int = 3) -> Path:
    it = root / f"iter_{iteration:07d}"
    (it / "hf_assets").mkdir(parents=True)
    (it / "eaopd_checkpoint.json").write_text(json.dumps({"iteration": iteration}))
    (it / "hf_assets" / "config.json").write_text("{}")
    (it / "hf_assets" / "tokenizer.json").write_text("{}")
    (root / "latest").write_text(it.name + "\n")
    return it


def test_hub_cache_dir_follows_huggingface_hub_order(monkeypatch, tmp_path):
    for v in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", "/x")
    assert hub_cache_dir() == Path("/x/huggingface/hub")
    monkeypatch.setenv("HF_HOME", "/h")
    assert hub_cache_dir() == Path("/h/hub")
    monkeypatch.setenv("HF_HUB_CACHE", "/c")
    assert hub_cache_dir() == Path("/c")


def test_hub_id_shape():
    assert looks_like_hub_id("Qwen/Qwen3-4B-Base") and looks_like_hub_id("HuggingFaceTB/SmolLM2-135M")
    for v in ("checkpoints/mcore/Qwen3-4B-Base", "/models/Qwen3-8B", "./a/b", "data/train.jsonl", "Qwen3-8B", "a//b"):
        assert not looks_like_hub_id(v), v
    assert download_command("Qwen/Qwen3-8B") == "hf download Qwen/Qwen3-8B"


def test_hub_id_resolves_from_the_cache(hub):
    snap = cache_repo(hub, "Qwen/Qwen3-4B-Base", {"config.json": "{}", "tokenizer.json": "{}"})
    src = resolve_model_source("Qwen/Qwen3-4B-Base", key="student.hf_path")
    assert (src.kind, src.path, src.assets) == ("hub", snap, snap)
    # a pinned commit resolves to its own snapshot
    other = "f" * 40
    snap2 = cache_repo(hub, "Qwen/Qwen3-4B-Base", {"config.json": "{}"}, commit=other, ref="v2")
    assert resolve_model_source("Qwen/Qwen3-4B-Base", revision="v2").path == snap2
    assert resolve_model_source("Qwen/Qwen3-4B-Base", revision=other).path == snap2


def test_hub_id_missing_names_the_download_command(hub):
    with pytest.raises(ModelSourceError) as e:
        resolve_model_source("Qwen/Qwen3-4B-Base", key="student.hf_path")
    msg = str(e.value)
    assert "student.hf_path = 'Qwen/Qwen3-4B-Base'" in msg
    assert "\n  hf download Qwen/Qwen3-4B-Base\n" in msg
    assert str(hub) in msg and "HF_HUB_CACHE" in msg
    # a cached repo without the needed files is not taken as the model
    cache_repo(hub, "Qwen/Qwen3-8B", {"README.md": "x"})
    with pytest.raises(ModelSourceError, match=r"no config.json"):
        resolve_model_source("Qwen/Qwen3-8B", key="teacher.hf_path")
    cache_repo(hub, "Qwen/Qwen3-8B", {"config.json": "{}"})
    with pytest.raises(ModelSourceError, match=r"(?s)no .*weight.*hf download Qwen/Qwen3-8B"):
        resolve_model_source("Qwen/Qwen3-8B", key="teacher.hf_path", need="weights")


def test_local_folders(hub, tmp_path):
    d = hf_folder(tmp_path / "models" / "Qwen3-0.6B")
    src = resolve_model_source("models/Qwen3-0.6B", key="student.hf_path", need="weights")  # relative to cwd
    assert (src.kind, src.path.resolve(), src.assets.resolve()) == ("hf_dir", d, d)
    it = megatron_ckpt(tmp_path / "ckpt")
    for v in (tmp_path / "ckpt", it):
        src = resolve_model_source(v, key="student.checkpoint", kinds=("megatron",), need="weights")
        assert (src.kind, src.path, src.assets) == ("megatron", it, it / "hf_assets")
    # a local folder wins over a hub id of the same spelling
    cache_repo(hub, "models/Qwen3-0.6B", {"config.json": "{}"})
    assert resolve_model_source("models/Qwen3-0.6B").kind == "hf_dir"


def test_missing_local_path(hub):
    with pytest.raises(ModelSourceError, match=r"student.checkpoint = 'checkpoints/mcore/Qwen3-4B-Base' does not exist"
                       r" .*; expected a Megatron checkpoint$"):
        resolve_model_source("checkpoints/mcore/Qwen3-4B-Base", key="student.checkpoint", kinds=("megatron",))
    with pytest.raises(ModelSourceError, match=r"expected a Megatron checkpoint, a Hugging Face folder or a cached "
                                               r"hub id \(org/name\)$"):
        resolve_model_source("/no/such/folder", key="teacher.hf_path")
    # a hub-shaped value where hub ids are not accepted is just a missing path
    with pytest.raises(ModelSourceError, match=r"does not exist") as e:
        resolve_model_source("ckpt/qwen", key="student.checkpoint", kinds=("megatron",))
    assert "hf download" not in str(e.value)
    with pytest.raises(ModelSourceError, match=r"is empty"):
        resolve_model_source("", key="student.hf_path")


def test_run_directory_points_at_its_checkpoints(hub, tmp_path):
    run = tmp_path / "runs" / "eopd_4b"
    megatron_ckpt(run / "checkpoints")
    (run / "resolved_config.yaml").write_text("student: {}\n")
    with pytest.raises(ModelSourceError) as e:
        resolve_model_source(run, key="--model")
    assert "is a training run directory" in str(e.value) and str(run / "checkpoints") in str(e.value)
    # its checkpoints folder is accepted
    assert resolve_model_source(run / "checkpoints", key="--model").kind == "megatron"


def test_kind_mismatch_hints(hub, tmp_path):
    megatron_ckpt(tmp_path / "ckpt")
    with pytest.raises(ModelSourceError, match=r"Megatron checkpoint.*set student.checkpoint=.*ckpt"):
        resolve_model_source(tmp_path / "ckpt", key="student.hf_path", kinds=("hf_dir", "hub"))
    hf_folder(tmp_path / "hf")
    with pytest.raises(ModelSourceError, match=r"convert it first \(python tools/convert_hf.py import --hf .*hf --out CKPT\)"):
        resolve_model_source(tmp_path / "hf", key="teacher.checkpoint", kinds=("megatron",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match=r"is not a model folder: no config.json"):
        resolve_model_source(tmp_path / "empty", key="student.hf_path")
    (tmp_path / "incomplete" / "iter_0000002").mkdir(parents=True)
    (tmp_path / "incomplete" / "latest").write_text("iter_0000002")
    with pytest.raises(ModelSourceError, match=r"points to iter_0000002, which is missing or incomplete"):
        resolve_model_source(tmp_path / "incomplete", key="student.checkpoint")


def test_tokenizer_sources(hub, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text("{}")
    assert resolve_model_source(tok, key="student.tokenizer", need="tokenizer").kind == "hf_dir"
    cache_repo(hub, "Qwen/Qwen3-8B", {"tokenizer.json": "{}", "tokenizer_config.json": "{}"})
    assert resolve_model_source("Qwen/Qwen3-8B", key="student.tokenizer", need="tokenizer").kind == "hub"
    cache_repo(hub, "org/nothing", {"README.md": ""})
    with pytest.raises(ModelSourceError, match=r"no tokenizer files"):
        resolve_model_source("org/nothing", key="student.tokenizer", need="tokenizer")
