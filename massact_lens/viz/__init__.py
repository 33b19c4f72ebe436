"""Views of massive activations: circuitsvis widgets and plotly figures that render results, offline.

Widgets and figures take data (results, hidden states); the model-taking one-liners
(:func:`attention_heads`, :func:`tokens_by_activation`, :func:`hidden_states`)
measure first. :func:`save_html` writes any of them to one file that draws offline.
The ``massact report`` page is :mod:`massact_lens.report`.

>>> from massact_lens import viz
>>> "save_html" in viz.__all__
True
"""

from typing import Any

from massact_lens.viz.figures import (
    ablation_figure,
    attention_logits_figure,
    attention_sink_figure,
    hidden_state_figure,
    implicit_bias_figure,
    layer_stats_figure,
)
from massact_lens.viz.hidden import HiddenStates, hidden_states
from massact_lens.viz.page import save_html
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
    "hidden_state_figure",
    "hidden_states",
    "implicit_bias_figure",
    "layer_stats_figure",
    "save_html",
    "tokens_by_activation",
    "tokens_by_activation_widget",
]

_MOVED_TO_REPORT = ("Report", "Section", "build_report")


def __getattr__(name: str) -> Any:
    """``viz.build_report`` / ``viz.Report`` / ``viz.Section``: moved to :mod:`massact_lens.report` (deprecated)."""
    if name not in _MOVED_TO_REPORT:
        raise AttributeError(f"module 'massact_lens.viz' has no attribute {name!r}")
    import importlib
    import warnings

    warnings.warn(
        f"massact_lens.viz.{name} moved to massact_lens.report.{name}; the old name goes in the next release.",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module("massact_lens.report"), name)
