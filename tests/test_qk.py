"""qk_massive_values: q and k norms per rotary pair, with the model's own frequencies and pairing.

A planted pair (rows of W_Q scaled) is found with its frequency on the native tiny LLaMA
(adjacent pairs, base 10000) and on a tiny HuggingFace LLaMA (rotate_half pairs,
rope_theta 5000 read from the model, not cfg.rotary_base); the norms equal a hand
computation from run_with_cache; pre- and post-rotary reads agree; padding, merge,
bad input; and the docs' recipe for zeroing a pair.
"""

from __future__ import annotations

import pytest
import torch

from massact_lens.attention import QKMassiveValues, qk_massive_values
from massact_lens.examples import minilm_dir, tiny_model
from massact_lens.interventions import edited_weights
from massact_lens.models.load import load_model

LAYER, HEAD, PAIR, SCALE = 1, 2, 3, 40.0


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny random HF LLaMA (head dim 8, rope_theta 5000, GQA 4 -> 2)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("qk_llama")
    config = transformers.LlamaConfig(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=5000.0,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(folder)
    return load_model(folder)


def _tokens(n: int = 4, length: int = 10, seed: int = 0, high: int = 64) -> torch.Tensor:
    return torch.randint(1, high, (n, length), generator=torch.Generator().manual_seed(seed))


def _q_weight(model, layer: int) -> torch.Tensor:
    """The query projection's weight ``[n_heads * d_head, d_model]`` of ``layer``."""
    attn = model.blocks[layer].attn
    q = attn.q.original_component if hasattr(attn.q, "original_component") else attn.q
    return q.weight


def _plant(model, dims: tuple[int, int]) -> None:
    d_head = int(model.cfg.d_head)
    with torch.no_grad():
        for d in dims:
            _q_weight(model, LAYER)[HEAD * d_head + d] *= SCALE


def test_a_planted_pair_is_found_with_its_frequency_native():
    model = tiny_model("llama", n_layers=2)
    _plant(model, (2 * PAIR, 2 * PAIR + 1))  # adjacent pairs: dims 6, 7
    qk = qk_massive_values(model, _tokens(), min_ratio=5.0, progress=False)
    assert qk.pairing == "adjacent"
    assert qk.pairs[PAIR].tolist() == [6, 7]
    assert float(qk.frequencies[PAIR]) == pytest.approx(10000 ** (-2 * PAIR / 8), rel=1e-4)
    massive = qk.massive("q")
    assert massive.nonzero().tolist() == [[LAYER, HEAD, PAIR]]
    assert not qk.massive("k").any()
    assert float(qk.ratio("q")[LAYER, HEAD, PAIR]) > 10
    assert bool(qk.low_frequency[PAIR])  # the slowest of the 4 pairs
    summary = qk.summary().set_index("kind")
    assert summary.loc["q", "massive_pairs"] == 1 and summary.loc["q", "low_frequency_share"] == 1.0
    assert summary.loc["q", "top_pairs"] == [PAIR]


def test_a_planted_pair_is_found_with_its_frequency_hf(hf_llama):
    model = hf_llama
    original = _q_weight(model, LAYER).detach().clone()
    _plant(model, (PAIR - 2, PAIR - 2 + 4))  # rotate_half: dims 1 and 5 form pair 1
    try:
        qk = qk_massive_values(model, _tokens(high=30000), progress=False)
    finally:
        with torch.no_grad():
            _q_weight(model, LAYER).copy_(original)
    assert qk.pairing == "rotate_half"
    assert qk.pairs.tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert qk.massive("q").nonzero().tolist() == [[LAYER, HEAD, 1]]
    assert float(qk.frequencies[1]) == pytest.approx(
        5000 ** (-2 / 8), rel=1e-5
    )  # rope_theta of the HF config
    assert qk.hook_names == ("blocks.{layer}.attn.hook_rot_k", "blocks.{layer}.attn.hook_rot_q")


def _hand_norms(
    cache, kind: str, layer: int, pairs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    x = cache[f"blocks.{layer}.attn.hook_{kind}"]  # [b, pos, h, d]
    norms = (x[..., pairs[:, 0]] ** 2 + x[..., pairs[:, 1]] ** 2).sqrt()
    return norms[mask.bool()].mean(0)  # [h, pair]


@pytest.mark.parametrize("which", ["native", "hf"])
def test_norms_equal_a_hand_computation(which, hf_llama):
    model = tiny_model("llama", n_layers=2) if which == "native" else hf_llama
    tokens = _tokens(3, 9, high=60)
    mask = torch.ones_like(tokens)
    mask[1, 4:] = 0
    mask[2, 7:] = 0
    qk = qk_massive_values(model, tokens, attention_mask=mask, batch_size=2, progress=False)
    assert qk.n_tokens == int(mask.sum())
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    for kind, measured in (("q", qk.q_norm), ("k", qk.k_norm)):
        for i, layer in enumerate(qk.layers):
            # pre-rotary hook_q / hook_k by hand; the result reads post-rotary hooks where they fire
            assert torch.allclose(
                measured[i], _hand_norms(cache, kind, layer, qk.pairs, mask), rtol=1e-4, atol=1e-6
            )
    ratio = qk.ratio("q")  # the median pair of each head has ratio 1
    assert torch.allclose(torch.quantile(ratio, 0.5, dim=-1), torch.ones_like(ratio[..., 0]))


def test_slices_merge_to_the_whole():
    model = tiny_model("llama", n_layers=2)
    tokens = _tokens(5, 8)
    whole = qk_massive_values(model, tokens, progress=False)
    merged = QKMassiveValues.merge(
        [qk_massive_values(model, t, progress=False) for t in (tokens[:2], tokens[2:])]
    )
    assert merged.n_inputs == 5 and merged.n_tokens == whole.n_tokens == 40
    assert torch.allclose(merged.q_norm, whole.q_norm, rtol=1e-6)
    assert torch.allclose(merged.k_norm, whole.k_norm, rtol=1e-6)
    other = qk_massive_values(model, tokens, min_ratio=3.0, progress=False)
    with pytest.raises(ValueError, match="min_ratio"):
        QKMassiveValues.merge([whole, other])


def test_the_result_reads_at_a_glance():
    qk = qk_massive_values(tiny_model("llama", n_layers=2), _tokens(), progress=False)
    assert repr(qk).startswith("QKMassiveValues of tiny-llama") and len(repr(qk)) < 1000
    assert "<table" in qk._repr_html_()
    frame = qk.to_dataframe()
    assert len(frame) == 2 * 4 * 4 + 2 * 2 * 4  # q: layers x heads x pairs; k: KV heads
    assert set(frame["kind"]) == {"q", "k"}


def test_models_without_rotary_and_bad_input_are_refused_before_any_pass(minilm_model):
    for model in (tiny_model("gpt2"), minilm_model):
        with pytest.raises(ValueError, match="rotary"):
            qk_massive_values(model, torch.ones(1, 4, dtype=torch.long), progress=False)
    model = tiny_model("llama")
    calls = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: calls.append(1))]):
        for kwargs in ({"min_ratio": 1.0}, {"min_ratio": float("nan")}, {"layers": [5]}):
            with pytest.raises(ValueError):
                qk_massive_values(model, _tokens(), progress=False, **kwargs)
    assert calls == []


def test_the_docs_recipe_zeroes_a_pair():
    """docs/beyond_the_paper.md: zero one head's query pair through its rows of W_Q (and b_Q)."""
    model = tiny_model("llama", n_layers=2)
    d_head, d_model = int(model.cfg.d_head), int(model.cfg.d_model)
    qk = qk_massive_values(model, _tokens(), progress=False)
    rows = [HEAD * d_head + int(d) for d in qk.pairs[PAIR]]
    edits = {(LAYER, "attn.q", row, col): 0.0 for row in rows for col in range(d_model)}
    edits |= {
        (LAYER, "attn.q.bias", row): 0.0 for row in rows
    }  # the tiny model has a query bias; SmolLM2 none
    with edited_weights(model, edits):
        zeroed = qk_massive_values(model, _tokens(), progress=False)
    assert float(zeroed.q_norm[LAYER, HEAD, PAIR]) == 0.0
    others = torch.ones_like(zeroed.q_norm, dtype=torch.bool)
    others[LAYER, HEAD, PAIR] = False
    assert torch.allclose(zeroed.q_norm[others], qk.q_norm[others])
    assert torch.equal(
        qk_massive_values(model, _tokens(), progress=False).q_norm, qk.q_norm
    )  # weights restored
