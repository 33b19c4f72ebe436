"""Per-hidden-state statistics on the activation's own device: exact medians and top-k.

One hidden state is ``[pos, d_model]`` of one input, over its real (non-padding)
positions. Its median ``|x|`` is the paper's (``torch.median``: the lower middle value
for an even count), found for a whole padded batch with **one** selection: padding
entries are filled so that every row's median sits at the same rank (see
:func:`lower_medians`; one slice per padded input, touching only padding). On a GPU
the selection is ``torch.kthvalue``; on the CPU it is numpy's introselect in place
(``ndarray.partition``), inside a sampled bracket on long rows
(:mod:`~massact_lens._core.selection`): 3.5-5x faster than ``torch.kthvalue`` there
(``python bench/bench_scan.py --micro``). Its top-k entries come in one canonical
order (descending ``|x|``, equal magnitudes by position, then dim); for a long state
only the entries of the k positions with the largest ``max |x|`` are ranked (see
:func:`_top_entries`), for a short one every entry, in one copy of ``|x|`` that the
median reuses. Each top-k entry also gets its column's median: the median ``|x|`` of
its dim over the state's real positions (``k`` floats per state), which tells a dim
large on a few tokens (a massive activation) from one large on most of them (an outlier
channel). :func:`grouped_stats` does several hidden states of one batch (several
hooks) in one call: a short batch's statistics are a few dozen small operations
whatever their size.

>>> x = torch.tensor([[[1.0, -4.0], [2.0, 9.0], [100.0, 100.0]]])
>>> hidden_state_medians(x, torch.tensor([[True, True, False]]))
tensor([2.])
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from jaxtyping import Bool, Float, Int

from massact_lens._core.selection import kth_smallest, topk_in_blocks

__all__ = [
    "HiddenStateStats",
    "RealLayout",
    "grouped_stats",
    "hidden_state_medians",
    "hidden_state_stats",
    "lower_medians",
]


_INF = float("inf")


def _check(activation: torch.Tensor, real: torch.Tensor) -> None:
    if activation.ndim != 3 or real.ndim != 2 or tuple(real.shape) != tuple(activation.shape[:2]):
        raise ValueError(
            f"Expected an activation [batch, pos, d_model] and a mask [batch, pos] of the same "
            f"batch and pos; got {tuple(activation.shape)} and {tuple(real.shape)}."
        )


class RealLayout(NamedTuple):
    """Where a batch's real positions are, known on the host once per batch, so that
    the statistics of every hook make no device-to-host read (no GPU synchronisation).

    >>> RealLayout.of(torch.tensor([[True, True, False], [True, True, True]]))
    RealLayout(counts=(2, 3), prefix=True)
    """

    #: Real positions per row.
    counts: tuple[int, ...]
    #: True when every row is right-padded (ones, then zeros).
    prefix: bool

    @classmethod
    def of(cls, real: Bool[torch.Tensor, "batch pos"]) -> RealLayout:
        """The layout of a mask (reads it: give the host copy of a batch's mask)."""
        real = real.bool()
        return cls(tuple(int(n) for n in real.sum(dim=1).tolist()), _is_prefix(real))


def lower_medians(
    magnitude: Float[torch.Tensor, "batch entries"],
    n_real: Int[torch.Tensor, " batch"],
    counts: tuple[int, ...] | None = None,
) -> Float[torch.Tensor, " batch"]:
    """Per row, the lower median of its first ``n_real`` entries (the rest is padding).

    One selection for the whole batch: row ``r`` wants its ``m_r = (n_r + 1) // 2``-th
    smallest real entry. With ``K = max m_r``, ``K - m_r`` of its padding entries are
    set to -1 (below every magnitude) and the others to +inf, so that rank ``K`` of
    every row is its median. ``K - m_r`` never exceeds the padding a row has. Rows with
    no real entry give NaN. ``magnitude`` is overwritten. ``counts``: ``n_real`` as
    host integers, when known (then nothing is read back from the device).

    >>> lower_medians(torch.tensor([[3.0, 1.0, 2.0, 0.0], [5.0, 4.0, 0.0, 0.0]]), torch.tensor([3, 2]))
    tensor([2., 4.])
    """
    if counts is None:
        counts = tuple(int(n) for n in n_real.tolist())
    k = _equalise_ranks(magnitude[None], counts)
    if k == 0:
        return torch.full((magnitude.shape[0],), float("nan"), device=magnitude.device)
    return _with_empty_rows_nan(kth_smallest(magnitude, k).to(magnitude.device), counts)


def _equalise_ranks(flat: Float[torch.Tensor, "group batch entries"], counts: tuple[int, ...]) -> int:
    """Fill the padding of every row ``[g, i]`` (after its first ``counts[i]`` entries)
    so that rank ``K`` of every row is its lower median (see :func:`lower_medians`);
    return ``K`` (0 when no row has an entry). One slice per padded input, touching
    only padding: no mask as large as the batch is built."""
    n_total = int(flat.shape[-1])
    k = max(((n + 1) // 2 for n in counts), default=0)
    rows = _writable(flat)
    for i, n in enumerate(counts):
        if n < n_total:
            low_end = n + k - (n + 1) // 2
            rows[:, i, n:low_end] = -1.0
            rows[:, i, low_end:] = _INF
    return k


def _writable(x: torch.Tensor) -> torch.Tensor | np.ndarray:
    """``x`` to write slices into: on the CPU its numpy view (a slice assignment there
    costs less per call than torch's ``fill_``, and the padding fills are one per input); the
    tensor itself on a device, for bfloat16 (no numpy dtype) and when it requires grad."""
    if x.device.type != "cpu" or x.dtype == torch.bfloat16 or x.requires_grad:
        return x
    return x.numpy()


def _with_empty_rows_nan(medians: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """NaN in the last axis where a row has no real entry."""
    empty = [i for i, n in enumerate(counts) if n == 0]
    if empty:
        medians[..., empty] = float("nan")
    return medians


def hidden_state_medians(
    activation: Float[torch.Tensor, "batch pos d_model"], real: Bool[torch.Tensor, "batch pos"]
) -> Float[torch.Tensor, " batch"]:
    """Median ``|x|`` of each hidden state over its real positions and all dims (float32).

    The lower median for an even count, as ``torch.median``. Right padding is
    assumed when ``real`` is a prefix mask; any other mask is handled too (slower).

    >>> x = torch.tensor([[[1.0, -4.0], [2.0, 9.0], [100.0, 100.0]]])
    >>> hidden_state_medians(x, torch.tensor([[True, True, False]]))
    tensor([2.])
    """
    _check(activation, real)
    magnitude = activation.detach().float().abs()
    if not _is_prefix(real):  # move the real positions first, keeping their values
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
        magnitude = magnitude.gather(1, order[:, :, None].expand_as(magnitude))
    n_real = real.sum(dim=1) * int(activation.shape[-1])
    return lower_medians(magnitude.flatten(1).clone(), n_real)


def _is_prefix(real: torch.Tensor) -> bool:
    """True when every row is ones then zeros (right padding)."""
    if real.shape[1] < 2:
        return True
    return not bool((real[:, 1:] & ~real[:, :-1]).any())


class HiddenStateStats(NamedTuple):
    """What :func:`hidden_state_stats` keeps of a batch of hidden states (on their device)."""

    #: Signed values of the top-k ``|x|`` entries, ``[batch, k]`` (NaN where missing).
    values: torch.Tensor
    #: Their positions and feature dims (-1 where missing), int32.
    positions: torch.Tensor
    dims: torch.Tensor
    #: Median ``|x|`` per hidden state, ``[batch]`` (NaN for a non-finite state).
    medians: torch.Tensor
    #: True where the hidden state holds a NaN or an infinite entry.
    nonfinite: torch.Tensor
    #: Per top-k entry, the median ``|x|`` of its dim over the state's real positions
    #: (its column), ``[batch, k]`` (NaN where missing or non-finite): whether the dim
    #: is large on a few tokens or on most of them (:func:`_column_medians`).
    column_medians: torch.Tensor


def hidden_state_stats(
    activation: Float[torch.Tensor, "batch pos d_model"],
    real: Bool[torch.Tensor, "batch pos"],
    top_k: int,
    layout: RealLayout | None = None,
) -> HiddenStateStats:
    """Top-k ``|x|`` entries and the median of each hidden state of a right-padded batch.

    Padding never enters a statistic. Entries come in descending ``|x|``; equal
    magnitudes (common in bfloat16) in position order, then dim order, so the records
    do not depend on the batch's shape, padding or device. A hidden state with a NaN
    or infinite entry is flagged in ``nonfinite`` (its median is NaN; its top-k entries
    are kept as found, non-finite ones first, a NaN ranking as +inf): the caller says
    so, never averages it silently.
    ``layout``: :meth:`RealLayout.of` the batch's mask, made once on the host (else
    it is read from ``real`` here).

    >>> x = torch.zeros(1, 2, 3); x[0, 1, 2] = -7.0; x[0, 0, 0] = 0.5
    >>> s = hidden_state_stats(x, torch.ones(1, 2, dtype=torch.bool), top_k=2)
    >>> s.values.tolist(), s.positions.tolist(), s.dims.tolist(), s.medians.tolist()
    ([[-7.0, 0.5]], [[1, 0]], [[2, 0]], [0.0])
    """
    _check(activation, real)
    stats = _stats(activation.detach()[None], real, top_k, layout)
    return HiddenStateStats(*(field[0] for field in stats))


#: The indices one :func:`_order_keys` call ranks must fit the low 32 bits of a key.
_MAX_ENTRIES = 1 << 32


def _order_keys(
    magnitude: Float[torch.Tensor, "*rows n"], index: Int[torch.Tensor, "*index_rows n"], n_index: int
) -> Int[torch.Tensor, "*rows n"]:
    """int64 keys whose descending order is the statistics' canonical order: larger
    ``|x|`` first, then the lower flat index. ``magnitude`` is non-negative and not NaN
    (its float32 bits then order as int32 the way the values do) or -1 (padding: a
    negative int, below every real entry). No two keys are equal."""
    if n_index > _MAX_ENTRIES:
        raise ValueError(
            f"A hidden state of {n_index:,} entries has more than the statistics index holds "
            "(2^32): scan shorter inputs."
        )
    bits = magnitude.contiguous().view(torch.int32).to(torch.int64)
    return (bits << 32) | (n_index - 1 - index)


def _top_entries(
    x: Float[torch.Tensor, "group batch pos d_model"], real: Bool[torch.Tensor, "batch pos"], k: int,
    layout: RealLayout,
) -> tuple[Float[torch.Tensor, "group batch k"], Float[torch.Tensor, "group batch k"], Int[torch.Tensor, "group batch k"]]:
    """The ``k`` largest ``|x|`` entries of each real part of ``x[g, i]``, in the canonical
    order (:func:`_order_keys`: ties in ``|x|`` go to the lower position, then dim, so
    the records do not depend on the batch's shape or the device; NaN ranks as +inf):
    their magnitudes (-1 where a state has fewer than ``k`` real entries), signed values
    and flat indices (position x d_model + dim).

    Exact, without ranking every entry: the ``k`` positions with the largest
    ``max |x|`` (ties: the lower position) hold the ``k`` first entries, since each of
    them holds an entry that comes before any entry of a position left out. So only
    ``min(k, pos) x d_model`` entries per state are ranked (at 500 tokens: 2% of them).
    ``x`` is read, never written."""
    group, batch, pos, d_model = (int(s) for s in x.shape)
    device = x.device
    # max |x| per position, exactly: max(max x, -min x).
    per_position = torch.maximum(x.amax(dim=-1), x.amin(dim=-1).neg_()).abs_()
    per_position.masked_fill_(~real.to(device)[None], -1.0)
    kp = min(k, pos)
    ranked = per_position.nan_to_num(nan=_INF, posinf=_INF)
    chosen = _order_keys(ranked, torch.arange(pos, device=device).expand(group, batch, pos), pos).topk(kp, dim=2)
    chosen = chosen.indices.sort(dim=2).values  # in position order: candidate order = flat order
    rows = (torch.arange(group * batch, device=device).view(group, batch, 1) * pos + chosen).flatten()
    candidates = x.reshape(group * batch * pos, d_model).index_select(0, rows)  # a copy: ours
    magnitude = candidates.abs_().view(group, batch, kp * d_model)
    if min(layout.counts, default=pos) < kp:  # some state's k positions reach its padding
        padding = per_position.gather(2, chosen) < 0
        magnitude.view(group, batch, kp, d_model).masked_fill_(padding[..., None], -1.0)
    best = _canonical_topk(magnitude, k)
    position = chosen.gather(2, torch.div(best, d_model, rounding_mode="floor"))
    dim = best % d_model
    signed = x[torch.arange(group, device=device)[:, None, None], torch.arange(batch, device=device)[None, :, None],
               position, dim]  # x is intact: the signs of the k entries
    return magnitude.gather(2, best), signed, position * d_model + dim


def _canonical_topk(magnitude: Float[torch.Tensor, "group batch n"], k: int) -> Int[torch.Tensor, "group batch k"]:
    """Indices of the ``k`` first entries of each row in the canonical order (larger
    first, ties to the lower index, NaN as +inf; -1 is padding). On the CPU a plain
    ``topk`` is used when no tie, NaN or infinity could make its order differ (checked
    on the row's top k + 1: the common case); otherwise, and on other devices (where the
    check would wait for the device), :func:`_canonical_topk_on_device`."""
    n = int(magnitude.shape[-1])
    if magnitude.device.type == "cpu":
        top, best = topk_in_blocks(magnitude, min(k + 1, n))  # one more: a tie at the k-th shows
        tie = (top[..., 1:] == top[..., :-1]) & (top[..., 1:] >= 0)
        if not (tie.any() or not torch.isfinite(top[..., 0]).all()):
            return best[..., :k]
    return _canonical_topk_on_device(magnitude, k)


def _canonical_topk_on_device(magnitude: Float[torch.Tensor, "group batch n"], k: int) -> Int[torch.Tensor, "group batch k"]:
    """:func:`_canonical_topk` by ranking unique int64 keys: no read back from the device."""
    n = int(magnitude.shape[-1])
    ranked = magnitude.nan_to_num(nan=_INF, posinf=_INF)
    return _order_keys(ranked, torch.arange(n, device=magnitude.device), n).topk(k, dim=2).indices


def _fill_padding(
    magnitude: Float[torch.Tensor, "group batch pos d_model"], real: Bool[torch.Tensor, "batch pos"],
    layout: RealLayout, value: float,
) -> None:
    """Set every padding entry of ``magnitude`` to ``value``: one slice per padded input
    when the batch is right-padded, a mask otherwise."""
    if layout.prefix:
        entries = _writable(magnitude)
        for i, n in enumerate(layout.counts):
            if n < magnitude.shape[2]:
                entries[:, i, n:] = value
    else:
        magnitude.masked_fill_(~real.to(magnitude.device)[None, :, :, None], value)


def _stats(
    x: Float[torch.Tensor, "group batch pos d_model"],
    real: Bool[torch.Tensor, "batch pos"],
    top_k: int,
    layout: RealLayout | None,
    overwrite: bool = False,
) -> HiddenStateStats:
    """The statistics of every ``[g, i]`` hidden state; fields ``[group, batch, ...]``.
    ``overwrite``: ``x`` may be used as the work space (a float32 copy the caller owns):
    the median's selection then runs in it, with no second copy."""
    group, batch, pos, d_model = (int(s) for s in x.shape)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, not {top_k!r}.")
    if layout is None:
        layout = RealLayout.of(real)
    n_total = pos * d_model
    k = min(top_k, n_total)
    values = x if x.dtype == torch.float32 else x.float()  # ours when it had to be converted
    if k == 0:  # no entry at all (no position or no dim)
        magnitude = values.abs()
        top = signed = torch.zeros(group, batch, 0, device=x.device)
        index = torch.zeros(group, batch, 0, dtype=torch.long, device=x.device)
    elif 2 * min(k, pos) >= pos:
        # Short states: the k strongest positions would be half of them or more, so every
        # entry is ranked, in one copy of |x| that the median then reuses (x keeps the signs).
        magnitude = values.abs().contiguous()
        _fill_padding(magnitude, real, layout, -1.0)
        best = _canonical_topk(magnitude.view(group, batch, n_total), k)
        top = magnitude.view(group, batch, n_total).gather(2, best)
        signed = values.reshape(group, batch, n_total).gather(2, best)
        index = best
    else:
        top, signed, index = _top_entries(values, real, k, layout)  # reads the signs: before any abs_
        own = values is not x or (overwrite and values.is_contiguous())  # may be written
        magnitude = values.abs_() if own else values.abs()
    if not layout.prefix:  # move the real positions first (stable): the same layout as right padding
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
        magnitude = magnitude.gather(2, order[None, :, :, None].expand_as(magnitude))
    flat = magnitude.reshape(group, batch, n_total)  # a copy only when x was strided (then ours)
    entries = tuple(n * d_model for n in layout.counts)
    missing = top < 0
    if k:
        nonfinite = ~torch.isfinite(top[..., 0])
    else:
        nonfinite = torch.zeros(group, batch, dtype=torch.bool, device=flat.device)
    columns = _column_medians(magnitude, index % max(d_model, 1), layout.counts)  # before flat is overwritten
    kth = _equalise_ranks(flat, entries)
    if kth == 0:
        medians = torch.full((group, batch), float("nan"), device=flat.device)
    else:
        medians = kth_smallest(flat.view(group * batch, n_total), kth).to(flat.device).view(group, batch)
        medians = _with_empty_rows_nan(medians, entries)
    medians = medians.masked_fill(nonfinite, float("nan"))
    positions = torch.div(index, d_model, rounding_mode="floor")
    dims = index % d_model
    if k < top_k:
        pad = top_k - k
        signed = torch.nn.functional.pad(signed, (0, pad))
        missing = torch.nn.functional.pad(missing, (0, pad), value=True)
        positions = torch.nn.functional.pad(positions, (0, pad))
        dims = torch.nn.functional.pad(dims, (0, pad))
        columns = torch.nn.functional.pad(columns, (0, pad))
    return HiddenStateStats(
        values=signed.masked_fill(missing, float("nan")),
        positions=positions.masked_fill(missing, -1).to(torch.int32),
        dims=dims.masked_fill(missing, -1).to(torch.int32),
        medians=medians,
        nonfinite=nonfinite,
        column_medians=columns.masked_fill(missing | nonfinite[..., None], float("nan")),
    )


def _column_medians(
    magnitude: Float[torch.Tensor, "group batch pos d_model"], dims: Int[torch.Tensor, "group batch k"],
    counts: tuple[int, ...],
) -> Float[torch.Tensor, "group batch k"]:
    """Per entry ``[g, i, r]``, the lower median of ``magnitude[g, i, :, dims[g, i, r]]`` over
    the first ``counts[i]`` positions (the real ones: ``magnitude`` holds them first; its
    padding is not read). One gather of ``k`` columns and one selection for the whole
    group: ``k x pos`` numbers per state, a small part of the state's own statistics.

    >>> m = torch.tensor([[[[1.0, 9.0], [2.0, 8.0], [3.0, 7.0], [0.0, 0.0]]]])  # 3 real positions
    >>> _column_medians(m, torch.tensor([[[1, 0]]]), (3,)).tolist()
    [[[8.0, 2.0]]]
    """
    group, batch, pos = (int(s) for s in magnitude.shape[:3])
    k = int(dims.shape[-1])
    if k == 0 or pos == 0:
        return torch.full((group, batch, k), float("nan"), device=magnitude.device)
    columns = magnitude.gather(3, dims[:, :, None, :].expand(group, batch, pos, k))  # [g, b, pos, k]: a copy
    rows = columns.permute(0, 3, 1, 2).contiguous().view(group * k, batch, pos)
    kth = _equalise_ranks(rows, counts)
    if kth == 0:
        return torch.full((group, batch, k), float("nan"), device=magnitude.device)
    medians = kth_smallest(rows.view(group * k * batch, pos), kth).to(magnitude.device).view(group, k, batch)
    return _with_empty_rows_nan(medians, counts).permute(0, 2, 1)


def grouped_stats(
    states: Float[torch.Tensor, "group batch pos d_model"],
    real: Bool[torch.Tensor, "batch pos"],
    top_k: int,
    layout: RealLayout | None = None,
    overwrite: bool = False,
) -> HiddenStateStats:
    """:func:`hidden_state_stats` of several hidden states of one batch (several hooks)
    in one call: fields ``[group, batch, ...]``, equal to those of one call per state.

    A short batch's statistics are a few dozen small tensor operations whatever its
    size, so one call per group of hooks in place of one per hook takes most of their
    cost away.

    ``overwrite=True``: ``states`` is a float32 copy that may be overwritten (the
    statistics then need no second copy of it).

    >>> x = torch.zeros(2, 1, 2, 3); x[0, 0, 1, 2] = -7.0; x[1, 0, 0, 1] = 5.0
    >>> s = grouped_stats(x, torch.ones(1, 2, dtype=torch.bool), top_k=1)
    >>> s.values.tolist(), s.dims.tolist()
    ([[[-7.0]], [[5.0]]], [[[2]], [[1]]])
    """
    if states.ndim != 4:
        raise ValueError(f"Expected states [group, batch, pos, d_model], got shape {tuple(states.shape)}.")
    _check(states[0], real)
    return _stats(states.detach(), real, top_k, layout, overwrite)
