"""Token-sparse massive activations vs channel-wide outlier channels (issue 23).

A dim can pass the criterion because it is large on a few tokens (the paper's massive
activations) or on most tokens of a hidden state (an outlier channel, LLM.int8's kind:
Gemma-3-270m's dim 400). The scan keeps, per top-k entry, the median |x| of its column;
find_massive keeps the token-sparse records and lists the channel-wide ones apart.
"""

from __future__ import annotations

import pytest
import torch

import massact_lens as ml
from massact_lens._core.statistics import grouped_stats, hidden_state_stats
from massact_lens.examples import tiny_model
from massact_lens.find.criterion import Criterion
from massact_lens.models.planting import plant_massive_activation

CHANNEL, PLANTED, OFFSET = 7, 5, 300.0


def _with_outlier_channel(kind: str):
    """A tiny model with 1000.0 planted at dim 5 on token 0 (BOS) from block 1 on, and an outlier
    channel: every other token's embedding carries 300.0 at dim 7 (so dim 7 is large on every
    token but the first, at every hook)."""
    model = plant_massive_activation(tiny_model(kind, n_layers=4), layer=1, dim=PLANTED, value=1000.0)
    embed = dict(model.original_model.named_parameters())["tok_embed._original_component.weight"]
    with torch.no_grad():
        embed[1:, CHANNEL] += OFFSET
    return model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def outlier(request):
    return _with_outlier_channel(request.param)


