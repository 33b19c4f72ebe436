"""Streaming attention results: statistics over every input from running sums, exact merges.

The summaries of :func:`implicit_bias` are checked against the two-pass computation
on the full tensors (the method before streaming, kept here as the reference); merges
of slices against one run over the whole corpus: bit for bit where both see the same
batches, to float32 rounding where the batches differ (another padding changes the
forward pass in the last bits).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from massact_lens.attention import (
    AttentionConcentration,
    ImplicitBias,
    TokenFeatures,
    attention_concentration,
    implicit_bias,
    token_features,
)
from massact_lens.examples import tiny_model


def _tokens(n: int = 7, width: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 64, (n, width), generator=torch.Generator().manual_seed(n))
    mask = torch.ones_like(tokens)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    return tokens, mask


# --- the reference: the two-pass statistics on the full tensors ---------------------------


def _cosine(a, b):
    denominator = a.norm(dim=-1) * b.norm(dim=-1)
    return (a * b).sum(-1) / denominator.masked_fill(denominator == 0, float("nan"))


def _spread(x):
    if x.shape[0] == 0:
        nan = torch.full(x.shape[1:2], float("nan"), dtype=x.dtype)
        return nan, nan, nan
    mean = x.mean(0)
    norm = mean.norm(dim=-1)
    rel = ((x - mean[None]) ** 2).sum(-1).mean(0).sqrt() / norm
    return _cosine(x, mean[None]).nanmean(0), rel, norm


def _scopes(x, qmask):
    x = x.double()
    out = {"all": (*_spread(x[qmask]), int(qmask.sum()))}
    w = qmask[:, :, None].double()
    counts = qmask.sum(1)
    keep = counts > 0
    means = (x * w[..., None]).sum(1) / counts.clamp_min(1)[:, None, None]
    cos = _cosine(x, means[:, None]).masked_fill(~qmask[:, :, None], float("nan"))
    var = (((x - means[:, None]) ** 2).sum(-1) * w).sum(1) / counts.clamp_min(1)[:, None]
    norm = means.norm(dim=-1)
    out["within_input"] = (cos.nanmean(1)[keep].nanmean(0), (var.sqrt() / norm)[keep].nanmean(0), norm[keep].mean(0), int(keep.sum()))
    out["across_inputs"] = (*_spread(means[keep]), int(keep.sum()))
    return out


def _reference_constancy(result: ImplicitBias, queries: str) -> pd.DataFrame:
    qmask = result.attention_mask.bool()
    if queries == "outside":
        qmask = qmask & ~result.key_mask[:, : qmask.shape[1]]
    rows = []
    for i, layer in enumerate(result.layers):
        for term in ("bias", "rest"):
            z = (result.bias_z if term == "bias" else result.rest_z)[i].double()
            for space in ("head", "resid"):
                if space == "head":
                    x, heads = z, list(result.heads)
                else:
                    resid = torch.einsum("nqhd,hdm->nqhm", z, result.W_O[i].double())
                    x, heads = torch.cat([resid, resid.sum(2, keepdim=True)], 2), [*result.heads, -1]
                for scope, (cos, rel, norm, n) in _scopes(x, qmask).items():
                    rows += [{"layer": layer, "head": h, "term": term, "space": space, "scope": scope,
                              "cos_to_mean": float(cos[j]), "rel_variation": float(rel[j]),
                              "mean_norm": float(norm[j]), "n": n} for j, h in enumerate(heads)]
    return pd.DataFrame(rows)


def _same_table(a: pd.DataFrame, b: pd.DataFrame, rtol: float) -> None:
    assert list(a.columns) == list(b.columns)
    assert a.select_dtypes(exclude="number").equals(b.select_dtypes(exclude="number"))
    np.testing.assert_allclose(a.select_dtypes("number").to_numpy(float), b.select_dtypes("number").to_numpy(float),
                               rtol=rtol, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_summary_equals_the_two_pass_statistics_of_the_full_tensors(kind):
    model = tiny_model(kind, n_layers=2)
    tokens, mask = _tokens()
    result = implicit_bias(model, tokens, [0, 2], attention_mask=mask, keep="all", batch_size=3, progress=False)
    assert result.n_kept == result.n_inputs == 7
    for queries in ("all", "outside"):
        _same_table(result.constancy(queries), _reference_constancy(result, queries), rtol=1e-5)
    table = result.to_dataframe().set_index(["layer", "head"])
    for i, layer in enumerate(result.layers):
        real = result.attention_mask.bool()
        written = result.written(layer, "bias")
        written = torch.cat([written, written.sum(2, keepdim=True)], 2)[real].double()
        np.testing.assert_allclose(table.loc[layer, "bias_norm"].to_numpy(), written.norm(dim=-1).mean(0).numpy(), rtol=1e-5)
        mass = result.c_mass[i][real].double().mean(0)
        np.testing.assert_allclose(table.loc[layer, "c_mass"].to_numpy()[:-1], mass.numpy(), rtol=1e-5)


@pytest.mark.parametrize("block", [1, 200])
def test_summary_over_query_blocks_equals_the_full_tensors(monkeypatch, block):
    """The statistics run a block of queries at a time, each input's spread measured from a
    centre fixed at its first block (one query with ``block=1``): equal to the two-pass
    reference whatever the blocks, with padding, a query set that skips C, and an input
    whose terms in a block are all zero (rest of query 0, which sees only C)."""
    import massact_lens.attention._bias_stats as stats

    monkeypatch.setattr(stats, "_BLOCK_ELEMENTS", block)
    model = tiny_model("llama", n_layers=2)
    tokens, mask = _tokens()
    result = implicit_bias(model, tokens, [0, 2], attention_mask=mask, keep="all", batch_size=3, progress=False)
    for queries in ("all", "outside"):
        _same_table(result.constancy(queries), _reference_constancy(result, queries), rtol=1e-5)
    monkeypatch.undo()
    whole = implicit_bias(model, tokens, [0, 2], attention_mask=mask, batch_size=3, progress=False)
    _same_table(result.constancy(), whole.constancy(), rtol=1e-5)


def test_statistics_alone_keep_no_weights_of_the_size_of_w_o():
    """keep=0 (the default) keeps the statistics: the Gram matrices, not W_O; written() says what to do."""
    model = tiny_model("llama", n_layers=2)
    tokens, _ = _tokens(4)
    result = implicit_bias(model, tokens, "start", progress=False)
    assert result.keep == 0 and result.W_O is None and tuple(result.gram.shape) == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="keep=N"):
        result.written(0)
    kept = implicit_bias(model, tokens, "start", keep=1, progress=False)
    assert kept.W_O is not None and torch.equal(kept.gram, result.gram)
    w = kept.W_O.double() * kept.out_gain.double()[:, None, None, :]
    assert torch.allclose(kept.gram, torch.einsum("lhdm,lhem->lhde", w, w))
    pd.testing.assert_frame_equal(kept.constancy(), result.constancy())


def test_minilm_summary_equals_the_full_tensors(minilm_model, sentences):
    result = implicit_bias(minilm_model, sentences[:6], "start", layers=[1, 3], heads=[0, 5, 7], keep="all",
                           batch_size=4, progress=False)
    for queries in ("all", "outside"):
        _same_table(result.constancy(queries), _reference_constancy(result, queries), rtol=1e-5)


def test_keep_bounds_the_tensors_not_the_statistics():
    model = tiny_model("llama", n_layers=2)
    tokens, mask = _tokens()
    full = implicit_bias(model, tokens, "start", attention_mask=mask, keep="all", batch_size=3, progress=False)
    two = implicit_bias(model, tokens, "start", attention_mask=mask, keep=2, batch_size=3, progress=False)
    none = implicit_bias(model, tokens, "start", attention_mask=mask, keep=0, batch_size=3, progress=False)
    assert (two.n_inputs, two.n_kept, none.n_kept) == (7, 2, 0)
    assert none.bias_z.shape == (2, 0, 0, 4, 8) and none.tokens.shape == (0, 0)
    for name in ("bias_z", "rest_z", "c_mass"):
        assert torch.equal(getattr(two, name), getattr(full, name)[:, :2])
    for name in ("key_mask", "attention_mask", "tokens"):
        assert torch.equal(getattr(two, name), getattr(full, name)[:2])
    for other in (two, none):
        assert other.sums.keys() == full.sums.keys()
        assert all(torch.equal(other.sums[k], full.sums[k]) for k in full.sums)
        pd.testing.assert_frame_equal(other.constancy(), full.constancy())
    assert torch.equal(two.z_error, full.z_error) and torch.equal(two.out_error, full.out_error)
    # The sums do not grow with the corpus.
    more = implicit_bias(model, torch.cat([tokens, tokens, tokens]), "start", keep=2, progress=False)
    assert {k: v.shape for k, v in more.sums.items()} == {k: v.shape for k, v in two.sums.items()}
    more.sums["all.n"].add_(0.0)  # normal tensors, not inference-mode ones
    for bad, error in ((-1, ValueError), ("some", TypeError), (True, TypeError), (1.5, TypeError)):
        with pytest.raises(error, match="keep"):
            implicit_bias(model, tokens, keep=bad, progress=False)


# --- merges -------------------------------------------------------------------------------


def _assert_same_sums(a: dict, b: dict, rtol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if rtol == 0.0:
            assert torch.equal(a[name], b[name]), name
        else:
            scale = float(b[name].abs().max()) if b[name].numel() else 0.0
            torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=rtol * scale + 1e-12, msg=name)


@pytest.mark.parametrize("keep", [3, 5, "all"])
def test_implicit_bias_merge_is_one_run_bit_for_bit(keep):
    model = tiny_model("llama", n_layers=2)
    tokens, mask = _tokens()
    kwargs = dict(attention_mask=None, keep=keep, batch_size=2, by_length=False, progress=False)
    whole = implicit_bias(model, tokens, [0, 2], **{**kwargs, "attention_mask": mask})
    parts = [implicit_bias(model, tokens[s], [0, 2], **{**kwargs, "attention_mask": mask[s]})
             for s in (slice(0, 4), slice(4, 6), slice(6, 7))]  # batch boundaries as in the whole run
    merged = ImplicitBias.merge(parts)
    assert merged.n_inputs == 7 and merged.n_kept == whole.n_kept == (7 if keep == "all" else keep)
    _assert_same_sums(merged.sums, whole.sums)
    for name in ("bias_z", "rest_z", "c_mass", "key_mask", "attention_mask", "tokens", "z_error", "out_error"):
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
    pd.testing.assert_frame_equal(merged.constancy("outside"), whole.constancy("outside"))


def test_minilm_merges_equal_one_run_to_float_rounding(minilm_model, sentences):
    """Other batches pad to other lengths: float32's last bits differ, nothing else."""
    kw = dict(batch_size=5, progress=False)
    whole = implicit_bias(minilm_model, sentences, "start", layers=[0, 2], keep=6, **kw)
    parts = [implicit_bias(minilm_model, sentences[s], "start", layers=[0, 2], keep=6, batch_size=3, progress=False)
             for s in (slice(0, 4), slice(4, 12))]
    merged = ImplicitBias.merge(parts)
    _assert_same_sums(merged.sums, whole.sums, rtol=1e-5)
    width = whole.bias_z.shape[2]
    assert merged.bias_z.shape == whole.bias_z.shape and torch.equal(merged.tokens, whole.tokens)
    torch.testing.assert_close(merged.bias_z[:, :, :width], whole.bias_z, rtol=1e-5, atol=1e-5)
    _same_table(merged.constancy(), whole.constancy(), rtol=1e-4)
    _same_table(merged.to_dataframe(), whole.to_dataframe(), rtol=1e-4)

    conc = attention_concentration(minilm_model, sentences, "start", keep=10, **kw)
    conc_parts = [attention_concentration(minilm_model, sentences[s], "start", keep=10, batch_size=3, progress=False)
                  for s in (slice(0, 7), slice(7, 12))]
    conc_merged = AttentionConcentration.merge(conc_parts)
    assert (conc_merged.n_inputs, conc_merged.n_kept) == (12, 10)
    torch.testing.assert_close(conc_merged.mass, conc.mass, rtol=1e-5, atol=1e-6)
    _assert_same_sums(conc_merged.sums, conc.sums, rtol=1e-5)
    _same_table(conc_merged.sink_scores(), conc.sink_scores(), rtol=1e-4)

    feats = token_features(minilm_model, sentences, "start", layers=[1, 2], **kw)
    feats_merged = TokenFeatures.merge([token_features(minilm_model, sentences[s], "start", layers=[1, 2], batch_size=3,
                                                       progress=False) for s in (slice(0, 5), slice(5, 12))])
    assert feats_merged.n_inputs == 12 and torch.equal(feats_merged.counts, feats.counts)
    _assert_same_sums(feats_merged.sums, feats.sums, rtol=1e-5)
    for name in ("value_norm", "key_norm", "out_norm", "feature_norm", "feature_cos_to_mean", "feature_rel_variation", "feature_mean"):
        torch.testing.assert_close(getattr(feats_merged, name), getattr(feats, name), rtol=1e-4, atol=1e-6, msg=name)


