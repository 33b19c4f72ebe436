"""The attention analyses inside the fused kernel equal the eager patterns (issue 26).

attention_concentration, implicit_bias, token_features and sink_curve take the fused
route (_core/probes.py: extra value columns in one SDPA call, no [query, key] tensor)
wherever the bridge runs HuggingFace's attention; ``MASSACT_LENS_EAGER=1`` runs the
bridge's own eager code and reads ``hook_pattern``. Both must agree to float32
rounding: on tiny random HuggingFace LLaMA (rotary, grouped-query), BERT and Gemma 3
(sliding windows, q/k norms), with padding, at several lengths, with key sets known
before the pass and read from the residual stream; and on the real MiniLM and SmolLM2.
Where the route is not taken (GPT-2's joint QKV, Gemma 2's soft cap, a hook inside
attention, the explicit-bias slot's hooks on keys and values) the function says so in
its result and still gives the eager numbers.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from massact_lens._core.fast_paths import fused_route
from massact_lens.attention import (
    MassiveTokens,
    attention_concentration,
    implicit_bias,
    sink_curve,
    token_features,
)
from massact_lens.examples import minilm, minilm_dir, smollm2
from massact_lens.models.explicit_bias import attach_explicit_bias, detach_prefix
from massact_lens.models.load import load_model

_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
_HF = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_SHAPE, num_key_value_heads=2, max_position_embeddings=128)),
    "bert": ("BertConfig", "BertForMaskedLM", dict(_SHAPE, max_position_embeddings=128)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        _SHAPE, num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        _SHAPE, num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=4)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=3, n_head=4, n_positions=128)),
}


def _hf_model(tmp_path_factory, family: str):
    transformers = pytest.importorskip("transformers")
    config_class, model_class, arguments = _HF[family]
    folder = tmp_path_factory.mktemp(f"fused_{family}")
    torch.manual_seed(0)
    getattr(transformers, model_class)(getattr(transformers, config_class)(vocab_size=30522, **arguments)).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(folder)
    return load_model(folder)


@pytest.fixture(scope="module", params=["llama", "bert", "gemma3"])
def fused_family(request, tmp_path_factory):
    return request.param, _hf_model(tmp_path_factory, request.param)


def _batch(length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three inputs of ``length`` tokens, the last two padded (right) to shorter lengths."""
    tokens = torch.randint(1000, 2000, (3, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, length - 3:] = 0
    mask[2, length // 2:] = 0
    return tokens, mask


def _both(monkeypatch, fn, *args, **kwargs):
    """``fn`` on the eager route, then on the fused route."""
    monkeypatch.setenv("MASSACT_LENS_EAGER", "1")
    eager = fn(*args, progress=False, **kwargs)
    monkeypatch.setenv("MASSACT_LENS_EAGER", "0")
    return eager, fn(*args, progress=False, **kwargs)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    assert a.shape == b.shape
    assert torch.equal(a.isnan(), b.isnan())
    torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), rtol=1e-4, atol=atol)


