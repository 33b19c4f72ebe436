"""profile_values.py: the one-pass profile equals the two-pass one and costs about one scan."""

from __future__ import annotations

import math

import pytest

import massact_lens as ml
from massact_lens._core.hook_names import residual_hook_names
from massact_lens._core.loop import measure
from massact_lens.find._scan_stats import scan_plan
from massact_lens.find.criterion import Criterion
from massact_lens.find.profile_values import CandidateValues


def _same_stats(one, two):
    assert [(s.hook_name, s.dim, s.kind, s.count) for s in one] == [(s.hook_name, s.dim, s.kind, s.count) for s in two]
    for a, b in zip(one, two, strict=True):
        assert math.isclose(a.mean, b.mean, rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(a.std, b.std, rel_tol=1e-9, abs_tol=1e-9)


def _scan_following(model, tokens, batch_size, min_value=50.0, min_ratio=100.0):
    """A scan whose pass also follows the massive entries (as profile runs it): the scan's
    measurement, the follower, and the scan's result."""
    statistics, plan = scan_plan(model, tokens, hooks=residual_hook_names(model), batch_size=batch_size)
    follower = CandidateValues(model, statistics, Criterion(min_value, min_ratio))
    measure(model, plan, statistics, follower, progress=False)
    return statistics, follower, statistics.result()


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_one_pass_profile_equals_two_passes_on_minilm(minilm_model, sentences, batch_size):
    one = ml.profile(minilm_model, sentences, min_value=50, min_ratio=200, batch_size=batch_size, progress=False)
    earlier = ml.scan(minilm_model, sentences, batch_size=batch_size, progress=False)
    two = ml.profile(minilm_model, sentences, min_value=50, min_ratio=200, batch_size=batch_size,
                     scan_result=earlier, progress=False)
    assert one.dims == two.dims and one.massive_dims
    _same_stats(one.stats, two.stats)


def test_one_pass_profile_equals_two_passes_on_smollm2(smollm2_model, sentences):
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
        _, follower, _ = _scan_following(model, tokens, batch_size)
    finally:
        point.remove_hooks("fwd")
    return follower, forwards


def test_the_first_input_alone_finds_the_dims_so_nothing_runs_twice(planted, bos_tokens):
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
        _, follower, _ = _scan_following(planted, bos_tokens, 4)
    finally:
        point.remove_hooks("fwd")
    assert shapes[0] == (1, 2) and follower.dims == [5] and follower.reruns == 0


def test_a_batch_with_a_dim_not_yet_followed_runs_again(planted, bos_tokens):
    tokens = bos_tokens.clone()
    tokens[:4, 0] = 7  # no start token 0 in the first two batches: the probe finds nothing
    follower, forwards = _follow(planted, tokens, 2)
    assert follower.dims == [5]
    # the probe, 4 batches, and batch 3 again
    assert follower.reruns == 1 and forwards == [1, 2, 2, 2, 2, 2]


def test_a_dim_appearing_late_is_followed_from_then_on(planted, bos_tokens):
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
    statistics, follower, result = _scan_following(minilm_model, sentences[:2], 16, 50.0, 200.0)
    stricter = CandidateValues(minilm_model, statistics, Criterion(50.0, 200.0))  # followed nothing
    with pytest.raises(RuntimeError, match="not followed"):
        stricter.value_stats(result, ml.find_massive(result, 50, 200))
    assert follower.value_stats(result, ml.find_massive(result, 50, 200))
