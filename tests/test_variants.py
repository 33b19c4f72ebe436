"""Attention variants without sinks: softmax-off-by-one and head-wise sigmoid gates, by hand."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

from massact_lens.cli import build_parser
from massact_lens.examples import tiny_model
from massact_lens.models.attention_variants import (
    HeadGate,
    SoftmaxOffByOne,
    attach_head_gate,
    attach_softmax_one,
    detach_gate,
    gate_component,
)
from massact_lens.models.checkpoints import load_checkpoint
from massact_lens.models.explicit_bias import (
    attach_explicit_bias,
    attach_sink_token,
    detach_prefix,
    prefix_component,
)
from massact_lens.training import BigramBackcopy, TrainConfig, task_metrics, train

PLACEHOLDER = 0  # the bos_tokens fixture (conftest) starts every input with token 0


def projections(model, cache, layer):
    """q, k, v [batch, pos, head, d_head] from ln1's output and the weights."""
    attn = model.blocks[layer].attn
    x = cache[f"blocks.{layer}.ln1.hook_out"]
    return tuple(
        torch.einsum("bpm,hmd->bphd", x, w) + b
        for w, b in ((attn.W_Q, attn.b_Q), (attn.W_K, attn.b_K), (attn.W_V, attn.b_V))
    )


# ---------------------------------------------------------------- softmax-off-by-one


def test_softmax1_pattern_is_exp_over_one_plus_the_sum_of_exps(bos_tokens):
    model = tiny_model("gpt2", n_layers=2)
    attach_softmax_one(model, placeholder_id=PLACEHOLDER)
    _, cache = model.run_with_cache(bos_tokens)
    for layer in range(2):
        q, k, v = projections(model, cache, layer)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k[:, 1:]) / math.sqrt(
            q.shape[-1]
        )  # real keys 1..
        n = q.shape[1]
        seen = torch.ones(n, n - 1, dtype=torch.bool).tril(
            diagonal=-1
        )  # query i sees real keys 1..i
        e = torch.exp(scores).masked_fill(~seen, 0.0)
        expected = e / (1 + e.sum(-1, keepdim=True))
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        torch.testing.assert_close(pattern[..., 1:], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pattern[..., 0], 1 / (1 + e.sum(-1)), rtol=1e-5, atol=1e-6)
        assert float(pattern[:, :, 1:, 1:].sum(-1).max()) < 1  # real keys never get all the mass
        # the zero slot adds nothing: z is the real keys' weighted values
        z = torch.einsum("bhqk,bkhd->bqhd", expected, v[:, 1:])
        torch.testing.assert_close(cache[f"blocks.{layer}.attn.hook_z"], z, rtol=1e-5, atol=1e-6)


def test_softmax1_is_an_explicit_bias_frozen_at_zero_on_a_rotary_grouped_query_model(bos_tokens):
    model = tiny_model("llama")
    slot = attach_softmax_one(model, placeholder_id=PLACEHOLDER)
    assert isinstance(prefix_component(model), SoftmaxOffByOne)
    assert not any(p is slot.k or p is slot.v for p in model.parameters())
    assert not [name for name in model.state_dict() if "massact" in name]  # the zeros are not saved
    logits, cache = model.run_with_cache(bos_tokens)
    with pytest.raises(ValueError, match="already has a softmax-off-by-one zero slot"):
        attach_sink_token(model, placeholder_id=PLACEHOLDER)
    detach_prefix(model)
    assert prefix_component(model) is None
    bias = attach_explicit_bias(model, placeholder_id=PLACEHOLDER)
    with torch.no_grad():
        bias.k.zero_()
    bias_logits, bias_cache = model.run_with_cache(bos_tokens)
    torch.testing.assert_close(logits, bias_logits, rtol=0, atol=0)
    for layer in range(2):
        for kind in ("k", "v"):
            assert torch.count_nonzero(cache[f"blocks.{layer}.attn.hook_{kind}"][:, 0]) == 0
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        torch.testing.assert_close(
            pattern, bias_cache[f"blocks.{layer}.attn.hook_pattern"], rtol=0, atol=0
        )
        assert float(pattern[..., 0].min()) > 0  # every query gives the zero logit some mass


# ---------------------------------------------------------------- head gate


@pytest.fixture()
def gated():
    """A 2-layer, 4-head GPT-2-like model with random, non-trivial gate weights."""
    model = tiny_model("gpt2", n_layers=2)
    gate = attach_head_gate(model)
    with torch.no_grad():
        gate.w.copy_(torch.randn(gate.w.shape, generator=torch.Generator().manual_seed(1)) * 0.2)
        gate.b.copy_(torch.randn(gate.b.shape, generator=torch.Generator().manual_seed(2)))
    return model, gate


