"""Exact selection on the host: each row's k-th smallest entry and its top j, faster than
numpy's and torch's own over a whole row, with the same answers.

:mod:`~massact_lens._core.statistics` takes a hidden state's median and its strongest
entries here. Both read only part of each row exactly: :func:`kth_bracketed` selects
inside a bracket that a strided sample gives, :func:`topk_in_blocks` ranks only the
blocks of 64 entries whose maxima could hold the top. Off the CPU, torch's own
selection runs (a read back from a GPU per row would cost more than it saves).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from jaxtyping import Float, Int

__all__ = ["kth_bracketed", "kth_on_device", "kth_smallest", "topk_in_blocks"]


def kth_smallest(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the k-th smallest entry: numpy's introselect on the CPU, in place (the
    rows are reordered: no copy of the batch), long rows through :func:`kth_bracketed`;
    ``torch.kthvalue`` elsewhere."""
    if magnitude.device.type == "cpu":
        rows = magnitude.numpy()
        if rows.shape[1] >= _BRACKET_MIN_ENTRIES:
            return torch.from_numpy(kth_bracketed(rows, k))
        rows.partition(k - 1, axis=1)
        return torch.from_numpy(rows[:, k - 1].copy())
    return kth_on_device(magnitude, k)


#: Rows at least this long are selected in a bracket (shorter: one partition is cheaper).
_BRACKET_MIN_ENTRIES = 2048
#: The bracket's sample takes every 17th entry: coprime with d_model of every usual
#: width (powers of two times 3, 5, 7), so the sample visits every dim.
_SAMPLE_STEP = 17


def kth_bracketed(rows: np.ndarray, k: int) -> np.ndarray:
    """Per row, the exact k-th smallest entry (numpy's order: NaN last), selected in a
    bracket instead of the whole row. A strided sample's order statistics around rank
    ``k`` give each row a bracket ``[lo, hi]``; with ``c`` entries below ``lo`` and the
    k-th inside it (``c < k <= c + n_in``), the answer is the ``(k - c)``-th smallest
    inside, about a tenth of the row on a dozen tokens and less on longer rows. A row
    whose bracket misses (or is NaN) is partitioned whole. Exact either way; 0.6x a
    whole-row partition's time on 16 tokens of 384 dims, 0.4x on 128 and 512
    (``python bench/bench_scan.py --micro``). ``rows`` is overwritten.

    >>> rows = np.random.default_rng(0).random((3, 5000), dtype=np.float32)
    >>> bool((kth_bracketed(rows.copy(), 2500) == np.partition(rows, 2499, axis=1)[:, 2499]).all())
    True
    """
    n_rows, n = rows.shape
    sample = rows[:, ::_SAMPLE_STEP].copy()
    s = sample.shape[1]
    # ~2 standard deviations of the k-th's rank in the sample: one row in twenty or so misses
    # and is partitioned whole, which costs less than a wider bracket on every row.
    margin = math.isqrt(s) + 1
    centre = (k - 1) * s // n
    low_rank, high_rank = max(centre - margin, 0), min(centre + margin, s - 1)
    _order_sample(sample, low_rank, high_rank)
    low, high = sample[:, low_rank, None], sample[:, high_rank, None]
    below, inside = np.empty(rows.shape, bool), np.empty(rows.shape, bool)  # the only [rows, n] arrays made
    # its rank among the row's entries inside
    wanted = (k - 1) - np.count_nonzero(np.less(rows, low, out=below), axis=1)
    np.greater_equal(rows, low, out=inside)  # NaN is in neither: numpy ranks it last, above every bracket
    inside &= np.less_equal(rows, high, out=below)
    inside_values = np.compress(inside.ravel(), rows.ravel())  # row after row
    n_inside = np.count_nonzero(inside, axis=1)
    ends = np.cumsum(n_inside).tolist()
    hits = ((wanted >= 0) & (wanted < n_inside)).tolist()
    out = np.empty(n_rows, dtype=rows.dtype)
    start = 0
    for r, (end, want, hit) in enumerate(zip(ends, wanted.tolist(), hits, strict=True)):
        if hit:
            part = inside_values[start:end]
            part.partition(want)
            out[r] = part[want]
        else:  # the bracket missed: the whole row
            rows[r].partition(k - 1)
            out[r] = rows[r, k - 1]
        start = end
    return out


#: A sample up to this long is sorted (numpy sorts short rows faster than it selects
#: two ranks in them); a longer one is partitioned at each rank in turn.
_SORT_MAX = 512


def _order_sample(sample: np.ndarray, low_rank: int, high_rank: int) -> None:
    """Put each row's ``low_rank``-th and ``high_rank``-th smallest entries in place."""
    if sample.shape[1] <= _SORT_MAX:
        sample.sort(axis=1)
        return
    sample.partition(low_rank, axis=1)
    if high_rank > low_rank:
        sample[:, low_rank + 1 :].partition(high_rank - low_rank - 1, axis=1)


def kth_on_device(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the k-th smallest entry, by ``torch.kthvalue`` (no read back from the device)."""
    return magnitude.kthvalue(k, dim=1).values


#: Entries per block of :func:`topk_in_blocks`.
_BLOCK = 64


def topk_in_blocks(
    magnitude: Float[torch.Tensor, "group batch n"], j: int
) -> tuple[Float[torch.Tensor, "group batch j"], Int[torch.Tensor, "group batch j"]]:
    """``magnitude.topk(j, dim=2)`` read in blocks of 64 entries, for a caller that uses
    only the first ``j - 1`` and checks the ``j`` values it gets.

    When a row's ``(j-1)``-th and ``j``-th largest values differ, the ``j - 1`` entries
    above lie in at most ``j - 1`` blocks, each with a larger maximum than any other
    block: the ``j`` blocks with the largest maxima (and the tail after the last whole
    block) hold them, so one ``amax`` pass and a ``topk`` over those blocks find them:
    0.6x a plain ``topk``'s time on 16 tokens of 384 dims, 0.2x on 128 and 512
    (``python bench/bench_scan.py --micro``). When those two
    values tie, the blocks may miss an equal entry of lower index, but then what this
    returns ties too (and a NaN or infinity comes back first): the caller,
    ``statistics._canonical_topk``, sees that and ranks the row canonically. Short or
    strided rows take the plain ``topk``.

    >>> x = torch.rand(2, 3, 5000)
    >>> top, where = topk_in_blocks(x, 11)
    >>> bool(torch.equal(top, x.topk(11, dim=2).values)), bool(torch.equal(x.gather(2, where), top))
    (True, True)
    """
    group, batch, n = (int(s) for s in magnitude.shape)
    whole = n // _BLOCK
    if whole < 4 * j or not magnitude.is_contiguous():
        return magnitude.topk(j, dim=2)
    maxima = magnitude[..., : whole * _BLOCK].view(group, batch, whole, _BLOCK).amax(dim=3)
    blocks = maxima.topk(j, dim=2).indices
    where = (blocks[..., None] * _BLOCK + torch.arange(_BLOCK, device=magnitude.device)).view(group, batch, j * _BLOCK)
    if whole * _BLOCK < n:
        tail = torch.arange(whole * _BLOCK, n, device=magnitude.device).expand(group, batch, -1)
        where = torch.cat([where, tail], dim=2)
    top, chosen = magnitude.gather(2, where).topk(j, dim=2)
    return top, where.gather(2, chosen)
