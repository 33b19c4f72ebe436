"""The :class:`Widget`: a circuitsvis view that draws offline (its bundle inlined, its props inert).

>>> Widget("ColoredTokens", {"tokens": ["a"], "values": [1.0]}).element
'ColoredTokens'
"""

from __future__ import annotations

import html
import uuid
from typing import Any

import circuitsvis
from circuitsvis.utils.render import RenderedHTML

from massact_lens.viz._notebook import widget_output
from massact_lens.viz._scripts import circuitsvis_bundle, inert_markup, plain, script_json

__all__ = ["INNER_HTML_TOKENS", "Widget"]

#: circuitsvis views that set each token as ``innerHTML``: their tokens are made inert (:func:`inert_markup`).
INNER_HTML_TOKENS = frozenset({"ColoredTokens", "ColoredTokensMulti", "TokenLogProbs"})

class Widget(RenderedHTML):
    """A circuitsvis view that draws offline.

    A ``circuitsvis.utils.render.RenderedHTML`` (so it displays inline in Jupyter
    and VS Code). Token text never becomes markup: the props sit in a script as
    escaped JSON, and views that show tokens through ``innerHTML`` get them inert
    (:func:`~massact_lens.viz._scripts.inert_markup`). ``str()`` is ``local_src``, the view with circuitsvis's bundle
    inlined (1.3 MB). In a notebook the bundle is inlined only by the first view of
    the session, later views reuse it, and each output shows a static summary where
    no JavaScript runs (:mod:`massact_lens.viz._notebook`). ``cdn_src`` (and
    ``show_code()``) keep circuitsvis's CDN form.

    Attributes:
        element: the circuitsvis React component (``"AttentionHeads"``, ...).
        props: its props, as plain JSON-ready values.
        meta: what the view shows, for tests and reports (layer, massive
            positions, colour scale, ...).
        select: the label (index) the view opens on, where circuitsvis has no prop
            for it (``ColoredTokensMulti``); None: circuitsvis's first.

    >>> view = Widget("ColoredTokens", {"tokens": ["a", " b"], "values": [1.0, 2.0]})
    >>> '<p dir="auto">a b</p>' in view.static_html(), view.local_src.count("var CircuitsVis")
    (True, 1)
    """

    def __init__(self, element: str, props: dict[str, Any], meta: dict[str, Any] | None = None,
                 select: int | None = None) -> None:
        self.element = element
        self.props = {k: plain(v) for k, v in props.items() if v is not None}
        if element in INNER_HTML_TOKENS and isinstance(self.props.get("tokens"), list):
            self.props["tokens"] = [inert_markup(str(t)) for t in self.props["tokens"]]
        self.meta = dict(meta or {})
        self.select = select
        self.div_id = "circuits-vis-" + uuid.uuid4().hex[:13]

    def _call(self, namespace: str = "CircuitsVis") -> str:
        call = f'{namespace}.render("{self.div_id}", {namespace}.{self.element}, {script_json(self.props)});'
        if self.select is None:
            return call
        # circuitsvis's labels are clickable divs: click the chosen one once React has drawn them
        return call + (
            f'(function pick(n) {{ var row = document.querySelector("#{self.div_id} > div > div");'
            f" if (row && row.children.length > {self.select}) {{ row.children[{self.select}].click(); }}"
            " else if (n < 200) { setTimeout(function () { pick(n + 1); }, 25); } })(0);"
        )

    def static_html(self) -> str:
        """What the view shows, as plain HTML (no script): its kind and its tokens (as running text where it shows text)."""
        raw = [str(t).replace("\u2060", "") for t in self.props.get("tokens", [])]
        if self.element in INNER_HTML_TOKENS:
            tokens = f'<p dir="auto">{html.escape("".join(raw))}</p>'
        else:
            cells = "".join(f"<td>{html.escape(t)}</td>" for t in raw[:60]) + ("<td>...</td>" if len(raw) > 60 else "")
            tokens = f'<table style="border-collapse: collapse;"><tr>{cells}</tr></table>'
        what = ", ".join(f"{k} {html.escape(str(v))}" for k, v in self.meta.items()
                         if k in ("layer", "heads", "opens_on", "dim") and v is not None)
        return (f"<b>circuitsvis {html.escape(self.element)}</b> (interactive; this summary is shown where "
                f"JavaScript does not run){': ' + what if what else ''}{tokens}")

    @property
    def local_src(self) -> str:  # type: ignore[override]
        """The widget with circuitsvis's bundle inlined: draws offline, about 1.3 MB."""
        return (
            f'<div id="{self.div_id}" style="margin: 15px 0;"></div>\n'
            f'<script crossorigin type="module">\n{circuitsvis_bundle()}\n{self._call()}\n</script>'
        )

    @property
    def cdn_src(self) -> str:  # type: ignore[override]
        """circuitsvis's CDN form (needs internet to draw)."""
        url = f"https://unpkg.com/circuitsvis@{circuitsvis.__version__}/dist/cdn/esm.js"
        return (
            f'<div id="{self.div_id}" style="margin: 15px 0;"></div>\n<script crossorigin type="module">\n'
            f'import {{ render, {self.element} }} from "{url}";\n'
            f'render("{self.div_id}", {self.element}, {script_json(self.props)});\n</script>'
        )

    def mount_html(self) -> str:
        """The div and a classic script that draws into it, for a page that already ran
        :func:`circuitsvis_bundle` (what :func:`massact_lens.viz.save_html` writes)."""
        return (f'<div id="{self.div_id}" class="circuitsvis circuitsvis-{self.element}"></div>\n'
                f"<script>{self._call()}</script>")

    def _repr_html_(self) -> str:
        """The notebook output: the bundle only in the session's first view, and a static summary."""
        return widget_output(self.div_id, self._call(), self.static_html())

    def __str__(self) -> str:
        return self.local_src

    def __repr__(self) -> str:
        return f"Widget({self.element}, {sorted(self.props)})"
