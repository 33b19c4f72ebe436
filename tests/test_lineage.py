"""lineage (first writing block, MLP channels, super weights) and edited_weights.

Known answers come from planted models (plant_massive_activation writes the value
with one MLP neuron of one block, through one down-projection entry), the real
all-MiniLM-L6-v2 and, where its folder exists, SmolLM2-135M (dequantised 4-bit
weights; see DESIGN.md section 3).
"""

from __future__ import annotations

import dataclasses
import math
import shutil

import numpy as np
import pytest
import torch

import massact_lens as ml
from massact_lens._core.blocks import block_model
from massact_lens.examples import minilm_dir, tiny_model
from massact_lens.interventions.weights import edited_weights, edits_from_rows, projection_weight
from massact_lens.models.load import load_model
from massact_lens.models.planting import plant_massive_activation
from massact_lens.trace.writers import Lineage, lineage

LAYER, DIM, NEURON, VALUE = 1, 5, 11, 1000.0


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def planted_model(request):
    """A 4-layer tiny model: block LAYER's MLP neuron NEURON writes VALUE into DIM on token 0."""
    model = plant_massive_activation(tiny_model(request.param, n_layers=4), layer=LAYER, dim=DIM, value=VALUE, neuron=NEURON)
    block_model(model)  # its one check pass runs here, not inside a test that counts forward passes
    return model


@pytest.fixture(scope="module")
def found(planted_model, bos_tokens):
    return ml.find_massive(ml.scan(planted_model, bos_tokens, progress=False))


@pytest.fixture(scope="module")
def traced(planted_model, bos_tokens, found) -> Lineage:
    return lineage(planted_model, bos_tokens, found, top_channels=4, progress=False)


def _planted_value(model, tokens) -> torch.Tensor:
    _, cache = model.run_with_cache(tokens, names_filter=[f"blocks.{LAYER}.hook_resid_post"])
    return cache[f"blocks.{LAYER}.hook_resid_post"][:, 0, DIM]


class ForwardCounter:
    """Counts forward passes of a model (a plain torch pre-hook, removed on exit)."""

    def __init__(self, model) -> None:
        self.model, self.calls = model, 0

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(self._count)
        return self

    def _count(self, module, args):
        self.calls += 1

    def __exit__(self, *exc) -> None:
        self.handle.remove()


# --- lineage on planted models: the writer is known by construction --------------------


def test_finds_the_planted_block_mlp_and_weight(planted_model, bos_tokens, traced):
    writers = traced.writers()
    assert writers[["dim", "kind", "layer"]].values.tolist() == [[DIM, "start", LAYER]]
    row = writers.iloc[0]
    assert row.n_positions == row.n_inputs == bos_tokens.shape[0] and row.share == 1.0
    assert row.value_after == pytest.approx(VALUE, rel=1e-3)
    assert row.mlp == pytest.approx(VALUE, rel=1e-2)
    assert abs(row.attention) < 0.01 * VALUE
    # pre-norm: the block output is its input plus the two direct writes
    assert row.value_after == pytest.approx(row.value_before + row.attention + row.mlp, abs=1e-2)

    top = traced.super_weights().iloc[0]
    assert (top.layer, top.row, top.column, top["rank"]) == (LAYER, DIM, NEURON, 0)
    weight = projection_weight(planted_model, LAYER)
    assert top.weight == pytest.approx(float(weight[DIM, NEURON]))
    assert top.weight_ratio == pytest.approx(abs(top.weight) / float(weight.abs().median()))
    assert top.contribution == pytest.approx(top.activation * top.weight)
    assert top.share == pytest.approx(1.0, abs=0.01)
    assert abs(top.activation) > 100 * top.max_abs_elsewhere  # fires on the marked token only
    assert traced.not_found == ()


def test_profile_and_records_give_the_same_lineage(planted_model, bos_tokens, found, traced):
    prof = ml.profile(planted_model, bos_tokens, progress=False)
    from_profile = lineage(planted_model, bos_tokens, prof, top_channels=4, progress=False)
    assert from_profile.blocks == traced.blocks
    assert from_profile.channels == traced.channels


