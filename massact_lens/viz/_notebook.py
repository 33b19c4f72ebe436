"""How figures and widgets show themselves in a notebook: each library once per session, and a static fallback.

A notebook output that carries plotly.js (4.6 MB) or circuitsvis's bundle (1.3 MB)
in every cell makes a heavy notebook. Here the first figure (widget) shown in a
Python session inlines its library as a classic script, which defines the global
``Plotly`` (``CircuitsVis``); later outputs wait for that global and reuse it. Each
output also holds a static part, a plain-HTML summary of what it draws (title, axis
titles, the numbers as a table), which the drawing hides: viewers that run no
JavaScript (GitHub, nbviewer without trust, an exported HTML with scripts off) still
show something. Colab puts each output in its own frame, so there every output
inlines its library. When the cell whose output holds a library runs again (its output
is replaced), its new output inlines the library again, so a notebook saved after any
re-run still holds it once (a cell is known by the id JupyterLab sends, else by its source:
without ids a second cell of the same source inlines it again too, which is heavy but
safe). :func:`forget_shown_bundles` makes the next output inline again (after clearing
the output that held them by hand).

>>> import plotly.graph_objects as go
>>> forget_shown_bundles()
>>> first = NotebookFigure(go.Figure(go.Bar(x=["a", "b"], y=[1, 2], name="n")))._repr_mimebundle_()
>>> second = NotebookFigure(go.Figure(go.Bar(x=["a"], y=[3])))._repr_mimebundle_()
>>> sorted(first), 'id="massact-plotly-js"' in first["text/html"], 'id="massact-plotly-js"' in second["text/html"]
(['application/vnd.plotly.v1+json', 'text/html'], True, False)
"""

from __future__ import annotations

import html
import json
import sys
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import plotly.graph_objects as go

from massact_lens.viz._scripts import circuitsvis_bundle, plotly_bundle, script_json

__all__ = ["NotebookFigure", "forget_shown_bundles", "static_summary", "widget_output"]

#: Libraries already inlined into a notebook output in this Python session, and the cell
#: whose output holds each: (cell id or None, cell source).
_SHOWN: dict[str, tuple[str | None, str]] = {}
#: The cell running now, as IPython's ``pre_run_cell`` event told it (None: not yet told).
_RUNNING: list[tuple[str | None, str] | None] = [None]
#: The IPython shells told to call :func:`_before_cell` (by id).
_WATCHED: set[int] = set()
_MAX_ROWS = 40
_STATIC_STYLE = "font: 12px/1.4 sans-serif; color: #333; border: 1px dashed #bbb; padding: 6px 10px; margin: 6px 0;"
_PLOTLY_CONFIG = {"responsive": True, "displaylogo": False}


def forget_shown_bundles() -> None:
    """Make the next figure and widget shown inline their library again (this session forgets it did)."""
    _SHOWN.clear()


def _same_cell(a: tuple[str | None, str], b: tuple[str | None, str]) -> bool:
    """One cell: the same cell id where the front end sends ids (JupyterLab), else the same source (nbclient)."""
    return a[0] == b[0] if a[0] is not None and b[0] is not None else a[1] == b[1]


def _before_cell(info: Any) -> None:
    """IPython's ``pre_run_cell``: a cell whose output held a library runs again, and its new
    output replaces the old one, so the library is inlined again (a saved notebook keeps it)."""
    cell = (getattr(info, "cell_id", None), str(getattr(info, "raw_cell", "") or ""))
    _RUNNING[0] = cell
    for name, where in list(_SHOWN.items()):
        if _same_cell(where, cell):
            del _SHOWN[name]


def _running_cell() -> tuple[str | None, str]:
    """The cell running now (before the event was registered: the last input of IPython's history)."""
    if _RUNNING[0] is not None:
        return _RUNNING[0]
    shell = _shell()
    history = getattr(getattr(shell, "history_manager", None), "input_hist_raw", None) or [""]
    return (None, str(history[-1]))


