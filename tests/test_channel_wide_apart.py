"""Outlier channels kept apart everywhere, not only in find_massive's records (issue 23).

find_massive lists channel-wide entries (a dim that passes the criterion on more than half
of the tokens of a hidden state) apart from the token-sparse massive activations. The same
split holds for the profile (its ``channel_wide`` summaries, saved, merged and shown, never
in its dims) and the one-pass profile's followers (which no longer follow outlier channels).

The model: a tiny random LLaMA / GPT-2 with 1000.0 planted at dim 5 on token 0 (the start
token) and an outlier channel, 300.0 added at dim 7 to every other token's embedding.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import massact_lens as ml
from massact_lens._core.hook_names import residual_hook_names
from massact_lens._core.loop import measure
from massact_lens.examples import tiny_model
from massact_lens.find._scan_stats import scan_plan
from massact_lens.find.criterion import Criterion
from massact_lens.find.profile_values import CandidateValues
from massact_lens.models.planting import plant_massive_activation

PLANTED, CHANNEL = 5, 7
CRITERION = dict(min_value=50, min_ratio=100)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def outlier(request):
    model = plant_massive_activation(tiny_model(request.param, n_layers=4), layer=1, dim=PLANTED, value=1000.0)
    embed = dict(model.original_model.named_parameters())["tok_embed._original_component.weight"]
    with torch.no_grad():
        embed[1:, CHANNEL] += 300.0  # every token but the start token 0
    return model


@pytest.fixture(scope="module")
def tokens():
    out = torch.randint(1, 64, (6, 12), generator=torch.Generator().manual_seed(0))
    out[:, 0] = 0
    return out


def _profile(model, tokens, **options):
    return ml.profile(model, tokens, **CRITERION, top_k=16, progress=False, **options)


def _found(model, tokens, top_k=16):
    return ml.find_massive(ml.scan(model, tokens, top_k=top_k, progress=False), **CRITERION)


def _follow(model, tokens, batch_size):
    """A scan whose pass follows the massive entries, as profile runs it: the follower."""
    statistics, plan = scan_plan(model, tokens, hooks=residual_hook_names(model), top_k=16, batch_size=batch_size)
    follower = CandidateValues(model, statistics, Criterion(**CRITERION))
    measure(model, plan, statistics, follower, progress=False)
    return follower


# ----------------------------------------------------------------------------- the profile


def test_the_profile_lists_outlier_channels_apart(outlier, tokens):
    prof = _profile(outlier, tokens)
    assert prof.massive_dims == (PLANTED,) and prof.channel_wide_dims == (CHANNEL,)
    assert prof.channel_wide == _found(outlier, tokens).channel_wide_summaries()  # before: no such field
    assert {s.dim for s in prof.stats} == {PLANTED} and prof.dim_kinds() == ((PLANTED, "start"),)
    # the key set built from the profile: its token-sparse dims, outlier channels left out
    positions = ml.interventions.as_positions(outlier, prof)
    assert positions.dims == (PLANTED,) and positions.channel_wide is False
    # shown
    assert "outlier channels, listed apart: 7 (layers 0..3)" in repr(prof)
    assert "outlier channels, listed apart: 7 (layers 0..3)" in prof._repr_html_()
    # the two-pass profile agrees
    earlier = ml.scan(outlier, tokens, top_k=16, progress=False)
    assert _profile(outlier, tokens, scan_result=earlier).channel_wide == prof.channel_wide


def test_a_profile_without_outlier_channels_says_nothing_of_them(planted, bos_tokens):
    prof = ml.profile(planted, bos_tokens, **CRITERION, progress=False)
    assert prof.channel_wide == () and prof.channel_wide_dims == ()
    assert "outlier" not in repr(prof)


def test_outlier_channels_are_saved_and_loaded(outlier, tokens, tmp_path):
    prof = _profile(outlier, tokens)
    prof.save(tmp_path / "p.json")
    loaded = ml.MassiveProfile.load(tmp_path / "p.json")
    assert loaded == prof and loaded.channel_wide_dims == (CHANNEL,)
    data = json.loads(prof.to_json())
    assert [d["dim"] for d in data["channel_wide"]] == [CHANNEL]
    del data["channel_wide"]  # a profile saved before the field existed loads with none
    assert ml.MassiveProfile.from_json(json.dumps(data)).channel_wide == ()
    # a damaged entry is refused, naming the field
    for damage, message in (
        (lambda d: d["channel_wide"][0].update(max_ratio="large"), r"channel_wide\[0\]\.'max_ratio' must be"),
        (lambda d: d.update(channel_wide={"dim": 7}), "'channel_wide' must be a list"),
        (lambda d: d["channel_wide"][0].update(hook_names=["blocks.9.hook_resid_post"]),
         r"channel_wide\[0\]\.hook_names \['blocks.9.hook_resid_post'\] are not among hook_names"),
    ):
        bad = json.loads(prof.to_json())
        damage(bad)
        with pytest.raises(ValueError, match=message):
            ml.MassiveProfile.from_json(json.dumps(bad))


def test_outlier_channels_merge_as_the_whole_corpus_gives_them(outlier, tokens):
    parts = [_profile(outlier, t) for t in (tokens[:2], tokens[2:5], tokens[5:])]
    merged, whole = ml.MassiveProfile.merge(parts), _profile(outlier, tokens)
    assert len(merged.channel_wide) == len(whole.channel_wide) == 1
    got, want = merged.channel_wide[0], whole.channel_wide[0]
    for name in ("dim", "first_layer", "last_layer", "hook_names", "kinds", "tokens", "input_fraction", "hook_inputs"):
        assert getattr(got, name) == getattr(want, name), name
    assert math.isclose(got.max_abs_value, want.max_abs_value, rel_tol=1e-5)
    assert math.isclose(got.max_ratio, want.max_ratio, rel_tol=1e-4)
    # a part without the channel (a one-token input can't tell): kept, counted over all inputs
    short = _profile(outlier, torch.tensor([[0]]))
    both = ml.MassiveProfile.merge([parts[0], short])
    assert short.channel_wide == () and both.channel_wide[0].input_fraction == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- the one-pass followers


def test_the_followers_leave_outlier_channels_alone(outlier, tokens):
    follower = _follow(outlier, tokens, 4)
    found = follower.found()
    assert found.channel_wide_dims == (CHANNEL,)  # the scan sees the channel
    # before: dims [5, 7] (dim 7's column copied at every hook) and ~70 (input, position, dim) more kept
    assert follower.dims == [PLANTED] and follower.reruns == 0
    assert sorted(follower._keys) == sorted({(r.input_index, r.position, r.dim) for r in found})
    # the values of the token-sparse entries: those of the two-pass way, which follows only the records
    one = follower.result()
    two = _profile(outlier, tokens, batch_size=4, scan_result=follower.statistics.result()).stats
    assert [(s.hook_name, s.dim, s.kind, s.count) for s in one] == [(s.hook_name, s.dim, s.kind, s.count) for s in two]
    for a, b in zip(one, two, strict=True):
        assert math.isclose(a.mean, b.mean, rel_tol=1e-12)
        assert math.isclose(a.std, b.std, rel_tol=1e-9, abs_tol=1e-9)
    # and those of the hidden states read directly
    _, cache = outlier.run_with_cache(tokens)
    for s in one:
        values = cache[s.hook_name][:, 0, PLANTED].double()
        assert s.count == len(tokens) and math.isclose(s.mean, float(values.mean()), rel_tol=1e-6)


def test_a_probe_that_meets_only_an_outlier_channel_follows_nothing(outlier):
    tokens = torch.randint(1, 64, (4, 10), generator=torch.Generator().manual_seed(1))  # no start token 0
    follower = _follow(outlier, tokens, 2)
    assert follower.found().channel_wide_dims == (CHANNEL,) and len(follower.found()) == 0
    assert follower.dims == [] and follower._keys == [] and follower.result() == ()
