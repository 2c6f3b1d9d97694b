"""pytest plugin: with ``EAOPD_STRICT_SKIPS=1`` a skipped test fails, unless it is marked ``gpu``.

CI (``.ci/run``) and ``make test`` set the flag, so a test that did not run because a package, a tool
or a data file was missing shows up as a failure carrying the skip's reason, instead of a silent "s".
GPU tests (``@pytest.mark.gpu``) may still skip on a machine without CUDA. Plain ``pytest`` runs keep
ordinary skips. ``xfail`` is left alone (it is an explicit expectation, not a missing dependency).

Registered by ``tests/conftest.py`` (``pytest_plugins``); usable elsewhere as ``pytest -p strict_skips``.
"""

from __future__ import annotations

import os

import pytest

FLAG = "EAOPD_STRICT_SKIPS"


def strict() -> bool:
    """True when ``$EAOPD_STRICT_SKIPS`` is ``1`` (or ``true``/``yes``)."""
    return os.environ.get(FLAG, "").strip().lower() in ("1", "true", "yes")


def _skip_reason(longrepr) -> str:
    # a skip's longrepr is (path, lineno, "Skipped: reason")
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return f"{longrepr[2]} ({longrepr[0]}:{longrepr[1]})"
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not (rep.skipped and strict()) or hasattr(rep, "wasxfail") or item.get_closest_marker("gpu") is not None:
        return
    rep.outcome = "failed"
    rep.longrepr = (
        f"{FLAG}=1: this test was skipped, which CI treats as a failure (only @pytest.mark.gpu tests may skip). "
        f"Skip reason: {_skip_reason(rep.longrepr)}. Install what it needs in the setup step, or run without "
        f"{FLAG}=1 locally"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and strict():  # a whole module skipped at import (pytest.importorskip at module level)
        rep.outcome = "failed"
        rep.longrepr = f"{FLAG}=1: module skipped at collection, which CI treats as a failure. Skip reason: " \
                       f"{_skip_reason(rep.longrepr)}"