def test_gate_multiplies_each_head_by_sigmoid_of_its_input(gated, bos_tokens):
    model, gate = gated
    _, cache = model.run_with_cache(bos_tokens)
    for layer in range(2):
        attn = model.blocks[layer].attn
        x = cache[f"blocks.{layer}.ln1.hook_out"]  # the attention's normed input
        g = torch.sigmoid(torch.einsum("bpm,hm->bph", x, gate.w[layer]) + gate.b[layer])
        _, _, v = projections(model, cache, layer)
        z = torch.einsum("bhqk,bkhd->bqhd", cache[f"blocks.{layer}.attn.hook_pattern"], v)
        torch.testing.assert_close(
            cache[f"blocks.{layer}.attn.hook_z"], g[..., None] * z, rtol=1e-5, atol=1e-6
        )
        out = torch.einsum("bqhd,hdm->bqm", g[..., None] * z, attn.W_O) + attn.b_O
        torch.testing.assert_close(
            cache[f"blocks.{layer}.hook_attn_out"], out, rtol=1e-5, atol=1e-5
        )
        g = g.detach()
        assert (
            float(g.std()) > 0.1 and float(((g > 0.1) & (g < 0.9)).float().mean()) > 0.5
        )  # really gating


def test_gated_logits_equal_a_hand_written_hook_on_the_ungated_model(gated, bos_tokens):
    model, gate = gated
    inputs = bos_tokens
    expected_logits = model(inputs, return_type="logits")
    w, b = gate.w.detach().clone(), gate.b.detach().clone()
    detach_gate(model)
    plain = model(inputs, return_type="logits")
    kept = {}

    def keep(layer):
        def fn(x, hook):
            kept[layer] = x

        return fn

    def multiply(layer):
        def fn(z, hook):
            return z * torch.sigmoid(kept[layer] @ w[layer].T + b[layer])[..., None]

        return fn

    hooks = [(f"blocks.{i}.attn.hook_in", keep(i)) for i in range(2)]
    hooks += [(f"blocks.{i}.attn.hook_z", multiply(i)) for i in range(2)]
    with model.hooks(fwd_hooks=hooks):
        by_hand = model(inputs, return_type="logits")
    torch.testing.assert_close(by_hand, expected_logits, rtol=1e-5, atol=1e-5)
    assert float((plain - expected_logits).abs().max().detach()) > 1e-3


def test_open_gates_are_the_plain_model_and_closed_gates_leave_the_output_bias(bos_tokens):
    model = tiny_model("gpt2", n_layers=2)
    inputs = bos_tokens
    plain, plain_cache = model.run_with_cache(inputs)
    gate = attach_head_gate(model)
    with torch.no_grad():
        gate.w.zero_()
        gate.b.fill_(60.0)  # sigmoid(60) == 1 in float32
    torch.testing.assert_close(model(inputs), plain, rtol=0, atol=0)
    with torch.no_grad():
        gate.b.fill_(-200.0)  # sigmoid(-200) == 0 in float32
    _, cache = model.run_with_cache(inputs)
    b_o = model.blocks[0].attn.b_O
    torch.testing.assert_close(
        cache["blocks.0.hook_attn_out"], b_o.expand(*bos_tokens.shape, -1), rtol=0, atol=0
    )
    assert not torch.equal(plain_cache["blocks.0.hook_attn_out"], cache["blocks.0.hook_attn_out"])


def test_gate_trains_detaches_and_refuses_a_second_copy(bos_tokens):
    from conftest import hook_counts

    model = tiny_model("llama")  # grouped-query: the gate is per query head
    before = hook_counts(model)
    gate = attach_head_gate(model)
    assert tuple(gate.w.shape) == (2, 4, 32) and gate_component(model) is gate
    assert {"massact_gate.w", "massact_gate.b"} <= set(model.state_dict())
    assert any(p is gate.w for p in model.parameters())
    model(bos_tokens, return_type="loss").backward()
    assert float(gate.w.grad.abs().sum()) > 0 and float(gate.b.grad.abs().sum()) > 0
    assert not gate._inputs  # nothing kept between passes
    with pytest.raises(ValueError, match="already has a head gate"):
        attach_head_gate(model)
    detach_gate(model)
    assert gate_component(model) is None and hook_counts(model) == before
    assert "massact_gate.w" not in model.state_dict()


