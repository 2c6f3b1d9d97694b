"""EAOPD_STRICT_SKIPS=1 (CI, make test) turns a skipped non-GPU test into a failure that names the reason."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

from conftest import ROOT

SAMPLE = textwrap.dedent('''
    import pytest

    @pytest.fixture
    def tool():
        pytest.skip("gizmo tool not installed (apt-get install gizmo)")

    def test_runs():
        pass

    def test_skips_in_body():
        pytest.skip("widget package missing")

    def test_skips_in_fixture(tool):
        pass

    @pytest.mark.skipif(True, reason="data file absent")
    def test_skipif_marker():
        pass

    @pytest.mark.gpu
    def test_gpu_may_skip():
        pytest.skip("needs CUDA")

    @pytest.mark.xfail(reason="documented limitation")
    def test_expected_failure():
        assert False
''')


def _run(tmp_path, flag: str | None):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "EAOPD_STRICT_SKIPS"}
    if flag is not None:
        env["EAOPD_STRICT_SKIPS"] = flag
    env["PYTHONPATH"] = str(ROOT / "tests")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "strict_skips", "-p", "no:cacheprovider", "-q", "-rA",
         "-W", "ignore::pytest.PytestUnknownMarkWarning", str(tmp_path / "test_sample.py")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )


def test_strict_flag_fails_non_gpu_skips_with_their_reason(tmp_path):
    proc = _run(tmp_path, "1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    # a skip in the test body fails; one in setup (fixture, skipif marker) errors: both fail the run
    assert "1 failed, 1 passed, 1 skipped, 1 xfailed, 2 errors" in out, out
    for kind, name, reason in (("FAILED", "test_skips_in_body", "widget package missing"),
                               ("ERROR", "test_skips_in_fixture", "gizmo tool not installed"),
                               ("ERROR", "test_skipif_marker", "data file absent")):
        assert f"{kind} test_sample.py::{name} - EAOPD_STRICT_SKIPS=1" in out, (name, out)
        assert f"Skip reason: Skipped: {reason}" in out, (name, out)
    assert re.search(r"SKIPPED \[1\] test_sample.py:\d+: needs CUDA", out), out


def test_plain_runs_keep_ordinary_skips(tmp_path):
    for flag in (None, "0"):
        proc = _run(tmp_path, flag)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        assert "1 passed, 4 skipped, 1 xfailed" in out, out