def test_channel_contributions_add_up_to_the_mlp_write(planted_model, bos_tokens, found):
    d_mlp = int(planted_model.cfg.d_mlp)
    result = lineage(planted_model, bos_tokens, found, top_channels=d_mlp, progress=False)
    channels = result.super_weights()
    assert len(channels) == d_mlp and sorted(channels.column) == list(range(d_mlp))
    bias = planted_model.blocks[LAYER].mlp.out.original_component.bias
    bias = None if bias is None else bias.detach()
    total = channels.contribution.sum() + (float(bias[DIM]) if bias is not None else 0.0)
    assert total == pytest.approx(result.writers().iloc[0].mlp, rel=1e-4)


def test_batching_and_streaming_do_not_change_the_result(planted_model, bos_tokens, found, traced):
    small = lineage(planted_model, bos_tokens, found, top_channels=4, batch_size=3, progress=False)
    streamed = lineage(planted_model, iter([bos_tokens[:5], bos_tokens[5:]]), found, top_channels=4, progress=False)
    for other in (small, streamed):
        assert [(b.dim, b.kind, b.layer, b.n_positions) for b in other.blocks] == [
            (b.dim, b.kind, b.layer, b.n_positions) for b in traced.blocks
        ]
        assert other.writers().mlp.tolist() == pytest.approx(traced.writers().mlp.tolist(), rel=1e-5)
        assert other.super_weights().column.tolist() == traced.super_weights().column.tolist()


def test_result_records_how_it_was_obtained(planted_model, traced):
    assert traced.provenance == ml.Provenance.of(planted_model)
    assert traced.targets == ((DIM, "start"),)
    assert "blocks.{layer}.mlp.out.hook_in" in traced.hook_names
    assert traced.n_inputs == 8 and traced.top_channels == 4
    assert {"layer", "row", "column", "weight", "weight_ratio", "activation", "contribution"} <= set(
        traced.super_weights().columns
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        traced.top_channels = 3  # type: ignore[misc]


def test_inputs_without_the_activation_warn(planted_model, found):
    no_bos = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning, match="Never massive"):
        result = lineage(planted_model, no_bos, found, progress=False)
    assert result.not_found == ((DIM, "start"),) and result.writers().empty and result.super_weights().empty


# --- validation happens before any forward pass -----------------------------------------


def test_a_profile_from_another_model_is_refused_before_any_forward(found, bos_tokens):
    other_shape = tiny_model("gpt2", n_layers=3)
    other_name = tiny_model("llama" if found.scan.provenance.model_name == "tiny-gpt2" else "gpt2", n_layers=4)
    for model, match in ((other_shape, "n_layers"), (other_name, "another model")):
        with ForwardCounter(model) as counter, pytest.raises(ValueError, match=match):
            lineage(model, bos_tokens, found, progress=False)
        assert counter.calls == 0


def test_bad_massive_sets_are_refused_before_any_forward(planted_model, bos_tokens, found):
    empty = dataclasses.replace(found, records=())
    out_of_range = dataclasses.replace(found, records=(dataclasses.replace(found[0], dim=999),))
    cases = [
        (empty, ValueError, "empty"),
        (out_of_range, ValueError, "out of range"),
        (found.to_dataframe(), TypeError, "MassiveProfile"),
    ]
    with ForwardCounter(planted_model) as counter:
        for massive, error, match in cases:
            with pytest.raises(error, match=match):
                lineage(planted_model, bos_tokens, massive, progress=False)
        with pytest.raises(ValueError, match="top_channels"):
            lineage(planted_model, bos_tokens, found, top_channels=0, progress=False)
        with pytest.raises(ValueError, match="vocabulary|\\[0, 64\\)"):
            lineage(planted_model, bos_tokens + 100, found, progress=False)
    assert counter.calls == 0


