"""The paper's figures as plotly figures, each drawn from the result object that holds its data.

Layer-wise top-1/2/3 vs median (:func:`layer_stats_figure`, the paper's Figure 2),
one hidden state in 3D (:func:`hidden_state_figure`, Figure 1), attention logits
(Figure 6), attention on the massive tokens, the implicit-bias decomposition
(Figure 8), and the ablation table (Table 3). Traces are named so that code can
read the data back; token text is HTML-escaped where plotly would read it as markup.

>>> from massact_lens import scan
>>> from massact_lens.examples import minilm
>>> fig = layer_stats_figure(scan(minilm(), ["The cat sat on the mat."], progress=False))
>>> [trace.name for trace in fig.data], fig.layout.yaxis.type
(['top 1', 'top 2', 'top 3', 'median'], 'log')
"""

from __future__ import annotations

import html
import math
from typing import Literal

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from massact_lens.attention import AttentionConcentration, AttentionLogits, ImplicitBias
from massact_lens.evaluate import AblationTable
from massact_lens.find.scanner import ScanResult
from massact_lens.viz._expect import expect_result
from massact_lens.viz._labels import (
    display_token,
    layer_labels,
    model_short_name,
    short_hook_name,
    short_positions,
)
from massact_lens.viz._notebook import NotebookFigure
from massact_lens.viz.hidden import HiddenStates

__all__ = [
    "ablation_figure",
    "attention_logits_figure",
    "attention_sink_figure",
    "hidden_state_figure",
    "implicit_bias_figure",
    "layer_stats_figure",
]

