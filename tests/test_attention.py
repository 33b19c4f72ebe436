"""attention.py: sink mass, logits, the implicit-bias decomposition, key/value features.

Exactness is checked against the model's own hook_z and attention output, read with
run_with_cache, on each attention kind: multi-head + learned positions (tiny gpt2),
rotary + grouped-query (tiny native llama, and a tiny HF LlamaForCausalLM booted
through boot_transformers, whose hook_attn_scores are real pre-softmax scores), and
a bidirectional post-LN encoder (the real MiniLM).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from massact_lens import find_massive, profile, scan
from massact_lens.attention import (
    MassiveTokens,
    attention_concentration,
    attention_logits,
    implicit_bias,
    token_features,
)
from massact_lens.examples import tiny_model
from massact_lens.interventions import at_positions, delimiter_positions, start_token, where_massive


@pytest.fixture(scope="module")
def models(minilm_model, hf_llama):
    return {
        "gpt2": tiny_model("gpt2", n_layers=2),
        "llama": tiny_model("llama", n_layers=2),
        "hf_llama": hf_llama,
        "minilm": minilm_model,
    }


def _inputs(kind: str, sentences: list[str]):
    """Token ids with right padding (and its mask) for every model kind."""
    if kind in ("minilm", "hf_llama"):
        return sentences[:4], None
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (4, 9), generator=generator)
    mask = torch.ones_like(tokens)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    return tokens, mask


def _cache(model, inputs, mask, names):
    """Run the model the plain way (run_with_cache) on the same padded batch."""
    if isinstance(inputs, list):
        rows = [model.to_tokens(t, truncate=False)[0] for t in inputs]
        width = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
            mask[i, : len(r)] = 1
    else:
        tokens = inputs
    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: n in names)
    return cache, mask.bool()


@pytest.mark.parametrize("kind", ["gpt2", "llama", "hf_llama", "minilm"])
def test_decomposition_is_exact(models, sentences, kind, no_leftover_hooks):
    model = models[kind]
    no_leftover_hooks(model)
    inputs, mask = _inputs(kind, sentences)
    result = implicit_bias(model, inputs, [0, 2], attention_mask=mask, batch_size=3, keep="all", progress=False)
    no_leftover_hooks(model)
    n_heads = model.cfg.n_heads
    names = set()
    for layer in result.layers:
        names |= {f"blocks.{layer}.attn.{h}" for h in ("hook_pattern", "hook_v", "hook_z", "o.hook_out")}
        names.add(f"blocks.{layer}.hook_attn_out")
    cache, real = _cache(model, inputs, mask, names)
    for i, layer in enumerate(result.layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        v = cache[f"blocks.{layer}.attn.hook_v"]
        z = cache[f"blocks.{layer}.attn.hook_z"]
        if kind in ("llama", "hf_llama"):
            assert v.shape[2] == n_heads // 2  # grouped-query: fewer value heads than heads
        v = v.repeat_interleave(n_heads // v.shape[2], dim=2)
        in_c = torch.zeros(pattern.shape[-1], dtype=torch.bool)
        in_c[[0, 2]] = True
        expected_bias = torch.einsum("bhqk,bkhd->bqhd", pattern * in_c, v)
        width = pattern.shape[2]
        bias, rest = result.bias_z[i, :, :width], result.rest_z[i, :, :width]
        scale = float(z[real].abs().max())
        torch.testing.assert_close(bias[real], expected_bias[real], atol=1e-5 * scale, rtol=1e-5)
        torch.testing.assert_close((bias + rest)[real], z[real], atol=1e-5 * scale, rtol=1e-5)
        # Through W_O per head; summed over heads plus b_O: the attention output.
        written = result.written(layer, "bias") + result.written(layer, "rest")
        out = written[:, :width].sum(2) + result.b_O[i]
        target = cache[f"blocks.{layer}.attn.o.hook_out"]
        out_scale = float(target[real].abs().max())
        torch.testing.assert_close(out[real], target[real], atol=1e-5 * out_scale, rtol=1e-5)
        if kind != "minilm":  # pre-norm: hook_attn_out is the attention output too
            torch.testing.assert_close(out[real], cache[f"blocks.{layer}.hook_attn_out"][real], atol=1e-5 * out_scale, rtol=1e-5)
        assert float(result.z_error[i]) <= 1e-5 * scale
        assert float(result.out_error[i]) <= 1e-5 * out_scale
        assert not bias[~real].any()  # padding queries hold zeros
    if kind == "minilm":  # post-LN: hook_attn_out is LayerNorm(resid + attn), not the attention output
        layer = result.layers[1]
        assert not torch.allclose(cache[f"blocks.{layer}.hook_attn_out"], cache[f"blocks.{layer}.attn.o.hook_out"], atol=1e-2)
        assert result.out_hooks[1] == f"blocks.{layer}.attn.o.hook_out"


def test_chosen_heads_are_slices_of_all_heads(models):
    model = models["llama"]
    tokens, mask = _inputs("llama", [])
    full = implicit_bias(model, tokens, "start", attention_mask=mask, keep="all", progress=False)
    part = implicit_bias(model, tokens, "start", attention_mask=mask, layers=[1], heads=[3, 1], keep="all", progress=False)
    assert part.heads == (1, 3) and part.layers == (1,)
    torch.testing.assert_close(part.bias_z[0], full.bias_z[1][:, :, [1, 3]])
    torch.testing.assert_close(part.written(1, "rest"), full.written(1, "rest")[:, :, [1, 3]])


def test_minilm_cls_sink_matches_hook_pattern(minilm_model, sentences, no_leftover_hooks):
    no_leftover_hooks(minilm_model)
    result = attention_concentration(minilm_model, sentences, "start", batch_size=5, progress=False)
    no_leftover_hooks(minilm_model)
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in range(6)}
    cache, real = _cache(minilm_model, sentences, None, names)
    lengths = real.sum(1)
    for layer in range(6):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [input, head, query, key]
        direct = (pattern[..., 0] * real[:, None]).sum(-1) / lengths[:, None]
        torch.testing.assert_close(result.mass[:, layer], direct, atol=1e-5, rtol=1e-5)
    per_layer = result.layer_mass().set_index("layer")["mass"]
    assert all(0.5 <= per_layer[layer] <= 0.75 for layer in (1, 2, 3, 4)), per_layer
    assert per_layer[0] < 0.45  # the sink forms after the massive activation (layer 0)
    torch.testing.assert_close(result.uniform_mass, 1.0 / lengths.float())  # bidirectional
    assert result.n_positions.tolist() == [1] * len(sentences)
    scores = result.sink_scores()
    assert scores["mass"].is_monotonic_decreasing and (scores["lift"] > 3).head(10).all()
    assert (scores["logit_gap"].head(10) > 0).all()
    assert len(result.to_dataframe()) == len(sentences) * 6 * 12


def test_minilm_bias_term_is_the_constant_one(minilm_model, sentences):
    result = implicit_bias(minilm_model, sentences[:8], "start", keep="all", progress=False)
    summary = result.to_dataframe().set_index(["layer", "head"])
    for layer in (1, 2, 3, 4):
        row = summary.loc[(layer, -1)]
        assert row.bias_cos > 0.9 > row.rest_cos, row
        assert row.bias_rel_variation < 0.8 < row.rest_rel_variation, row
    table = result.constancy()
    assert set(table.scope) == {"all", "within_input", "across_inputs"}
    assert set(table.space) == {"head", "resid"} and set(table.term) == {"bias", "rest"}
    assert table[["cos_to_mean", "rel_variation"]].notna().all().all()
    # The cosine of one head's bias term within an input: a single C key, so colinear.
    within = table[(table.scope == "within_input") & (table.term == "bias") & (table["head"] >= 0)]
    assert within.cos_to_mean.min() > 0.999


def test_massive_rules_find_cls(minilm_model, sentences):
    texts = sentences[:4]
    start = attention_concentration(minilm_model, texts, "start", progress=False)
    rule = MassiveTokens(min_value=50, min_ratio=200)
    massive = attention_concentration(minilm_model, texts, rule, progress=False)
    assert massive.positions == rule.describe()
    assert massive.n_positions.tolist() == [1, 1, 1, 1]
    torch.testing.assert_close(massive.mass, start.mass)
    found = find_massive(scan(minilm_model, texts, progress=False), min_value=50, min_ratio=200)
    from_records = attention_concentration(minilm_model, texts, found, progress=False)
    torch.testing.assert_close(from_records.mass, start.mass)
    prof = profile(minilm_model, texts, min_value=50, min_ratio=200, progress=False)
    from_profile = attention_concentration(minilm_model, texts, prof, layers=[2], progress=False)
    torch.testing.assert_close(from_profile.mass[:, 0], start.mass[:, 2])
    with pytest.raises(ValueError, match="scan of 4 inputs"):
        attention_concentration(minilm_model, sentences[:3], found, progress=False)


def test_position_rules_agree(models, minilm_model):
    model = models["gpt2"]
    tokens, mask = _inputs("gpt2", [])
    by_index = attention_concentration(model, tokens, [0, 5], attention_mask=mask, progress=False)
    bool_mask = torch.zeros_like(tokens, dtype=torch.bool)
    bool_mask[:, [0, 5]] = True
    by_mask = attention_concentration(model, tokens, bool_mask, attention_mask=mask, progress=False)
    by_callable = attention_concentration(
        model, tokens, lambda batch: torch.isin(torch.arange(batch.tokens.shape[1]), torch.tensor([0, 5]))[None].expand(batch.tokens.shape[0], -1),
        attention_mask=mask, batch_size=3, progress=False,
    )
    streamed = attention_concentration(model, iter([(tokens[:2], mask[:2]), (tokens[2:], mask[2:])]), [0, 5], progress=False)
    by_rule = attention_concentration(model, tokens, start_token() | at_positions(5), attention_mask=mask, progress=False)
    for other in (by_mask, by_callable, streamed, by_rule):
        torch.testing.assert_close(other.mass, by_index.mass)
    assert by_index.n_positions.tolist() == [2, 2, 2, 1]  # input 3 has 4 real tokens: no key 5
    # Causal uniform baseline: query q sees q + 1 keys.
    length = 9
    expected = sum((1 + int(q >= 5)) / (q + 1) for q in range(length)) / length
    assert float(by_index.uniform_mass[0]) == pytest.approx(expected)
    text = ["The cat sat. Then it left. Done"]
    delimiters = token_features(minilm_model, text, "delimiters", progress=False)
    first = token_features(minilm_model, text, "first_delimiter", progress=False)
    # [CLS] the cat sat . then it left . done [SEP]: 11 tokens, 2 delimiters
    assert (delimiters.counts.tolist(), first.counts.tolist()) == ([2, 9], [1, 10])
    same = token_features(minilm_model, text, delimiter_positions(minilm_model), progress=False)
    assert same.counts.tolist() == delimiters.counts.tolist()
    # where_massive is one rule: as a key set it reads the residual stream, as MassiveTokens does.
    by_where = token_features(minilm_model, text, where_massive(50, 200), progress=False)
    by_tokens = token_features(minilm_model, text, MassiveTokens(50, 200), progress=False)
    assert by_where.counts.tolist() == by_tokens.counts.tolist() == [1, 10]  # [CLS]
    either = token_features(minilm_model, text, start_token() | where_massive(50, 200), progress=False)
    assert either.counts.tolist() == [1, 10]
    assert token_features(minilm_model, text, ~where_massive(50, 200), progress=False).counts.tolist() == [10, 1]


def test_attention_logits_sources(models):
    expected = {"gpt2": "q.k", "llama": "log(hook_pattern) centred", "hf_llama": "hook_attn_scores", "minilm": "q.k"}
    for kind, source in expected.items():
        model = models[kind]
        text = "The cat sat on the mat." if kind in ("minilm", "hf_llama") else torch.arange(3, 11)
        heat = attention_logits(model, text)
        assert heat.source == (source,) * model.cfg.n_layers, kind
        probs = heat.logits.nan_to_num(nan=float("-inf")).softmax(-1)
        torch.testing.assert_close(probs, heat.pattern, atol=1e-5, rtol=1e-4)
        if model.cfg.attention_dir == "causal":
            assert torch.isnan(heat.logits[..., 0, 1:]).all()
    table = heat.to_dataframe()
    assert {"query_token", "key_token", "logit", "prob"} <= set(table.columns)
    assert table.query_token.iloc[0] == "[CLS]"


@pytest.mark.parametrize("eager", ["1", "0"])
def test_logit_gap_does_not_depend_on_the_logit_source(models, monkeypatch, eager):
    """HF Llama gives real scores on the eager route, q.k sums in the fused kernel, the rest
    log(pattern): the centred gap is the same."""
    model = models["hf_llama"]
    texts = ["The cat sat on the mat.", "Hello there."]
    monkeypatch.setenv("MASSACT_LENS_EAGER", eager)
    result = attention_concentration(model, texts, [0, 1], progress=False)
    assert set(result.logit_source) == {"hook_attn_scores" if eager == "1" else "q.k (fused kernel)"}
    monkeypatch.setenv("MASSACT_LENS_EAGER", "0")
    cache, real = _cache(model, texts, None, {"blocks.1.attn.hook_pattern"})
    pattern = cache["blocks.1.attn.hook_pattern"]
    n = pattern.shape[-1]
    visible = real[:, None, :, None] & real[:, None, None, :] & torch.ones(n, n, dtype=torch.bool).tril()
    logp = pattern.clamp_min(1e-38).log().masked_fill(~visible, 0.0)
    centred = (logp - logp.sum(-1, keepdim=True) / visible.sum(-1, keepdim=True).clamp_min(1)).masked_fill(~visible, 0.0)
    in_c = torch.zeros(n, dtype=torch.bool)
    in_c[[0, 1]] = True
    gap = (centred * in_c).sum((-1, -2)) / (visible * in_c).sum((-1, -2)) - (centred * ~in_c).sum((-1, -2)) / (visible & ~in_c).sum((-1, -2))
    torch.testing.assert_close(result.logit_gap[:, 1], gap, atol=1e-4, rtol=1e-4)


def test_token_features_match_hooks(minilm_model, models, sentences):
    texts = sentences[:3]
    feats = token_features(minilm_model, texts, "start", layers=[2], progress=False)
    assert feats.feature_hooks == ("blocks.2.hook_resid_pre",)  # post-LN: the block input
    cache, real = _cache(minilm_model, texts, None, {"blocks.2.attn.hook_v", "blocks.2.hook_resid_pre"})
    v_norm = cache["blocks.2.attn.hook_v"].norm(dim=-1)  # [input, pos, head]
    other = real.clone()
    other[:, 0] = False
    torch.testing.assert_close(feats.value_norm[0, 0], v_norm[:, 0].mean(0))
    torch.testing.assert_close(feats.value_norm[0, 1], v_norm[other].mean(0))
    assert bool((feats.out_norm[0, 0] < feats.out_norm[0, 1]).all())  # [CLS] writes little when attended
    x = cache["blocks.2.hook_resid_pre"]
    torch.testing.assert_close(feats.feature_mean[0, 0], x[:, 0].mean(0))
    assert feats.top_feature_dims(2, 1)[0][0] == 99  # the massive dim, after LayerNorm
    assert feats.counts.tolist() == [3, int(other.sum())]
    assert feats.feature_cos_to_mean[0, 0] > 0.99 > feats.feature_cos_to_mean[0, 1]
    pre_norm = token_features(models["llama"], torch.arange(2, 10)[None], "start", progress=False)
    assert pre_norm.feature_hooks == ("blocks.0.ln1.hook_out", "blocks.1.ln1.hook_out")
    assert len(pre_norm.to_dataframe()) == 2 * 4 and len(pre_norm.features_dataframe()) == 2


def _count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls, handle


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers": [7]}, ValueError, r"Layers \[7\] do not exist"),
        ({"layers": []}, ValueError, "layers is empty"),
        ({"heads": [4]}, ValueError, r"Heads \[4\] do not exist"),
        ({"heads": []}, ValueError, "heads is empty"),
        ({"positions": []}, ValueError, "positions is empty"),
        ({"positions": torch.zeros(9, dtype=torch.bool)}, ValueError, "all False"),
        ({"positions": torch.ones(3, 9, dtype=torch.bool)}, ValueError, "3 rows for 4 inputs"),
        ({"positions": [-1]}, ValueError, "negative"),
        ({"positions": [40]}, ValueError, r"\[40\] do not exist"),
        ({"positions": "eos"}, ValueError, "Unknown position rule"),
        ({"positions": "delimiters"}, ValueError, "tokenizer"),
        ({"positions": MassiveTokens(min_ratio=0)}, ValueError, "positive finite"),
        ({"positions": MassiveTokens(dims=[99])}, ValueError, "dims"),
        ({"positions": 1.5}, TypeError, None),
    ],
)
def test_bad_input_fails_before_any_forward_pass(models, kwargs, error, match):
    model = models["gpt2"]
    tokens, mask = _inputs("gpt2", [])
    calls, handle = _count_forwards(model)
    try:
        for function in (implicit_bias, attention_concentration, token_features):
            if "heads" in kwargs and function is not implicit_bias:
                continue
            with pytest.raises(error, match=match):
                function(model, tokens, attention_mask=mask, progress=False, **kwargs)
    finally:
        handle.remove()
    assert calls == []


def test_empty_profile_and_records_fail_early(models):
    model = models["gpt2"]
    tokens = torch.randint(0, 64, (2, 6))
    empty_profile = profile(model, tokens, progress=False)
    assert empty_profile.massive_dims == ()
    empty_found = find_massive(scan(model, tokens, progress=False))
    calls, handle = _count_forwards(model)
    try:
        with pytest.raises(ValueError, match="no massive dims"):
            implicit_bias(model, tokens, empty_profile, progress=False)
        with pytest.raises(ValueError, match="find_massive found nothing"):
            attention_concentration(model, tokens, empty_found, progress=False)
    finally:
        handle.remove()
    assert calls == []


def test_runtime_failures_leave_no_hooks_and_empty_c_warns(models, no_leftover_hooks):
    model = models["llama"]
    tokens, mask = _inputs("llama", [])
    no_leftover_hooks(model)
    with pytest.raises(ValueError, match="must return a bool tensor"):
        implicit_bias(model, tokens, lambda batch: torch.ones(2, dtype=torch.bool), attention_mask=mask, progress=False)
    no_leftover_hooks(model)
    with pytest.warns(UserWarning, match="selected no key position"):
        result = attention_concentration(model, tokens, MassiveTokens(), attention_mask=mask, progress=False)
    no_leftover_hooks(model)
    assert float(result.mass.abs().max()) == 0.0 and torch.isnan(result.logit_gap).all()


def test_results_are_frozen_and_record_how(models):
    model = models["gpt2"]
    tokens, mask = _inputs("gpt2", [])
    result = implicit_bias(model, tokens, [0], layers=[1], attention_mask=mask, keep="all", progress=False)
    assert result.provenance.model_name == "tiny-gpt2" and result.positions == "indices[0]"
    assert result.provenance.model_name == "tiny-gpt2"  # the old spelling, read-only
    assert result.hook_names == ("blocks.1.attn.hook_pattern", "blocks.1.attn.hook_v", "blocks.1.attn.hook_z")
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.layers = (0,)  # type: ignore[misc]
    with pytest.raises(ValueError, match="was not decomposed"):
        result.written(0)
    result.bias_z.add_(0.0)  # a normal tensor, not an inference-mode one
    assert list(result.to_dataframe().columns)[:5] == ["layer", "head", "c_mass", "bias_norm", "rest_norm"]


def test_key_sets_are_position_rules(models):
    from massact_lens._core.batching import plan_batches
    from massact_lens.attention import as_rule, key_mask
    from massact_lens.interventions import PositionRule

    model = models["gpt2"]
    tokens, mask = _inputs("gpt2", [])
    plan = plan_batches(model, tokens, attention_mask=mask, batch_size=4)
    batch = plan.batches[0]
    for positions in ("start", [0, 5], torch.ones(9, dtype=torch.bool), lambda b: b.attention_mask.bool(), MassiveTokens()):
        assert isinstance(as_rule(model, positions, plan), PositionRule)
    assert key_mask(as_rule(model, [0, 5], plan), batch).sum(1).tolist() == [2, 2, 2, 1]
    rows = torch.zeros(4, 9, dtype=torch.bool)
    rows[2, 3] = True
    assert key_mask(as_rule(model, rows, plan), batch).nonzero().tolist() == [[2, 3]]


@pytest.mark.parametrize("measure", ["implicit_bias", "attention_concentration"])
def test_attention_passes_stop_after_the_last_block_they_read(minilm_model, sentences, measure):
    """No MLM head (MiniLM's 30,522-word unembedding): the pass stops after the block
    it reads last, and the numbers are those of the whole pass (checked above against
    hook_pattern)."""
    fired = []
    point = minilm_model.hook_dict["unembed.hook_in"]
    point.add_hook(lambda x, hook: fired.append(1))
    try:
        fn = implicit_bias if measure == "implicit_bias" else attention_concentration
        fn(minilm_model, sentences[:3], "start", layers=[1], progress=False)
        assert fired == []
        minilm_model(sentences[:1])
        assert fired == [1]  # the hook itself works
    finally:
        point.remove_hooks("fwd")
