"""Widgets and figures of massact_lens.viz: they carry the right data, mask and mark correctly, draw offline."""

from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest
import torch
from circuitsvis.utils.render import RenderedHTML

from massact_lens import Provenance, scan
from massact_lens.attention import attention_concentration, attention_logits, implicit_bias
from massact_lens.evaluate import AblationTable
from massact_lens.examples import tiny_model
from massact_lens.models.planting import plant_massive_activation
from massact_lens.viz import (
    Widget,
    ablation_figure,
    attention_heads,
    attention_heads_widget,
    attention_logits_figure,
    attention_sink_figure,
    hidden_state_figure,
    hidden_states,
    implicit_bias_figure,
    layer_stats_figure,
    save_html,
    tokens_by_activation,
    tokens_by_activation_widget,
)
from massact_lens.viz._page import write_atomic
from massact_lens.viz._scripts import script_json

XSS = "</script><script>alert(1)</script>"


def _props(widget: Widget) -> dict:
    """The props exactly as the page's JavaScript will parse them."""
    match = re.search(r'CircuitsVis\.render\("[^"]+", CircuitsVis\.\w+, (\{.*\})\);', widget.mount_html())
    assert match is not None
    return json.loads(match.group(1))


# ----------------------------------------------------------------------------- data


def test_hidden_states_match_a_cache_and_apply_the_criterion_to_every_entry(minilm_model, no_leftover_hooks):
    no_leftover_hooks(minilm_model)
    text = "The cat sat on the mat."
    states = hidden_states(minilm_model, text)
    no_leftover_hooks(minilm_model)
    _, cache = minilm_model.run_with_cache(minilm_model.to_tokens(text))
    for i, name in enumerate(states.hook_names):
        torch.testing.assert_close(states.values[i], cache[name][0].float())
    assert states.tokens[0] == "[CLS]" and len(states.tokens) == states.values.shape[1]
    assert states.massive(min_value=50, min_ratio=200) == {0: (99,)}
    assert states.massive() == {}  # the paper's 100 / 1000 are too strict for a 384-dim encoder
    assert states.hook_names[states.hook_index(0)] == "blocks.0.ln2.hook_in"
    frame = states.to_dataframe()
    top = frame.loc[frame["max_abs"].idxmax()]
    assert (top["position"], top["dim"], top["token"]) == (0, 99, "[CLS]")