def test_no_hook_is_left_after_an_error_mid_run(planted_model, bos_tokens, found, no_leftover_hooks):
    no_leftover_hooks(planted_model)
    with ForwardCounter(planted_model) as counter, pytest.raises(TypeError):
        lineage(planted_model, iter([bos_tokens[:4], 12345]), found, progress=False)
    assert counter.calls == 1  # the first batch ran, the second was refused
    no_leftover_hooks(planted_model)


# --- edited_weights ------------------------------------------------------------------


def test_zeroing_the_super_weight_removes_the_activation_and_restores_it(planted_model, bos_tokens, traced):
    weight_before = projection_weight(planted_model, LAYER).clone()
    original = _planted_value(planted_model, bos_tokens)
    assert original.tolist() == pytest.approx([VALUE] * len(original), rel=1e-3)
    edits = edits_from_rows(traced.super_weights().head(1))
    assert edits == {(LAYER, "mlp.out", DIM, NEURON): 0.0}
    with torch.no_grad(), edited_weights(planted_model, edits):
        assert float(projection_weight(planted_model, LAYER)[DIM, NEURON]) == 0.0
        assert _planted_value(planted_model, bos_tokens).abs().max() < 0.01 * VALUE
    assert torch.equal(projection_weight(planted_model, LAYER), weight_before)
    assert torch.equal(_planted_value(planted_model, bos_tokens), original)


def test_weights_are_restored_when_the_body_raises(planted_model, bos_tokens):
    weight_before = projection_weight(planted_model, LAYER).clone()
    edits = {(LAYER, "mlp.out", DIM, NEURON): 0.0, (0, "W_down", 2, 3): 7.5}
    with pytest.raises(RuntimeError, match="inside"), torch.inference_mode(), edited_weights(planted_model, edits):
        assert float(projection_weight(planted_model, 0)[2, 3]) == 7.5
        raise RuntimeError("inside the with-body")
    assert torch.equal(projection_weight(planted_model, LAYER), weight_before)
    assert float(projection_weight(planted_model, 0)[2, 3]) != 7.5
    assert _planted_value(planted_model, bos_tokens).tolist() == pytest.approx([VALUE] * 8, rel=1e-3)


@pytest.mark.parametrize(
    ("edits", "match"),
    [
        ({}, "No edits"),
        ({(9, "mlp.out", 0, 0): 0.0}, "Layer 9"),
        ({(0, "mlp.nope", 0, 0): 0.0}, "no component"),
        ({(0, "W_out", 0, 0): 0.0}, "ambiguous"),
        ({(0, "mlp.out", 32, 0): 0.0}, "row 32"),
        ({(0, "mlp.out", 0, 10_000): 0.0}, "column 10000"),
        ({(0, "mlp.out", 0, 0): float("nan")}, "finite"),
        ({(0, "mlp.out", 1, 2): 0.0, (0, "W_down", 1, 2): 1.0}, "same weight entry"),
    ],
)
def test_bad_edits_change_nothing(planted_model, edits, match):
    before = [p.clone() for p in planted_model.parameters()]
    valid_first = {(0, "mlp.out", 0, 1): 123.0, **edits} if edits else edits
    with pytest.raises(ValueError, match=match), edited_weights(planted_model, valid_first):
        pass
    assert all(torch.equal(a, b) for a, b in zip(before, planted_model.parameters(), strict=True))


def test_edits_from_rows_needs_the_columns():
    import pandas as pd

    with pytest.raises(ValueError, match="column"):
        edits_from_rows(pd.DataFrame({"layer": [1], "row": [2]}))
    with pytest.raises(ValueError, match="empty"):
        edits_from_rows(pd.DataFrame({"layer": [], "row": [], "column": []}))


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A tiny random HuggingFace GPT-2 (Conv1D projections, [in, out] weights), booted offline."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-hf-gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_positions=64, n_embd=32, n_layer=2, n_head=4)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_dir() / name).exists():
            shutil.copy(minilm_dir() / name, folder / name)
    return load_model(folder)


