"""One HTML file that draws offline: figures, circuitsvis views, tables and text on one page.

plotly.js and the circuitsvis bundle are inlined once each, no element loads
anything from a network address (a Content-Security-Policy says so to the
browser), every piece of text is escaped, and files are written to a temporary
name and renamed, so an error never leaves a partial page.

>>> import os, tempfile
>>> import pandas as pd
>>> path = save_html(os.path.join(tempfile.mkdtemp(), "t.html"), pd.DataFrame({"dim": [99]}), "<b>text</b>")
>>> page = path.read_text()
>>> "&lt;b&gt;text&lt;/b&gt;" in page, "plotly-js" in page
(True, False)
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from circuitsvis.utils.render import RenderedHTML

from massact_lens._core.files import check_writable, write_atomic  # noqa: F401 (re-exported for the views)
from massact_lens.viz._rendered import Widget
from massact_lens.viz._scripts import circuitsvis_bundle, plotly_bundle, script_json

__all__ = [
    "Collapsed",
    "Glossary",
    "Item",
    "anchor",
    "check_writable",
    "format_value",
    "html_document",
    "item_html",
    "package_version",
    "save_html",
    "table_html",
    "write_atomic",
]

@dataclass(frozen=True)
class Collapsed:
    """An item shown folded: a ``<details>`` element whose ``summary`` line opens it (a long table).

    >>> item_html(Collapsed(pd.DataFrame({"layer": [0]}), "the 1 row"), "x").startswith("<details>")
    True
    """

    item: Any
    summary: str


@dataclass(frozen=True)
class Glossary:
    """Terms and what they mean, shown as a definition list (what a table's columns mean).

    >>> item_html(Glossary({"c_mass": "attention on C"}), "x")
    '<dl class="glossary"><dt>c_mass</dt><dd>attention on C</dd></dl>'
    """

    terms: dict[str, str]


#: What a page shows: plotly figures, circuitsvis views, DataFrames (as tables), strings (as
#: paragraphs), glossaries, and any of them :class:`Collapsed`.
Item = go.Figure | RenderedHTML | pd.DataFrame | str | Glossary | Collapsed

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1180px; margin: 0 auto; padding: 0 24px 48px; line-height: 1.45; }
h1 { font-size: 1.7em; margin: 28px 0 6px; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 4px;
     margin-top: 40px; } h3 { margin: 22px 0 6px; font-size: 1.1em; }
p.lead { color: #555; margin-top: 0; } p.note { color: #8a4b00; background: #fff6e5; padding: 6px 10px;
     border-left: 3px solid #e0a030; } p.caption { color: #555; font-size: 0.92em; margin: 4px 0 14px; }
table.data { border-collapse: collapse; font-size: 0.86em; margin: 6px 0 16px; }
table.data th, table.data td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
table.data th { background: #f4f4f4; } table.data td:first-child, table.data th:first-child { text-align: left; }
table.settings td:first-child { font-weight: 600; white-space: nowrap; } table.settings td { text-align: left; }
table.data td { overflow-wrap: break-word; } .table-wrap { max-width: 100%; overflow-x: auto; }
table.settings { width: 100%; table-layout: fixed; } table.settings td:first-child { width: 12em; }
p, li, h1, h2, summary { overflow-wrap: anywhere; }
nav a { margin-right: 14px; } .plot { width: 100%; min-height: 320px; }
.circuitsvis { margin: 10px 0 16px; max-width: 100%; }
.circuitsvis .colored-tokens span { max-width: 100%; overflow-wrap: anywhere; }
/* ColoredTokensMulti pads 20 px per hidden state for its tooltip, which floats anyway */
.circuitsvis-ColoredTokensMulti > div { padding-bottom: 24px !important; }
details { margin: 10px 0; } summary { cursor: pointer; color: #1a4f8b; } code { background: #f4f4f4; padding: 0 3px; }
.findings { background: #f6f8fb; border: 1px solid #dde3ea; padding: 4px 18px 8px; margin: 14px 0; }
ol.prompts li { font-family: ui-monospace, monospace; font-size: 0.86em; white-space: pre-wrap; }
dl.glossary dt { font-family: ui-monospace, monospace; font-weight: 600; } dl.glossary dd { margin: 0 0 6px 1.5em; }
"""

_PLOTLY_CONFIG = {"responsive": True, "displaylogo": False}


def package_version(package: str) -> str:
    """The installed version of ``package``, or ``"unknown"``."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def anchor(title: str) -> str:
    """The id a heading gets, for links within the page.

    >>> anchor("Where are they?")
    'where-are-they'
    """
    return "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")


def item_html(item: Item, item_id: str) -> str:
    """The HTML of one item; ``TypeError`` for anything a page cannot show.

    >>> item_html("a < b", "x")
    '<p dir="auto">a &lt; b</p>'
    """
    if isinstance(item, go.Figure):
        figure = json.loads(str(item.to_json(validate=False)))  # plotly's encoder: numpy, dates, NaN -> plain JSON
        return (
            f'<div id="{item_id}" class="plot"></div>\n<script>Plotly.newPlot("{item_id}", '
            f"{script_json(figure.get('data', []))}, {script_json(figure.get('layout', {}))}, "
            f"{script_json(_PLOTLY_CONFIG)});</script>"
        )
    if isinstance(item, Widget):
        return item.mount_html()
    if isinstance(item, RenderedHTML):  # a plain circuitsvis view: its own inlined copy of the bundle
        return item.local_src.replace("<div id=\"circuits-vis-", "<div class=\"circuitsvis\" id=\"circuits-vis-", 1)
    if isinstance(item, pd.DataFrame):
        return table_html(item)
    if isinstance(item, str):
        return f'<p dir="auto">{html.escape(item)}</p>'
    if isinstance(item, Glossary):
        terms = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in item.terms.items())
        return f'<dl class="glossary">{terms}</dl>'
    if isinstance(item, Collapsed):
        inner = item_html(item.item, item_id)
        return f"<details><summary>{html.escape(item.summary)}</summary>\n{inner}\n</details>"
    raise TypeError(
        "A page item must be a plotly Figure, a circuitsvis view, a DataFrame, a string, a Glossary or a "
        f"Collapsed item, not {type(item).__name__}."
    )


def format_value(value: Any) -> str:
    """A table cell: floats to 4 significant digits, nan / inf spelled out, lists joined.

    >>> format_value(0.000123), format_value(float("inf")), format_value([1, 2.5])
    ('0.000123', 'inf', '1, 2.5')
    """
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {format_value(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def table_html(frame: pd.DataFrame, *, classes: str = "data") -> str:
    """A DataFrame as an escaped HTML table, cells by :func:`format_value`.

    Each cell takes its text direction from its text (``dir="auto"``: a right-to-left
    token reads right to left); a wide table scrolls inside its box, not the page.

    >>> table_html(pd.DataFrame({"t": ["<s>"]})).count("&lt;s&gt;")
    1
    """
    shown = frame.copy()
    for column in shown.columns:
        shown[column] = [format_value(v) for v in shown[column].tolist()]
    table = shown.to_html(index=False, escape=True, border=0, classes=classes).replace("<td>", '<td dir="auto">')
    return f'<div class="table-wrap">{table}</div>'


def html_document(title: str, body: Sequence[str], items: Sequence[Item]) -> str:
    """A whole page: head (policy, style, the bundles ``items`` need, once each), ``body``, a footer.

    ``body`` is trusted HTML (build it with :func:`item_html`); ``items`` are the
    items it shows, read only to decide which bundles to inline.

    >>> page = html_document("<T>", ["<p>hi</p>"], [])
    >>> page.startswith("<!DOCTYPE html>"), "<title>&lt;T&gt;</title>" in page
    (True, True)
    """
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # Nothing may be fetched: a policy the browser enforces, not just a promise.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "script-src 'unsafe-inline' 'unsafe-eval' blob:; style-src 'unsafe-inline'; "
        "img-src data: blob:; font-src data:; worker-src blob:; connect-src 'none'\">",
        f"<title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style>",
    ]
    items = [i.item if isinstance(i, Collapsed) else i for i in items]
    if any(isinstance(i, go.Figure) for i in items):
        out.append("<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>")
        out.append(f'<script id="plotly-js">{plotly_bundle()}</script>')
    if any(isinstance(i, Widget) for i in items):
        out.append(f'<script id="circuitsvis-js">{circuitsvis_bundle()}</script>')
    out.append("</head><body>")
    out.extend(body)
    out.append(
        f'<p class="caption">Written by massact_lens {html.escape(package_version("massact_lens"))}; '
        "this file loads nothing from the network.</p>"
    )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def save_html(path: str | os.PathLike[str], *items: Item, title: str = "massact_lens") -> Path:
    """Save figures, circuitsvis views, tables and text to one HTML file that draws offline.

    circuitsvis views are always written with the inlined bundle (never the CDN
    form that ``str()`` of a plain circuitsvis object gives); plotly.js and the
    circuitsvis bundle are included once each. Written atomically.

    >>> import tempfile, os
    >>> from massact_lens.examples import minilm
    >>> from massact_lens.viz import tokens_by_activation
    >>> path = os.path.join(tempfile.mkdtemp(), "view.html")
    >>> page = save_html(path, tokens_by_activation(minilm(), "Hello.")).read_text()
    >>> "unpkg.com" in page, page.count('id="circuitsvis-js"')
    (False, 1)
    """
    if not items:
        raise ValueError("Nothing to save: pass at least one figure, widget, table or text.")
    check_writable(path)  # before any rendering
    body = [f"<h1>{html.escape(title)}</h1>", f'<h2 id="{anchor(title)}">{html.escape(title)}</h2>']
    body += [item_html(item, f"item-{i}") for i, item in enumerate(items, start=1)]  # type-checks before writing
    return write_atomic(path, html_document(title, body, items))
