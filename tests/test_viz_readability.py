"""Views read right: colour scales, the hidden state a view opens on, running text, labels, axes, legends."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from massact_lens import scan
from massact_lens._core.types import Provenance
from massact_lens.attention import AttentionLogits, implicit_bias
from massact_lens.evaluate import AblationTable
from massact_lens.examples import tiny_model
from massact_lens.models.planting import plant_massive_activation
from massact_lens.viz import (
    ablation_figure,
    attention_heads,
    attention_heads_widget,
    hidden_state_figure,
    hidden_states,
    implicit_bias_figure,
    layer_stats_figure,
    tokens_by_activation,
    tokens_by_activation_widget,
)
from massact_lens.viz._rendered import Widget

TEXT = "The cat slept on the warm windowsill all afternoon."


def _logits(pattern: torch.Tensor, causal: bool) -> AttentionLogits:
    """AttentionLogits for one layer (2) holding ``pattern`` ``[head, q, k]``, NaN logits above the diagonal if causal."""
    heads, n = pattern.shape[0], pattern.shape[-1]
    logits = torch.zeros_like(pattern)
    if causal:
        logits[:, torch.ones(n, n, dtype=torch.bool).triu(1)] = math.nan
    return AttentionLogits(
        provenance=Provenance("synthetic", "x", 3, 16, heads, "float32", False), layers=(2,), source=("synthetic",),
        prepend_bos=True, tokens=tuple(f"t{i}" for i in range(n)), token_ids=torch.arange(n),
        logits=logits[None], pattern=pattern[None],
    )


def test_one_strong_cell_does_not_set_the_colour_scale_of_every_head():
    n, heads = 12, 9
    pattern = torch.full((heads, n, n), 0.02).tril()
    pattern[:, :, 0] = 0.9  # the sink column
    pattern[4, 7, 5] = 0.99  # one strong cell in one head
    view = attention_heads_widget(_logits(pattern, causal=True), 2, massive=[0], exclude_bos=True)
    assert view.meta["max_value"] == pytest.approx(0.02)  # the other heads' attention is visible, not white
    assert view.props["maxValue"] == view.meta["max_value"]


def test_attention_heads_marks_minilms_massive_token_with_its_defaults(minilm_model):
    view = attention_heads(minilm_model, TEXT, layer=2)  # as README calls it
    assert view.props["tokens"][0] == "[CLS] ★d99"
    assert view.meta["criterion"] == (50.0, 200.0)  # the paper's 100 / 1000 find nothing on MiniLM
    planted = plant_massive_activation(tiny_model("llama", n_layers=3), layer=1, dim=5, value=1000.0)
    view = attention_heads(planted, torch.tensor([0, 4, 9, 3]), layer=2)
    assert view.meta["criterion"] == (100.0, 1000.0) and view.meta["massive"] == {0: (5,)}
    with pytest.raises(ValueError):
        attention_heads(minilm_model, TEXT, layer=2, min_ratio=0)


def test_the_tokens_view_opens_on_the_first_hidden_state_where_something_is_massive(minilm_model):
    view = tokens_by_activation(minilm_model, TEXT)
    states = view.meta["hook_names"]
    assert view.meta["opens_on"] == "blocks.0.ln2.hook_in" and view.select == states.index("blocks.0.ln2.hook_in")
    assert f"row.children[{view.select}].click()" in view.mount_html()
    # one colour scale for all hidden states: circuitsvis keeps the first bound when another is clicked
    top = max(max(row) for row in view.props["values"])
    assert view.props["positiveBounds"] == pytest.approx([top] * len(states))
    later = tokens_by_activation(minilm_model, TEXT, open_on="blocks.2.ln2.hook_in")
    assert later.select == states.index("blocks.2.ln2.hook_in")
    quiet = tokens_by_activation_widget(hidden_states(tiny_model(), torch.arange(6)))  # nothing massive
    assert quiet.meta["opens_on"] in quiet.meta["hook_names"]


def test_wordpiece_pieces_join_their_word_and_words_are_spaced(minilm_model):
    from massact_lens.viz._scripts import inert_markup

    tokens = tokens_by_activation(minilm_model, TEXT, layers=[0]).props["tokens"]
    assert "".join(tokens) == "[CLS] the cat slept on the warm windowsill all afternoon . [SEP]"
    smol_like = tokens_by_activation_widget(dataclasses.replace(hidden_states(tiny_model(), torch.arange(3)),
                                                                tokens=("<s>", "The", " cat")))
    assert smol_like.props["tokens"] == [inert_markup("<s>"), "The", " cat"]  # BPE: as they are


def test_token_markup_is_inert_where_circuitsvis_uses_innerhtml():
    view = Widget("ColoredTokens", {"tokens": ["<img src=x onerror=alert(1)>", "a&lt;b"], "values": [1.0, 2.0]})
    assert view.props["tokens"] == ["<\u2060img src=x onerror=alert(1)>", "a&\u2060lt;b"]
    heads = Widget("AttentionHeads", {"tokens": ["<b>"], "attention": [[[1.0]]]})
    assert heads.props["tokens"] == ["<b>"]  # drawn as text by circuitsvis: left as it is


def test_3d_labels_show_tokens_as_they_are_and_hover_stays_escaped():
    model = plant_massive_activation(tiny_model("llama", n_layers=3), layer=1, dim=5, value=800.0)
    states = dataclasses.replace(hidden_states(model, torch.tensor([0, 9, 4, 33])),
                                 tokens=("<|im_start|>", "a&b", " x", "<b>"))
    fig = hidden_state_figure(states, "blocks.2.hook_resid_post")
    assert list(fig.layout.scene.yaxis.ticktext) == ["<|im_start|>", "a&b", " x", "<b>"]  # WebGL text: literal
    marker = fig.data[1]
    assert list(marker.text) == ["dim 5 on <|im_start|>"]
    assert list(marker.customdata) == ["dim 5 on &lt;|im_start|&gt;"]  # SVG hover: escaped
    heat = hidden_state_figure(states, 2, kind="heatmap")
    assert list(heat.layout.yaxis.ticktext)[0] == "&lt;|im_start|&gt;"  # SVG axis: escaped


def _axes(fig) -> dict[str, dict]:
    layout = fig.layout.to_plotly_json()
    axes = {k: v for k, v in layout.items() if k.startswith(("xaxis", "yaxis"))}
    for name, scene in layout.items():
        if name.startswith("scene"):
            axes.update({f"{name}.{k}": v for k, v in scene.items() if k in ("xaxis", "yaxis", "zaxis")})
    return axes


def test_every_panel_has_axis_titles_and_no_legend_sits_under_the_plot(minilm_model, sentences):
    result = scan(minilm_model, sentences[:2], progress=False)
    split = implicit_bias(tiny_model(), torch.randint(0, 64, (3, 6)), "start", progress=False)
    table = AblationTable(provenance=Provenance("m", "unknown", 1, 4, 1, "float32", False), profile_dims=(1,), metrics=("perplexity", "accuracy"),
                          hook_names={}, details={}, values={"Original": {"perplexity": 18.8, "accuracy": 70.0},
                          "Set to zero": {"perplexity": 2.9e6, "accuracy": 30.0},
                          "Set to mean": {"perplexity": 18.8, "accuracy": 69.0}})
    figures = {"layer stats": layer_stats_figure(result), "implicit bias": implicit_bias_figure(split),
               "ablation": ablation_figure(table)}
    for name, fig in figures.items():
        axes = _axes(fig)
        assert axes, name
        for axis_name, axis in axes.items():
            assert (axis.get("title") or {}).get("text"), f"{name}: {axis_name} has no title"
        legend = fig.layout.legend
        if any(t.showlegend is not False for t in fig.data) and len(fig.data) > 1:
            assert legend.y is not None and legend.y >= 1, f"{name}: the legend sits over the ticks"
    ablation = figures["ablation"]
    assert ablation.layout.yaxis.type == "log" and ablation.layout.yaxis2.type == "linear"  # 18.8 vs 2.9e6 both shown


def test_layer_ticks_are_short_when_there_is_one_hook_point_per_layer():
    model = tiny_model("llama", n_layers=4)
    fig = layer_stats_figure(scan(model, torch.randint(0, 64, (2, 6)), progress=False))
    assert list(fig.data[0].x) == ["L0", "L1", "L2", "L3"]
    assert fig.layout.xaxis.title.text == "layer (hook_resid_post)"