def test_conv1d_weights_are_read_as_output_by_input(hf_gpt2):
    weight = projection_weight(hf_gpt2, 1)
    conv = hf_gpt2.blocks[1].mlp.out.original_component
    assert type(conv).__name__ == "Conv1D" and weight.shape == (32, 128)
    _, cache = hf_gpt2.run_with_cache(hf_gpt2.to_tokens("a short text"))
    hidden, written = cache["blocks.1.mlp.out.hook_in"], cache["blocks.1.mlp.out.hook_out"]
    assert torch.allclose(hidden @ weight.T + conv.bias, written, atol=1e-5)
    before = float(conv.weight.detach()[7, 3])
    with edited_weights(hf_gpt2, {(1, "mlp.out", 3, 7): 0.0}):
        assert float(conv.weight.detach()[7, 3]) == 0.0
    assert float(conv.weight.detach()[7, 3]) == before


# --- real weights ----------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_dim_99_on_cls(minilm_model, sentences):
    prof = ml.profile(minilm_model, sentences[:6], min_value=50, min_ratio=200, progress=False)
    result = lineage(minilm_model, sentences[:6], prof, top_channels=minilm_model.cfg.d_mlp, progress=False)
    cls = result.writers().query("dim == 99 and kind == 'start'")
    assert len(cls) == 1, result.writers()
    row = cls.iloc[0]
    first = next(d.first_layer for d in prof.dims if d.dim == 99)
    assert row.layer == first and row.n_inputs == 6 and row.share == 1.0
    # the reported writes are the hook values of one input, averaged
    _, cache = minilm_model.run_with_cache(sentences[0])
    layer = int(row.layer)
    assert row.mlp == pytest.approx(float(cache[f"blocks.{layer}.mlp.out.hook_out"][0, 0, 99]), rel=0.05)
    assert row.value_after == pytest.approx(float(cache[f"blocks.{layer}.ln2.hook_in"][0, 0, 99]), rel=0.05)
    channels = result.super_weights().query("dim == 99 and kind == 'start'")
    bias = float(minilm_model.blocks[layer].mlp.out.original_component.bias.detach()[99])
    assert channels.contribution.sum() + bias == pytest.approx(row.mlp, rel=1e-4)
    top = channels.iloc[0]
    assert top.weight_ratio > 10 and abs(top.contribution) > abs(channels.iloc[1].contribution)


@pytest.mark.slow
def test_smollm2_super_weight(smollm2_model, sentences):
    smollm2 = smollm2_model
    texts = sentences[:4]
    found = ml.find_massive(ml.scan(smollm2, texts, prepend_bos=False, progress=False))
    result = lineage(smollm2, texts, found, top_channels=3, progress=False)
    assert result.prepend_bos is False
    row = result.writers().query("dim == 507 and kind == 'start'").iloc[0]
    assert row.layer == 11 and row.n_inputs == len(texts)
    assert 20_000 < row.mlp < 26_000 and abs(row.attention) < 50  # ~23,200 and ~5 measured
    assert row.value_after == pytest.approx(row.value_before + row.attention + row.mlp, rel=1e-4)
    top = result.super_weights().query("dim == 507 and kind == 'start' and layer == 11").iloc[0]
    assert (top.row, top.column) == (507, 1229)
    assert top.weight == pytest.approx(5.876, abs=2e-3)
    assert 40 < top.weight_ratio < 55  # ~46x the median |W_down|
    assert 2_500 < top.activation < 3_500 and top.max_abs_elsewhere < 50

    tokens = smollm2.to_tokens("The quick brown fox jumps over the lazy dog. It was a sunny day and everyone was happy.")

    def perplexity() -> float:
        with torch.no_grad():
            return math.exp(float(smollm2(tokens, return_type="loss")))

    original = perplexity()
    with edited_weights(smollm2, edits_from_rows(result.super_weights().head(1))):
        zeroed = perplexity()
    assert zeroed > 5 * original  # 27 -> ~590 measured on this text
    assert perplexity() == original


