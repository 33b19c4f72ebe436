"""No silent wrong number (issue 24): non-finite values, merges, precision, placement.

Each test here failed before its fix: a NaN averaged into an attention statistic, parts
of other settings pooled, a compare_precision of the wrong records or dtype, a device
map ignored or failing deep inside a dependency.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch

import massact_lens as ml
from massact_lens.attention import (
    AttentionConcentration,
    ImplicitBias,
    MassiveTokens,
    TokenFeatures,
    attention_concentration,
    implicit_bias,
    token_features,
)
from massact_lens.examples import minilm_dir, tiny_model
from massact_lens.find.precision import compare_precision
from massact_lens.models.load import load_model
from massact_lens.models.planting import plant_massive_activation


@pytest.fixture(scope="module")
def planted():
    return plant_massive_activation(tiny_model("llama", n_layers=3), layer=1, dim=5, value=1000.0)


def _tokens(n: int = 4, width: int = 7, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(1, 64, (n, width), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = 0
    return tokens


def _poison(row: int, value: float, position: int | None = None, dim: int | None = None):
    """A hook of the user's that writes ``value`` into one input's hidden state."""

    def hook(x, hook):
        x = x.clone()
        if position is None:
            x[row] = value
        else:
            x[row, position, dim] = value
        return x

    return hook


# --- one non-finite rule per pass ---------------------------------------------------------------


def test_attention_concentration_leaves_a_nan_input_out_and_says_so(planted):
    tokens = _tokens()
    with planted.hooks(fwd_hooks=[("blocks.0.hook_resid_post", _poison(1, float("nan")))]), \
            pytest.warns(RuntimeWarning, match=r"1 input\(s\) held NaN.*input 1 at blocks\.1\..*entries"):
        sinks = attention_concentration(planted, tokens, "start", layers=[1, 2], progress=False)
    clean = attention_concentration(planted, tokens[[0, 2, 3]], "start", layers=[1, 2], progress=False)
    scores = sinks.sink_scores()
    assert scores[["mass", "mass_std", "mass_min", "lift", "logit_gap"]].notna().all().all()
    assert sinks.n_inputs == 4 and sinks.n_used == 3
    torch.testing.assert_close(sinks.mean_mass, clean.mean_mass, rtol=1e-5, atol=1e-6)
    assert sinks.layer_mass()["mass"].notna().all()


def test_a_massive_tokens_key_set_with_inf_at_the_massive_entry(planted):
    tokens = _tokens()
    rule = MassiveTokens(min_value=100, min_ratio=10)
    with planted.hooks(fwd_hooks=[("blocks.1.hook_resid_post", _poison(0, float("inf"), 2, 5))]), \
            pytest.warns(RuntimeWarning, match=r"input 0 at blocks\.1\.hook_resid_post \(1 entries\)"):
        sinks = attention_concentration(planted, tokens, rule, progress=False)
    assert sinks.n_used == 3
    assert np.isfinite(sinks.sink_scores()[["mass", "uniform", "lift"]].to_numpy()).all()


def test_implicit_bias_constancy_leaves_a_nan_input_out(planted):
    tokens = _tokens()
    with planted.hooks(fwd_hooks=[("blocks.0.hook_resid_post", _poison(2, float("nan")))]), \
            pytest.warns(RuntimeWarning, match="input 2 at blocks.1"):
        split = implicit_bias(planted, tokens, "start", layers=[1], progress=False)
    clean = implicit_bias(planted, tokens[[0, 1, 3]], "start", layers=[1], progress=False)
    got, want = split.constancy(), clean.constancy()
    columns = ["cos_to_mean", "rel_variation", "mean_norm"]
    assert np.allclose(got[columns].to_numpy(), want[columns].to_numpy(), rtol=1e-4, atol=1e-6, equal_nan=True)
    assert (got["n"] == want["n"]).all()
    assert bool(torch.isfinite(split.z_error).all() and torch.isfinite(split.out_error).all())
    assert split.to_dataframe()["c_mass"].notna().all()


def test_token_features_leave_an_inf_input_out(planted):
    tokens = _tokens()
    with planted.hooks(fwd_hooks=[("blocks.0.hook_resid_post", _poison(3, float("inf"), 4, 1))]), \
            pytest.warns(RuntimeWarning, match="input 3 at blocks.1"):
        feats = token_features(planted, tokens, "start", layers=[1], progress=False)
    clean = token_features(planted, tokens[:3], "start", layers=[1], progress=False)
    assert feats.counts.tolist() == clean.counts.tolist()
    torch.testing.assert_close(feats.value_norm, clean.value_norm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats.feature_norm, clean.feature_norm, rtol=1e-5, atol=1e-6)


def test_a_clean_pass_says_nothing(planted):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        attention_concentration(planted, _tokens(), "start", progress=False)
        implicit_bias(planted, _tokens(), "start", progress=False)


# --- merges compare what makes parts compatible --------------------------------------------------


def test_implicit_bias_refuses_parts_with_per_input_masks(planted):
    tokens = _tokens()
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[:, 0] = True
    parts = [implicit_bias(planted, t, mask, layers=[1], progress=False) for t in (tokens[:2], tokens[2:])]
    with pytest.raises(ValueError, match="names positions by input index.*Measure the whole corpus"):
        ImplicitBias.merge(parts)


def test_parts_with_masks_of_other_content_are_refused(planted):
    tokens = _tokens()
    a, b = torch.zeros(7, dtype=torch.bool), torch.zeros(7, dtype=torch.bool)
    a[0], b[1] = True, True
    for verb, cls in ((implicit_bias, ImplicitBias), (attention_concentration, AttentionConcentration),
                      (token_features, TokenFeatures)):
        parts = [verb(planted, tokens[:2], a, layers=[1], progress=False),
                 verb(planted, tokens[2:], b, layers=[1], progress=False)]
        assert parts[0].positions == parts[1].positions  # the descriptions agree: the content does not
        with pytest.raises(ValueError, match="key_set"):
            cls.merge(parts)


def test_profiles_of_other_top_k_do_not_pool(planted):
    tokens = _tokens()
    a = ml.profile(planted, tokens[:2], min_value=100, min_ratio=10, top_k=10, progress=False)
    with pytest.warns(UserWarning, match="larger top_k"):  # every kept entry is massive: said, not our point
        b = ml.profile(planted, tokens[2:], min_value=100, min_ratio=10, top_k=1, progress=False)
    assert (a.top_k, b.top_k) == (10, 1)
    with pytest.raises(ValueError, match="top_k"):
        ml.MassiveProfile.merge([a, b])
    again = ml.MassiveProfile.from_json(a.to_json())
    assert again.top_k == 10 and again == a


def test_parts_of_other_weights_with_one_name_and_shape_are_refused():
    tokens = _tokens()
    a, b = tiny_model("llama", n_layers=2, seed=0), tiny_model("llama", n_layers=2, seed=1)
    parts = [attention_concentration(a, tokens[:2], progress=False), attention_concentration(b, tokens[2:], progress=False)]
    assert parts[0].provenance == parts[1].provenance
    with pytest.raises(ValueError, match="other weights .*same checkpoint"):
        AttentionConcentration.merge(parts)
    profiles = [ml.profile(m, tokens, min_value=1, min_ratio=2, progress=False) for m in (a, b)]
    with pytest.raises(ValueError, match="other weights"):
        ml.MassiveProfile.merge(profiles)


@pytest.mark.parametrize("cls", ["ScanResult", "MassiveProfile"])
def test_non_result_parts_are_refused_before_they_are_read(planted, cls):
    tokens = _tokens()
    result = ml.scan(planted, tokens, progress=False)
    if cls == "MassiveProfile":
        result = ml.profile(planted, tokens, min_value=100, min_ratio=10, progress=False)
    merge = type(result).merge
    for parts, match in (([result, result.to_dataframe()], "Part 1 is a DataFrame, not a"),
                         ([result.to_dataframe(), result], "Part 0 is a DataFrame"),
                         (result.to_dataframe(), "takes a list of"),
                         (result, "takes a list of")):
        with pytest.raises(TypeError, match=match) as caught:
            merge(parts)
        assert "pass only" in str(caught.value) or "one per slice" in str(caught.value)


def test_merge_refusals_say_what_to_do(planted):
    tokens = _tokens()
    sinks = attention_concentration(planted, tokens, progress=False)
    with pytest.raises(TypeError, match=r"Part 1 is a ScanResult, not an AttentionConcentration: pass only"):
        AttentionConcentration.merge([sinks, ml.scan(planted, tokens, progress=False)])
    other = attention_concentration(tiny_model("gpt2", n_layers=3), tokens, progress=False)
    with pytest.raises(ValueError, match="different models .*: use results and models of one model"):
        AttentionConcentration.merge([sinks, other])


# --- compare_precision ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def precision_pair():
    model = plant_massive_activation(tiny_model("llama", n_layers=3), layer=1, dim=5, value=20000.0)
    half = plant_massive_activation(tiny_model("llama", n_layers=3), layer=1, dim=5, value=20000.0).to(torch.bfloat16)
    return model, half


def test_compare_precision_refuses_a_half_precision_reference(precision_pair):
    _, half = precision_pair
    other_half = plant_massive_activation(tiny_model("llama", n_layers=3), layer=1, dim=5, value=20000.0).to(torch.bfloat16)
    with pytest.raises(ValueError, match="reference must run in float32, not bfloat16"):
        compare_precision(half, other_half, _tokens(2, 6))


def test_compare_precision_refuses_records_of_other_inputs(precision_pair):
    model, half = precision_pair
    tokens = _tokens(3, 6)
    found = ml.find_massive(ml.scan(model, tokens, progress=False), 1000, 100)
    assert len(found) > 0
    with pytest.raises(ValueError, match="scan of other inputs.*pass the inputs"):
        compare_precision(model, half, tokens[:1], massive=found)
    other = _tokens(3, 6, seed=5)
    with pytest.raises(ValueError, match="scan of other inputs"):
        compare_precision(model, half, other, massive=found)


def test_compare_precision_refuses_records_of_another_model(precision_pair):
    model, half = precision_pair
    tokens = _tokens(2, 6)
    gpt2 = plant_massive_activation(tiny_model("gpt2", n_layers=3), layer=1, dim=5, value=20000.0)
    found = ml.find_massive(ml.scan(gpt2, tokens, progress=False), 1000, 100)
    with pytest.raises(ValueError, match="different models"):
        compare_precision(model, half, tokens, massive=found)
    # Same shape, same name, other weights: refused by the weights fingerprint, before any pass.
    other = plant_massive_activation(tiny_model("llama", n_layers=3, seed=3), layer=1, dim=5, value=30000.0)
    found = ml.find_massive(ml.scan(other, tokens, progress=False), 1000, 100)
    with pytest.raises(ValueError, match="other weights"):
        compare_precision(model, half, tokens, massive=found)


# --- load_model ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(device_map={"bert.not_a_module": "cpu", "": "cpu"}), r"does not have: \['bert.not_a_module'\]"),
        (dict(device_map={"": "cuda:99"}), "sends '' to 'cuda:99', but"),
        (dict(device_map="nonsense"), "neither a strategy .* nor a device"),
        (dict(device_map="auto", max_memory={"cpu": "lots"}), "is not a size.*'5GiB'"),
        (dict(device_map="auto", max_memory={"cpu": "30MB"}), "tied weights to disk"),
        (dict(device_map="auto", max_memory={"cpu": "30MB"}, offload_folder="TMP"), "tied weights to disk"),
    ],
)
def test_placements_are_checked_before_any_weight_is_read(kwargs, match, tmp_path):
    kwargs = {k: (tmp_path if v == "TMP" else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match) as caught:
        load_model(minilm_dir(), **kwargs)
    assert "truncated" not in str(caught.value)


def test_a_file_is_not_a_missing_hub(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a model folder"):
        load_model(path)


def test_huggingface_errors_keep_their_own_message(tmp_path):
    for item in minilm_dir().iterdir():
        if item.is_file():
            shutil.copy(item, tmp_path / item.name)
    (tmp_path / "config.json").write_text('{"model_type": "not_a_model_type"}')
    with pytest.raises(Exception) as caught:  # noqa: PT011 (whatever HuggingFace raises, as it raises it)
        load_model(tmp_path)
    assert "truncated" not in str(caught.value)


def test_load_model_wraps_a_huggingface_model_and_verbs_point_to_it(minilm_model):
    from transformers import AutoModelForMaskedLM

    hf = AutoModelForMaskedLM.from_pretrained(minilm_dir())
    inner = getattr(attention_concentration, "__wrapped__", attention_concentration)  # past the test-time type check
    with pytest.raises(TypeError, match=r"load_model\(hf_model\)"):
        inner(hf, ["Hello."], progress=False)
    bridge = load_model(hf)
    a = ml.scan(bridge, ["The cat sat."], progress=False)
    b = ml.scan(minilm_model, ["The cat sat."], progress=False)
    torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-4)


def test_distributed_messages_say_what_to_do():
    from massact_lens.distributed import shard

    with pytest.raises(ValueError, match="not in a world of 2: pass 0 <= rank < world_size"):
        shard(10, 3, 2)
