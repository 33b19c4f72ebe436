"""A page of sections: :class:`Report` lays out figures, views, tables and text under headings, with settings.

:func:`massact_lens.cli.report.build_report` fills one with the paper's story; any code
can build one by hand. ``to_html()`` is one self-contained document
(:func:`massact_lens.viz._page.html_document`), ``save(path)`` writes it atomically.

>>> report = Report("Mine")
>>> _ = report.section("Where?").add_table(__import__("pandas").DataFrame({"layer": range(20)}), "layers")
>>> "Show the 20 rows: layers" in report.to_html()
True
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from massact_lens.viz._page import (
    Collapsed,
    Item,
    anchor,
    check_writable,
    format_value,
    html_document,
    item_html,
    write_atomic,
)

__all__ = ["FOLD_ROWS", "Report", "Section"]

#: Tables longer than this are folded (a line to click opens them).
FOLD_ROWS = 12


@dataclass
class Section:
    """One part of a report: a title, an introduction, and items in order.

    Items are plotly figures, circuitsvis views, DataFrames (drawn as tables),
    strings (paragraphs, escaped), glossaries and folded items; ``captions[i]`` is
    shown under item ``i``.

    >>> Section("Where?").add("A paragraph.", caption="under it").anchor
    'where'
    """

    title: str
    intro: str = ""
    items: list[Item] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, item: Item, caption: str = "") -> Section:
        self.items.append(item)
        self.captions.append(caption)
        return self

    def add_table(self, frame: pd.DataFrame, what: str, caption: str = "") -> Section:
        """A table, folded behind a line ("the 30 rows of <what>") when longer than :data:`FOLD_ROWS`."""
        item: Item = frame if len(frame) <= FOLD_ROWS else Collapsed(frame, f"Show the {len(frame)} rows: {what}")
        return self.add(item, caption)

    @property
    def anchor(self) -> str:
        return anchor(self.title)


@dataclass
class Report:
    """A page of sections and the settings of the run that produced it.

    ``to_html()`` gives the self-contained document; ``save(path)`` writes it
    atomically; in a notebook the report shows itself (in an iframe). Build one
    with :func:`build_report`, or add your own sections.

    >>> report = Report("Mine")
    >>> _ = report.section("Notes").add("Dim 99 is massive.")
    >>> "Dim 99 is massive." in report.to_html(), report._repr_html_().startswith("<iframe")
    (True, True)
    """

    title: str
    settings: dict[str, Any] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)
    prompts: tuple[str, ...] = ()
    summary: str = ""
    findings: list[str] = field(default_factory=list)
    #: The layer-wise table of the scan (top-1/2/3, median, ratio, massive entries per hidden state).
    layer_stats: pd.DataFrame | None = None

    def section(self, title: str, intro: str = "") -> Section:
        """Append a new section and return it."""
        part = Section(title, intro)
        self.sections.append(part)
        return part

    def items(self) -> list[Item]:
        return [item for s in self.sections for item in s.items]

    def to_html(self) -> str:
        """The whole document: one string, every script inline, nothing loaded from a network."""
        out = [f'<h1 dir="auto">{html.escape(self.title)}</h1>']
        if self.summary:
            out.append(f'<p class="lead">{html.escape(self.summary)}</p>')
        if self.findings:
            out.append('<div class="findings"><h3>In short</h3><ul>')
            out.extend(f'<li dir="auto">{html.escape(f)}</li>' for f in self.findings)
            out.append("</ul></div>")
        if len(self.sections) > 1:
            links = " ".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in self.sections)
            out.append(f"<nav>{links}</nav>")
        counter = 0
        for section in self.sections:
            out.append(f'<h2 id="{section.anchor}">{html.escape(section.title)}</h2>')
            if section.intro:
                out.append(f"<p>{html.escape(section.intro)}</p>")
            for note in section.notes:
                out.append(f'<p class="note">{html.escape(note)}</p>')
            for item, caption in zip(section.items, section.captions, strict=True):
                counter += 1
                out.append(item_html(item, f"item-{counter}"))
                if caption:
                    out.append(f'<p class="caption">{html.escape(caption)}</p>')
        if self.settings:
            out.append('<h2 id="settings">Settings of this run</h2>')
            rows = "".join(
                f'<tr><td>{html.escape(str(k))}</td><td dir="auto">{html.escape(format_value(v))}</td></tr>'
                for k, v in self.settings.items()
            )
            out.append(f'<table class="data settings">{rows}</table>')
        if self.prompts:
            out.append(f"<details><summary>The {len(self.prompts)} prompts</summary><ol class=\"prompts\" start=\"0\">")
            out.extend(f'<li dir="auto">{html.escape(p)}</li>' for p in self.prompts)
            out.append("</ol></details>")
        return html_document(self.title, out, self.items())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_html` to ``path`` (temp name, then rename); returns the path.

        The path is checked before the page is rendered (:func:`~massact_lens.viz._page.check_writable`).
        """
        check_writable(path)
        return write_atomic(path, self.to_html())

    def _repr_html_(self) -> str:
        """The page in an iframe, so its styles and scripts stay apart from the notebook's."""
        return (
            f'<iframe srcdoc="{html.escape(self.to_html(), quote=True)}" title="{html.escape(self.title)}" '
            'style="width: 100%; height: 820px; border: 1px solid #ddd;"></iframe>'
        )