def _tokens(n: int = 6, length: int = 12, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(1, 64, (n, length), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = 0
    return tokens


# ----------------------------------------------------------------------------- the statistic


@pytest.mark.parametrize("left_padded", [False, True])
def test_column_medians_are_the_median_of_each_entrys_dim_over_real_tokens(left_padded):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 9, 16, generator=gen)
    x[:, :, 4] += 50.0  # a dim large everywhere
    x[:, 0, 11] = -900.0  # and one large on the first token only
    lengths = torch.tensor([9, 4, 1, 6, 2])
    real = torch.arange(9)[None] < lengths[:, None]
    if left_padded:
        real = real.flip(1)
    stats = hidden_state_stats(x, real, top_k=6)
    for i in range(5):
        for r in range(6):
            dim = int(stats.dims[i, r])
            if dim < 0:
                assert torch.isnan(stats.column_medians[i, r])
                continue
            want = x[i, real[i], dim].abs().median()  # torch.median: the lower median
            assert float(stats.column_medians[i, r]) == float(want), (i, r)
    grouped = grouped_stats(torch.stack([x, -x]), real, 6)
    assert torch.equal(grouped.column_medians[0].nan_to_num(-1.0), stats.column_medians.nan_to_num(-1.0))
    assert torch.equal(grouped.column_medians[1].nan_to_num(-1.0), stats.column_medians.nan_to_num(-1.0))


def test_the_rule_is_more_than_half_of_the_tokens():
    """The column's lower median passes exactly when more than half of the tokens pass."""
    criterion = Criterion(10, 10)
    for n in range(1, 9):
        for passing in range(n + 1):
            column = torch.cat([torch.full((passing,), 500.0), torch.full((n - passing,), 0.1)])
            median = column.median()  # lower median
            wide = criterion.channel_wide(median[None, None], torch.tensor([1.0]), torch.tensor([n]))
            assert bool(wide) == (passing > n / 2 and n >= 2), (n, passing)


# ----------------------------------------------------------------------------- planted


def test_an_outlier_channel_is_listed_apart_and_the_massive_activation_found(outlier):
    tokens = _tokens()
    result = ml.scan(outlier, tokens, top_k=16, progress=False)
    found = ml.find_massive(result, 50, 100)
    assert found.massive_dims == (PLANTED,)  # before: (5, 7)
    assert {r.position for r in found} == {0} and not any(r.channel_wide for r in found)
    assert found.channel_wide_dims == (CHANNEL,)
    assert all(r.channel_wide and r.position > 0 for r in found.channel_wide)
    # a direct count: where a record is channel-wide, its dim passes on more than half of the tokens
    criterion = Criterion(50, 100)
    _, cache = outlier.run_with_cache(tokens)
    for r in found.channel_wide:
        state = cache[r.hook_name][r.input_index][None]
        passes = criterion.entries(state, torch.ones(1, state.shape[1], dtype=torch.bool))[0, :, r.dim]
        assert int(passes.sum()) > state.shape[1] / 2
    for r in found:
        state = cache[r.hook_name][r.input_index][None]
        passes = criterion.entries(state, torch.ones(1, state.shape[1], dtype=torch.bool))[0, :, r.dim]
        assert int(passes.sum()) <= state.shape[1] / 2
    table = found.to_dataframe(include_channel_wide=True)
    assert table["channel_wide"].tolist() == [False] * len(found) + [True] * len(found.channel_wide)
    assert not found.to_dataframe()["channel_wide"].any()
    assert [d.dim for d in found.channel_wide_summaries()] == [CHANNEL]


def test_profile_and_key_sets_use_the_token_sparse_records(outlier):
    tokens = _tokens()
    prof = ml.profile(outlier, tokens, min_value=50, min_ratio=100, top_k=16, progress=False)
    assert prof.massive_dims == (PLANTED,)  # before: (5, 7)
    found = ml.find_massive(ml.scan(outlier, tokens, top_k=16, progress=False), 50, 100)
    sinks = ml.attention_concentration(outlier, tokens, found, progress=False)
    assert sinks.n_positions.tolist() == [1] * len(tokens)  # C = the BOS, not every token of the channel
    by_profile = ml.attention_concentration(outlier, tokens, prof, progress=False)
    assert by_profile.n_positions.tolist() == [1] * len(tokens)


def test_a_one_token_input_is_never_channel_wide(outlier):
    found = ml.find_massive(ml.scan(outlier, torch.tensor([[3]]), progress=False), 50, 100)
    assert found.channel_wide == () and found.massive_dims == (CHANNEL,)


def test_column_medians_merge_like_the_other_fields(outlier):
    tokens = _tokens(5)
    parts = [ml.scan(outlier, t, top_k=16, progress=False) for t in (tokens[:2], tokens[2:])]
    merged, whole = ml.ScanResult.merge(parts), ml.scan(outlier, tokens, top_k=16, progress=False)
    assert merged.column_medians is not None and merged.column_medians.shape == whole.values.shape
    torch.testing.assert_close(merged.column_medians, whole.column_medians, rtol=1e-5, atol=1e-4)
    assert ml.find_massive(merged, 50, 100).channel_wide_dims == (CHANNEL,)
    empty = ml.ScanResult.empty(whole.provenance, whole.hook_names, whole.top_k, whole.prepend_bos)
    assert ml.ScanResult.merge([empty, whole]).column_medians.shape == whole.column_medians.shape


# ----------------------------------------------------------------------------- real models: nothing changes


def test_minilm_has_no_outlier_channel(minilm_model, sentences):
    result = ml.scan(minilm_model, sentences, progress=False)
    found = ml.find_massive(result, 50, 200)
    assert found.channel_wide == () and found.massive_dims == (99,)
    passing = int(Criterion(50, 200).among_top(result.values, result.medians).sum())
    assert len(found) == passing  # every record of before is still a record


@pytest.mark.parametrize("variant", ["default", "sink_token", "explicit_bias"])
def test_bigram_decoders_have_no_outlier_channel(variant):
    from massact_lens.examples import bigram_backcopy

    model = bigram_backcopy(variant)
    tokens = torch.randint(3, int(model.cfg.d_vocab), (8, 32), generator=torch.Generator().manual_seed(0))
    start = model.to_tokens("")[0]
    tokens[:, : len(start)] = start
    result = ml.scan(model, tokens, progress=False)
    found = ml.find_massive(result, 5, 10)
    assert found.channel_wide == ()
    assert len(found) == int(Criterion(5, 10).among_top(result.values, result.medians).sum())


@pytest.mark.slow
def test_smollm2_has_no_outlier_channel(smollm2_model, sentences):
    result = ml.scan(smollm2_model, sentences[:8], progress=False)
    found = ml.find_massive(result)
    assert found.channel_wide == () and 507 in found.massive_dims
    assert len(found) == int(Criterion().among_top(result.values, result.medians).sum())
