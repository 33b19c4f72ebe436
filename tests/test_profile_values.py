"""profile_values.py: the one-pass profile equals the two-pass one and costs about one scan."""

from __future__ import annotations

import math

import pytest
import torch

import massact_lens as ml
from massact_lens.profile_values import CandidateValues


def _same_stats(one, two):
    assert [(s.hook_name, s.dim, s.kind, s.count) for s in one] == [(s.hook_name, s.dim, s.kind, s.count) for s in two]
    for a, b in zip(one, two, strict=True):
        assert math.isclose(a.mean, b.mean, rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(a.std, b.std, rel_tol=1e-9, abs_tol=1e-9)


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


def test_only_batches_with_a_new_dim_run_again(planted, bos_tokens):
    """The planted dim appears in the first batch: that batch alone runs twice."""
    forwards = []
    point = planted.hook_dict["hook_embed"]
    point.add_hook(lambda x, hook: forwards.append(1))
    try:
        names = ml.hook_names.residual_hook_names(planted)
        follower = CandidateValues(planted, names, 50.0, 100.0)
        ml.scan(planted, bos_tokens, follower=follower, batch_size=2, progress=False)
    finally:
        point.remove_hooks("fwd")
    assert follower.dims == [5] and follower.reruns == 1
    assert len(forwards) == 4 + 1  # 8 inputs in batches of 2, and the one rerun


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
    names = ml.hook_names.residual_hook_names(minilm_model)
    follower = CandidateValues(minilm_model, names, 50.0, 200.0)
    result = ml.scan(minilm_model, sentences[:2], follower=follower, progress=False)
    stricter = CandidateValues(minilm_model, names, 50.0, 200.0)  # followed nothing
    with pytest.raises(RuntimeError, match="not followed"):
        stricter.value_stats(result, ml.find_massive(result, 50, 200))
    assert follower.value_stats(result, ml.find_massive(result, 50, 200))
    assert torch.is_tensor(result.values)
