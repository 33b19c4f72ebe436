"""Shared fixtures. Models from fixtures are session-scoped and must not be edited in place."""

from __future__ import annotations

import pytest
import torch

from massact_lens.examples import minilm, minilm_dir, tiny_model
from massact_lens.models.load import load_model
from massact_lens.models.planting import plant_massive_activation

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "I love reading books in the evening.",
    "Paris is the capital of France.",
    "She went to the market to buy some apples.",
    "The weather today is sunny and warm.",
    "He plays the guitar in a small band.",
    "Our team won the championship last year.",
    "The museum opens at nine in the morning.",
    "Please close the door when you leave.",
    "Coffee tastes better with a little milk.",
    "The train was delayed by twenty minutes.",
    "Mathematics is the language of science.",
]


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    return list(SENTENCES)


@pytest.fixture(scope="session")
def minilm_model():
    return minilm()


@pytest.fixture(scope="session")
def smollm2_model():
    """SmolLM2-135M-Instruct (dequantised Q4_1 weights), converted once into the user cache."""
    from massact_lens.examples import smollm2

    return smollm2()


@pytest.fixture(scope="session")
def hf_llama_dir(tmp_path_factory):
    """The folder of a tiny random HF Llama (rotary, GQA 4 -> 2 KV heads) with MiniLM's tokenizer."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny_llama")
    config = transformers.LlamaConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hf_llama(hf_llama_dir):
    """The tiny HF Llama, booted like a hub model."""
    return load_model(hf_llama_dir)


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def planted(request):
    """A 4-layer tiny model with 1000.0 planted at dim 5 on token 0 from block 1 on."""
    return plant_massive_activation(tiny_model(request.param, n_layers=4), layer=1, dim=5, value=1000.0)


@pytest.fixture(scope="session")
def bos_tokens() -> torch.Tensor:
    """8 sequences of 12 tokens, token 0 (the planted BOS) first and nowhere else."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 64, (8, 12), generator=generator)
    tokens[:, 0] = 0
    return tokens


def hook_counts(model) -> dict[str, int]:
    return {name: len(point._forward_hooks) for name, point in model.hook_dict.items()}


@pytest.fixture
def no_leftover_hooks():
    """Call with a model before and after: asserts no hook was left attached."""

    snapshots = {}

    def check(model):
        key = id(model)
        if key not in snapshots:
            snapshots[key] = hook_counts(model)
            return
        assert hook_counts(model) == snapshots[key], "a hook was left attached"

    return check