def test_mixed_lengths_run_longest_first_with_the_result_of_one_input_at_a_time(minilm_model, sentences):
    long = "A much longer sentence that goes on and on for quite a while, then stops at last."
    texts = [sentences[0], "Hi.", long, sentences[1], "Yes.", long + " " + sentences[2], sentences[3]]
    prof = ml.profile(minilm_model, texts, min_value=50, min_ratio=200, progress=False)
    widths = []
    point = minilm_model.hook_dict["hook_embed"]
    point.add_hook(lambda x, hook: widths.append(int(x.shape[1])))
    try:
        batched = lineage(minilm_model, texts, prof, top_channels=8, batch_size=3, progress=False)
    finally:
        point.remove_hooks("fwd")
    lengths = [len(minilm_model.to_tokens(t)[0]) for t in texts]
    assert widths == sorted(widths, reverse=True) and widths[0] == max(lengths)  # the longest ran first
    assert sum(widths) < sum(max(lengths[i : i + 3]) for i in range(0, len(texts), 3))  # less padding than as given
    alone = lineage(minilm_model, texts, prof, top_channels=8, batch_size=1, progress=False)
    assert len(batched.blocks) > 0
    assert [(b.dim, b.kind, b.layer, b.n_positions) for b in batched.blocks] == [
        (b.dim, b.kind, b.layer, b.n_positions) for b in alone.blocks
    ]
    assert batched.writers().mlp.tolist() == pytest.approx(alone.writers().mlp.tolist(), rel=1e-5)
    assert batched.super_weights().column.tolist() == alone.super_weights().column.tolist()


# --- issue 24 / 25: non-finite states, layers the model lacks, another model, the order ----------


def test_a_non_finite_hidden_state_is_reported_once_and_left_out(planted_model, bos_tokens, found):
    def poison(x, hook):  # noqa: ARG001  (a user hook that overflows on input 2, at the massive entry)
        x = x.clone()
        x[2, 0, DIM] = float("inf")
        return x

    point = planted_model.hook_dict[f"blocks.{LAYER}.hook_resid_post"]
    point.add_hook(poison)
    try:
        with pytest.warns(UserWarning, match=rf"1 input\(s\).*input 2: 1 in blocks\.{LAYER}\.hook_resid_post") as caught:
            result = lineage(planted_model, bos_tokens, found, top_channels=4, progress=False)
    finally:
        point.remove_hooks("fwd")
    assert sum("NaN or infinite" in str(w.message) for w in caught) == 1
    clean = lineage(planted_model, bos_tokens[[0, 1, 3, 4, 5, 6, 7]], found, top_channels=4, progress=False)
    got, want = result.writers(), clean.writers()
    assert got[["dim", "layer", "n_positions", "n_inputs"]].values.tolist() == want[
        ["dim", "layer", "n_positions", "n_inputs"]].values.tolist()
    for column in ("value_before", "value_after", "ratio_after", "attention", "mlp", "residual_change"):
        assert got[column].tolist() == pytest.approx(want[column].tolist(), rel=1e-5), column
    assert result.super_weights().contribution.tolist() == pytest.approx(
        clean.super_weights().contribution.tolist(), rel=1e-5)


@pytest.mark.parametrize("layer", [99, -5])
def test_records_at_layers_the_model_lacks_say_what_is_valid(planted_model, bos_tokens, found, layer):
    bad = dataclasses.replace(found, records=(dataclasses.replace(found[0], layer=layer),))
    with ForwardCounter(planted_model) as counter, pytest.raises(ValueError, match=r"valid layers are 0\.\.3"):
        lineage(planted_model, bos_tokens, bad, progress=False)
    assert counter.calls == 0


def test_a_massive_set_of_a_same_shape_model_with_another_name_warns(planted_model, bos_tokens, found):
    kind = str(planted_model.cfg.model_name).removeprefix("tiny-")
    other = tiny_model(kind, n_layers=4, seed=1)
    other.cfg.model_name = "another-tiny-model"  # same shape, other weights, another name
    with pytest.warns(UserWarning, match="same shape"):
        lineage(other, bos_tokens, found, progress=False)


