"""Outlier channels kept apart everywhere, not only in find_massive's records (issue 23).

find_massive lists channel-wide entries (a dim that passes the criterion on more than half
of the tokens of a hidden state) apart from the token-sparse massive activations. The same
split holds for: the profile (its ``channel_wide`` summaries, saved, merged and shown, never
in its dims), the one-pass profile's followers (which no longer follow outlier channels),
``hidden_states(...).massive()`` and ``where_massive`` (edits and attention key sets).

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
from massact_lens.interventions import where_massive, zero_hook
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


# ----------------------------------------------------------------------------- hidden_states().massive()


def _pairs(records, input_index=0):
    return {(r.position, r.dim) for r in records if r.input_index == input_index}


def _flat(massive):
    return {(p, d) for p, dims in massive.items() for d in dims}


def test_hidden_states_massive_is_token_sparse_as_find_massive(outlier, tokens):
    found = _found(outlier, tokens, top_k=64)
    assert {d for _, d in _pairs(found.channel_wide)} == {CHANNEL}
    states = ml.viz.hidden_states(outlier, tokens[0])
    assert states.massive(**CRITERION) == {0: (PLANTED,)}  # before: every position, with dim 7
    assert _flat(states.massive(**CRITERION)) == _pairs(found)
    every = states.massive(**CRITERION, channel_wide=True)
    assert _flat(every) == _pairs(found) | _pairs(found.channel_wide)
    # the hooks: the planted dim from block 1 on (block 0 holds only the channel)
    assert states.massive_hooks(**CRITERION) == states.hook_names[1:]
    assert states.massive_hooks(**CRITERION, channel_wide=True) == states.hook_names
    with pytest.raises(TypeError, match="channel_wide"):  # beartype's, or our own check outside the tests
        states.massive(**CRITERION, channel_wide="yes")


# ----------------------------------------------------------------------------- where_massive


def _keep(into):
    def keep(x, hook):  # noqa: ARG001
        into.append(x.detach().clone())

    return keep


def test_where_massive_edits_only_the_token_sparse_entries(outlier, tokens):
    hook = "blocks.2.hook_resid_post"
    _, clean = outlier.run_with_cache(tokens, names_filter=[hook])
    for channel_wide, zeroed in ((False, {PLANTED}), (True, {PLANTED, CHANNEL})):
        edit = zero_hook(positions=where_massive(**CRITERION, channel_wide=channel_wide))
        read = []
        hooks = [*ml.interventions.edit_hooks(outlier, edit, hooks=[hook]), (hook, _keep(read))]
        with outlier.hooks(fwd_hooks=hooks):
            outlier(tokens)
        changed = (read[0] != clean[hook]).nonzero().tolist()
        assert {d for _, _, d in changed} == zeroed  # before: dim 7 zeroed by default too
        assert {(p, d) for _, p, d in changed if d == PLANTED} == {(0, PLANTED)}
        if channel_wide:  # the channel on every token but the start token
            assert {p for _, p, d in changed if d == CHANNEL} == set(range(1, tokens.shape[1]))


def test_where_massive_as_a_key_set_is_the_start_token(outlier, tokens):
    sinks = ml.attention_concentration(outlier, tokens, where_massive(**CRITERION), progress=False)
    assert sinks.n_positions.tolist() == [1] * len(tokens)  # before: 12, every token
    rule = where_massive(**CRITERION, channel_wide=True)
    every = ml.attention_concentration(outlier, tokens, rule, progress=False)
    assert every.n_positions.tolist() == [tokens.shape[1]] * len(tokens)
    assert where_massive(**CRITERION) != rule
    with pytest.raises(TypeError, match="channel_wide"):
        where_massive(channel_wide=1)
