"""Views of massive activations: circuitsvis widgets, plotly figures, one offline HTML report.

* :mod:`massact_lens.viz.widgets`: circuitsvis views that draw offline:
  :func:`attention_heads` (one layer's heads, massive tokens marked, sinks out of
  the colour scale on request, causal or bidirectional masking from the model) and
  :func:`tokens_by_activation` (tokens coloured by their largest ``|x|`` or one dim,
  per hidden state).
* :mod:`massact_lens.viz.figures`: the paper's figures as plotly figures, from the
  library's results.
* :mod:`massact_lens.viz.report`: :func:`build_report` (the ``massact report``
  page) and :func:`save_html` (any figures / widgets / tables to one offline file).
* :mod:`massact_lens.viz.hidden`: :func:`hidden_states`, the full hidden states of
  one input, which the single-input views read.

>>> from massact_lens import viz
>>> "save_html" in viz.__all__
True
"""

from massact_lens.viz.figures import (
    ablation_figure,
    attention_logits_figure,
    attention_sink_figure,
    hidden_state_figure,
    implicit_bias_figure,
    layer_stats_figure,
)
from massact_lens.viz.hidden import HiddenStates, hidden_states
from massact_lens.viz.report import Report, Section, build_report, save_html
from massact_lens.viz.widgets import Widget, attention_heads, tokens_by_activation

__all__ = [
    "HiddenStates",
    "Report",
    "Section",
    "Widget",
    "ablation_figure",
    "attention_heads",
    "attention_logits_figure",
    "attention_sink_figure",
    "build_report",
    "hidden_state_figure",
    "hidden_states",
    "implicit_bias_figure",
    "layer_stats_figure",
    "save_html",
    "tokens_by_activation",
]
