"""profile_values.py: the one-pass profile equals the two-pass one and costs about one scan."""

from __future__ import annotations

import math

import pytest

import massact_lens as ml
from massact_lens.find.profile_values import CandidateValues


def _same_stats(one, two):
    assert [(s.hook_name, s.dim, s.kind, s.count) for s in one] == [(s.hook_name, s.dim, s.kind, s.count) for s in two]
    for a, b in zip(one, two, strict=True):
        assert math.isclose(a.mean, b.mean, rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(a.std, b.std, rel_tol=1e-9, abs_tol=1e-9)


@pytest.fixture(params=["0", "1"], ids=["inside", "beside"])
def stats_thread(request, monkeypatch):
    """Statistics inside the hooks, or on the worker thread (whose batch results arrive
    one batch later: the follower then learns new dims one batch later too)."""
    monkeypatch.setenv("MASSACT_LENS_STATS_THREAD", request.param)
    return request.param == "1"


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_one_pass_profile_equals_two_passes_on_minilm(minilm_model, sentences, batch_size, stats_thread):
    one = ml.profile(minilm_model, sentences, min_value=50, min_ratio=200, batch_size=batch_size, progress=False)
    earlier = ml.scan(minilm_model, sentences, batch_size=batch_size, progress=False)
    two = ml.profile(minilm_model, sentences, min_value=50, min_ratio=200, batch_size=batch_size,
                     scan_result=earlier, progress=False)
    assert one.dims == two.dims and one.massive_dims
    _same_stats(one.stats, two.stats)


def test_one_pass_profile_equals_two_passes_on_smollm2(smollm2_model, sentences, stats_thread):
    one = ml.profile(smollm2_model, sentences[:6], batch_size=2, progress=False)
    earlier = ml.scan(smollm2_model, sentences[:6], batch_size=2, progress=False)
    two = ml.profile(smollm2_model, sentences[:6], batch_size=2, scan_result=earlier, progress=False)
    assert 507 in one.massive_dims and one.dims == two.dims
    _same_stats(one.stats, two.stats)


def _follow(model, tokens, batch_size):
    """Scan with a CandidateValues, counting forward passes (embedding hook firings)."""
    forwards = []
    point = model.hook_dict["hook_embed"]
    point.add_hook(lambda x, hook: forwards.append(int(x.shape[0])))
    try:
        follower = CandidateValues(model, ml.hook_names.residual_hook_names(model), 50.0, 100.0)
        ml.scan(model, tokens, follower=follower, batch_size=batch_size, progress=False)
    finally:
        point.remove_hooks("fwd")
    return follower, forwards


def test_the_first_input_alone_finds_the_dims_so_nothing_runs_twice(planted, bos_tokens, stats_thread):
    follower, forwards = _follow(planted, bos_tokens, 2)
    assert follower.dims == [5] and follower.reruns == 0
    assert forwards == [1, 2, 2, 2, 2]  # the one-input probe, then 8 inputs in batches of 2


def test_the_probe_reads_only_the_start_of_the_first_input(planted, bos_tokens, monkeypatch):
    from massact_lens.find import profile_values

    monkeypatch.setattr(profile_values, "PROBE_TOKENS", 2)
    shapes = []
    point = planted.hook_dict["hook_embed"]
    point.add_hook(lambda x, hook: shapes.append(tuple(x.shape[:2])))
    try:
        follower = CandidateValues(planted, ml.hook_names.residual_hook_names(planted), 50.0, 100.0)
        ml.scan(planted, bos_tokens, follower=follower, batch_size=4, progress=False)
    finally:
        point.remove_hooks("fwd")
    assert shapes[0] == (1, 2) and follower.dims == [5] and follower.reruns == 0


def test_a_batch_with_a_dim_not_yet_followed_runs_again(planted, bos_tokens, stats_thread):
    tokens = bos_tokens.clone()
    tokens[:4, 0] = 7  # no start token 0 in the first two batches: the probe finds nothing
    follower, forwards = _follow(planted, tokens, 2)
    assert follower.dims == [5]
    if stats_thread:  # batch 3 learns dim 5 after batch 4 ran: both run again
        assert follower.reruns == 2 and forwards == [1, 2, 2, 2, 2, 2, 2]
    else:  # the probe, 4 batches, and batch 3 again
        assert follower.reruns == 1 and forwards == [1, 2, 2, 2, 2, 2]


def test_a_dim_appearing_late_is_followed_from_then_on(planted, bos_tokens, stats_thread):
    """Inputs without the planted token first: no massive entry, nothing copied or rerun
    until the batch that has one."""
    tokens = bos_tokens.clone()
    tokens[:4, 0] = 7  # the first two batches have no start token 0
    one = ml.profile(planted, tokens, min_value=50, min_ratio=100, batch_size=2, progress=False)
    two = ml.profile(planted, tokens, min_value=50, min_ratio=100, batch_size=2,
                     scan_result=ml.scan(planted, tokens, batch_size=2, progress=False), progress=False)
    assert one.massive_dims == (5,)
    _same_stats(one.stats, two.stats)
    assert {s.count for s in one.stats} == {4}


def test_an_entry_not_followed_is_an_error_not_a_gap(minilm_model, sentences):
    names = ml.hook_names.residual_hook_names(minilm_model)
    follower = CandidateValues(minilm_model, names, 50.0, 200.0)
    result = ml.scan(minilm_model, sentences[:2], follower=follower, progress=False)
    stricter = CandidateValues(minilm_model, names, 50.0, 200.0)  # followed nothing
    with pytest.raises(RuntimeError, match="not followed"):
        stricter.value_stats(result, ml.find_massive(result, 50, 200))
    assert follower.value_stats(result, ml.find_massive(result, 50, 200))
