"""Mechanics of the explicit attention bias and the sink token on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch

from massact_lens import scan
from massact_lens.examples import tiny_model
from massact_lens.models.explicit_bias import (
    PREFIX_POSITION,
    ExplicitAttentionBias,
    SinkToken,
    attach_explicit_bias,
    attach_sink_token,
    detach_prefix,
    first_token_position,
    prefix_component,
)

PLACEHOLDER = 0


def hook_counts(model):
    return {name: len(hp._forward_hooks) for name, hp in model.hook_dict.items()}


def tokens(batch=3, length=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    body = torch.randint(1, 64, (batch, length - 1), generator=generator)
    return torch.cat([torch.full((batch, 1), PLACEHOLDER), body], dim=1)


@pytest.fixture()
def biased():
    """A 2-layer, 4-head GPT-2-like model with a random (non-zero) k' and v'."""
    model = tiny_model("gpt2", n_layers=2)
    bias = attach_explicit_bias(model, placeholder_id=PLACEHOLDER)
    with torch.no_grad():
        bias.k.copy_(torch.randn(bias.k.shape, generator=torch.Generator().manual_seed(1)) * 2.0)
        bias.v.copy_(torch.randn(bias.v.shape, generator=torch.Generator().manual_seed(2)))
    return model, bias


def independent_attention(model, cache, layer, bias):
    """q, K, V from ln1's output and the weights; softmax([q K^T, q k'^T] / sqrt(d))."""
    attn = model.blocks[layer].attn
    x = cache[f"blocks.{layer}.ln1.hook_out"]  # [batch, pos, d_model]
    q = torch.einsum("bpm,hmd->bphd", x, attn.W_Q) + attn.b_Q
    k = torch.einsum("bpm,hmd->bphd", x, attn.W_K) + attn.b_K
    v = torch.einsum("bpm,hmd->bphd", x, attn.W_V) + attn.b_V
    k_real, v_real = k[:, 1:], v[:, 1:]  # position 0 holds the placeholder: not a key
    d_head = q.shape[-1]
    slot = torch.einsum("bqhd,hd->bhq", q, bias.k[layer]) / math.sqrt(d_head)
    real = torch.einsum("bqhd,bkhd->bhqk", q, k_real) / math.sqrt(d_head)
    n = q.shape[1]
    causal = torch.ones(n, n - 1, dtype=torch.bool).tril(diagonal=-1)  # query i sees real keys 1..i
    real = real.masked_fill(~causal, float("-inf"))
    probs = torch.softmax(torch.cat([slot[..., None], real], dim=-1), dim=-1)
    z = probs[..., 0, None] * bias.v[layer][None, :, None, :] + torch.einsum("bhqk,bkhd->bhqd", probs[..., 1:], v_real)
    return probs, z.transpose(1, 2)  # pattern [b, h, q, 1 + key], z [b, q, h, d]


def test_slot_gets_the_attention_mass_of_the_formula(biased):
    model, bias = biased
    _, cache = model.run_with_cache(tokens())
    for layer in range(2):
        probs, z = independent_attention(model, cache, layer, bias)
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        torch.testing.assert_close(pattern[..., PREFIX_POSITION], probs[..., 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pattern[..., 1:], probs[..., 1:], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cache[f"blocks.{layer}.attn.hook_z"], z, rtol=1e-5, atol=1e-6)
        assert float(pattern[..., 0].mean()) > 0.05  # the slot is really attended to
        assert torch.equal(cache[f"blocks.{layer}.attn.hook_k"][:, 0], bias.k[layer].expand(3, -1, -1))
        assert torch.equal(cache[f"blocks.{layer}.attn.hook_v"][:, 0], bias.v[layer].expand(3, -1, -1))


def test_zero_value_slot_adds_nothing_but_still_takes_softmax_mass():
    model = tiny_model("gpt2", n_layers=2)
    bias = attach_explicit_bias(model, placeholder_id=PLACEHOLDER)
    assert torch.count_nonzero(bias.v) == 0 and torch.count_nonzero(bias.k) > 0
    _, cache = model.run_with_cache(tokens())
    for layer in range(2):
        probs, _ = independent_attention(model, cache, layer, bias)
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        torch.testing.assert_close(bias.bias_term(model, layer, pattern), torch.zeros(3, 7, 32))
        # z = (1 - p_slot) * (softmax over the real keys alone) @ V: unchanged up to that factor.
        attn = model.blocks[layer].attn
        x = cache[f"blocks.{layer}.ln1.hook_out"]
        v_real = (torch.einsum("bpm,hmd->bphd", x, attn.W_V) + attn.b_V)[:, 1:]
        real_only = probs[..., 1:] / probs[..., 1:].sum(-1, keepdim=True)
        expected = (1 - probs[..., 0, None]) * torch.einsum("bhqk,bkhd->bhqd", real_only, v_real)
        # query 0 (the slot position) has no real key: compare the queries after it
        z = cache[f"blocks.{layer}.attn.hook_z"][:, 1:]
        torch.testing.assert_close(z, expected.transpose(1, 2)[:, 1:], rtol=1e-5, atol=1e-6)


def test_bias_term_is_the_decomposition_term_of_c_equal_slot(biased):
    model, bias = biased
    _, cache = model.run_with_cache(tokens())
    for layer in range(2):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [b, h, q, k]
        values = cache[f"blocks.{layer}.attn.hook_v"]  # [b, k, h, d]
        w_o = model.blocks[layer].attn.W_O  # [h, d, d_model]
        per_key = torch.einsum("bhqk,bkhd,hdm->bqkm", pattern, values, w_o)
        in_c, rest = per_key[:, :, :1].sum(2), per_key[:, :, 1:].sum(2)
        torch.testing.assert_close(in_c, bias.bias_term(model, layer, pattern), rtol=1e-5, atol=1e-6)
        attn_out = cache[f"blocks.{layer}.hook_attn_out"] - model.blocks[layer].attn.b_O
        torch.testing.assert_close(in_c + rest, attn_out, rtol=1e-4, atol=1e-5)


def test_gradients_reach_the_bias_and_the_sink():
    for attach, names in ((attach_explicit_bias, ("k", "v")), (attach_sink_token, ("embedding",))):
        model = tiny_model("gpt2", n_layers=2)
        component = attach(model, placeholder_id=PLACEHOLDER)
        parameters = dict(model.named_parameters())
        for name in names:
            assert parameters[f"massact_prefix.{name}"] is getattr(component, name)
        loss = model(tokens(), return_type="loss")
        loss.backward()
        for name in names:
            grad = getattr(component, name).grad
            assert grad is not None and float(grad.abs().sum()) > 0


def test_sink_token_replaces_the_embedding_at_position_zero_only():
    model = tiny_model("gpt2", n_layers=1)
    reference = model.run_with_cache(tokens())[1]["hook_embed"]
    sink = attach_sink_token(model, placeholder_id=PLACEHOLDER)
    embed = model.run_with_cache(tokens())[1]["hook_embed"]
    assert torch.equal(embed[:, 0], sink.embedding.expand(3, -1))
    assert torch.equal(embed[:, 1:], reference[:, 1:])
    assert first_token_position(model) == 1 and isinstance(prefix_component(model), SinkToken)


def test_grouped_query_rotary_model_gets_one_slot_per_key_value_head():
    model = tiny_model("llama", n_layers=2)  # 4 query heads, 2 key/value heads, rotary
    bias = attach_explicit_bias(model, placeholder_id=PLACEHOLDER)
    assert tuple(bias.k.shape) == (2, 2, 8)
    with torch.no_grad():
        bias.v.normal_()
    _, cache = model.run_with_cache(tokens())
    assert torch.equal(cache["blocks.1.attn.hook_k"][:, 0], bias.k[1].expand(3, -1, -1))
    pattern = cache["blocks.1.attn.hook_pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
    term = bias.bias_term(model, 1, pattern)
    values = cache["blocks.1.attn.hook_v"].repeat_interleave(2, dim=2)
    expected = torch.einsum("bhq,bhd,hdm->bqm", pattern[..., 0], values[:, 0], model.blocks[1].attn.W_O)
    torch.testing.assert_close(term, expected, rtol=1e-5, atol=1e-6)


def test_inputs_without_the_placeholder_are_refused_and_no_hook_is_left_behind():
    model = tiny_model("gpt2", n_layers=2)
    before = hook_counts(model)
    attach_explicit_bias(model, placeholder_id=PLACEHOLDER)
    attached = hook_counts(model)
    assert attached != before
    bad = tokens()
    bad[1, 0] = 5
    with pytest.raises(ValueError, match="placeholder token id 0"):
        model(bad)
    with pytest.raises(ValueError, match="placeholder token id 0"), model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: None)]):
        model(bad)
    assert hook_counts(model) == attached
    model.reset_hooks()  # permanent hooks survive an ordinary reset
    assert hook_counts(model) == attached
    with pytest.raises(ValueError, match="already has an explicit attention bias"):
        attach_sink_token(model, placeholder_id=PLACEHOLDER)
    detach_prefix(model)
    assert hook_counts(model) == before
    assert prefix_component(model) is None and first_token_position(model) == 0
    assert not any("massact_prefix" in name for name, _ in model.named_parameters())


def test_bad_arguments():
    with pytest.raises(ValueError, match="placeholder_id"):
        ExplicitAttentionBias(2, 4, 8, placeholder_id=-1)
    model = tiny_model("gpt2", n_layers=2)
    bias = attach_explicit_bias(model, placeholder_id=None)  # unchecked: any first token is the slot
    model(torch.randint(1, 64, (2, 5)))
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        bias.bias_term(model, 5, torch.zeros(1, 4, 3, 3))


def test_scan_reads_a_biased_model_and_the_slot_position():
    model = tiny_model("gpt2", n_layers=2)
    attach_explicit_bias(model, placeholder_id=PLACEHOLDER)
    before = hook_counts(model)
    result = scan(model, tokens(), progress=False)
    assert hook_counts(model) == before
    assert result.values.shape == (3, 2, 10)
    assert int(result.positions.min()) >= 0


def test_library_decomposition_with_c_the_slot_is_the_explicit_bias(biased):
    attention = pytest.importorskip("massact_lens.attention")
    model, bias = biased
    inputs = tokens()
    result = attention.implicit_bias(model, inputs, positions=[PREFIX_POSITION], keep="all", progress=False)
    _, cache = model.run_with_cache(inputs)
    for layer in range(2):
        expected = bias.bias_term(model, layer, cache[f"blocks.{layer}.attn.hook_pattern"])
        torch.testing.assert_close(result.written(layer, "bias").sum(dim=2), expected, rtol=1e-5, atol=1e-6)
