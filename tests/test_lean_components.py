"""Every lean component against the bridge's own forward, on every architecture the library claims.

Models: the bundled MiniLM (BERT), SmolLM2 (LLaMA, slow) and the three Bigram-Backcopy
decoders; the tiny native GPT-2 and LLaMA of ``examples.tiny_model``; and tiny random
HuggingFace models bridged by TransformerLens: GPT-2, LLaMA, BERT, Gemma 2 and Gemma 3
(sandwich norms, soft-capping, sliding windows, q/k norms).

* each component given a lean forward, called on the inputs it received in a real
  forward pass, returns what the bridge's own forward returns: norms to the bit,
  attention (HuggingFace module, the kernel a pass picks) to float32 rounding;
* a whole pass under the lean paths and the pass's kernel gives the residual stream
  and logits of the bridge's own code with eager attention;
* blocks filter keyword arguments as the bridge does;
* on a TransformerLens release not verified (or a bridge class that does not import),
  the lean paths switch off with one warning and the bridge's own forward runs.
"""

from __future__ import annotations

import ast
import contextlib
import warnings
from pathlib import Path

import pytest
import torch

from massact_lens._core import fast_paths
from massact_lens._core.fast_paths import attention_for_run, lean_components
from massact_lens.examples import bigram_backcopy, minilm_dir, tiny_model
from massact_lens.models.load import load_model

#: Tiny random HuggingFace models: (config class, model class, config arguments).
_HF_FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)),
    "bert": ("BertConfig", "BertForMaskedLM", dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4,
        attn_logit_softcapping=0.5)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"])),
}
#: Families whose attention is the bridge's step-by-step reimplementation (lean attention).
_LEAN_ATTENTION = {"hf-llama", "hf-gemma2", "hf-gemma3", "smollm2"}
_MODELS = [
    "minilm", pytest.param("smollm2", marks=pytest.mark.slow), "backcopy-default", "backcopy-sink_token",
    "backcopy-explicit_bias", "tiny-gpt2", "tiny-llama", *(f"hf-{f}" for f in _HF_FAMILIES),
]


def _hf_model(tmp_path_factory, family):
    import transformers

    config_class, model_class, arguments = _HF_FAMILIES[family]
    folder = tmp_path_factory.mktemp(f"tiny_{family}")
    config = getattr(transformers, config_class)(vocab_size=30522, **arguments)
    torch.manual_seed(0)
    hf = getattr(transformers, model_class)(config)
    with torch.no_grad():  # weights large enough that soft-capping and the norms' scales matter
        for name, parameter in hf.named_parameters():
            if parameter.dim() == 2 and "embed" not in name:
                parameter.mul_(8.0)
    hf.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(folder)
    return load_model(folder)


@pytest.fixture(scope="module", params=_MODELS)
def family(request, tmp_path_factory):
    """(name, model) for every architecture."""
    name = request.param
    if name == "minilm":
        return name, request.getfixturevalue("minilm_model")
    if name == "smollm2":
        return name, request.getfixturevalue("smollm2_model")
    if name.startswith("backcopy-"):
        return name, bigram_backcopy(name.removeprefix("backcopy-"))
    if name.startswith("tiny-"):
        return name, tiny_model(name.removeprefix("tiny-"))
    return name, _hf_model(tmp_path_factory, name.removeprefix("hf-"))


