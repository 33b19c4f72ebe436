"""A model split across devices / offloaded to disk with Accelerate gives the in-memory results."""

from __future__ import annotations

import shutil

import pytest
import torch

import massact_lens as ml
from massact_lens.examples import smollm2_dir
from massact_lens.models.load import load_model

#: Blocks 1 and 2 live on disk and are read in by Accelerate's hooks at each forward.
DEVICE_MAP = {
    "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
    "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 4-layer random LLaMA saved with save_pretrained, with SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2_dir() / name).exists():
            shutil.copy(smollm2_dir() / name, out / name)
    return out


@pytest.fixture(scope="module")
def pair(folder, tmp_path_factory):
    offload = tmp_path_factory.mktemp("offload")
    return load_model(folder), load_model(folder, device_map=DEVICE_MAP, offload_folder=offload)


def test_offloaded_blocks_really_are_offloaded(pair):
    _, offloaded = pair
    assert offloaded.original_model.hf_device_map["model.layers.1"] == "disk"
    assert any(p.device.type == "meta" for p in offloaded.blocks[1].parameters())


def test_scan_and_lineage_match_the_model_in_memory(pair):
    memory, offloaded = pair
    # The offloaded leaves carry accelerate's hook where the library's quick alignment
    # looks for it (fast_paths._quick_align), so they are still aligned at each call.
    hooked = [m for m in offloaded.blocks[1].modules() if "_hf_hook" in m.__dict__]
    assert any(getattr(m._hf_hook, "offload", False) for m in hooked)
    tokens = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(1))
    a, b = ml.scan(memory, tokens, progress=False), ml.scan(offloaded, tokens, progress=False)
    assert torch.equal(a.values.nan_to_num(), b.values.nan_to_num()) and torch.equal(a.medians, b.medians)
    found_a = ml.find_massive(a, min_value=0.5, min_ratio=3)
    found_b = ml.find_massive(b, min_value=0.5, min_ratio=3)
    assert [(r.input_index, r.layer, r.dim) for r in found_a] == [(r.input_index, r.layer, r.dim) for r in found_b]


def test_perplexity_matches_the_model_in_memory(pair):
    from massact_lens.evaluate import perplexity

    memory, offloaded = pair
    text = "The quick brown fox jumps over the lazy dog. " * 4
    a = perplexity(memory, [text], seq_len=32, progress=False)
    b = perplexity(offloaded, [text], seq_len=32, progress=False)
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-6)


def test_bad_placements_fail_before_loading(folder, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        (dict(device_map=DEVICE_MAP), "offload_folder"),
        (dict(device_map=DEVICE_MAP, offload_folder=blocker / "sub"), "cannot be written"),
        (dict(device="cpu", device_map="auto"), "either device or device_map"),
        (dict(offload_folder=tmp_path), "only apply with device_map"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            load_model(folder, **kwargs)
