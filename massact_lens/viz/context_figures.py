"""Figures of attention over a long context: the sink curve.

>>> from massact_lens.attention import sink_curve
>>> from massact_lens.examples import minilm
>>> fig = sink_curve_figure(sink_curve(minilm(), ["The cat sat on the mat."], layers=[0, 3], progress=False))
>>> [trace.name for trace in fig.data]
['L0', 'L3', 'uniform']
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import plotly.graph_objects as go

from massact_lens.attention import SinkCurve
from massact_lens.viz._notebook import NotebookFigure

__all__ = ["sink_curve_figure"]


def sink_curve_figure(curve: SinkCurve, *, layers: Sequence[int] | None = None, log_x: bool = True,
                      title: str | None = None) -> go.Figure:
    """Attention on C against the query's position: one line per layer (mean over heads),
    and the uniform baseline (averaged over the layers shown).

    ``fig.data[i].y[q]`` is the mass on C of layer ``layers[i]`` at query position ``q``
    (``x``: the positions; a log axis by default, queries 1 onwards, so that the first
    tokens and the far end both read).

    Raises:
        TypeError: ``curve`` is not a :class:`~massact_lens.attention.SinkCurve` (make one
            with :func:`massact_lens.attention.sink_curve`).
        ValueError: a layer the curve does not hold.
    """
    if not isinstance(curve, SinkCurve):
        raise TypeError(f"sink_curve_figure needs a SinkCurve (massact_lens.attention.sink_curve(...)), "
                        f"not {type(curve).__name__}.")
    chosen = list(curve.layers) if layers is None else list(layers)
    missing = [layer for layer in chosen if layer not in curve.layers]
    if missing:
        raise ValueError(f"Layers {missing} are not in this curve (it holds {list(curve.layers)}): pass some of "
                         "those, or measure the curve with them.")
    mass, uniform = curve.mass, curve.uniform
    start = 1 if log_x and mass.shape[-1] > 1 else 0
    x = list(range(start, int(mass.shape[-1])))
    fig = NotebookFigure()
    rows = [curve.layers.index(layer) for layer in chosen]
    for layer, i in zip(chosen, rows, strict=True):
        fig.add_trace(go.Scatter(x=x, y=mass[i, :, start:].mean(0).tolist(), mode="lines", name=f"L{layer}",
                                 hovertemplate=f"L{layer}, query %{{x}}: %{{y:.3f}}<extra></extra>"))
    fig.add_trace(go.Scatter(x=x, y=uniform[rows, start:].mean(0).tolist(), mode="lines", name="uniform",
                             line={"dash": "dot", "color": "black"}))
    fig.update_layout(
        template="plotly_white",
        title=title or f"Attention on C = {html.escape(curve.positions)} by query position (mean over heads)",
        xaxis={"title": "query position", "type": "log" if log_x else "linear"},
        yaxis={"title": "attention on C", "range": [0, 1.02]},
        meta={"positions": curve.positions, "route": curve.route},
    )
    return fig