def _shell() -> Any:
    """The running IPython shell, or None (never imports IPython)."""
    ipython = sys.modules.get("IPython")
    return ipython.get_ipython() if ipython is not None else None  # type: ignore[attr-defined]


def _watch_cells() -> None:
    """Register :func:`_before_cell` with the running IPython shell, once."""
    shell = _shell()
    if shell is not None and id(shell) not in _WATCHED:
        shell.events.register("pre_run_cell", _before_cell)
        _WATCHED.add(id(shell))


def _library_once(name: str, source: Callable[[], str]) -> str:
    """The library's ``<script>`` for the first output of the session (every output in Colab), else ``""``.

    "First" again when the cell whose output held it runs again (its output is replaced).
    """
    if name in _SHOWN and "google.colab" not in sys.modules:
        return ""
    _watch_cells()
    _SHOWN[name] = _running_cell()
    return f'<script id="massact-{name}-js">{source()}</script>\n'


def _wait_then(global_name: str, element_id: str, body: str) -> str:
    """A script that runs ``body`` once ``window[global_name]`` exists (an earlier output defines it)."""
    missing = (
        f"This view needs {global_name}, which the first view of this Python session put into its output. "
        "Re-run that cell, or call massact_lens.viz._notebook.forget_shown_bundles() and re-run this one."
    )
    return (
        "<script>(function () {\n"
        "  var tries = 0;\n"
        "  function draw() {\n"
        f"    if (window.{global_name} === undefined) {{\n"
        f"      if (++tries < 600) {{ setTimeout(draw, 100); return; }}\n"
        f"      var el = document.getElementById({script_json(element_id + '-static')});\n"
        f"      if (el) el.insertAdjacentText('afterbegin', {script_json(missing)});\n"
        "      return;\n"
        "    }\n"
        f"    {body}\n"
        f"    var fallback = document.getElementById({script_json(element_id + '-static')});\n"
        "    if (fallback) fallback.style.display = 'none';\n"
        "  }\n"
        "  draw();\n"
        "})();</script>"
    )


# ----------------------------------------------------------------------------- static summaries


def _text(value: Any) -> str:
    """A cell of the static table: escaped once (labels that plotly needed escaped are unescaped first)."""
    if isinstance(value, float):
        value = f"{value:.4g}"
    return html.escape(html.unescape(str(value)))


def _table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    shown = list(rows[:_MAX_ROWS])
    more = f"<p>... {len(rows) - _MAX_ROWS} more rows</p>" if len(rows) > _MAX_ROWS else ""
    head = "".join(f"<th>{_text(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_text(v)}</td>" for v in row) + "</tr>" for row in shown)
    return f'<table style="border-collapse: collapse;"><tr>{head}</tr>{body}</table>{more}'


def _axis_titles(layout: dict[str, Any]) -> list[str]:
    """``"xaxis: layer"``, ... for every 2D and 3D axis with a title."""
    axes = [(name, axis) for name, axis in layout.items() if name.startswith(("xaxis", "yaxis"))]
    for scene_name, scene in layout.items():
        if scene_name.startswith("scene") and isinstance(scene, dict):
            axes += [(f"{scene_name}.{n}", a) for n, a in scene.items() if n in ("xaxis", "yaxis", "zaxis")]
    out = []
    for name, axis in sorted(axes):
        title = axis.get("title") if isinstance(axis, dict) else None
        text = title.get("text") if isinstance(title, dict) else title
        if text:
            out.append(f"{name}: {text}")
    return out


