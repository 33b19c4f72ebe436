"""Issue 24, a fresh adversarial run (round three) over the surfaces added since round two.

Each test here failed before its fix: a NaN input averaged into the sink curve as NaN,
q/k pair norms summed over a NaN input without a word and merged across other weights,
a surgery's hooks attached to another model, an int tensor of key indices read as a
bool mask, settings given beside a scan silently ignored, bad training settings trained
on, and several errors that said what was wrong but not what to do.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from jaxtyping import TypeCheckError
from test_hardening_cli_viz import _forward_passes  # counts a model's forward passes

import massact_lens as ml
from massact_lens import distributed, viz
from massact_lens.attention import QKMassiveValues, bias_surgery, qk_massive_values, sink_curve
from massact_lens.examples import tiny_model
from massact_lens.interventions import where_massive, zero_hook
from massact_lens.models.attention_variants import attach_head_gate, attach_softmax_one
from massact_lens.models.planting import plant_massive_activation
from massact_lens.training import ModelConfig, TrainConfig

KEEP = [0, 2]  # the inputs left when input 1 holds a NaN


def _planted(seed: int = 0):
    return plant_massive_activation(tiny_model("llama", n_layers=3, seed=seed), layer=1, dim=5, value=1000.0)


def _tokens(n: int = 3, width: int = 6) -> torch.Tensor:
    tokens = torch.randint(1, 64, (n, width), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    return tokens


def _nan_in_input_1(x, hook):
    x = x.clone()
    x[1] = float("nan")
    return x


# ------------------------------------------------------------------- non-finite values


def test_sink_curve_leaves_a_nan_input_out_of_every_position():
    model, tokens = _planted(), _tokens()
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", _nan_in_input_1)]), \
            pytest.warns(RuntimeWarning, match="input 1 .*left out"):
        curve = sink_curve(model, tokens, batch_size=3, progress=False)
    want = sink_curve(model, tokens[KEEP], progress=False)
    assert not curve.mass.isnan().any()  # NaN * 0 was NaN: layers 1 and 2 were NaN throughout
    assert torch.allclose(curve.mass, want.mass, atol=1e-6)


def test_qk_massive_values_leaves_a_nan_input_out_and_says_so():
    model, tokens = _planted(), _tokens()
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", _nan_in_input_1)]), \
            pytest.warns(RuntimeWarning, match="input 1 at blocks.1.attn.hook_k"):
        got = qk_massive_values(model, tokens, progress=False)
    want = qk_massive_values(model, tokens[KEEP], progress=False)
    assert got.n_tokens == want.n_tokens == 12
    assert torch.allclose(got.q_norm, want.q_norm) and torch.allclose(got.k_norm, want.k_norm)


def test_hidden_states_say_when_a_state_holds_a_nan():
    model = _planted()

    def poison(x, hook):
        x = x.clone()
        x[0, 3, 2] = float("nan")
        return x

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", poison)]), \
            pytest.warns(RuntimeWarning, match="blocks.0.hook_resid_post .1 entries"):
        viz.hidden_states(model, _tokens()[0])


# ------------------------------------------------------------------- results of other models


def test_qk_parts_of_other_weights_do_not_merge():
    tokens = _tokens()
    parts = [qk_massive_values(_planted(0), tokens, progress=False), qk_massive_values(_planted(1), tokens, progress=False)]
    with pytest.raises(ValueError, match="other weights"):
        QKMassiveValues.merge(parts)


def test_surgery_hooks_refuse_another_model_and_warn_on_other_weights():
    model, tokens = _planted(0), _tokens()
    surgery = bias_surgery(model, tokens, mode="mean", levels=["all"], progress=False)
    for other in (tiny_model("gpt2"), tiny_model("llama", n_layers=3, n_heads=8, d_model=64)):
        with pytest.raises(ValueError, match="different models"):
            surgery.hooks(other)
    with pytest.warns(UserWarning, match="other weights .*Run bias_surgery on this model"):
        surgery.hooks(_planted(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert surgery.hooks(model)
    with pytest.raises(ValueError, match="pass one of them"):
        surgery.hooks(model, layer=99)


# ------------------------------------------------------------------- arguments refused before any pass


def test_an_int_tensor_of_positions_is_not_read_as_a_mask():
    model, tokens = _planted(), _tokens()
    with _forward_passes(model) as calls:
        with pytest.raises(ValueError, match=r"tensor.tolist\(\)"):
            ml.attention_concentration(model, tokens, torch.tensor([0, 2]), progress=False)
        with pytest.raises(ValueError, match="bool mask"):  # was read as .bool(): every token id but 0 in C
            ml.attention_concentration(model, tokens, lambda batch: torch.ones_like(batch.tokens), progress=False)
        with pytest.raises(ValueError, match="return one row per input"):  # was found in the pass
            ml.implicit_bias(model, tokens, lambda batch: torch.ones(2, dtype=torch.bool), progress=False)
    assert calls == []


def test_profile_refuses_settings_that_disagree_with_its_scan_before_any_pass():
    model, tokens = _planted(), _tokens()
    scanned = ml.scan(model, tokens, progress=False)
    with _forward_passes(model) as calls:
        with pytest.raises(ValueError, match="top_k=3 but scan_result kept top_k=10"):
            ml.profile(model, tokens, min_value=100, min_ratio=10, top_k=3, scan_result=scanned, progress=False)
        with pytest.raises(ValueError, match="other hook points"):
            ml.profile(model, tokens, min_value=100, min_ratio=10, layers=[0], scan_result=scanned, progress=False)
    assert calls == []
    same = ml.profile(model, tokens, min_value=100, min_ratio=10, top_k=10, layers=[0, 1, 2], scan_result=scanned,
                      progress=False)
    assert same.massive_dims == (5,)


def test_ablation_table_checks_settings_and_extra_arguments_before_any_pass():
    model, tokens = _planted(), _tokens()
    found = ml.profile(model, tokens, min_value=100, min_ratio=10, progress=False)
    with _forward_passes(model) as calls:
        with pytest.raises((TypeError, TypeCheckError), match="settings"):  # beartype checks the dict under pytest
            ml.ablation_table(model, found, corpus=tokens.flatten(), settings=[("x", [])], progress=False)
        with pytest.raises(TypeError, match=r"unknown arguments \['frobnicate'\]"):
            ml.ablation_table(model, found, corpus=tokens.flatten(), frobnicate=1, progress=False)
    assert calls == []


def test_the_new_surfaces_refuse_odd_arguments_with_what_to_do():
    model, tokens = _planted(), _tokens()
    curve = sink_curve(model, tokens, progress=False)
    with pytest.raises(ValueError, match=r"pass e.g. at\(\[1, 5\]\)"):
        curve.at([99])
    for layers in ([], 0):
        with pytest.raises((ValueError, TypeCheckError), match="layers"):
            viz.sink_curve_figure(curve, layers=layers)
    with pytest.raises((TypeError, TypeCheckError), match="BiasSurgery"):
        viz.bias_surgery_figure(curve)
    with pytest.raises((TypeError, TypeCheckError), match="by_length"):
        ml.implicit_bias(model, tokens, by_length="yes", progress=False)
    with pytest.raises(ValueError, match="name each head once"):
        ml.implicit_bias(model, tokens, heads=[1, 1], progress=False)
    with pytest.raises(ValueError, match="leave reference out"):
        bias_surgery(model, tokens, mode="zero", reference=tokens, progress=False)
    with pytest.raises(ValueError, match="dims >= 0"):
        where_massive(dims=[-1])
    with pytest.raises(ValueError, match="pass indices >= 0"):
        zero_hook(dims=1, positions=[-1])


def test_attention_variants_check_their_arguments():
    for kwargs, error in (({"init_std": float("nan")}, ValueError), ({"seed": "x"}, (TypeError, TypeCheckError))):
        with pytest.raises(error):
            attach_head_gate(tiny_model("llama"), **kwargs)
    with pytest.raises((TypeError, TypeCheckError)):  # beartype under pytest; our TypeError at run time
        attach_head_gate(None)
    with pytest.raises(ValueError, match="pass 0..1"):
        attach_head_gate(tiny_model("llama")).gates(torch.zeros(1, 2, 32), 99)
    with pytest.raises(ValueError, match="not a token of this model"):
        attach_softmax_one(tiny_model("gpt2"), placeholder_id=999)


def test_shard_and_run_distributed_refuse_before_any_pass():
    for rank, world in ((0.5, 2), ("0", 2), (0, 2.0), (True, 2), (0, None)):
        with pytest.raises((TypeError, TypeCheckError), match="rank|world_size"):  # beartype's under pytest
            distributed.shard(10, rank, world)
    model = _planted()
    with _forward_passes(model) as calls, pytest.raises(TypeError, match="do not merge: call the verb itself"):
        distributed.run_distributed(ml.perplexity, model, _tokens())  # refused before asking for a process group
    assert calls == []


@pytest.mark.parametrize(("config", "kwargs", "match"), [
    (TrainConfig, {"lr": float("nan")}, "lr must be"),
    (TrainConfig, {"beta1": 2.0}, "beta1 must be"),
    (TrainConfig, {"threads": 0}, "threads must be"),
    (TrainConfig, {"snapshot_every": -1}, "snapshot_every must be"),
    (ModelConfig, {"normalization_type": "nope"}, "normalization_type must be"),
    (ModelConfig, {"n_heads": 3}, "multiple of n_heads"),
    (ModelConfig, {"act_fn": "nope"}, "act_fn must be one of .*'gelu'.*: choose one"),
])
def test_training_settings_are_checked_when_made(config, kwargs, match):
    with pytest.raises(ValueError, match=match):
        config(**kwargs)