def test_concentration_summaries_cover_every_input():
    model = tiny_model("gpt2", n_layers=2)
    tokens, mask = _tokens()
    run = dict(batch_size=2, by_length=False, progress=False)  # the merge below needs the same batch boundaries
    every = attention_concentration(model, tokens, [0, 5], attention_mask=mask, keep="all", **run)
    few = attention_concentration(model, tokens, [0, 5], attention_mask=mask, keep=3, **run)
    assert (few.n_inputs, few.n_kept, len(few.to_dataframe())) == (7, 3, 3 * 2 * 4)
    torch.testing.assert_close(every.mean_mass, every.mass.mean(0))
    assert every.mean_uniform_mass == pytest.approx(float(every.uniform_mass.double().mean()))
    scores = few.sink_scores().set_index(["layer", "head"]).sort_index()
    mass = every.mass.double()
    np.testing.assert_allclose(scores["mass"].to_numpy(), mass.mean(0).flatten().numpy(), rtol=1e-6)
    np.testing.assert_allclose(scores["mass_std"].to_numpy(), mass.std(0).flatten().numpy(), rtol=1e-5)
    np.testing.assert_allclose(scores["mass_min"].to_numpy(), mass.amin(0).flatten().numpy())
    np.testing.assert_allclose(scores["logit_gap"].to_numpy(), every.logit_gap.double().nanmean(0).flatten().numpy(), rtol=1e-5)
    pd.testing.assert_frame_equal(few.layer_mass(), every.layer_mass())
    parts = [attention_concentration(model, tokens[s], [0, 5], attention_mask=mask[s], keep=3, **run)
             for s in (slice(0, 2), slice(2, 7))]
    merged = AttentionConcentration.merge(parts)
    _assert_same_sums(merged.sums, few.sums)
    for name in ("mass", "uniform_mass", "logit_gap", "n_positions", "lengths"):
        assert torch.equal(getattr(merged, name), getattr(few, name)), name