def test_hidden_states_reject_bad_input_before_running(minilm_model):
    with pytest.raises(ValueError, match="one input"):
        hidden_states(minilm_model, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="no hook point"):
        hidden_states(minilm_model, "Hi.", hooks="blocks.0.no_such_hook")
    with pytest.raises(TypeError):
        hidden_states(minilm_model, ["a", "b"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one width"):
        hidden_states(minilm_model, "Hi.", hooks="blocks.0.attn.hook_pattern")


# ----------------------------------------------------------------------------- figures


def test_layer_stats_figure_carries_the_scan(minilm_model, sentences):
    result = scan(minilm_model, sentences[:3], progress=False)
    fig = layer_stats_figure(result)
    stats = result.layer_stats()
    assert [t.name for t in fig.data] == ["top 1", "top 2", "top 3", "median"]
    for trace, column in zip(fig.data, ["top1", "top2", "top3", "median"], strict=True):
        assert list(trace.y) == pytest.approx(stats[column].tolist())
        assert list(trace.customdata) == list(result.hook_names)
    assert fig.layout.yaxis.type == "log"
    assert list(fig.data[0].error_y.array) == pytest.approx(stats["top1_std"].tolist())
    peak = fig.data[0].customdata[max(range(len(stats)), key=lambda i: fig.data[0].y[i])]
    assert peak == "blocks.0.ln2.hook_in"


@pytest.mark.parametrize("dim", [5, 17])
def test_hidden_state_figure_labels_the_massive_dim_found_in_the_data(dim):
    model = plant_massive_activation(tiny_model("llama", n_layers=3), layer=1, dim=dim, value=800.0)
    tokens = torch.tensor([0, 9, 4, 33, 7, 12])
    states = hidden_states(model, tokens)
    fig = hidden_state_figure(states, "blocks.2.hook_resid_post")
    assert fig.layout.meta["labelled_dims"] == [dim]
    assert list(fig.layout.scene.xaxis.tickvals) == [dim]
    assert list(fig.layout.scene.xaxis.ticktext) == [f"dim {dim}"]
    surface, marker = fig.data
    torch.testing.assert_close(torch.tensor(surface.z), states.state("blocks.2.hook_resid_post").abs())
    assert (list(marker.x), list(marker.y)) == ([dim], [0])
    assert marker.z[0] == pytest.approx(float(states.state(2)[0, dim].abs()))
    heat = hidden_state_figure(states, 2, kind="heatmap")
    assert list(heat.layout.xaxis.tickvals) == [dim]
    assert list(heat.layout.yaxis.ticktext) == [str(int(t)) for t in tokens]


def test_hidden_state_figure_labels_nothing_on_a_clean_model():
    states = hidden_states(tiny_model(), torch.arange(6))
    fig = hidden_state_figure(states, 1)
    assert fig.layout.meta["labelled_dims"] == []
    assert fig.layout.scene.xaxis.tickvals is None
    with pytest.raises((ValueError, TypeError)):  # beartype checks the Literal first under pytest
        hidden_state_figure(states, 1, kind="bars")  # type: ignore[arg-type]


def test_attention_logits_figure_is_the_mean_or_one_head_with_the_causal_mask():
    model = tiny_model("gpt2", n_layers=2)
    logits = attention_logits(model, torch.tensor([[3, 1, 4, 1, 5]]))
    fig = attention_logits_figure(logits, 1)
    z = torch.tensor([[math.nan if v is None else v for v in row] for row in fig.data[0].z])
    torch.testing.assert_close(z, logits.logits[1].nanmean(0), equal_nan=True)
    assert all(fig.data[0].z[q][k] is None for q in range(5) for k in range(q + 1, 5))  # causal: empty above
    head = attention_logits_figure(logits, 1, head=2, values="pattern")
    torch.testing.assert_close(torch.tensor(head.data[0].z, dtype=torch.float32).nan_to_num(), logits.pattern[1, 2])
    assert head.layout.meta == {"layer": 1, "head": 2, "values": "pattern", "source": logits.source[1]}
    with pytest.raises(ValueError, match="Layer 5"):
        attention_logits_figure(logits, 5)


def test_sink_and_implicit_bias_figures_carry_their_results(minilm_model, sentences):
    sinks = attention_concentration(minilm_model, sentences[:3], "start", progress=False)
    fig = attention_sink_figure(sinks)
    torch.testing.assert_close(torch.tensor(fig.data[0].z), sinks.mass.mean(0))
    assert "start" in fig.layout.title.text

    split = implicit_bias(minilm_model, sentences[:3], "start", layers=[1, 3], progress=False)
    fig = implicit_bias_figure(split)
    total = split.to_dataframe()
    total = total[total["head"] == -1]
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["bias norm"].x) == [1, 3]
    assert list(by_name["bias norm"].y) == pytest.approx(total["bias_norm"].tolist())
    assert list(by_name["rest variation"].y) == pytest.approx(total["rest_rel_variation"].tolist())
    assert list(by_name["attention on C"].y) == pytest.approx(total["c_mass"].tolist())
    # the paper's point, read back from the figure: the bias term varies less than the rest
    assert all(b < r for b, r in zip(by_name["bias variation"].y, by_name["rest variation"].y, strict=True))


def test_ablation_figure_draws_every_setting_and_writes_inf_as_text():
    table = AblationTable(
        provenance=Provenance("llama-2-7b", "LlamaForCausalLM", 32, 4096, 32, "float16", False),
        profile_dims=(1415, 2533),
        metrics=("perplexity", "accuracy"),
        values={
            "Original": {"perplexity": 5.47, "accuracy": 68.95},
            "Set to zero": {"perplexity": math.inf, "accuracy": 36.75},
            "Set to mean": {"perplexity": 5.47, "accuracy": 68.94},
        },
        hook_names={},
        details={},
    )
    fig = ablation_figure(table)
    ppl, acc = fig.data
    assert (ppl.name, acc.name) == ("perplexity", "accuracy")
    assert list(ppl.x) == ["Original", "Set to zero", "Set to mean"]
    assert list(ppl.y) == [5.47, None, 5.47] and list(ppl.text) == ["5.47", "inf", "5.47"]
    assert list(acc.y) == [68.95, 36.75, 68.94]


# ----------------------------------------------------------------------------- widgets


def test_attention_heads_on_an_encoder_marks_the_massive_token_and_shows_both_triangles(minilm_model, no_leftover_hooks):
    text = "The cat sat on the mat."
    no_leftover_hooks(minilm_model)
    view = attention_heads(minilm_model, text, layer=2, min_value=50, min_ratio=200)
    no_leftover_hooks(minilm_model)
    assert isinstance(view, RenderedHTML)
    props = _props(view)
    pattern = attention_logits(minilm_model, text, layers=[2]).pattern[0]
    torch.testing.assert_close(torch.tensor(props["attention"]), pattern)  # [head_index, query_pos, key_pos]
    assert props["maskUpperTri"] is False  # bidirectional: the upper triangle is real attention
    assert props["tokens"][0] == "[CLS] ★d99" and props["tokens"][1:] == ["the", "cat", "sat", "on", "the", "mat", ".", "[SEP]"]
    assert props["attentionHeadNames"] == [f"L2H{h}" for h in range(12)]
    assert "maxValue" not in props  # circuitsvis scales to the largest value

    scaled = attention_heads(minilm_model, text, layer=2, heads=[0, 5], massive=[0], exclude_bos=True)
    sub = pattern[[0, 5]]
    others = sub[..., 1:].flatten()
    assert scaled.meta["max_value"] == pytest.approx(float(torch.quantile(others, 0.95, interpolation="lower")))
    assert scaled.meta["max_value"] < float(sub[..., 0].max())  # the sink column saturates
    assert _props(scaled)["tokens"][0] == "[CLS] ★"
    by_hand = attention_heads(minilm_model, text, layer=2, heads=[0], exclude_bos=True, max_value=0.25)
    assert _props(by_hand)["maxValue"] == 0.25


def test_attention_heads_on_a_decoder_masks_the_upper_triangle(planted, bos_tokens):
    view = attention_heads(planted, bos_tokens[0], layer=2, min_value=100, min_ratio=100)
    props = _props(view)
    assert props["maskUpperTri"] is True
    assert view.meta["massive"] == {0: (5,)}
    assert props["tokens"][0] == "0 ★d5"
    with pytest.raises(ValueError, match="Heads"):
        attention_heads(planted, bos_tokens[0], layer=2, heads=[9])


def test_tokens_by_activation_colours_by_the_largest_entry_or_one_dim(minilm_model):
    text = "Rain fell on the roof."
    states = hidden_states(minilm_model, text)
    view = tokens_by_activation(minilm_model, text)
    props = _props(view)
    assert view.meta["hook_names"] == states.hook_names
    assert props["labels"] == [f"L{n.split('.')[1]} {n.split('.', 2)[2]}" for n in states.hook_names]
    torch.testing.assert_close(torch.tensor(props["values"]), states.values.abs().amax(-1).T)
    one = _props(tokens_by_activation(minilm_model, text, dim=99, layers=[0]))
    torch.testing.assert_close(torch.tensor(one["values"]), states.values[:2, :, 99].T)
    with pytest.raises(ValueError, match="dim 384"):
        tokens_by_activation(minilm_model, text, dim=384)


def test_widgets_draw_offline_and_never_let_a_token_close_the_script():
    view = Widget("AttentionHeads", {"tokens": [XSS, "a & b"], "attention": [[[1.0, 0.0], [0.5, 0.5]]]})
    assert str(view) == view.local_src
    assert "unpkg.com" not in view.local_src and "unpkg.com" in view.cdn_src
    assert "var CircuitsVis" in view.local_src  # the bundle itself, inlined
    for source in (view.local_src, view.cdn_src, view.mount_html(), view._repr_html_()):
        assert "<script>alert(1)" not in source and XSS not in source
    assert _props(view)["tokens"] == [XSS, "a & b"]  # what the page shows: the text itself
    assert json.loads(script_json({"t": XSS})) == {"t": XSS}


def test_save_html_inlines_each_bundle_once_and_writes_nothing_on_error(tmp_path, minilm_model):
    views = [tokens_by_activation(minilm_model, "Hello there.", layers=[0]) for _ in range(2)]
    fig = layer_stats_figure(scan(minilm_model, ["Hello there."], progress=False))
    path = save_html(tmp_path / "views.html", *views, fig, pd.DataFrame({"token": [XSS]}), title="Two views")
    page = path.read_text()
    assert page.count('id="circuitsvis-js"') == 1 and page.count('id="plotly-js"') == 1
    assert page.count("var CircuitsVis") == 1
    assert "&lt;/script&gt;&lt;script&gt;alert(1)" in page and "<script>alert(1)" not in page
    before = path.read_text()
    with pytest.raises(TypeError):
        save_html(path, views[0], object())  # type: ignore[arg-type]
    with pytest.raises(UnicodeEncodeError):  # fails half-way through writing
        write_atomic(path, "<p>" * 100_000 + "\ud800")
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["views.html"]  # no temp file left


# ----------------------------------------------------------------------------- views render results


def test_views_render_results_and_the_one_liners_measure_first(minilm_model):
    text = "The cat sat on the mat."
    logits = attention_logits(minilm_model, text, layers=[2])
    states = hidden_states(minilm_model, text)
    from_data = attention_heads_widget(logits, 2, massive=states.massive(50, 200), exclude_bos=True)
    one_liner = attention_heads(minilm_model, text, layer=2, min_value=50, min_ratio=200, exclude_bos=True)
    assert _props(from_data) == _props(one_liner)
    assert from_data.meta["mask_upper_tri"] is False  # an encoder's logits have no masked entries
    assert _props(tokens_by_activation_widget(states)) == _props(tokens_by_activation(minilm_model, text))
    with pytest.raises(ValueError, match="Layer 3"):
        attention_heads_widget(logits, 3)


def test_the_causal_mask_is_read_from_the_logits(planted, bos_tokens):
    logits = attention_logits(planted, bos_tokens[0], layers=[2])
    assert attention_heads_widget(logits, 2).meta["mask_upper_tri"] is True  # NaN above the diagonal
    assert attention_heads_widget(logits, 2, causal=False).meta["mask_upper_tri"] is False


def test_viz_views_take_no_model_and_the_report_moved_out(recwarn):
    import ast
    import inspect
    from pathlib import Path

    import massact_lens.viz as viz

    views = [name for name in viz.__all__ if name.endswith(("_figure", "_widget"))]
    assert len(views) == 10
    for name in views:
        assert "model" not in inspect.signature(getattr(viz, name)).parameters, name
    for path in Path(viz.__file__).parent.glob("*.py"):  # the package root imports viz, not the other way
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "massact_lens", path.name
            elif isinstance(node, ast.Import):
                assert "massact_lens" not in [alias.name for alias in node.names], path.name
