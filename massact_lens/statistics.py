"""Per-hidden-state statistics on the activation's own device: exact medians and top-k.

One hidden state is ``[pos, d_model]`` of one input, over its real (non-padding)
positions. Its median ``|x|`` is the paper's (``torch.median``: the lower middle value
for an even count), found for a whole padded batch with **one** selection: padding
entries are filled so that every row's median sits at the same rank (see
:func:`lower_medians`; one slice per padded input, touching only padding). On a GPU
the selection is ``torch.kthvalue``; on the CPU it is numpy's introselect in place
(``ndarray.partition``, about 10x faster than ``torch.kthvalue`` there, measured by
``bench/bench_scan.py``'s microbenchmark). :func:`grouped_stats` does several hidden
states of one batch (several hooks) in one call: a short batch's statistics are a few
dozen small operations whatever their size.

>>> x = torch.tensor([[[1.0, -4.0], [2.0, 9.0], [100.0, 100.0]]])
>>> hidden_state_medians(x, torch.tensor([[True, True, False]]))
tensor([2.])
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int

__all__ = [
    "HiddenStateStats",
    "RealLayout",
    "grouped_stats",
    "hidden_state_medians",
    "hidden_state_stats",
    "lower_medians",
]


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
    return _with_empty_rows_nan(_kth_smallest(magnitude, k).to(magnitude.device), counts)


def _equalise_ranks(
    flat: Float[torch.Tensor, "group batch entries"], counts: tuple[int, ...], low_filled: bool = False
) -> int:
    """Fill the padding of every row ``[g, i]`` (after its first ``counts[i]`` entries)
    so that rank ``K`` of every row is its lower median (see :func:`lower_medians`);
    return ``K`` (0 when no row has an entry). One slice per padded input, touching
    only padding: no mask as large as the batch is built. ``low_filled``: the padding
    is at -1 already (only its +inf part is written)."""
    n_total = int(flat.shape[-1])
    k = max(((n + 1) // 2 for n in counts), default=0)
    for i, n in enumerate(counts):
        if n < n_total:
            low_end = n + k - (n + 1) // 2
            if not low_filled:
                flat[:, i, n:low_end].fill_(-1.0)
            flat[:, i, low_end:].fill_(float("inf"))
    return k


def _with_empty_rows_nan(medians: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """NaN in the last axis where a row has no real entry."""
    empty = [i for i, n in enumerate(counts) if n == 0]
    if empty:
        medians[..., empty] = float("nan")
    return medians


def _kth_smallest(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the k-th smallest entry: numpy's introselect on the CPU, in place (the
    rows are reordered: no copy of the batch), ``torch.kthvalue`` elsewhere."""
    if magnitude.device.type == "cpu":
        rows = magnitude.numpy()
        rows.partition(k - 1, axis=1)
        return torch.from_numpy(rows[:, k - 1].copy())
    return _kth_on_device(magnitude, k)


def _kth_on_device(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    return magnitude.kthvalue(k, dim=1).values


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


def hidden_state_stats(
    activation: Float[torch.Tensor, "batch pos d_model"],
    real: Bool[torch.Tensor, "batch pos"],
    top_k: int,
    layout: RealLayout | None = None,
) -> HiddenStateStats:
    """Top-k ``|x|`` entries and the median of each hidden state of a right-padded batch.

    Padding never enters a statistic. A hidden state with a NaN or infinite entry is
    flagged in ``nonfinite`` (its median is NaN; its top-k entries are kept as
    found, non-finite ones first): the caller says so, never averages it silently.
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


def _stats(
    x: Float[torch.Tensor, "group batch pos d_model"],
    real: Bool[torch.Tensor, "batch pos"],
    top_k: int,
    layout: RealLayout | None,
    overwrite: bool = False,
) -> HiddenStateStats:
    """The statistics of every ``[g, i]`` hidden state; fields ``[group, batch, ...]``.
    ``overwrite``: ``x`` may be used as the work space (a float32 copy the caller owns):
    then only its signs are kept aside (a byte per entry) instead of a second copy."""
    group, batch, pos, d_model = (int(s) for s in x.shape)
    if layout is None:
        layout = RealLayout.of(real)
    negative = None
    if overwrite and x.dtype == torch.float32 and x.is_contiguous():
        # The sign bit (also of -0.0 and NaN), read as the sign of the same bits as int32:
        # about 1.4x faster than torch.signbit on the CPU here.
        negative = (x.view(torch.int32) < 0).view(group, batch, pos * d_model)
        magnitude = x.abs_()
    else:
        magnitude = x.float().abs()
    order = None
    if not layout.prefix:  # move the real positions first (stable): the same layout as right padding
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
        magnitude = magnitude.gather(2, order[None, :, :, None].expand_as(magnitude))
    n_total = pos * d_model
    flat = magnitude.reshape(group, batch, n_total)  # a copy only when x was strided (then ours)
    entries = tuple(n * d_model for n in layout.counts)
    for i, n in enumerate(entries):  # padding at -1: below every real entry
        if n < n_total:
            flat[:, i, n:].fill_(-1.0)
    k = min(top_k, n_total)
    top, index = flat.topk(k, dim=2)
    if order is not None:  # back to the input's own positions
        back = order[None].expand(group, batch, pos).gather(2, torch.div(index, d_model, rounding_mode="floor"))
        index = back * d_model + index % d_model
    if negative is None:
        signed = x.reshape(group, batch, n_total).gather(2, index).float()
    else:  # |x| with x's sign: x itself, exactly
        signed = torch.where(negative.gather(2, index), -top, top)
    missing = top < 0
    if k:
        nonfinite = ~torch.isfinite(top[..., 0])
    else:
        nonfinite = torch.zeros(group, batch, dtype=torch.bool, device=flat.device)
    kth = _equalise_ranks(flat, entries, low_filled=True)  # padding is at -1 since the top-k
    if kth == 0:
        medians = torch.full((group, batch), float("nan"), device=flat.device)
    else:
        medians = _kth_smallest(flat.view(group * batch, n_total), kth).to(flat.device).view(group, batch)
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
    return HiddenStateStats(
        values=signed.masked_fill(missing, float("nan")),
        positions=positions.masked_fill(missing, -1).to(torch.int32),
        dims=dims.masked_fill(missing, -1).to(torch.int32),
        medians=medians,
        nonfinite=nonfinite,
    )


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