def test_super_weights_are_sorted_by_contribution_strongest_first(bos_tokens):
    model = plant_massive_activation(tiny_model("llama", n_layers=4), layer=1, dim=5, value=1000.0, neuron=11)
    model = plant_massive_activation(model, layer=2, dim=7, value=3000.0, neuron=3)
    found = ml.find_massive(ml.scan(model, bos_tokens, progress=False))
    weights = lineage(model, bos_tokens, found, top_channels=2, progress=False).super_weights()
    assert weights.contribution.abs().is_monotonic_decreasing
    assert (weights.iloc[0].layer, weights.iloc[0].row, weights.iloc[0].column) == (2, 7, 3)


# --- edited_weights: 1-D weights, dtypes, numpy and 0-d tensor values -----------------------------


def test_one_dimensional_weights_are_edited_and_restored(planted_model, bos_tokens):
    norm = planted_model.blocks[LAYER].ln2.original_component
    before = [p.clone() for p in planted_model.parameters()]
    original = _planted_value(planted_model, bos_tokens)
    edits = {(LAYER, "ln2", DIM): 3.0, (LAYER, "ln2.weight", DIM + 1): -1.0}
    out_bias = getattr(planted_model.blocks[LAYER].mlp.out.original_component, "bias", None)
    if out_bias is not None:
        edits[(LAYER, "mlp.out.bias", DIM)] = 50.0
    with edited_weights(planted_model, edits):
        assert float(norm.weight.detach()[DIM]) == 3.0 and float(norm.weight.detach()[DIM + 1]) == -1.0
        if out_bias is not None:
            assert float(out_bias.detach()[DIM]) == 50.0
    assert all(torch.equal(a, b) for a, b in zip(before, planted_model.parameters(), strict=True))
    assert torch.equal(_planted_value(planted_model, bos_tokens), original)


@pytest.mark.parametrize(
    ("edits", "match"),
    [
        ({(0, "ln2", 32): 1.0}, "index 32"),
        ({(0, "mlp.out", 3): 1.0}, "no 1-D weight"),
        ({(0, "ln2", 0, 0): 1.0}, r"\(layer, component, index\)"),
        ({(0, "ln2", 1): 1.0, (0, "ln2.weight", 1): 2.0}, "same weight entry"),
    ],
)
def test_bad_one_dimensional_edits_change_nothing(planted_model, edits, match):
    before = [p.clone() for p in planted_model.parameters()]
    with pytest.raises(ValueError, match=match), edited_weights(planted_model, {(0, "ln2", 2): 9.0, **edits}):
        pass
    assert all(torch.equal(a, b) for a, b in zip(before, planted_model.parameters(), strict=True))


def test_numpy_and_zero_dim_tensor_values_are_accepted(planted_model):
    with edited_weights(planted_model, {(0, "mlp.out", 0, 1): np.float32(0.5), (0, "mlp.out", 0, 2): torch.tensor(0.25),
                                        (0, "ln2", 4): np.int64(2)}):
        weight = projection_weight(planted_model, 0)
        assert (float(weight[0, 1]), float(weight[0, 2])) == (0.5, 0.25)
        assert float(planted_model.blocks[0].ln2.original_component.weight.detach()[4]) == 2.0


def test_a_value_beyond_the_dtype_is_refused_with_what_to_do(hf_llama_dir):
    model = load_model(hf_llama_dir, dtype=torch.float16)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"float16 \(largest 65504\).*float32"), \
            edited_weights(model, {(0, "mlp.out", 0, 0): 1.0, (0, "mlp.out", 0, 1): 1e5}):
        pass
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with edited_weights(model, {(0, "mlp.out", 0, 1): 6e4}):  # fits
        assert float(projection_weight(model, 0)[0, 1]) == pytest.approx(6e4, rel=1e-3)