def _key_sets(length: int) -> list:
    per_input = torch.zeros(3, length, dtype=torch.bool)
    per_input[:, [0, 2]] = True
    per_input[1, length // 2] = True
    return ["start", [1, length - 1], per_input]


@pytest.mark.parametrize("length", [9, 40])
def test_attention_concentration_equals_the_eager_patterns(fused_family, monkeypatch, length):
    family, model = fused_family
    assert fused_route(model, range(3)) is None
    tokens, mask = _batch(length)
    for keys in _key_sets(length):
        eager, fused = _both(monkeypatch, attention_concentration, model, tokens, keys, attention_mask=mask)
        assert "fused kernel" in fused.hook_names[0] and "hook_pattern" in eager.hook_names[0]
        _close(eager.mass, fused.mass, 1e-6)
        _close(eager.logit_gap, fused.logit_gap, 1e-4)
        _close(eager.layer_uniform_mass, fused.layer_uniform_mass, 1e-6)
        assert torch.equal(eager.n_positions, fused.n_positions)
        if family == "gemma3" and length == 40:  # the window changes the baseline of sliding layers
            assert not torch.allclose(fused.layer_uniform_mass[:, 0], fused.layer_uniform_mass[:, 1])


@pytest.mark.parametrize("length", [9, 40])
def test_implicit_bias_equals_the_eager_patterns(fused_family, monkeypatch, length):
    _, model = fused_family
    tokens, mask = _batch(length, seed=1)
    # every third key: at 40 tokens more keys in C than a head has dims (8), so the probe
    # takes its [v * c, c] form; the other sets take one column per key of C
    for keys in [*_key_sets(length)[:2], list(range(0, length, 3))]:
        eager, fused = _both(monkeypatch, implicit_bias, model, tokens, keys, attention_mask=mask, keep="all")
        for name in ("bias_z", "rest_z", "c_mass"):
            _close(getattr(eager, name), getattr(fused, name), 1e-5)
        assert float(fused.z_error.max()) < 1e-5 and float(fused.out_error.max()) < 1e-4
        constancy = [r.constancy().select_dtypes("number").to_numpy() for r in (eager, fused)]
        _close(torch.tensor(constancy[0]), torch.tensor(constancy[1]), 1e-4)


def test_the_split_probe_takes_one_column_per_key_of_c_unless_c_is_wider_than_a_head():
    from massact_lens.attention._fused import SplitProbe

    value = torch.randn(2, 3, 40, 8)  # [batch, kv_heads, key_pos, d_head]
    real = torch.ones(2, 40, dtype=torch.bool)
    for positions, width in (([0], 1), ([0, 5, 9], 3), (list(range(0, 40, 3)), 9)):
        c = torch.zeros(2, 40, dtype=torch.bool)
        c[0, positions] = True
        c[1, 0] = True
        columns = SplitProbe(c, real).values(value, value, value, 1.0)
        assert columns.shape == (2, 3, 40, width)
        if width < 8:  # indicator columns: input 0 has one per key of C, input 1 one and zeros
            assert columns[0, 0].sum(0).tolist() == [1.0] * width
            assert columns[1, 0, 0, 0] == 1 and columns[1, 0].sum() == 1


def test_token_features_and_the_sink_curve_equal_the_eager_patterns(fused_family, monkeypatch):
    family, model = fused_family
    tokens, mask = _batch(24, seed=2)
    eager, fused = _both(monkeypatch, token_features, model, tokens, "start", attention_mask=mask)
    for name in ("value_norm", "out_norm", "feature_norm") + (() if family == "gemma3" else ("key_norm",)):
        _close(getattr(eager, name), getattr(fused, name), 1e-5)
    eager, fused = _both(monkeypatch, sink_curve, model, tokens, [0, 5], attention_mask=mask)
    assert (eager.route, fused.route) == ("hook_pattern", "fused kernel")
    assert fused.count.tolist() == mask.sum(0).tolist()
    _close(eager.mass, fused.mass, 1e-6)
    _close(eager.uniform, fused.uniform, 1e-6)


def test_a_key_set_read_from_the_residual_stream_gets_its_own_pass(monkeypatch):
    """MiniLM's massive dim 99 on [CLS]: C found in a pass of its own before the fused pass."""
    model = minilm()
    texts = ["The cat sat on the mat.", "A much longer sentence, with commas; and more words than the first."]
    keys = MassiveTokens(min_value=5.0, min_ratio=10.0, hooks=("blocks.3.hook_resid_post",))
    eager, fused = _both(monkeypatch, attention_concentration, model, texts, keys)
    assert fused.n_positions.tolist() == eager.n_positions.tolist() and int(fused.n_positions.min()) >= 1
    _close(eager.mass, fused.mass, 1e-6)
    eager, fused = _both(monkeypatch, implicit_bias, model, texts, keys, layers=[4])
    _close(eager.bias_z, fused.bias_z, 1e-5)


def test_smollm2_at_a_longer_context(monkeypatch):
    model = smollm2()
    text = " ".join(["The quick brown fox jumps over the lazy dog, and then it runs home."] * 20)
    tokens = model.to_tokens(text, prepend_bos=False)[:, :256]
    eager, fused = _both(monkeypatch, attention_concentration, model, tokens, "start")
    _close(eager.mass, fused.mass, 1e-5)
    _close(eager.logit_gap, fused.logit_gap, 1e-3)
    eager, fused = _both(monkeypatch, implicit_bias, model, tokens, "start", layers=[3, 20], keep=1)
    _close(eager.bias_z, fused.bias_z, 1e-4)
    _close(eager.c_mass, fused.c_mass, 1e-5)


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_where_the_route_is_not_taken_the_result_says_so_and_holds_the_eager_numbers(tmp_path_factory, family):
    model = _hf_model(tmp_path_factory, family)
    reason = fused_route(model, [0])
    assert reason is not None and ("bridge's own code" in reason if family == "gpt2" else "soft-capped" in reason)
    tokens, mask = _batch(12)
    sinks = attention_concentration(model, tokens, "start", attention_mask=mask, progress=False)
    assert "hook_pattern" in sinks.hook_names[0]
    assert float(sinks.mass.min()) > 0


def test_a_hook_inside_attention_sends_the_pass_to_the_eager_route_and_fires():
    model = smollm2()
    tokens = model.to_tokens("The cat sat on the mat, and then the dog came.", prepend_bos=False)
    fired = []
    inside = [("blocks.2.attn.hook_pattern", lambda x, hook: fired.append(1))]
    with model.hooks(fwd_hooks=inside):
        assert "hook is attached inside layer 2" in fused_route(model, [2])
        with_hook = attention_concentration(model, tokens, "start", layers=[1, 2], progress=False)
    assert fired and "hook_pattern" in with_hook.hook_names[0]
    assert fused_route(model, [2]) is None
    without = attention_concentration(model, tokens, "start", layers=[1, 2], progress=False)
    _close(with_hook.mass, without.mass, 1e-5)


def test_the_explicit_bias_slot_takes_the_eager_route(tmp_path_factory):
    """The slot's keys and values are permanent hooks on hook_k / hook_v: inside attention."""
    model = _hf_model(tmp_path_factory, "llama")
    attach_explicit_bias(model, placeholder_id=1000)
    try:
        assert "hook is attached inside" in fused_route(model, [0])
        tokens, mask = _batch(10)
        tokens[:, 0] = 1000
        split = implicit_bias(model, tokens, [0], attention_mask=mask, keep="all", progress=False)
        assert "hook_pattern" in split.hook_names[0] and float(split.z_error.max()) < 1e-5
        assert float(split.c_mass.mean()) > 0  # the slot is attended to
    finally:
        detach_prefix(model)
    assert fused_route(model, [0]) is None


def test_a_nan_from_a_hook_upstream_is_left_out_on_the_fused_route():
    model = minilm()
    texts = ["The cat sat on the mat.", "Hello world."]

    def poison(x, hook):
        x[1, 1, 0] = float("nan")
        return x

    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", poison)]), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sinks = attention_concentration(model, texts, "start", layers=[2, 3], progress=False)
    assert "fused kernel" in sinks.hook_names[0]
    assert sinks.n_used == 1 and torch.isfinite(torch.tensor(sinks.sink_scores()["mass"].to_numpy())).all()
    assert any("input 1" in str(w.message) for w in caught)


def test_implicit_bias_folds_a_batch_again_without_an_input_that_met_a_nan(monkeypatch):
    """The fused route folds each layer as it runs: a NaN found later rolls the batch back."""
    model = minilm()
    texts = ["The cat sat on the mat.", "Hello world.", "A third, longer sentence for the batch."]

    def poison(x, hook):
        x[1, 1, 0] = float("nan")
        return x

    results = {}
    for eager in ("1", "0"):
        monkeypatch.setenv("MASSACT_LENS_EAGER", eager)
        with model.hooks(fwd_hooks=[("blocks.3.hook_resid_post", poison)]), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results[eager] = implicit_bias(model, texts, "start", layers=[1, 4], progress=False)
        assert any("input 1" in str(w.message) for w in caught)
    eager, fused = results["1"], results["0"]
    assert "fused kernel" in fused.hook_names[0]
    table_e, table_f = (r.constancy().select_dtypes("number").to_numpy() for r in (eager, fused))
    assert torch.isfinite(torch.tensor(table_f)).all()
    _close(torch.tensor(table_e), torch.tensor(table_f), 1e-4)
    clean = implicit_bias(model, [texts[0], texts[2]], "start", layers=[1, 4], progress=False)
    _close(torch.tensor(clean.constancy().select_dtypes("number").to_numpy()), torch.tensor(table_f), 1e-4)


def test_a_pass_asks_for_no_key_value_cache(smollm2_model, monkeypatch):
    """HF fills a KV cache on a forward of SmolLM2 unless told not to (``config.use_cache`` is
    True: 2 x kv_heads x length x d_head per layer, held to the end of the pass, 90 MiB at 2,000
    tokens); the library's passes read each input once and ask for none."""
    import functools

    import massact_lens as ml
    from massact_lens._core.batching import plan_batches
    from massact_lens._core.loop import UserHooks, measure

    hf = smollm2_model.original_model
    assert hf.config.use_cache
    asked = []
    forward = type(hf).forward
    @functools.wraps(forward)  # the same signature: the library reads it
    def spy(self, *a, **k):
        asked.append(k.get("use_cache"))
        return forward(self, *a, **k)

    monkeypatch.setattr(type(hf), "forward", spy)
    tokens = smollm2_model.to_tokens("The cat sat on the mat, and the dog sat on the rug.")
    measure(smollm2_model, plan_batches(smollm2_model, tokens), UserHooks([]), progress=False)
    ml.scan(smollm2_model, tokens, progress=False)
    attention_concentration(smollm2_model, tokens, "start", progress=False)
    implicit_bias(smollm2_model, tokens, "start", progress=False)
    assert asked == [False] * 4
