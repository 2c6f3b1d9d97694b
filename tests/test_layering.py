"""The package's import structure: no import cycles, no upward imports, no oversized modules.

Every module of ``megatron_eaopd`` belongs to one layer of :data:`LAYERS` (lowest first); a module may
import its own layer's modules only if that makes no cycle, and lower layers freely. The graph is read
from the source with ``ast`` (module-level and function-level imports alike), so a deferred import
cannot hide an upward dependency. A new module must be placed in a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "megatron_eaopd"

#: Layers, lowest first. Names are module paths below ``megatron_eaopd`` ("loss" covers the package).
LAYERS: list[set[str]] = [
    {"settings", "dtypes", "platform", "answers", "prompts"},
    {"distributed", "pipeline", "data", "logger"},
    {"loss", "checkpoint"},
    {"checkpoint_optimizer", "models"},
    {"rollout", "teacher", "student", "teacher_groups"},
    {"config"},
    {"evaluation", "phases", "train_state"},
    {"trainer", "demo"},
    {"train", "cli", "__init__"},
]
MAX_LINES = 480


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _layer(mod: str) -> int:
    top = mod.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if mod in layer or top in layer:
            return i
    raise AssertionError(f"module megatron_eaopd.{mod} is in no layer of tests/test_layering.py: place it there")


def _imports(path: Path) -> set[str]:
    """Modules of megatron_eaopd imported by ``path`` (relative to the package, e.g. ``loss.eopd``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n.startswith("megatron_eaopd."):
                out.add(n[len("megatron_eaopd."):])
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        deps = set()
        for imp in _imports(path):
            while imp and imp not in files:  # "loss.eopd.EOPDConfig" -> "loss.eopd"
                imp = imp.rsplit(".", 1)[0] if "." in imp else ""
            if imp and imp != mod:
                deps.add(imp)
        graph[mod] = deps
    return graph


def test_no_upward_imports():
    bad = []
    for mod, deps in _graph().items():
        for d in deps:
            if _layer(d) > _layer(mod):
                bad.append(f"{mod} (layer {_layer(mod)}) imports {d} (layer {_layer(d)})")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ re-exports its submodules: not a cycle of its own
    graph = {m: {d for d in deps if not (m == d.split(".")[0] or d == m.split(".")[0])} for m, deps in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_modules_stay_small():
    big = {_module_name(p): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by concept): {big}"
