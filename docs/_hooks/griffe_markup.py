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
"""

from __future__ import annotations

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


class MarkdownDocstrings(griffe.Extension):
    """Rewrite every docstring's text with :func:`markdown` before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **_: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
