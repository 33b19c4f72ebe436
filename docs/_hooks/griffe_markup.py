"""Griffe extension: render the package's reStructuredText-flavoured docstring markup as Markdown.

The docstrings are doctests written for the terminal and for Sphinx-style readers; the
reference site is Markdown. Three rewrites, applied to each docstring's text before it
is parsed (what the docstrings say is unchanged):

* a doctest block (``>>>`` lines and their output, up to a blank line) becomes a
  fenced ``pycon`` code block (in Markdown ``>>>`` would start a block quote);
* a Sphinx role, ``:func:`name```, ``:class:`~a.b.C```, becomes inline code of the
  name (``~`` keeps the last component, as Sphinx does);
* a paragraph ending in ``::`` (a reST literal block follows) ends in ``:``;
* an ``Args:`` entry that names several parameters at once (``a, b: as in scan``, a
  reST / numpy habit that Google style lacks) becomes one entry per name, each with the
  whole description.

And two Sphinx habits griffe does not read, so that what the source documents shows:

* ``#:`` doc comments (on the lines just above an attribute, or after it on its line)
  become the attribute's docstring when it has none;
* constants assigned together (``ORIGINAL, ZERO, MEAN = "Original", ...``) become one
  module attribute each (griffe skips tuple assignments, so a name exported through
  ``__all__`` would otherwise vanish from the reference without a word).
"""

from __future__ import annotations

import ast
import re
from typing import Any

import griffe

_ARGS = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Other Parameters):\s*$")
_GROUP = re.compile(r"^(\s+)([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)+)(\s*\([^)]*\))?:(\s.*|)$")
_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc|const):`(~?)([^`]+)`")


def _role(match: re.Match[str]) -> str:
    name = match.group(2)
    if match.group(1):
        name = name.rsplit(".", 1)[-1]
    return f"`{name}`"


def _split_groups(lines: list[str]) -> list[str]:
    """``Args:`` entries naming several parameters, one entry per name."""
    out: list[str] = []
    section: str | None = None  # the indent of the Args header while inside that section
    i = 0
    while i < len(lines):
        line = lines[i]
        header = _ARGS.match(line)
        if header:
            section = header.group(1)
        elif section is not None and line.strip() and len(line) - len(line.lstrip()) <= len(section):
            section = None
        group = _GROUP.match(line) if section is not None else None
        if group is None:
            out.append(line)
            i += 1
            continue
        indent, names, kind, rest = group.groups()
        body = []
        i += 1
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(indent + " ")):
            if not lines[i].strip() and not (i + 1 < len(lines) and lines[i + 1].startswith(indent + " ")):
                break
            body.append(lines[i])
            i += 1
        for name in (n.strip() for n in names.split(",")):
            out.append(f"{indent}{name}{kind or ''}:{rest}")
            out += body
    return out


def markdown(text: str) -> str:
    """The docstring ``text`` with doctest blocks fenced, roles as code, ``::`` as ``:``."""
    out: list[str] = []
    lines = _split_groups(text.splitlines())
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            if out and out[-1].strip():
                out.append("")
            out.append(f"{indent}```pycon")
            while i < len(lines) and lines[i].strip():
                out.append(lines[i])
                i += 1
            out.append(f"{indent}```")
            continue
        line = _ROLE.sub(_role, line)
        if line.endswith("::") and not line.endswith(" ::"):
            line = line[:-1]
        out.append(line)
        i += 1
    return "\n".join(out)


def _doc_comment(obj: griffe.Object, lineno: int) -> str | None:
    """The ``#:`` comment of the statement at ``lineno``: the lines above it, else its own."""
    try:
        lines = obj.lines_collection[obj.filepath]  # type: ignore[index]
    except (KeyError, TypeError):
        return None
    above: list[str] = []
    i = lineno - 2
    while i >= 0 and lines[i].lstrip().startswith("#:"):
        above.insert(0, lines[i].lstrip()[2:].strip())
        i -= 1
    if above:
        return "\n".join(above)
    trailing = re.search(r"#:\s*(.+)$", lines[lineno - 1]) if lineno - 1 < len(lines) else None
    return trailing.group(1).strip() if trailing else None


class MarkdownDocstrings(griffe.Extension):
    """Rewrite every docstring's text with :func:`markdown` before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **_: Any) -> None:
        if obj.docstring is None and obj.is_attribute and obj.lineno:
            comment = _doc_comment(obj, obj.lineno)
            if comment:
                obj.docstring = griffe.Docstring(comment, lineno=obj.lineno, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)

    def on_module_members(self, *, node: Any, mod: griffe.Module, **_: Any) -> None:
        if not isinstance(node, ast.Module):
            return
        for statement in node.body:
            if not (
                isinstance(statement, ast.Assign)
                and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Tuple)
                and isinstance(statement.value, ast.Tuple)
                and len(statement.targets[0].elts) == len(statement.value.elts)
                and all(isinstance(t, ast.Name) for t in statement.targets[0].elts)
            ):
                continue
            comment = _doc_comment(mod, statement.lineno)
            for target, value in zip(statement.targets[0].elts, statement.value.elts, strict=True):
                name = target.id  # type: ignore[attr-defined]
                if name in mod.members:
                    continue
                attribute = griffe.Attribute(
                    name, value=ast.unparse(value), lineno=statement.lineno,
                    endlineno=statement.end_lineno, parent=mod,
                )
                attribute.labels.add("module-attribute")
                if comment:
                    attribute.docstring = griffe.Docstring(markdown(comment), lineno=statement.lineno, parent=attribute)
                mod.set_member(name, attribute)
