"""mkdocs hook: the API reference pages, generated from each module's ``__all__``.

A nav entry ``reference/<dotted.module>.md`` in mkdocs.yml becomes, at build time, a
page that renders ``::: <dotted.module>`` with ``members`` = that module's ``__all__``
(read from its source with :mod:`ast`, nothing imported), less the names that are
subpackages (each has a page of its own, linked instead). So the reference always shows
exactly the public API, and a module without ``__all__`` fails the build.

Pages kept outside docs/ because they are read where they sit (``bench/README.md``
next to the benchmarks) are copied into the site under the names in :data:`COPIED`.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

PREFIX = "reference/"
#: Site page -> the repository file it shows.
COPIED = {"benchmarks.md": "bench/README.md"}


def on_files(files: Files, config: Any) -> Files:
    root = Path(config.config_file_path).parent
    modules = _nav_modules(config["nav"])
    for module in modules:
        files.append(File.generated(config, f"{PREFIX}{module}.md", content=_page(root, module, modules)))
    for page, source in COPIED.items():
        files.append(File.generated(config, page, abs_src_path=str(root / source)))
    return files


def _nav_modules(nav: Any) -> list[str]:
    """The dotted module names of the nav's ``reference/<module>.md`` entries, in nav order."""
    found: list[str] = []
    items = nav if isinstance(nav, list) else [nav]
    for item in items:
        if isinstance(item, dict):
            for value in item.values():
                found += _nav_modules(value)
        elif isinstance(item, str) and item.startswith(PREFIX) and item.endswith(".md"):
            found.append(item[len(PREFIX) : -len(".md")])
    return found


def _source(root: Path, module: str) -> Path:
    base = root.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _exports(root: Path, module: str) -> list[str]:
    """``module.__all__`` as written in its source: a literal list or tuple of strings."""
    path = _source(root, module)
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return [str(ast.literal_eval(e)) for e in node.value.elts]  # type: ignore[attr-defined]
    raise ValueError(f"{path} has no literal __all__: the reference renders exactly __all__.")


def _page(root: Path, module: str, modules: list[str]) -> str:
    names = _exports(root, module)
    subpackages = [n for n in names if _source(root, f"{module}.{n}").exists()]
    members = [n for n in names if n not in subpackages]
    lines = [f"# `{module}`", "", f"::: {module}", "    options:", "      show_root_heading: false"]
    lines.append("      members:" if members else "      members: false")
    lines += [f"        - {n}" for n in members]
    linked = [n for n in subpackages if f"{module}.{n}" in modules]
    if linked:
        lines += ["", "## Subpackages", ""]
        lines += [f"- [`{module}.{n}`]({module}.{n}.md)" for n in linked]
    return "\n".join(lines) + "\n"
