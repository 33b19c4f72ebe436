"""Figures of the analyses beyond the paper: bias surgery head by head, and the sink curve
over a long context.

>>> from massact_lens.attention import sink_curve
>>> from massact_lens.examples import minilm
>>> fig = sink_curve_figure(sink_curve(minilm(), ["The cat sat on the mat."], layers=[0, 3], progress=False))
>>> [trace.name for trace in fig.data]
['L0', 'L3', 'uniform']
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from massact_lens.attention import SinkCurve
from massact_lens.attention.surgery import BiasSurgery
from massact_lens.viz._labels import short_positions
from massact_lens.viz._notebook import NotebookFigure

__all__ = ["bias_surgery_figure", "sink_curve_figure"]

_TEMPLATE = "plotly_white"


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
    if layers is not None and (isinstance(layers, str) or not isinstance(layers, Sequence) or not layers):
        raise ValueError(f"layers must be a non-empty list of the curve's layers {list(curve.layers)} (or None for "
                         f"all), not {layers!r}.")
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
        template=_TEMPLATE,
        title=title or f"Attention on C = {html.escape(curve.positions)} by query position (mean over heads)",
        xaxis={"title": "query position", "type": "log" if log_x else "linear"},
        yaxis={"title": "attention on C", "range": [0, 1.02]},
        meta={"positions": curve.positions, "route": curve.route},
    )
    return fig


def bias_surgery_figure(surgery: BiasSurgery, *, title: str | None = None) -> go.Figure:
    """Perplexity over the unedited model's per layer (bars, log axis) and per head (heat map).

    ``fig.data[0]``: per layer ``x`` and ``y = ppl_ratio`` (layer runs); ``fig.data[1].z[i][j]``:
    layer ``surgery.layers[i]``, head ``surgery.heads[j]`` (head runs; NaN where not run).

    >>> import torch
    >>> from massact_lens.attention import bias_surgery
    >>> from massact_lens.examples import tiny_model
    >>> r = bias_surgery(tiny_model("llama"), torch.randint(0, 64, (2, 8)), mode="zero", progress=False)
    >>> fig = bias_surgery_figure(r)
    >>> len(fig.data[0].y), len(fig.data[1].z), len(fig.data[1].z[0])   # layers; layers x heads
    (2, 2, 4)
    """
    if not isinstance(surgery, BiasSurgery):
        raise TypeError(f"bias_surgery_figure draws a BiasSurgery (massact_lens.attention.bias_surgery(...)), not "
                        f"{type(surgery).__name__}: pass the result itself, not its table.")
    base = surgery.baseline_nll
    layer_ratio = [math.exp(v - base) if math.isfinite(v) else None for v in surgery.layer_nll.tolist()]
    head_ratio = [[math.exp(v - base) if math.isfinite(v) else None for v in row] for row in surgery.head_nll.tolist()]
    fig = NotebookFigure(make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55],
                                       subplot_titles=["each layer's heads edited", "one head edited"]))
    fig.add_trace(go.Bar(x=list(surgery.layers), y=layer_ratio, name="layer", marker_color="#d62728",
                         hovertemplate="layer %{x}: x%{y:.3f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Heatmap(z=head_ratio, x=[f"H{h}" for h in surgery.heads], y=[f"L{la}" for la in surgery.layers],
                             colorscale="Reds", zmin=1.0, colorbar={"title": "perplexity<br>ratio"},
                             hovertemplate="%{y} %{x}: x%{z:.3f}<extra></extra>"), row=1, col=2)
    fig.update_yaxes(type="log", title_text="perplexity / unedited", row=1, col=1)
    fig.update_yaxes(autorange="reversed", row=1, col=2)
    fig.update_xaxes(title_text="layer", row=1, col=1)
    every = f", all heads x{math.exp(surgery.all_nll - base):.3g}" if math.isfinite(surgery.all_nll) else ""
    fig.update_layout(template=_TEMPLATE, height=max(380, 18 * len(surgery.layers) + 160), showlegend=False,
                      title=title or (f"Bias surgery ({html.escape(surgery.mode)}, C = "
                                      f"{html.escape(short_positions(surgery.positions))}): unedited perplexity "
                                      f"{surgery.baseline_perplexity:.4g}{every}"),
                      meta={"mode": surgery.mode, "positions": surgery.positions, "baseline_nll": base})
    return fig