def test_mismatched_parts_are_refused():
    model = tiny_model("llama", n_layers=2)
    tokens, _ = _tokens(4)
    base = implicit_bias(model, tokens, "start", progress=False)
    others = {
        "layers": implicit_bias(model, tokens, "start", layers=[1], progress=False),
        "heads": implicit_bias(model, tokens, "start", heads=[0, 1], progress=False),
        "positions": implicit_bias(model, tokens, [0, 1], progress=False),
        "keep": implicit_bias(model, tokens, "start", keep=1, progress=False),
        "gram": implicit_bias(tiny_model("llama", n_layers=2, seed=1), tokens, "start", progress=False),  # other W_O
        "different models": implicit_bias(tiny_model("gpt2", n_layers=2), tokens, "start", progress=False),
    }
    for what, other in others.items():
        with pytest.raises(ValueError, match=what):
            ImplicitBias.merge([base, other])
    with pytest.raises(ValueError, match="at least one"):
        ImplicitBias.merge([])
    with pytest.raises(TypeError, match="not an ImplicitBias"):
        ImplicitBias.merge([base, attention_concentration(model, tokens, progress=False)])
    conc = attention_concentration(model, tokens, "start", progress=False)
    with pytest.raises(ValueError, match="positions"):
        AttentionConcentration.merge([conc, attention_concentration(model, tokens, [0, 3], progress=False)])
    with pytest.raises(ValueError, match="layers"):
        AttentionConcentration.merge([conc, attention_concentration(model, tokens, "start", layers=[0], progress=False)])
    feats = token_features(model, tokens, "start", progress=False)
    with pytest.raises(ValueError, match="different models"):
        TokenFeatures.merge([feats, token_features(tiny_model("gpt2", n_layers=2), tokens, "start", progress=False)])
    with pytest.raises(ValueError, match="positions"):
        TokenFeatures.merge([feats, token_features(model, tokens, [1], progress=False)])