def static_summary(figure: go.Figure) -> str:
    """The figure as plain HTML, no script: title, axis titles, and its numbers as tables.

    Traces that share an x axis become columns of one table; a heat map with at most
    40 rows and columns becomes a table of its values; anything larger (a 3D
    surface) is described by its shape and peak.

    >>> fig = go.Figure(go.Scatter(x=["L0", "L1"], y=[1.0, 2.5], name="top 1"))
    >>> "<td>L1</td><td>2.5</td>" in static_summary(fig.update_layout(title="T"))
    True
    """
    parts = [f"<b>{_text(figure.layout.title.text or 'plotly figure')}</b> "
             "(interactive figure; this static summary is shown where JavaScript does not run)"]
    axes = _axis_titles(figure.layout.to_plotly_json())
    if axes:
        parts.append("<br>Axes: " + _text("; ".join(axes)))
    series: dict[tuple[Any, ...], list[Any]] = {}
    for trace in figure.data:
        kind = trace.type
        if kind in ("heatmap", "surface"):
            z = [list(row) for row in (trace.z or [])]
            n_rows, n_cols = len(z), len(z[0]) if z else 0
            if kind == "heatmap" and n_rows <= _MAX_ROWS and n_cols <= _MAX_ROWS:
                cols = list(trace.x) if trace.x is not None else list(range(n_cols))
                rows_ = list(trace.y) if trace.y is not None else list(range(n_rows))
                parts.append(_table(["", *cols], [[rows_[i], *z[i]] for i in range(n_rows)]))
            else:
                finite = [v for row in z for v in row if isinstance(v, int | float)]
                peak = f", largest value {max(finite):.4g}" if finite else ""
                parts.append(f"<p>{_text(kind)} of {n_rows} x {n_cols} values{peak}.</p>")
        elif getattr(trace, "x", None) is not None and getattr(trace, "y", None) is not None and kind != "scatter3d":
            key = (getattr(trace, "xaxis", None), tuple(trace.x))
            series.setdefault(key, []).append(trace)
    for (_, xs), traces in series.items():
        header = ["x", *[t.name or t.type for t in traces]]
        parts.append(_table(header, [[x, *[t.y[i] if i < len(t.y) else "" for t in traces]] for i, x in enumerate(xs)]))
    return "\n".join(parts)


# ----------------------------------------------------------------------------- outputs


class NotebookFigure(go.Figure):
    """A plotly ``Figure`` whose notebook output carries a static fallback and plotly.js once per session.

    Everything else is plotly's ``Figure``: ``fig.show()``, ``write_html``,
    ``update_layout``. Its mime bundle has plotly's own JSON type (JupyterLab and VS
    Code draw it natively) and ``text/html`` (nbconvert, GitHub, classic Notebook).
    """

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None, validate: bool = True,  # noqa: ARG002
                          **kwargs: Any) -> dict[str, Any]:  # noqa: ARG002
        figure = json.loads(str(self.to_json(validate=False)))
        element = "massact-plot-" + uuid.uuid4().hex[:12]
        library = _library_once("plotly", plotly_bundle)
        data, layout = script_json(figure.get("data", [])), script_json(figure.get("layout", {}))
        page = (
            f'<div id="{element}"></div>\n<div id="{element}-static" style="{_STATIC_STYLE}">{static_summary(self)}</div>\n'
            + library
            + _wait_then("Plotly", element,
                         f"Plotly.newPlot({script_json(element)}, {data}, {layout}, {script_json(_PLOTLY_CONFIG)});")
        )
        return {
            "application/vnd.plotly.v1+json": {"data": figure.get("data", []), "layout": figure.get("layout", {}),
                                               "config": _PLOTLY_CONFIG},
            "text/html": page,
        }

    def _repr_html_(self) -> str:
        return self._repr_mimebundle_()["text/html"]

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self._repr_mimebundle_(), raw=True)


def widget_output(div_id: str, render_call: str, static: str) -> str:
    """A circuitsvis view's notebook output: its div, a static summary until drawn, the bundle once, the call.

    ``render_call`` is the JavaScript that draws into ``div_id`` with the global
    ``CircuitsVis`` (:meth:`massact_lens.viz.Widget.mount_html` runs the same).
    """
    return (
        f'<div id="{div_id}" style="margin: 15px 0;"></div>\n'
        f'<div id="{div_id}-static" style="{_STATIC_STYLE}">{static}</div>\n'
        + _library_once("circuitsvis", circuitsvis_bundle)
        + _wait_then("CircuitsVis", div_id, render_call)
    )
