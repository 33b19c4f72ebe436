"""Acceptance on hub weights (the paper's GPT-2 numbers). Skipped where the hub is unreachable.

Sun et al. (2024) report for GPT-2 small a massive activation at feature dim 447 on the
first token (position 0) in the middle layers, about 3,000 in magnitude. These tests run
only where ``gpt2`` can be loaded: from the local HuggingFace cache or the hub.
"""

from __future__ import annotations

import pytest

import massact_lens as ml
from massact_lens.models.load import hub_reachable


def _cached(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 (any failure means: not usable offline)
        return False


@pytest.fixture(scope="module")
def gpt2():
    if not (_cached("gpt2") or hub_reachable()):
        pytest.skip("needs GPT-2 weights: the model hub is unreachable here and gpt2 is not in the local cache")
    return ml.load_model("gpt2")


@pytest.mark.slow
def test_gpt2_dim_447_on_the_first_token(gpt2):
    prompts = [
        "The quick brown fox jumps over the lazy dog.",
        "Paris is the capital of France.",
        "I love reading books in the evening.",
        "The weather today is sunny and warm.",
    ]
    # As the paper measured GPT-2: no BOS, the first word is the start token.
    result = ml.scan(gpt2, prompts, prepend_bos=False, progress=False)
    found = ml.find_massive(result)  # the paper's 100 / 1000
    on_447 = [r for r in found if r.dim == 447 and r.position == 0]
    assert {r.input_index for r in on_447} == set(range(len(prompts)))
    assert max(abs(r.value) for r in on_447) > 1000
    middle = {r.layer for r in on_447}
    assert middle & set(range(3, 9)), f"dim 447 massive in layers {sorted(middle)}"