def _mixed(sentences: list[str]) -> list[str]:
    long = "A much longer sentence that goes on and on for quite a while, then stops at last."
    return [sentences[0], "Hi.", long, sentences[1], "Yes.", long + " " + sentences[2], sentences[3]]


def test_attention_passes_run_longest_first_with_results_in_input_order(minilm_model, sentences):
    texts = _mixed(sentences)
    widths: list[int] = []
    point = minilm_model.hook_dict["hook_embed"]
    point.add_hook(lambda x, hook: widths.append(int(x.shape[1])))
    try:
        bias = implicit_bias(minilm_model, texts, "start", layers=[1], keep=4, batch_size=3, progress=False)
    finally:
        point.remove_hooks("fwd")
    assert widths == sorted(widths, reverse=True)  # the longest inputs ran first
    given = implicit_bias(minilm_model, texts, "start", layers=[1], keep=4, batch_size=3, by_length=False,
                          progress=False)
    assert bias.n_kept == given.n_kept == 4
    for name in ("key_mask", "attention_mask", "tokens"):  # the first four inputs, in input order
        assert torch.equal(getattr(bias, name), getattr(given, name)), name
    for name in ("bias_z", "rest_z", "c_mass"):
        torch.testing.assert_close(getattr(bias, name), getattr(given, name), rtol=1e-4, atol=1e-5)
    _assert_same_sums(bias.sums, given.sums, rtol=1e-5)

    sinks = attention_concentration(minilm_model, texts, "start", keep=5, batch_size=3, progress=False)
    in_order = attention_concentration(minilm_model, texts, "start", keep=5, batch_size=3, by_length=False,
                                       progress=False)
    assert torch.equal(sinks.lengths, in_order.lengths)
    torch.testing.assert_close(sinks.mass, in_order.mass, rtol=1e-4, atol=1e-5)
    feats = token_features(minilm_model, texts, "start", layers=[1], batch_size=3, progress=False)
    feats_in_order = token_features(minilm_model, texts, "start", layers=[1], batch_size=3, by_length=False,
                                    progress=False)
    torch.testing.assert_close(feats.value_norm, feats_in_order.value_norm, rtol=1e-4, atol=1e-5)


