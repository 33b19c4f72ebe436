"""Views of massive activations: circuitsvis widgets and plotly figures that render results, offline.

Widgets and figures take data (results, hidden states); the model-taking one-liners
(:func:`attention_heads`, :func:`tokens_by_activation`, :func:`hidden_states`)
measure first. :func:`save_html` writes any of them to one file that draws offline.
The ``massact report`` page is :mod:`massact_lens.cli.report`.

>>> from massact_lens import viz
>>> "save_html" in viz.__all__
True
"""

from massact_lens.viz._page import save_html
from massact_lens.viz.beyond_figures import bias_surgery_figure, sink_curve_figure
from massact_lens.viz.figures import (
    ablation_figure,
    attention_logits_figure,
    attention_sink_figure,
    hidden_state_figure,
    implicit_bias_figure,
    layer_stats_figure,
)
from massact_lens.viz.hidden import HiddenStates, hidden_states
from massact_lens.viz.widgets import (
    Widget,
    attention_heads,
    attention_heads_widget,
    tokens_by_activation,
    tokens_by_activation_widget,
)

__all__ = [
    "HiddenStates",
    "Widget",
    "ablation_figure",
    "attention_heads",
    "attention_heads_widget",
    "attention_logits_figure",
    "attention_sink_figure",
    "bias_surgery_figure",
    "hidden_state_figure",
    "hidden_states",
    "implicit_bias_figure",
    "layer_stats_figure",
    "save_html",
    "sink_curve_figure",
    "tokens_by_activation",
    "tokens_by_activation_widget",
]
