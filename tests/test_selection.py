"""The host's exact selection (``_core/selection.py``) gives numpy's and torch's own answers.

The bracketed k-th smallest and the blocked top-k read only part of each row; these
tests hold them to a full partition / the canonical ranking on rows built to break
them: heavy ties, NaN, infinities, padding, sorted rows, and a sample that lies.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from massact_lens._core import statistics
from massact_lens._core.selection import kth_bracketed, kth_smallest, topk_in_blocks


def _rows(kind: str, rng: np.random.Generator, n_rows: int, n: int) -> np.ndarray:
    if kind == "uniform":
        return rng.random((n_rows, n), dtype=np.float32)
    if kind == "ties":
        return rng.integers(0, 4, (n_rows, n)).astype(np.float32)
    if kind == "nan":
        x = np.abs(rng.standard_normal((n_rows, n))).astype(np.float32)
        x[:, rng.integers(0, n, n // 7)] = np.nan
        x[0] = np.nan  # a row of NaN only
        return x
    if kind == "padding":  # what statistics._equalise_ranks leaves: -1 and +inf after the real part
        x = rng.random((n_rows, n), dtype=np.float32)
        x[:, : n // 3] = -1.0
        x[:, -n // 4:] = np.inf
        return x
    if kind == "sorted":
        return np.sort(rng.standard_cauchy((n_rows, n)), axis=1)  # float64, heavy tails
    if kind == "lying_sample":  # every 17th entry (the sample) is 0, every other 1: the bracket misses
        x = np.ones((n_rows, n), dtype=np.float32)
        x[:, ::17] = 0.0
        return x
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["uniform", "ties", "nan", "padding", "sorted", "lying_sample"])
def test_the_bracketed_kth_smallest_is_numpys(kind):
    rng = np.random.default_rng(len(kind))
    for n in (2048, 5003, 20000):
        x = _rows(kind, rng, 9, n)
        for k in (1, 2, n // 17 + 2, n // 2, (n + 1) // 2, n - 1, n):
            want = np.partition(x, k - 1, axis=1)[:, k - 1]
            got = kth_bracketed(x.copy(), k)
            assert np.array_equal(got, want, equal_nan=True), (kind, n, k)


def test_kth_smallest_takes_the_bracket_on_long_rows_only(monkeypatch):
    from massact_lens._core import selection

    calls = []

    def counted(rows, k):
        calls.append(rows.shape)
        return kth_bracketed(rows, k)

    monkeypatch.setattr(selection, "kth_bracketed", counted)
    x = torch.rand(4, 3000)
    for rows in (x, x[:, :100]):
        k = rows.shape[1] // 2
        want = rows.kthvalue(k, dim=1).values
        assert torch.equal(kth_smallest(rows.clone(), k), want)
    assert calls == [(4, 3000)]  # the long rows only


def test_long_hidden_states_keep_the_exact_lower_median_with_padding():
    """Through the statistics: 40 positions x 96 dims (3,840 entries per state, the
    bracket's path), uneven right padding, heavy ties."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-6, 7, (5, 40, 96), generator=gen).float()
    lengths = [40, 23, 1, 37, 12]
    real = torch.arange(40)[None] < torch.tensor(lengths)[:, None]
    stats = statistics.hidden_state_stats(x, real, top_k=3)
    for row, n in enumerate(lengths):
        assert float(stats.medians[row]) == float(x[row, :n].abs().flatten().median())


@pytest.mark.parametrize("kind", ["uniform", "ties", "nan", "inf", "padding"])
def test_the_blocked_topk_ranks_as_the_canonical_order(kind):
    """``_canonical_topk`` through the blocks equals the device ranking (unique keys:
    larger first, ties to the lower index, NaN as +inf), on rows of 5,000 entries."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 4, 5000, generator=gen)
    if kind == "ties":
        x = torch.randint(0, 30, x.shape, generator=gen).float()  # ties at the top of every row
    elif kind == "nan":
        x[0, 1, 4321] = float("nan")
    elif kind == "inf":
        x[2, 3, 17] = float("inf")
        x[2, 3, 4990] = float("inf")  # in the tail after the last whole block
    elif kind == "padding":
        x[:, :, 100:] = -1.0
    want = statistics._canonical_topk_on_device(x, 10)
    assert torch.equal(statistics._canonical_topk(x.clone(), 10), want)
    if kind in ("uniform", "padding"):  # no tie: the blocks alone give topk's answer
        top, where = topk_in_blocks(x, 11)
        assert torch.equal(top, x.topk(11, dim=2).values)
        assert torch.equal(where[..., :10], want)


def test_the_blocked_topk_finds_entries_in_the_tail():
    x = torch.zeros(1, 1, 64 * 50 + 7)
    x[0, 0, -3:] = torch.tensor([5.0, 7.0, 6.0])
    top, where = topk_in_blocks(x, 4)
    assert top[0, 0, :3].tolist() == [7.0, 6.0, 5.0]
    assert where[0, 0, :3].tolist() == [x.shape[-1] - 2, x.shape[-1] - 1, x.shape[-1] - 3]