def test_a_callable_key_set_gets_the_inputs_in_order(minilm_model, sentences):
    texts = _mixed(sentences)
    seen: list[list[int]] = []

    def first_token(batch):
        seen.append(batch.input_indices)
        mask = torch.zeros(batch.tokens.shape, dtype=torch.bool)
        mask[:, 0] = True
        return mask

    implicit_bias(minilm_model, texts, first_token, layers=[1], batch_size=3, progress=False)
    assert [i for rows in seen for i in rows] == list(range(len(texts)))


def test_rules_of_your_own_and_strict_positions_keep_the_input_order():
    from massact_lens.interventions.positions import (
        WrappedRule,
        at_positions,
        in_any_order,
        start_token,
    )

    class FromBatchStart(WrappedRule):  # a rule of yours that reads batch.start
        def select(self, activation, dims, ctx):
            return self.rule.select(activation, dims, ctx)

    assert in_any_order(start_token() | at_positions([1], strict=False))
    assert not in_any_order(FromBatchStart(start_token()))
    assert not in_any_order(start_token() | FromBatchStart(start_token()))
    assert not in_any_order(at_positions([7]))  # strict: raises past the padded width, which depends on the batch
    model = tiny_model("llama", n_layers=2)
    tokens = torch.randint(1, model.cfg.d_vocab, (4, 10), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(10)[None] < torch.tensor([10, 3, 10, 3])[:, None]).long()
    # In input order each short input shares a batch 10 wide, so strict position 7 passes, as before this change.
    strict = implicit_bias(model, tokens, at_positions([7]), attention_mask=mask, batch_size=2, progress=False)
    assert strict.n_inputs == 4
    with pytest.raises(ValueError, match="does not exist in this input"):  # longest first: the short two, 3 wide
        implicit_bias(model, tokens, at_positions([7]), attention_mask=mask, batch_size=2, by_length=True,
                      progress=False)
