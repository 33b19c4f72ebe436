"""Bad input to the foundation (batching, scan, loading, test models): a clear error, before any work."""

from __future__ import annotations

import shutil

import pytest
import torch

import massact_lens as ml
from massact_lens.examples import minilm_dir, tiny_model
from massact_lens.find.profiles import MassiveProfile


def test_a_bool_token_tensor_is_refused_not_read_as_ids():
    with pytest.raises(TypeError, match="bool"):
        ml.scan(tiny_model(), torch.tensor([[True, False, True]]), progress=False)


@pytest.mark.parametrize("inputs", [["a sentence", 3], ["a sentence", None]])
def test_a_list_mixing_strings_and_others_names_the_items(minilm_model, inputs):
    with pytest.raises(TypeError, match=r"Inputs \[1\]"):
        ml.scan(minilm_model, inputs, progress=False)


def test_a_huge_top_k_is_refused_before_any_allocation():
    with pytest.raises(ValueError, match="more than a hidden state holds"):
        ml.scan(tiny_model(), torch.zeros(2, 3, dtype=torch.long), top_k=10**12, progress=False)


@pytest.mark.parametrize("kwargs", [{"n_heads": 0}, {"d_model": 30, "n_heads": 4}, {"n_layers": -1}])
def test_tiny_model_refuses_impossible_shapes(kwargs):
    with pytest.raises(ValueError, match="must be"):
        tiny_model(**kwargs)


def test_a_truncated_weights_file_names_the_folder(tmp_path):
    for item in minilm_dir().iterdir():
        if item.is_file():
            shutil.copy(item, tmp_path / item.name)
    with open(tmp_path / "model.safetensors", "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(ValueError, match="truncated or damaged"):
        ml.load_model(tmp_path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "not valid JSON"),
        ('{"format": "massact_lens.profile/1", "hook_names": ["a"]', "not valid JSON"),
        ("[1, 2]", "Not a massact_lens profile"),
        ('{"format": "massact_lens.profile/1"}', "provenance has no field"),
    ],
)
def test_a_broken_profile_file_is_refused_at_load_naming_the_file(tmp_path, text, match):
    path = tmp_path / "profile.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match) as caught:
        MassiveProfile.load(path)
    assert "profile.json" in str(caught.value) or "Not a massact_lens" in str(caught.value) or "JSON" in str(caught.value)


def test_a_profile_field_of_the_wrong_type_is_named(minilm_model, tmp_path):
    import json

    good = ml.profile(minilm_model, ["A short sentence."], min_value=50, min_ratio=200, progress=False)
    data = json.loads(good.to_json())
    data["stats"][0]["mean"] = "large"
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=r"stats\[0\]\.'mean' must be"):
        MassiveProfile.load(path)


def test_save_leaves_no_temporary_file_when_serialisation_fails(minilm_model, tmp_path):
    broken = ml.profile(minilm_model, ["A short sentence."], min_value=50, min_ratio=200, progress=False)
    object.__setattr__(broken, "delimiters", (object(),))  # not JSON-serialisable
    with pytest.raises(TypeError):
        broken.save(tmp_path / "p.json")
    assert list(tmp_path.iterdir()) == []


def test_a_profile_from_raw_weights_is_refused_on_a_processed_model(minilm_model):
    import warnings

    from massact_lens.examples import minilm
    from massact_lens.interventions import ablation_hooks

    raw = ml.profile(minilm_model, ["A short sentence."], min_value=50, min_ratio=200, progress=False)
    processed = minilm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processed.enable_compatibility_mode()
    with pytest.raises(ValueError, match="processed"):
        ablation_hooks(processed, raw, "mean")


def test_attention_refuses_a_profile_of_another_model(minilm_model):
    p = ml.profile(minilm_model, ["A short sentence."], min_value=50, min_ratio=200, progress=False)
    with pytest.raises(ValueError, match="6 layers"):
        ml.attention_concentration(tiny_model(), torch.zeros(1, 4, dtype=torch.long), p, progress=False)


def test_attention_heads_refuses_marks_outside_the_input_before_running(minilm_model):
    from conftest import hook_counts

    from massact_lens import viz

    before = hook_counts(minilm_model)
    with pytest.raises(ValueError, match=r"massive positions \[100\] are not in this input"):
        viz.attention_heads(minilm_model, "Hi there", 1, massive=[100])
    assert hook_counts(minilm_model) == before