_TEMPLATE = "plotly_white"
#: A horizontal legend above the plot area, right-aligned: it never covers tick labels or axis titles.
_LEGEND_ON_TOP = {"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "right", "x": 1.0}
_COLOURS = {"top 1": "#d62728", "top 2": "#ff7f0e", "top 3": "#bcbd22", "median": "#1f77b4", "bias": "#d62728", "rest": "#1f77b4"}


def _finite(values: list[float]) -> list[float | None]:
    return [v if v is not None and math.isfinite(v) else None for v in values]


#: The columns of :meth:`~massact_lens.ScanResult.layer_stats` that :func:`layer_stats_figure` draws.
_LAYER_STATS_COLUMNS = ("hook_name", "top1", "top2", "top3", "median", "top1_std")


def _layer_stats(result: ScanResult | pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The table to draw and the title's parenthesis, from a scan or its ``layer_stats()``."""
    if isinstance(result, ScanResult):
        model = html.escape(model_short_name(result.provenance))
        return result.layer_stats(), f"{model}, {result.n_inputs} inputs"
    if not isinstance(result, pd.DataFrame):
        raise TypeError(
            f"layer_stats_figure draws a ScanResult (massact_lens.scan(...)) or its layer_stats() DataFrame, "
            f"not {type(result).__name__}."
        )
    missing = [c for c in _LAYER_STATS_COLUMNS if c not in result.columns]
    if missing:
        raise ValueError(
            f"This DataFrame has no column {', '.join(missing)}: pass the ScanResult, or its layer_stats() "
            f"with the columns {', '.join(_LAYER_STATS_COLUMNS)} kept."
        )
    n = max((int(v) for v in result["n_inputs"]), default=None) if "n_inputs" in result.columns else None
    return result.reset_index(drop=True), "" if n is None else f"{n} inputs"


def layer_stats_figure(result: ScanResult | pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """The layer-wise top-1/2/3 ``|x|`` and median curves, log scale.

    One trace each named ``"top 1"``, ``"top 2"``, ``"top 3"``, ``"median"``: x the
    hook points in forward order (``"L3"`` when there is one per layer, else
    ``"L3 ln2.hook_in"``; ``customdata`` their full names), y the mean over inputs
    (:meth:`~massact_lens.ScanResult.layer_stats`); ``"top 1"`` has the spread
    across inputs as error bars. The legend sits above the plot, clear of the ticks.
    ``result`` is a :class:`~massact_lens.ScanResult` or its ``layer_stats()``
    DataFrame (the title then names no model).

    >>> import torch
    >>> from massact_lens import scan
    >>> from massact_lens.examples import tiny_model
    >>> fig = layer_stats_figure(scan(tiny_model(), torch.randint(0, 64, (2, 6)), progress=False))
    >>> len(fig.data[0].y), list(fig.data[0].x), fig.layout.xaxis.title.text   # one point per hook point
    (2, ['L0', 'L1'], 'layer (hook_resid_post)')

    Raises:
        TypeError / ValueError: neither a ScanResult nor a ``layer_stats()`` table.
    """
    stats, about = _layer_stats(result)
    labels, x_title = layer_labels(list(stats["hook_name"]))
    fig = NotebookFigure()
    for column, name in (("top1", "top 1"), ("top2", "top 2"), ("top3", "top 3"), ("median", "median")):
        fig.add_trace(
            go.Scatter(
                x=labels,
                y=_finite(stats[column].tolist()),
                name=name,
                mode="lines+markers",
                line={"color": _COLOURS[name], "dash": "dot" if name == "median" else "solid"},
                customdata=list(stats["hook_name"]),
                hovertemplate="%{customdata}<br>" + name + ": %{y:.4g}<extra></extra>",
                error_y={"type": "data", "array": stats["top1_std"].tolist(), "visible": True} if name == "top 1" else None,
            )
        )
    fig.update_layout(
        template=_TEMPLATE,
        title=title or "Largest |activation| vs median per hidden state" + (f" ({about})" if about else ""),
        xaxis={"title": x_title, "tickangle": -45 if len(labels) > 16 else None},
        yaxis={"title": "|activation| (mean over inputs)", "type": "log", "dtick": 1},
        legend=_LEGEND_ON_TOP,
        margin={"t": 100},
    )
    return fig


def hidden_state_figure(
    states: HiddenStates,
    hook: str | int,
    *,
    kind: Literal["surface", "heatmap"] = "surface",
    min_ratio: float | int = 100.0,
    max_labels: int = 6,
    title: str | None = None,
) -> go.Figure:
    """One hidden state of one input, ``|x|`` over tokens x dims, its standout dims labelled.

    Token labels are escaped for the heat map's SVG axis and left as they are on the
    3D axes and markers, which plotly draws as plain text (``<s>``, not ``&lt;s&gt;``).

    The paper's 3D plot (``kind="surface"``) or a heat map. The dims whose largest
    ``|x|`` is at least ``min_ratio x`` the median ``|x|`` (at most ``max_labels``,
    found in the data by :meth:`~massact_lens.viz.HiddenStates.massive_dims`) get
    tick labels ``"dim 99"`` and, on the surface, a marker at their peak; the
    token axis is labelled with the tokens. ``fig.layout.meta`` records the hook,
    the labelled dims, the median and the peak.

    Args:
        states: from :func:`massact_lens.viz.hidden_states`.
        hook: a hook name, or a layer (its hook point with the largest ``|x|``).

    >>> from massact_lens.examples import minilm
    >>> from massact_lens.viz import hidden_states
    >>> states = hidden_states(minilm(), "The cat sat on the mat.", layers=[0])
    >>> fig = hidden_state_figure(states, 0)
    >>> fig.layout.meta["hook_name"], fig.layout.meta["labelled_dims"]
    ('blocks.0.ln2.hook_in', [99])
    >>> list(fig.layout.scene.xaxis.ticktext), list(fig.layout.scene.yaxis.ticktext)[:2]
    (['dim 99'], ['[CLS]', 'the'])
    """
    expect_result(states, HiddenStates, "hidden_state_figure", "states", "massact_lens.viz.hidden_states(model, text)")
    if kind not in ("surface", "heatmap"):
        raise ValueError(f"kind must be 'surface' or 'heatmap', not {kind!r}.")
    index = states.hook_index(hook)
    name = states.hook_names[index]
    magnitude = states.values[index].abs()  # [pos, d_model]
    dims = list(states.massive_dims(name, min_ratio=min_ratio, max_dims=max_labels))
    median = float(states.medians()[index])
    peak = float(magnitude.max())
    tokens = [display_token(t) for t in states.tokens]  # for SVG text: escaped
    plain_tokens = [display_token(t, escape=False) for t in states.tokens]  # for WebGL text: as it is
    positions = list(range(len(tokens)))
    dim_ticks = sorted(dims)
    dim_text = [f"dim {d}" for d in dim_ticks]
    hover = "token %{y}<br>dim %{x}<br>|x| %{z:.4g}<extra></extra>"
    meta = {"hook_name": name, "labelled_dims": dims, "median": median, "peak": peak, "kind": kind}
    heading = title or (
        f"{html.escape(short_hook_name(name))}: |x| per token and dim, peak {peak:.4g} = "
        f"{peak / median if median > 0 else math.inf:.0f}x the median ({median:.3g})"
    )
    if kind == "heatmap":
        fig = NotebookFigure(
            go.Heatmap(z=magnitude.tolist(), x=list(range(magnitude.shape[1])), y=positions, colorscale="Viridis",
                       colorbar={"title": "|x|"}, hovertemplate=hover, name=name)
        )
        fig.update_layout(
            template=_TEMPLATE,
            title=heading,
            xaxis={"title": "feature dim", "tickvals": dim_ticks, "ticktext": dim_text} if dims else {"title": "feature dim"},
            yaxis={"title": "token", "tickvals": positions, "ticktext": tokens, "autorange": "reversed"},
            meta=meta,
        )
        return fig
    fig = NotebookFigure(
        go.Surface(z=magnitude.tolist(), x=list(range(magnitude.shape[1])), y=positions, colorscale="Viridis",
                   colorbar={"title": "|x|"}, hovertemplate=hover, name=name)
    )
    if dims:
        peak_pos = [int(magnitude[:, d].argmax()) for d in dims]
        fig.add_trace(
            go.Scatter3d(
                x=dims,
                y=peak_pos,
                z=[float(magnitude[p, d]) for p, d in zip(peak_pos, dims, strict=True)],
                mode="markers+text",
                text=[f"dim {d} on {plain_tokens[p]}" for p, d in zip(peak_pos, dims, strict=True)],
                customdata=[f"dim {d} on {tokens[p]}" for p, d in zip(peak_pos, dims, strict=True)],
                textposition="top center",
                marker={"size": 4, "color": "#d62728"},
                name="massive dims",
                hovertemplate="%{customdata}: %{z:.4g}<extra></extra>",
            )
        )
    fig.update_layout(
        template=_TEMPLATE,
        title=heading,
        scene={
            "xaxis": {"title": "feature dim", "tickvals": dim_ticks, "ticktext": dim_text} if dims else {"title": "feature dim"},
            "yaxis": {"title": "token", "tickvals": positions, "ticktext": plain_tokens},
            "zaxis": {"title": "|x|"},
            "camera": {"eye": {"x": 1.6, "y": -1.6, "z": 0.9}},
        },
        height=560,
        margin={"l": 0, "r": 0, "t": 60, "b": 0},
        meta=meta,
    )
    return fig


def attention_logits_figure(
    logits: AttentionLogits,
    layer: int,
    head: int | None = None,
    *,
    values: Literal["logits", "pattern"] = "logits",
    title: str | None = None,
) -> go.Figure:
    """Heat map of one layer's attention logits (or probabilities) on one input, query x key.

    ``head=None``: the mean over heads. Cells a query cannot see (causal mask) are
    empty. Axes are token positions labelled with the tokens; the trace's
    ``z`` is the matrix drawn and ``fig.layout.meta`` says what it is.

    >>> from massact_lens.attention import attention_logits
    >>> from massact_lens.examples import minilm
    >>> fig = attention_logits_figure(attention_logits(minilm(), "The cat sat.", layers=[2]), 2)
    >>> len(fig.data[0].z), fig.layout.meta["head"]
    (6, 'mean')
    """
    expect_result(logits, AttentionLogits, "attention_logits_figure", "logits",
                  "massact_lens.attention.attention_logits(model, text, layers=[...])")
    if values not in ("logits", "pattern"):
        raise ValueError(f"values must be 'logits' or 'pattern', not {values!r}.")
    if layer not in logits.layers:
        raise ValueError(f"Layer {layer} is not in these logits (layers {list(logits.layers)}): pass one of them, or "
                         f"measure it first: attention_logits(model, text, layers=[{layer}]).")
    i = logits.layers.index(layer)
    data = (logits.logits if values == "logits" else logits.pattern)[i]  # [head, q, k]
    n_heads = int(data.shape[0])
    if head is not None and not 0 <= head < n_heads:
        raise ValueError(f"Head {head} does not exist: there are {n_heads} heads; pass head=0..{n_heads - 1}, or "
                         "None for their mean.")
    matrix = data[head] if head is not None else data.nanmean(dim=0)
    n_keys = int(matrix.shape[-1])
    names = [display_token(t) for t in logits.tokens] + ["&lt;slot&gt;"] * max(0, n_keys - len(logits.tokens))
    z = [[None if math.isnan(v) else v for v in row] for row in matrix.tolist()]
    what = "attention logits" if values == "logits" else "attention probabilities"
    which = f"head {head}" if head is not None else "mean over heads"
    source = logits.source[i]
    fig = NotebookFigure(
        go.Heatmap(
            z=z,
            x=list(range(n_keys)),
            y=list(range(int(matrix.shape[0]))),
            colorscale="RdBu_r" if values == "logits" else "Blues",
            zmid=0 if values == "logits" else None,
            colorbar={"title": "logit" if values == "logits" else "p"},
            hovertemplate="query %{y}<br>key %{x}<br>%{z:.3f}<extra></extra>",
            name=what,
        )
    )
    fig.update_layout(
        template=_TEMPLATE,
        title=title or f"Layer {layer} {what}, {which} ({html.escape(source)})",
        xaxis={"title": "key", "tickvals": list(range(n_keys)), "ticktext": names, "side": "top"},
        yaxis={"title": "query", "tickvals": list(range(int(matrix.shape[0]))), "ticktext": names[: matrix.shape[0]],
               "autorange": "reversed"},
        height=max(360, 28 * int(matrix.shape[0]) + 160),
        meta={"layer": layer, "head": "mean" if head is None else head, "values": values, "source": source},
    )
    return fig


def attention_sink_figure(concentration: AttentionConcentration, *, title: str | None = None) -> go.Figure:
    """Heat map of the attention on the key positions C per layer x head (mean over inputs).

    ``fig.data[0].z[i][h]`` is the mean attention of layer ``concentration.layers[i]``,
    head ``h`` on C; the uniform baseline is in the title and ``layout.meta``.

    >>> from massact_lens.attention import attention_concentration
    >>> from massact_lens.examples import minilm
    >>> fig = attention_sink_figure(attention_concentration(minilm(), ["Hi there."], progress=False))
    >>> len(fig.data[0].z), len(fig.data[0].z[0])       # layers x heads
    (6, 12)
    """
    expect_result(concentration, AttentionConcentration, "attention_sink_figure", "concentration",
                  "massact_lens.attention.attention_concentration(model, inputs)")
    mass = concentration.mean_mass  # [layer, head], over every input (not only the kept ones)
    uniform = float(concentration.mean_uniform_mass)
    fig = NotebookFigure(
        go.Heatmap(
            z=mass.tolist(),
            x=[f"H{h}" for h in range(concentration.n_heads)],
            y=[f"L{layer}" for layer in concentration.layers],
            zmin=0.0,
            zmax=1.0,
            colorscale="Reds",
            colorbar={"title": "attention<br>on C"},
            hovertemplate="%{y} %{x}: %{z:.3f}<extra></extra>",
            name="attention on C",
        )
    )
    fig.update_layout(
        template=_TEMPLATE,
        title=title or (
            f"Attention on C = {html.escape(short_positions(concentration.positions))} "
            f"(uniform attention would give {uniform:.3f})"
        ),
        xaxis_title="head",
        yaxis={"title": "layer", "autorange": "reversed"},
        height=max(300, (40 if len(concentration.layers) <= 12 else 22) * len(concentration.layers) + 140),
        meta={"positions": concentration.positions, "uniform": uniform},
    )
    return fig


def implicit_bias_figure(
    decomposition: ImplicitBias,
    *,
    queries: Literal["all", "outside"] = "all",
    title: str | None = None,
) -> go.Figure:
    """The implicit attention bias: the term from C vs the rest, per layer (all heads summed).

    Three panels over layers, from :meth:`~massact_lens.attention.ImplicitBias.to_dataframe`
    rows ``head == -1`` (the attention output in the residual stream):
    attention mass on C; the mean norm of each term; and how much each term
    varies across queries and inputs (std norm / mean norm). The bias term is
    nearly constant where the rest is not. Traces are named
    ``"attention on C"``, ``"bias norm"``, ``"bias variation"``, ``"rest norm"``,
    ``"rest variation"``; every panel has axis titles, the legend sits above.

    >>> import torch
    >>> from massact_lens.attention import implicit_bias
    >>> from massact_lens.examples import tiny_model
    >>> split = implicit_bias(tiny_model(), torch.randint(0, 64, (3, 6)), "start", progress=False)
    >>> [t.name for t in implicit_bias_figure(split).data]
    ['attention on C', 'bias norm', 'bias variation', 'rest norm', 'rest variation']
    """
    expect_result(decomposition, ImplicitBias, "implicit_bias_figure", "decomposition",
                  "massact_lens.attention.implicit_bias(model, inputs)")
    table = decomposition.to_dataframe(queries)
    total = pd.DataFrame(table[table["head"] == -1]).sort_values(by="layer")
    layers = [int(x) for x in total["layer"]]
    fig = NotebookFigure(make_subplots(
        rows=1,
        cols=3,
        subplot_titles=("attention on C", "norm written to the residual", "variation across queries"),
        horizontal_spacing=0.09,
    ))
    fig.add_trace(go.Bar(x=layers, y=_finite(total["c_mass"].tolist()), name="attention on C", marker_color="#7f7f7f"), row=1, col=1)
    for term in ("bias", "rest"):
        colour = _COLOURS[term]
        fig.add_trace(
            go.Scatter(x=layers, y=_finite(total[f"{term}_norm"].tolist()), name=f"{term} norm", mode="lines+markers",
                       line={"color": colour}),
            row=1, col=2,
        )
        fig.add_trace(
            go.Scatter(x=layers, y=_finite(total[f"{term}_rel_variation"].tolist()), name=f"{term} variation",
                       mode="lines+markers", line={"color": colour, "dash": "dot"}),
            row=1, col=3,
        )
    fig.update_yaxes(range=[0, 1], title_text="mean attention probability", row=1, col=1)
    fig.update_yaxes(title_text="mean norm of the term", row=1, col=2)
    fig.update_yaxes(title_text="std / mean norm", row=1, col=3)
    fig.update_xaxes(title_text="layer", dtick=1 if len(layers) <= 12 else None)
    fig.update_layout(
        template=_TEMPLATE,
        title=title or (
            "Implicit attention bias: attention output = term from C "
            f"({html.escape(short_positions(decomposition.positions))}) + rest"
        ),
        legend={**_LEGEND_ON_TOP, "y": 1.16},  # above the panels' titles too
        height=450,
        margin={"t": 130},
        meta={"positions": decomposition.positions, "queries": queries, "layers": layers},
    )
    return fig


def ablation_figure(table: AblationTable, *, title: str | None = None) -> go.Figure:
    """The Table-3 comparison as bars: one panel per metric, one bar per setting.

    Each panel's trace is named after its metric; ``x`` holds the settings
    (Original, Set to zero, Set to mean, ...), ``y`` the values. An infinite or
    NaN value has no bar and is written as text (``"inf"``), as the paper does. A
    panel whose positive values span more than 100x (a perplexity that explodes)
    has a log y axis, so the small bars stay visible.

    >>> from massact_lens import Provenance
    >>> from massact_lens.evaluate import AblationTable
    >>> llama2 = AblationTable(provenance=Provenance("LLaMA2-7B", "LlamaForCausalLM", 32, 4096, 32, "float16", False),
    ...     profile_dims=(1415, 2533),
    ...     metrics=("WikiText ppl",), hook_names={}, details={}, values={"Original": {"WikiText ppl": 5.47},
    ...     "Set to zero": {"WikiText ppl": float("inf")}, "Set to mean": {"WikiText ppl": 5.47}})
    >>> fig = ablation_figure(llama2)                       # the paper's Table 3 numbers
    >>> list(fig.data[0].x), list(fig.data[0].y), list(fig.data[0].text)
    (['Original', 'Set to zero', 'Set to mean'], [5.47, None, 5.47], ['5.47', 'inf', '5.47'])
    >>> fig.layout.yaxis.title.text, fig.layout.yaxis.type
    ('WikiText ppl', 'linear')
    """
    expect_result(table, AblationTable, "ablation_figure", "table", "massact_lens.ablation_table(model, profile, ...)")
    settings = list(table.values)
    metrics = list(table.metrics)
    if not metrics:
        raise ValueError("The ablation table has no metrics to draw: build it with at least one metric "
                         "(massact_lens.evaluate.ablation_table with a corpus or sentences).")
    fig = NotebookFigure(make_subplots(rows=1, cols=len(metrics), subplot_titles=[html.escape(m) for m in metrics]))
    palette = ["#7f7f7f", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
    for j, metric in enumerate(metrics, start=1):
        raw = [float(table.values[s][metric]) for s in settings]
        text = ["inf" if math.isinf(v) else "nan" if math.isnan(v) else f"{v:.3g}" for v in raw]
        fig.add_trace(
            go.Bar(
                x=[html.escape(s) for s in settings],
                y=_finite(raw),
                text=text,
                textposition="outside",
                name=metric,
                marker_color=[palette[i % len(palette)] for i in range(len(settings))],
                showlegend=False,
                hovertemplate="%{x}: %{text}<extra>" + html.escape(metric) + "</extra>",
            ),
            row=1,
            col=j,
        )
        finite = [v for v in raw if math.isfinite(v)]
        fig.update_yaxes(title_text=html.escape(metric), row=1, col=j)
        if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
            top, bottom = math.log10(max(finite)), math.log10(min(finite))
            fig.update_yaxes(type="log", range=[bottom - 1.0, top + 0.6], row=1, col=j)  # small bars a decade tall
        elif finite and max(finite) > 0:
            fig.update_yaxes(type="linear", range=[0, max(finite) * 1.18], row=1, col=j)
    model = model_short_name(table.provenance)
    fig.update_xaxes(title_text="setting")
    fig.update_layout(
        template=_TEMPLATE,
        title=title or f"Massive activations set to zero vs set to their mean ({html.escape(model)})",
        height=380,
        meta={"settings": settings, "metrics": metrics},
    )
    return fig
