"""plant_massive_activation: the known-answer models every other test relies on."""

from __future__ import annotations

import pytest
import torch

from massact_lens.examples import tiny_model
from massact_lens.models.planting import plant_massive_activation


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize(("n_layers", "layer"), [(2, 1), (3, 2), (4, 0), (4, 3)])
def test_planted_at_any_layer_including_the_last(kind, n_layers, layer):
    # LayerNorm models failed at their last block before the reader was calibrated.
    model = plant_massive_activation(tiny_model(kind, n_layers=n_layers), layer=layer, dim=5, value=1000.0)
    tokens = torch.randint(1, 64, (3, 10), generator=torch.Generator().manual_seed(layer))
    tokens[:, 0] = 0
    _, cache = model.run_with_cache(tokens)
    after = cache[f"blocks.{layer}.hook_resid_post"][..., 5]
    assert after[:, 0].tolist() == pytest.approx([1000.0] * 3, rel=1e-4)
    assert float(after[:, 1:].abs().max()) < 5.0
    if layer > 0:
        assert float(cache[f"blocks.{layer - 1}.hook_resid_post"][:, 0, 5].abs().max()) < 5.0


@pytest.mark.parametrize(("family", "layer"), [("gemma2", 1), ("gemma3", 0), ("gemma3", 2)])
def test_planted_through_the_post_feed_forward_gain_on_sandwich_models(tmp_path_factory, family, layer):
    """Gemma 2 / 3 (sandwich norms): the neuron writes a modest value, the gain amplifies it."""
    transformers = pytest.importorskip("transformers")
    from massact_lens.examples import minilm_dir
    from massact_lens.models.load import load_model

    config_class, model_class = {"gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
                                 "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM")}[family]
    config = getattr(transformers, config_class)(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4)
    folder = tmp_path_factory.mktemp(f"plant_{family}")
    torch.manual_seed(0)
    getattr(transformers, model_class)(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(folder)
    model = plant_massive_activation(load_model(folder), layer=layer, dim=5, value=1000.0, neuron=3)
    tokens = torch.randint(1000, 2000, (3, 10), generator=torch.Generator().manual_seed(layer))
    tokens[:, 0] = 0
    _, cache = model.run_with_cache(tokens)
    after = cache[f"blocks.{layer}.hook_resid_post"][..., 5]
    assert after[:, 0].tolist() == pytest.approx([1000.0] * 3, rel=1e-4)
    assert float(after[:, 1:].abs().max()) < 20.0  # each post-normed write has rms ~1
    assert float(cache[f"blocks.{layer}.mlp.out.hook_out"][:, 0, 5].abs().max()) < 20.0  # the raw write is modest
    gain = 1.0 + model.blocks[layer].ln2_post.original_component.weight.detach()
    assert float(gain[5]) > 50 * float(gain.abs().median())
