"""Command lines: the console scripts of a NON-editable install (a wheel built from the package and
installed into a scratch folder; the scripts must work without the repository's tools/), and the
thin tools/*.py wrappers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Build a wheel from a copy of the package (no build files in the checkout) and pip-install it,
    without dependencies, into a target folder; return (wheel, target)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "megatron_eaopd", src / "megatron_eaopd", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    p = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    wheel = next(dist.glob("megatron_eaopd-*.whl"))
    target = tmp_path_factory.mktemp("site")
    p = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return wheel, target


def test_wheel_declares_the_console_scripts(installed):
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        ep = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        text = z.read(ep).decode()
    assert "[console_scripts]" in text
    for line in ("eaopd-convert = megatron_eaopd.cli.convert:main", "eaopd-evaluate = megatron_eaopd.cli.evaluate:main",
                 "eaopd-train = megatron_eaopd.train:main", "eaopd-plot = megatron_eaopd.cli.plot:main"):
        assert line in text, text
    for mod in ("cli/convert.py", "cli/evaluate.py", "models/sources.py", "prompts.py", "answers.py", "data.py"):
        assert f"megatron_eaopd/{mod}" in names, mod


@pytest.mark.parametrize("script,needle", [("eaopd-convert", "{import,export,prepare-smollm2}"),
                                           ("eaopd-evaluate", "--no-chat-template"),
                                           ("eaopd-train", "megatron_eaopd.train"),
                                           ("eaopd-plot", "--panels")])
def test_console_scripts_run_from_the_install(installed, script, needle, tmp_path):
    _, target = installed
    exe = target / "bin" / script
    assert exe.is_file(), sorted(p.name for p in (target / "bin").iterdir())
    # PYTHONPATH = the install only: the package must come from there, not from this checkout
    env = {**os.environ, "PYTHONPATH": str(target)}
    p = subprocess.run([sys.executable, str(exe), "--help"], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert needle in p.stdout, p.stdout[:2000]
    where = subprocess.run([sys.executable, "-c", "import megatron_eaopd; print(megatron_eaopd.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60).stdout
    assert where.startswith(str(target)), where


def test_convert_cli_errors_name_the_fix(installed, tmp_path):
    _, target = installed
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_CACHE": str(tmp_path / "cache"),
           "HF_ENDPOINT": "http://127.0.0.1:9"}
    p = subprocess.run([sys.executable, str(target / "bin" / "eaopd-convert"), "import", "--hf", "Qwen/Qwen3-8B",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 2 and "--hf = 'Qwen/Qwen3-8B'" in p.stderr and "hf download Qwen/Qwen3-8B" in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()