def test_gate_refuses_an_input_of_another_model():
    gate = HeadGate(2, 4, 32)
    with pytest.raises(ValueError, match=r"attention input \[batch, pos, 32\]"):
        gate.gates(torch.zeros(1, 3, 16), 0)
    with pytest.raises(ValueError, match="layer 2 does not exist"):
        gate.gates(torch.zeros(1, 3, 32), 2)


# ---------------------------------------------------------------- training, checkpoints, command line


@pytest.mark.parametrize("variant", ["softmax1", "gated"])
def test_variants_train_save_and_load(variant, tmp_path):
    config = TrainConfig(steps=20, batch_size=8, eval_sequences=16)
    run = train(
        BigramBackcopy(seq_len=16), variant, tmp_path / variant, train_config=config, progress=False
    )
    assert run.evaluation.variant == variant and run.evaluation.loss < math.log(69) - 0.3
    weights = set(load_file(str(tmp_path / variant / "model.safetensors")))
    extra = {name for name in weights if name.startswith("massact")}
    assert extra == ({"massact_gate.w", "massact_gate.b"} if variant == "gated" else set())
    first, second = load_checkpoint(run.directory), load_checkpoint(run.directory)
    inputs = first.to_tokens(["w7 w9 T1 w9", "w3 w4"])
    assert inputs[0, 0].item() == (4 if variant == "softmax1" else 1)  # <slot> or <s>
    torch.testing.assert_close(first(inputs), second(inputs), rtol=0, atol=0)
    evaluation = task_metrics(first, BigramBackcopy(seq_len=16), n_sequences=8)
    assert evaluation.variant == variant and evaluation.bos_position == (
        1 if variant == "softmax1" else 0
    )
    gates = evaluation.gate_plain + evaluation.gate_trigger
    assert (
        all(0 < g < 1 for g in gates) if variant == "gated" else all(math.isnan(g) for g in gates)
    )
    slot = evaluation.attn_prefix
    assert (
        all(0 < p < 1 for p in slot) if variant == "softmax1" else all(math.isnan(p) for p in slot)
    )


def test_command_line_names_the_variant_with_attention_or_variant(capsys):
    parser = build_parser()
    for flag in ("--attention", "--variant"):
        args = parser.parse_args(["train", "bigram-backcopy", flag, "gated", "--out", "x"])
        assert args.variant == "gated"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "bigram-backcopy", "--attention", "sigmoid", "--out", "x"])
    assert "softmax1" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["softmax1", "gated"])
def test_the_library_passes_see_the_variant(variant, bos_tokens):
    """scan's pass (fused attention and lean components where nothing reads inside) keeps the
    variant's hooks in play: its block outputs are run_with_cache's, on a rotary GQA model."""
    import massact_lens as ml

    model = tiny_model("llama", n_layers=2)
    if variant == "gated":
        gate = attach_head_gate(model)
        with torch.no_grad():
            gate.w.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
            gate.b.fill_(-3.0)
    else:
        attach_softmax_one(model, placeholder_id=PLACEHOLDER)
    result = ml.scan(model, bos_tokens, progress=False)
    _, cache = model.run_with_cache(bos_tokens)
    for layer in range(2):
        top = cache[f"blocks.{layer}.hook_resid_post"].abs().flatten(1).max(1).values
        torch.testing.assert_close(
            result.values[:, layer, 0].abs().float(), top, rtol=1e-5, atol=1e-5
        )
    detach_gate(model)
    detach_prefix(model)
    plain = ml.scan(model, bos_tokens, progress=False)
    assert not torch.allclose(plain.values, result.values)  # the variant changed what was measured


@pytest.mark.parametrize("variant", ["gate", "softmax1"])
def test_a_pass_says_when_a_variant_lost_its_hooks(variant, bos_tokens):
    """reset_hooks(including_permanent=True) removes a component's hooks, not its parameters:
    a pass then measures the plain model, and says so."""
    import massact_lens as ml

    model = tiny_model("llama")
    if variant == "gate":
        attach_head_gate(model)
    else:
        attach_softmax_one(model, placeholder_id=PLACEHOLDER)
    tokens = bos_tokens.clone()
    tokens[:, 0] = PLACEHOLDER
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # attached: quiet
        ml.scan(model, tokens, progress=False)
    model.reset_hooks(including_permanent=True)
    with pytest.warns(UserWarning, match=r"whose hooks were removed .*reset_hooks\(including_permanent=True\)"):
        ml.scan(model, tokens, progress=False)
