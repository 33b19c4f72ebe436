"""fast_paths.py: the passes' shortcuts give the same numbers and every hook still fires.

* lean attention (HF module, SDPA) agrees with the bridge's own eager reimplementation
  to float32 rounding, on a tiny HF Llama (GQA) and on the real SmolLM2, and is really
  taken (the HF attention module is called, which the bridge's own forward never does);
* lean norms are bit-identical;
* a hook anywhere inside a component (pattern, q, scale) sends it back to its own
  forward, and the hook fires;
* no module global of TransformerLens or accelerate is reassigned;
* the attention kernel is switched through HuggingFace's public API, once per run;
* scan with its statistics on the worker thread equals the scan without, to the bit.

Every lean component against the bridge's own forward, family by family, and the
version guard: tests/test_lean_components.py.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from massact_lens import scan
from massact_lens._core.batching import plan_batches
from massact_lens._core.fast_paths import (
    attention_for_run,
    attention_implementation,
    lean_components,
)
from massact_lens._core.hook_names import residual_hook_names
from massact_lens._core.loop import UserHooks, measure
from massact_lens.models.load import load_model


def _attention_modules(model):
    return [block.attn for block in model.blocks]


def _readings(model, tokens, mask, names):
    """Every hidden state at ``names`` through measure, and how many times the HF
    attention modules themselves were called."""
    seen: dict[str, torch.Tensor] = {}
    calls = []
    handles = [
        attn.original_component.register_forward_hook(lambda *_: calls.append(1)) for attn in _attention_modules(model)
    ]

    def keep(name):
        def hook(x, hook=None):  # noqa: ARG001
            seen[name] = x.detach().clone()

        return hook

    try:
        plan = plan_batches(model, tokens, batch_size=len(tokens), attention_mask=mask)
        measure(model, plan, UserHooks([(n, keep(n)) for n in names]), progress=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen, len(calls)


def _padded(vocab: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, vocab, (3, 11), generator=generator)
    mask = torch.ones_like(tokens)
    mask[1, 7:] = 0
    return tokens, mask


@pytest.mark.parametrize("name", ["hf_llama", "smollm2_model"])
def test_lean_attention_agrees_with_the_bridges_own_and_is_taken(name, request, monkeypatch):
    model = request.getfixturevalue(name)
    tokens, mask = _padded(min(int(model.cfg.d_vocab), 30000))
    names = residual_hook_names(model)
    lean, lean_calls = _readings(model, tokens, mask, names)
    monkeypatch.setenv("MASSACT_LENS_EAGER", "1")
    own, own_calls = _readings(model, tokens, mask, names)
    assert lean_calls == len(model.blocks) and own_calls == 0
    real = mask.bool()
    for n in names:
        scale = own[n][real].abs().max()
        torch.testing.assert_close(lean[n][real], own[n][real], rtol=1e-4, atol=2e-5 * float(scale))


def test_lean_norm_is_bit_identical(minilm_model, smollm2_model):
    generator = torch.Generator().manual_seed(0)
    for model in (minilm_model, smollm2_model):
        x = torch.randn(2, 5, int(model.cfg.d_model), generator=generator) * 50
        norm = model.blocks[1].ln1
        with torch.inference_mode():
            own = norm(x)
            with lean_components(model) as n:
                assert n > 0 and "forward" in norm.__dict__
                lean = norm(x)
        assert torch.equal(lean, own)
        assert "forward" not in norm.__dict__


@pytest.mark.parametrize(
    "inside", ["blocks.0.attn.hook_pattern", "blocks.0.attn.q.hook_out", "blocks.0.ln1.hook_scale"]
)
def test_a_hook_inside_a_component_fires(hf_llama, inside):
    tokens, mask = _padded(1000)
    fired = []

    def record(x, hook=None):  # noqa: ARG001
        fired.append(tuple(x.shape))

    plan = plan_batches(hf_llama, tokens, batch_size=3, attention_mask=mask)
    measure(hf_llama, plan, UserHooks([(inside, record)]), progress=False)
    assert len(fired) == 1 and fired[0][0] == 3


def test_user_hooks_inside_fire_too(hf_llama):
    """A hook the user attached beforehand (not through the pass) is seen at call time."""
    tokens, mask = _padded(1000)
    fired = []
    point = hf_llama.hook_dict["blocks.1.attn.hook_rot_k"]
    point.add_hook(lambda x, hook: fired.append(1))
    try:
        scan(hf_llama, tokens, attention_mask=mask, progress=False)
    finally:
        point.remove_hooks("fwd")
    assert fired == [1]


def test_restored_on_error_and_reentrant(hf_llama):
    """Lean methods live on the component instances only: no module global of
    TransformerLens or accelerate is reassigned, inside or after."""
    from accelerate.utils import align_module_device
    from transformer_lens.model_bridge.generalized_components import base

    attn = hf_llama.blocks[0].attn
    with pytest.raises(KeyError), lean_components(hf_llama):
        with lean_components(hf_llama):
            pass
        assert "forward" in attn.__dict__  # the outer one still holds
        assert base.align_module_device is align_module_device
        raise KeyError("boom")
    assert not any("forward" in m.__dict__ for m in hf_llama.modules())
    assert base.align_module_device is align_module_device


def test_the_kernel_is_switched_once_per_run_and_restored(minilm_model, monkeypatch):
    """attention_for_run switches HuggingFace's kernel through its public
    set_attn_implementation only when the choice changes, and restores it on error."""
    hf = minilm_model.original_model
    switches = []
    monkeypatch.setattr(hf, "set_attn_implementation", lambda impl, _set=hf.set_attn_implementation: (switches.append(impl), _set(impl)))
    names = ["blocks.0.hook_resid_post"]
    with pytest.raises(KeyError), attention_for_run(minilm_model) as choose:
        for _ in range(3):
            choose(names)
            assert hf.config._attn_implementation == "sdpa"
        choose([*names, "blocks.0.attn.hook_pattern"])  # a pass reading a pattern: back to eager
        assert hf.config._attn_implementation == "eager"
        choose(names)
        raise KeyError("boom")
    assert switches == ["sdpa", "eager", "sdpa", "eager"]
    assert hf.config._attn_implementation == "eager"
    monkeypatch.setenv("MASSACT_LENS_EAGER", "1")
    with attention_for_run(minilm_model) as choose:
        choose(names)
        assert hf.config._attn_implementation == "eager"
    with attention_implementation(minilm_model, "sdpa"):
        assert hf.config._attn_implementation == "sdpa"  # asked for by name: switched all the same
    assert switches[4:] == ["sdpa", "eager"]


def test_a_model_that_refuses_a_kernel_keeps_its_own(tmp_path):
    """Gemma 2 cannot soft-cap its scores under SDPA: HuggingFace refuses the switch,
    the model keeps eager attention, and the refusal is not asked for again."""
    import transformers

    from massact_lens._core import fast_paths

    config = transformers.Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=32,
    )
    hf = transformers.Gemma2ForCausalLM(config)
    hf.config._attn_implementation = "eager"
    assert fast_paths._set_kernel(hf, "sdpa") == "eager"
    assert "sdpa" in fast_paths._refused[hf]
    assert fast_paths._set_kernel(hf, "sdpa") == "eager"


@pytest.mark.parametrize("name", ["minilm_model", "hf_llama"])
def test_blocks_filter_keyword_arguments_as_the_bridge_does(name, request):
    """The block's keyword filter with its signature read once keeps exactly what the
    bridge's own keeps, for every positional count, reads the signature from its cache,
    and is removed on exit."""
    from transformer_lens.model_bridge.generalized_components.block import BlockBridge

    from massact_lens._core import fast_paths

    model = request.getfixturevalue(name)
    block = model.blocks[0]
    parameters = list(inspect.signature(block.original_component.forward).parameters)
    offered = {p: object() for p in [*parameters, "encoder_attention_mask", "not_a_parameter"]}
    with lean_components(model):
        assert "_filter_kwargs_for_forward" in block.__dict__
        for n_positional in range(len(parameters) + 1):
            lean = block._filter_kwargs_for_forward(dict(offered), n_positional)
            own = BlockBridge._filter_kwargs_for_forward(block, dict(offered), n_positional)
            assert lean == own
        assert fast_paths._signatures[type(block.original_component).forward][0] == tuple(parameters)
    assert not any("_filter_kwargs_for_forward" in m.__dict__ for m in model.modules())


def test_the_block_keyword_filter_drops_what_a_layer_without_kwargs_does_not_take():
    """Both real models' layers take **kwargs (everything passes): a layer that does not
    has its keywords filtered, as the bridge's own filter does, from the cached signature."""
    from types import SimpleNamespace

    from transformer_lens.model_bridge.generalized_components.block import BlockBridge

    from massact_lens._core import fast_paths

    class Layer(torch.nn.Module):
        def forward(self, hidden_states, attention_mask=None, position_ids=None):  # noqa: ARG002
            return hidden_states

    layer = Layer()
    block = SimpleNamespace(original_component=layer, _modules={"_original_component": layer})
    offered = {"hidden_states": 1, "attention_mask": 2, "encoder_attention_mask": 3, "position_ids": 4}
    for n_positional in range(4):
        lean = fast_paths._filter_block_kwargs(block, dict(offered), n_positional)
        assert lean == BlockBridge._filter_kwargs_for_forward(block, dict(offered), n_positional)
    assert lean == {}  # all three given positionally
    assert fast_paths._filter_block_kwargs(block, dict(offered), 1) == {"attention_mask": 2, "position_ids": 4}
    assert fast_paths._signatures[Layer.forward] == (("hidden_states", "attention_mask", "position_ids"), False)


def test_eager_setting_and_processed_weights_leave_the_model_alone(monkeypatch, hf_llama, hf_llama_dir):
    processed = load_model(hf_llama_dir)
    processed.enable_compatibility_mode(disable_warnings=True)
    with lean_components(processed) as n:
        assert n == 0
    monkeypatch.setenv("MASSACT_LENS_EAGER", "1")
    with lean_components(hf_llama) as n:
        assert n == 0


# --- statistics beside the forward pass ----------------------------------------------
