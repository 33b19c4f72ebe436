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