def _tokens(model, seed=0):
    """Three inputs of 11 tokens, the second right-padded after 7; a Bigram-Backcopy
    decoder's start tokens first (its sink / slot variants check them)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, min(int(model.cfg.d_vocab), 30000), (3, 11), generator=generator)
    if str(model.cfg.model_name).startswith("bigram"):
        start = model.to_tokens("")[0]
        tokens[:, : len(start)] = start
    mask = torch.ones_like(tokens)
    mask[1, 7:] = 0
    return tokens, mask


def _lean_modules(model):
    """The components that get a lean forward."""
    with lean_components(model):
        return [m for m in model.modules() if "forward" in vars(m)]


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _close(lean, own, real):
    lean, own = lean[real], own[real]
    scale = float(own.abs().max())
    torch.testing.assert_close(lean, own, rtol=1e-4, atol=2e-5 * max(scale, 1.0))


def test_each_lean_component_equals_the_bridges_own_forward(family):
    name, model = family
    modules = _lean_modules(model)
    kinds = {type(m).__name__ for m in modules}
    assert ("PositionEmbeddingsAttentionBridge" in kinds) == (name in _LEAN_ATTENTION), kinds
    calls: list[tuple[torch.nn.Module, tuple, dict]] = []
    handles = [
        m.register_forward_pre_hook(lambda m, a, k: calls.append((m, a, dict(k))), with_kwargs=True) for m in modules
    ]
    tokens, mask = _tokens(model)
    try:
        with torch.inference_mode():
            model(tokens, attention_mask=mask, return_type=None)
    finally:
        for handle in handles:
            handle.remove()
    assert {id(m) for m, _, _ in calls} == {id(m) for m in modules}
    real = mask.bool()
    hf_attention = [m.original_component for m in modules if "Attention" in type(m).__name__]
    with torch.inference_mode():
        own = [_first(m(*a, **dict(k))) for m, a, k in calls]
        taken: list[int] = []  # the bridge's own attention never calls its HuggingFace module
        handles = [hf.register_forward_hook(lambda *_: taken.append(1)) for hf in hf_attention]
        try:
            with lean_components(model), attention_for_run(model) as choose:
                choose(["blocks.0.hook_resid_post"])  # the kernel a pass that reads no pattern runs
                lean = [_first(m(*a, **dict(k))) for m, a, k in calls]
        finally:
            for handle in handles:
                handle.remove()
    assert len(taken) == len(hf_attention)
    for (module, _, _), x, y in zip(calls, lean, own, strict=True):
        if "Attention" in type(module).__name__:
            _close(x, y, real)
        else:
            assert torch.equal(x, y), type(module).__name__


def _pass(model, tokens, mask, *, lean):
    """Every block's output and the logits: through the lean paths and the kernel a pass
    picks, or through the bridge's own components with eager attention."""
    names = [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(x, hook):  # noqa: ARG001
            seen[name] = x.clone()

        return hook

    with torch.inference_mode(), contextlib.ExitStack() as stack:
        if lean:
            stack.enter_context(lean_components(model))
            stack.enter_context(attention_for_run(model))(names)
        with model.hooks(fwd_hooks=[(n, keep(n)) for n in names]):
            logits = model(tokens, attention_mask=mask)
    return [seen[n] for n in names] + [logits]


def test_a_pass_on_the_lean_paths_equals_the_bridges_own(family):
    name, model = family
    tokens, mask = _tokens(model, seed=1)
    lean = _pass(model, tokens, mask, lean=True)
    own = _pass(model, tokens, mask, lean=False)
    real = mask.bool()
    for x, y in zip(lean, own, strict=True):
        _close(x, y, real)
    if name in ("hf-gemma2",):  # HuggingFace refuses SDPA for Gemma 2 (it cannot soft-cap)
        assert model.original_model.config._attn_implementation == "eager"


def test_blocks_filter_keyword_arguments_as_the_bridge_does(family):
    from transformer_lens.model_bridge.generalized_components import BlockBridge

    _, model = family
    block = model.blocks[0]
    import inspect

    parameters = list(inspect.signature(block.original_component.forward).parameters)
    offered = {p: object() for p in [*parameters, "encoder_attention_mask", "not_a_parameter"]}
    with lean_components(model):
        assert "_filter_kwargs_for_forward" in vars(block)
        for n_positional in range(len(parameters) + 1):
            lean = block._filter_kwargs_for_forward(dict(offered), n_positional)
            assert lean == BlockBridge._filter_kwargs_for_forward(block, dict(offered), n_positional)


# --- the guard ---------------------------------------------------------------------------------


@pytest.fixture
def counted(monkeypatch):
    """How many times each lean function ran."""
    counts = {"attention": 0, "norm": 0, "filter": 0}

    def counting(key, function):
        def run(*args, **kwargs):
            counts[key] += 1
            return function(*args, **kwargs)

        return run

    monkeypatch.setattr(fast_paths, "_lean_attention", counting("attention", fast_paths._lean_attention))
    monkeypatch.setattr(fast_paths, "_lean_norm", counting("norm", fast_paths._lean_norm))
    monkeypatch.setattr(fast_paths, "_filter_block_kwargs", counting("filter", fast_paths._filter_block_kwargs))
    monkeypatch.setattr(fast_paths, "_warned", False)
    return counts


def _off_twice(model):
    """Two lean passes while switched off: the warnings, and the outputs."""
    tokens, mask = _tokens(model, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = []
        for _ in range(2):
            with torch.inference_mode(), lean_components(model) as n:
                assert n == 0 and not any("forward" in vars(m) for m in model.modules())
                outputs.append(model(tokens, attention_mask=mask))
    with torch.inference_mode():
        own = model(tokens, attention_mask=mask)
    return [w for w in caught if "TransformerBridge's own components" in str(w.message)], outputs, own


def test_an_unverified_transformer_lens_runs_the_bridges_own_forward(hf_llama, monkeypatch, counted):
    monkeypatch.setattr(fast_paths, "VERIFIED_TRANSFORMER_LENS", ("0.0.0",))
    caught, outputs, own = _off_twice(hf_llama)
    assert len(caught) == 1 and "not among the releases" in str(caught[0].message)
    assert all(torch.equal(x, own) for x in outputs)
    assert counted == {"attention": 0, "norm": 0, "filter": 0}
    monkeypatch.undo()  # verified again: the lean paths run
    with torch.inference_mode(), lean_components(hf_llama) as n:
        hf_llama(_tokens(hf_llama)[0])
    assert n > 0


def test_a_bridge_class_that_does_not_import_switches_off(hf_llama, monkeypatch, counted):
    import sys

    monkeypatch.setitem(sys.modules, "transformer_lens.model_bridge.generalized_components", None)
    caught, outputs, own = _off_twice(hf_llama)
    assert len(caught) == 1 and "could not be imported" in str(caught[0].message)
    assert all(torch.equal(x, own) for x in outputs)
    assert counted == {"attention": 0, "norm": 0, "filter": 0}


def test_the_lean_paths_import_nothing_private_when_the_library_is_imported():
    """At import time fast_paths reads only TransformerLens' public hook points and model
    protocol: the bridge classes are imported behind the guard, so a release that moves
    them cannot break ``import massact_lens``."""
    tree = ast.parse(Path(fast_paths.__file__).read_text(encoding="utf-8"))
    top = {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    top |= {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    assert {m for m in top if m.startswith("transformer_lens")} == {
        "transformer_lens.hook_points", "transformer_lens.model_protocol"}
