"""The shape of the package: a small top level, data flowing one way, no import circle, small units."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import massact_lens as ml

PACKAGE = Path(ml.__file__).parent


def test_the_top_level_is_small_and_every_name_resolves():
    assert 15 <= len(ml.__all__) <= 22
    for name in ml.__all__:
        assert getattr(ml, name) is not None


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = ml.nope


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(tree: ast.AST, modules: dict[str, Path], *, anywhere: bool) -> set[str]:
    """The massact_lens modules a tree imports: at its top level, or ``anywhere`` (inside functions too)."""
    nodes = ast.walk(tree) if anywhere else iter(tree.body)  # type: ignore[attr-defined]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("massact_lens"):
            found.add(node.module)
            for alias in node.names:
                if f"{node.module}.{alias.name}" in modules:
                    found.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("massact_lens")}
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _edges() -> dict[str, set[str]]:
    """Module -> the massact_lens modules it imports, inside functions too."""
    modules = _modules()
    return {
        name: {m for m in _imports(ast.parse(path.read_text(encoding="utf-8")), modules, anywhere=True)
               if m in modules and m != name}
        for name, path in modules.items()
    }


def test_no_import_circle_between_modules_not_even_inside_functions():
    edges = _edges()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if state.get(nxt) is None:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


#: The data flow, upstream first: a module imports only from its own folder and the ones before it.
LAYERS = ["_core", "models", "examples", "find", "interventions", "attention", "evaluate", "trace", "distributed",
          "training", "viz", "cli"]


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS)


def test_imports_flow_one_way():
    for module, targets in _edges().items():
        if module in ("massact_lens", "massact_lens.__main__"):
            continue
        downstream = sorted(t for t in targets if t != "massact_lens" and _layer(t) > _layer(module))
        assert not downstream, f"{module} imports {downstream}, which lie downstream of it"


def test_no_private_helper_is_imported_from_another_module():
    """A private name is imported only from a private module (``_core``, ``attention/_passes``
    ...), never sideways out of a public one; importing a private module itself is fine."""
    modules = _modules()
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("massact_lens"):
                private_module = any(part.startswith("_") for part in node.module.split(".")[1:])
                for alias in node.names:
                    if alias.name.startswith("_") and not private_module:
                        assert f"{node.module}.{alias.name}" in modules, (
                            f"{module} imports the private {alias.name} of {node.module}")


def test_analysis_never_imports_training_or_the_views():
    for module, targets in _edges().items():
        if _layer(module) < LAYERS.index("training"):
            assert not any(m.startswith(("massact_lens.training", "massact_lens.viz", "massact_lens.cli"))
                           for m in targets), module


def test_no_module_is_over_500_lines():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 500, sorted(sizes.items(), key=lambda kv: -kv[1])[:5]


def test_no_function_is_over_80_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = node.body[1] if ast.get_docstring(node) is not None and len(node.body) > 1 else node.body[0]
                n = (node.end_lineno or node.lineno) - first.lineno + 1  # code lines, the docstring left out
                if n > 80:
                    long.append((f"{path.relative_to(PACKAGE)}:{node.name}", n))
    assert not long, sorted(long, key=lambda kv: -kv[1])


def _public_names() -> set[str]:
    """Every name a module of the package offers: its ``__all__``, or its public functions and classes."""
    names: set[str] = set()
    for module, path in _modules().items():
        if any(part.startswith("_") and part != "__init__" for part in module.split(".")[1:]):
            continue  # private modules (_core, _passes, ...): counted where a public module re-exports them
        tree = ast.parse(path.read_text(encoding="utf-8"))
        exported = None
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
                exported = {ast.literal_eval(e) for e in node.value.elts}  # type: ignore[attr-defined]
        if exported is None:
            exported = {n.name for n in tree.body
                        if isinstance(n, ast.FunctionDef | ast.ClassDef) and not n.name.startswith("_")}
        names |= exported
    return names


def test_the_public_api_is_small():
    assert len(ml.__all__) <= 22
    names = _public_names()
    assert len(names) < 150, (len(names), sorted(names))


def test_no_module_is_named_like_a_function_it_exports():
    for module, path in _modules().items():
        stem = module.rsplit(".", 1)[-1]
        functions = {n.name for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.FunctionDef)}
        assert stem not in functions, f"{module} defines a function {stem}()"
    for name in ("scan", "lineage", "profile", "perplexity"):
        assert callable(getattr(ml, name))


def test_dir_shows_the_public_names_only():
    assert set(dir(ml)) <= set(ml.__all__) | {"training"}


def test_importing_the_package_loads_neither_training_nor_plotly():
    code = "import sys, massact_lens; print(any(m.startswith(('massact_lens.training', 'plotly')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
