"""Real weights: the bundled all-MiniLM-L6-v2, and model loading."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import massact_lens as ml
from massact_lens._core.hook_names import residual_hook_names
from massact_lens.examples import MINILM_SHA256, check_sha256, minilm, minilm_dir
from massact_lens.models import weights_processed


def test_post_norm_model_is_measured_in_the_pre_layernorm_sums(minilm_model):
    names = residual_hook_names(minilm_model)
    assert names[:2] == ("blocks.0.ln1.hook_in", "blocks.0.ln2.hook_in")
    assert len(names) == 12


def test_dim_99_on_cls_is_massive_in_every_sentence(minilm_model, sentences):
    result = ml.scan(minilm_model, sentences, progress=False)
    found = ml.find_massive(result, min_value=50, min_ratio=200)
    for layer in (0, 1, 2):
        hits = [r for r in found if r.layer == layer]
        assert {(r.token, r.dim, r.position, r.hook_name) for r in hits} == {
            ("[CLS]", 99, 0, f"blocks.{layer}.ln2.hook_in")
        }
        assert {r.input_index for r in hits} == set(range(len(sentences)))
    stats = result.layer_stats().set_index("hook_name")
    assert stats.loc["blocks.0.ln2.hook_in", "top1"] == pytest.approx(221.6, abs=3)
    assert stats.loc["blocks.0.ln2.hook_in", "ratio"] > 500
    # Layer 3 sits near the thresholds (~76, ~220x): report, do not require.
    layer3 = sum(r.layer == 3 for r in found)
    print(f"layer 3: dim 99 on [CLS] passes 50/200 in {layer3}/{len(sentences)} sentences")
    assert not any(r.layer >= 4 for r in found)


def test_profile_gives_the_coefficient_of_variation(minilm_model, sentences):
    prof = ml.profile(minilm_model, sentences, min_value=50, min_ratio=200, progress=False)
    assert prof.massive_dims == (99,)
    (dim,) = prof.dims
    assert dim.first_layer == 0 and dim.last_layer in (2, 3)
    assert dim.kinds.keys() == {"start"} and dim.input_fraction == 1.0
    stats = prof.to_dataframe().set_index("hook_name")
    layer0 = stats.loc["blocks.0.ln2.hook_in"]
    assert layer0["mean"] == pytest.approx(221.6, abs=3)
    assert layer0["cv"] < 0.01  # measured by hand: 221.6 +- 0.5, about 0.2%
    print(f"layer 0: {layer0['mean']:.1f} +- {layer0['std']:.2f} (cv {100 * layer0['cv']:.2f}%)")


def test_sha256_mismatch_is_an_error(tmp_path):
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="refusing to load"):
        check_sha256(fake, MINILM_SHA256)
    check_sha256(minilm_dir() / "model.safetensors", MINILM_SHA256)


def test_load_model_from_a_local_directory_matches_huggingface(sentences):
    from transformers import AutoModel

    model = ml.load_model(minilm_dir())
    assert not weights_processed(model)
    hf = AutoModel.from_pretrained(minilm_dir(), attn_implementation="eager").eval()
    tokens = model.to_tokens(sentences[0])
    _, cache = model.run_with_cache(tokens, names_filter="blocks.5.hook_resid_post")
    with torch.no_grad():
        expected = hf(tokens).last_hidden_state
    assert torch.allclose(cache["blocks.5.hook_resid_post"], expected, atol=1e-4)


def test_processed_weights_are_flagged(sentences):
    model = minilm()
    model.enable_compatibility_mode(disable_warnings=True)
    assert weights_processed(model)
    with pytest.warns(UserWarning, match="processed"):
        ml.scan(model, sentences[:2], progress=False)


def test_missing_directory_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="No directory"):
        ml.load_model("./no/such/folder")


def test_hub_name_offline_names_what_to_pass_instead():
    code = "import massact_lens as ml\ntry:\n    ml.load_model('gpt2')\nexcept OSError as e:\n    print(e)\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "Pass a local directory" in out.stdout or "gpt2" not in out.stdout, out.stdout + out.stderr
    if "Pass a local directory" not in out.stdout:
        pytest.skip("gpt2 is in the local HuggingFace cache here; the offline error cannot be shown")
