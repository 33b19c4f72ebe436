"""The shape of the package: a small top level, moved names that warn, no import circle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import massact_lens as ml

PACKAGE = Path(ml.__file__).parent


def test_the_top_level_is_small_and_every_name_resolves():
    assert 15 <= len(ml.__all__) <= 24
    for name in ml.__all__:
        assert getattr(ml, name) is not None


@pytest.mark.parametrize("name", ["zero_hook", "PositionRule", "AblationTable", "load_checkpoint", "TrainConfig", "token_kind"])
def test_old_top_level_names_still_work_with_a_deprecation_warning(name):
    with pytest.warns(DeprecationWarning, match=f"massact_lens.{name} moved to"):
        assert getattr(ml, name) is not None


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = ml.nope


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _edges() -> dict[str, set[str]]:
    """Module -> the massact_lens modules it imports at import time (not inside functions)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found: set[str] = set()
        for node in tree.body:  # top-level statements only: lazy imports inside functions are allowed
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("massact_lens"):
                found.add(node.module)
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in modules:
                        found.add(f"{node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("massact_lens")}
        edges[name] = {m for m in found if m in modules and m != name}
    return edges


def test_no_import_circle_between_modules():
    edges = _edges()
    # A package's __init__ re-exports its own modules; a circle through it is still a circle
    # only when a submodule imports the package root back.
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges.get(node, ()):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if state.get(nxt) is None:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_analysis_never_imports_training_or_the_views():
    edges = _edges()
    analysis = [m for m in edges if m.count(".") and m.split(".")[1] in {"profiles", "scan", "massive", "interventions", "attention", "evaluate", "lineage", "weights", "batching", "statistics"}]
    for module in analysis:
        assert not any(m.startswith(("massact_lens.training", "massact_lens.viz", "massact_lens.report", "massact_lens.cli")) for m in edges[module]), module


def test_no_module_is_over_about_500_lines():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 600, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_importing_the_package_loads_neither_training_nor_plotly():
    code = "import sys, massact_lens; print(any(m.startswith(('massact_lens.training', 'plotly')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_functions_named_like_their_modules_stay_functions():
    import importlib

    for module in ("massact_lens.scan", "massact_lens.lineage", "massact_lens.profiles"):
        importlib.import_module(module)
    assert callable(ml.scan) and callable(ml.lineage) and callable(ml.profile)
