"""The values a profile keeps: every massive (position, dim) followed through every hook.

For each (input, position, dim) found massive anywhere in its input (a token-sparse
record: the channel-wide entries of outlier channels are listed apart and not followed),
:func:`profile` keeps its signed value at **every** scanned hook (also where it is not
massive), summed per (hook, dim, token kind) in float64: count, mean and spread, the
means "set to mean" ablation writes.

Which entries to follow is known only once a batch has gone through all hooks, so
:class:`CandidateValues` follows them in the scan's own forward pass this way: at
every hook it copies the hidden state's columns at the dims already known to carry
massive activations (``[batch, pos, n_dims]``, a few columns); when the batch's
statistics arrive it keeps those columns' values at the batch's massive entries. A
batch whose massive entries use a dim not yet followed is run once more with that
dim added, reading nothing else. Before the first batch, the first
:data:`PROBE_TOKENS` tokens of the first batch's first input (the longest input when the
scan batches longest first) are scanned alone (a probe, its numbers
not kept) to learn the dims to follow: the start token carries them (a dim seen only
later costs a rerun, never a wrong number). Massive dims are few and fixed (the
paper's finding), so a profile costs about one scan plus one short input.
:class:`CandidateValues` is a :class:`~massact_lens._core.loop.Measurement` that runs
after the scan's own (:class:`~massact_lens.find._scan_stats.ScanStatistics`) in the
same pass and reads that batch's statistics from it. :func:`second_pass_values` is the
two-pass way, for a scan made earlier.

>>> import torch
>>> from massact_lens.examples import tiny_model
>>> from massact_lens.models.planting import plant_massive_activation
>>> from massact_lens import profile
>>> model = plant_massive_activation(tiny_model(n_layers=3), layer=1, dim=5, value=1000.0)
>>> tokens = torch.randint(1, 64, (6, 8), generator=torch.Generator().manual_seed(0)); tokens[:, 0] = 0
>>> p = profile(model, tokens, min_value=50, min_ratio=100, progress=False)
>>> [(s.layer, s.dim, s.kind, s.count) for s in p.stats][:3]
[(0, 5, 'start', 6), (1, 5, 'start', 6), (2, 5, 'start', 6)]
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._fingerprint import other_weights
from massact_lens._core.batching import Batch, BatchPlan, plan_batches
from massact_lens._core.loop import UserHooks, measure
from massact_lens._core.types import HookList, Inputs, Provenance
from massact_lens.find._scan_stats import ScanStatistics
from massact_lens.find.criterion import DELIMITERS, TOKEN_KINDS, Criterion, MassiveActivations
from massact_lens.find.scan_result import ScanResult
from massact_lens.find.scanner import scan

__all__ = ["ValueStat"]  # CandidateValues, second_pass_plan, second_pass_values: what profile runs


@dataclass(frozen=True)
class ValueStat:
    """The signed value of one massive (position, dim) across inputs, at one hook."""

    layer: int
    hook_name: str
    dim: int
    kind: str
    count: int
    mean: float
    std: float
    cv: float  # std / |mean|


def value_stat(layer: int, hook_name: str, dim: int, kind: str, count: int, mean: float, m2: float) -> ValueStat:
    """A ValueStat from count, mean and the sum of squared deviations (sample std)."""
    std = math.sqrt(max(m2, 0.0) / max(count - 1, 1))
    return ValueStat(layer, hook_name, dim, kind, count, mean, std, std / abs(mean) if mean != 0 else math.inf)


def pooled(stats: list[ValueStat]) -> ValueStat:
    """Chan et al.'s pooled count / mean / spread of disjoint samples."""
    count, mean, m2 = 0, 0.0, 0.0
    for st in stats:
        if count == 0:
            count, mean, m2 = st.count, st.mean, st.std**2 * max(st.count - 1, 0)
            continue
        n = count + st.count
        delta = st.mean - mean
        m2 += st.std**2 * max(st.count - 1, 0) + delta * delta * count * st.count / n
        mean += delta * st.count / n
        count = n
    first = stats[0]
    return value_stat(first.layer, first.hook_name, first.dim, first.kind, count, mean, m2)


@dataclass(frozen=True)
class _Followed:
    """The entries to follow: per input, (position, dim, key) with key = dim index x 3 + kind."""

    dims: tuple[int, ...]
    per_input: dict[int, list[tuple[int, int, int]]]

    @classmethod
    def of(cls, found: MassiveActivations) -> _Followed:
        dims = found.massive_dims
        dim_index = {d: i for i, d in enumerate(dims)}
        follow: dict[tuple[int, int, int], int] = {}
        for r in found:
            follow[(r.input_index, r.position, r.dim)] = dim_index[r.dim] * len(TOKEN_KINDS) + TOKEN_KINDS.index(r.kind)
        per_input: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        for (i, p, d), key in follow.items():
            per_input[i].append((p, d, key))
        return cls(tuple(dims), dict(per_input))

    @property
    def n_keys(self) -> int:
        return len(self.dims) * len(TOKEN_KINDS)

    def stats(self, sums: torch.Tensor, result: ScanResult) -> tuple[ValueStat, ...]:
        """ValueStats from ``sums`` ``[hook, (count, sum, sum of squares), key]``."""
        out = []
        for h, name in enumerate(result.hook_names):
            for key in range(self.n_keys):
                count = float(sums[h, 0, key])
                if count == 0:
                    continue
                mean = float(sums[h, 1, key]) / count
                m2 = max(float(sums[h, 2, key]) - count * mean * mean, 0.0)
                key_dim, kind = self.dims[key // len(TOKEN_KINDS)], TOKEN_KINDS[key % len(TOKEN_KINDS)]
                out.append(value_stat(result.layers[h], name, key_dim, kind, int(count), mean, m2))
        return tuple(out)


def _ignore(activation: torch.Tensor, hook: Any = None) -> None:  # noqa: ARG001
    pass


def _add(sums: torch.Tensor, h: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    sums[h, 0].index_add_(0, keys, torch.ones_like(values))
    sums[h, 1].index_add_(0, keys, values)
    sums[h, 2].index_add_(0, keys, values * values)


class _FollowedValues:
    """The second pass as a measurement: at every hook, the values of the followed
    entries of the batch's inputs, summed into ``sums``."""

    reads_input_index = True
    needs_output = False

    def __init__(self, followed: _Followed, hook_names: tuple[str, ...]) -> None:
        self.followed, self.hook_names = followed, hook_names
        self.sums = torch.zeros(len(hook_names), 3, followed.n_keys, dtype=torch.float64)

    def hooks(self, batch: Batch) -> HookList:
        rows, pos, dim, keys = [], [], [], []
        for row in range(batch.tokens.shape[0]):
            for p, d, key in self.followed.per_input.get(batch.input_index(row), ()):
                rows.append(row)
                pos.append(p)
                dim.append(d)
                keys.append(key)
        if not rows:  # nothing to read, but the pass still stops after the last block read
            return [(name, _ignore) for name in self.hook_names]
        index = [torch.tensor(v, dtype=torch.long) for v in (rows, pos, dim, keys)]

        def reader(h: int):  # noqa: ANN202
            def read(activation: torch.Tensor, hook: Any = None) -> None:  # noqa: ARG001
                r, p, d, _ = (t.to(activation.device) for t in index)
                _add(self.sums, h, index[3], activation.detach()[r, p, d].double().cpu())

            return read

        return [(name, reader(h)) for h, name in enumerate(self.hook_names)]

    def update(self, batch: Batch, output: torch.Tensor | None) -> None:
        pass

    def result(self) -> torch.Tensor:
        return self.sums


def second_pass_values(
    model: TransformerLensModel,
    plan: BatchPlan,
    result: ScanResult,
    found: MassiveActivations,
    progress: bool,
) -> tuple[ValueStat, ...]:
    """The value statistics from a forward pass of its own over ``plan`` (the inputs
    ``result`` scanned, checked by :func:`second_pass_plan`), reading each followed entry at
    every hook. Batched longest first, as :func:`~massact_lens.scan` batches by default, so
    that each value is read in a batch of the same shape as in the one-pass profile (the
    same float32 rounding)."""
    if len(found) == 0:
        for _ in plan.batches:  # nothing to read, but a streamed plan's checks still run to its end
            pass
        return ()
    followed = _Followed.of(found)
    values = _FollowedValues(followed, result.hook_names)
    measure(model, plan, values, progress=progress, desc="profile")
    return followed.stats(values.result(), result)


def second_pass_plan(
    model: TransformerLensModel,
    inputs: Inputs,
    scan_result: ScanResult,
    batch_size: int,
    prepend_bos: bool | None,
) -> BatchPlan:
    """The batches (longest first) of :func:`second_pass_values` over ``inputs``, refused
    (``ValueError`` saying what to do, before any forward pass) unless ``scan_result`` is a
    scan of this model, these weights and these inputs: the same number of inputs, lengths
    and BOS setting (``prepend_bos=None``: the scan's), and the token of every kept entry.
    A streamed plan (an iterable of batches) is checked batch by batch, each before its pass."""
    Provenance.check_same(scan_result.provenance, Provenance.of(model), "scan_result and model")
    differ = other_weights(model, scan_result.provenance.dtype, scan_result.weights)
    if differ:
        raise ValueError(
            f"scan_result was made on other weights than the model's ({differ}), though name and shape agree: "
            "scan this model (leave scan_result=None, or pass scan_result=scan(model, inputs))."
        )
    bos = scan_result.prepend_bos if prepend_bos is None else prepend_bos
    plan = plan_batches(model, inputs, batch_size=batch_size, prepend_bos=bos, by_length=True)
    if plan.prepend_bos != scan_result.prepend_bos:
        raise _other_inputs(f"prepend_bos {plan.prepend_bos} here, {scan_result.prepend_bos} in the scan")
    if plan.n_inputs is None:
        return BatchPlan(_checked_stream(plan.batches, scan_result), None, plan.prepend_bos)
    if plan.n_inputs != scan_result.n_inputs:
        raise _other_inputs(f"{plan.n_inputs} inputs here, {scan_result.n_inputs} scanned")
    for batch in plan.batches:  # a list: every input checked before any pass
        _check_batch(batch, scan_result)
    return plan


def _checked_stream(batches: Any, scan_result: ScanResult) -> Any:
    seen = 0
    for batch in batches:
        _check_batch(batch, scan_result)
        seen += int(batch.tokens.shape[0])
        yield batch
    if seen != scan_result.n_inputs:
        raise _other_inputs(f"{seen} inputs here, {scan_result.n_inputs} scanned")


def _check_batch(batch: Batch, scan_result: ScanResult) -> None:
    """Refuse a batch whose inputs are not the scanned ones (length, and the token at every kept entry)."""
    for row in range(int(batch.tokens.shape[0])):
        index, length = batch.input_index(row), int(batch.lengths[row])
        if index >= scan_result.n_inputs:
            raise _other_inputs(f"more than the {scan_result.n_inputs} inputs scanned")
        scanned = int(scan_result.lengths[index])
        if scanned != length:
            raise _other_inputs(f"input {index} has {length} tokens here, {scanned} in the scan")
        positions = scan_result.positions[index].long().cpu()
        valid = (positions >= 0) & (positions < length)
        here = batch.tokens[row].cpu()[positions[valid]].long()
        if not torch.equal(scan_result.token_ids[index].cpu()[valid].long(), here):
            raise _other_inputs(f"input {index} has other tokens than the scanned one")


def _other_inputs(detail: str) -> ValueError:
    return ValueError(
        f"scan_result is a scan of other inputs ({detail}): pass the inputs (and prepend_bos) that were "
        "scanned, or leave scan_result=None to scan these inputs in the profile's own pass."
    )


#: Tokens of the first batch's first input the probe scans (the start token and its neighbours).
PROBE_TOKENS = 64


class CandidateValues:
    """Follows the massive entries in the scan's own pass: a measurement that runs after
    ``statistics`` (the scan's) in the same :func:`~massact_lens._core.loop.measure` call
    and reads the batch's statistics from it in :meth:`update`.

    Keeps, for each (input, position, dim) that passes the criterion at some hook on a
    few tokens (a token-sparse record of :func:`~massact_lens.find_massive`; the entries
    of outlier channels, large on most tokens, are not followed), its value at every hook
    (float32, as read): a few numbers per input, like the scan's own records. ``reruns``
    counts the batches run a second time for a new dim. :meth:`result` is the profile's
    value statistics.
    """

    reads_input_index = True  # its rows are named by Batch.input_index: the plan may run longest first
    needs_output = False

    def __init__(
        self,
        model: TransformerLensModel,
        statistics: ScanStatistics,
        criterion: Criterion,
        delimiters: frozenset[str] = DELIMITERS,
    ) -> None:
        self.model = model
        self.statistics = statistics
        self.hook_names = statistics.hook_names
        self.criterion = criterion
        self.delimiters = frozenset(delimiters)
        self.dims: list[int] = []  # followed so far, in the order they appeared
        self.reruns = 0
        self.probed = False
        self._open: tuple[tuple[int, ...], list[torch.Tensor | None]] | None = None  # this batch's dims and columns
        self._keys: list[tuple[int, int, int]] = []
        self._values: list[torch.Tensor] = []  # [n_entries, n_hooks] per batch
        self._found: MassiveActivations | None = None

    def _capture(self, dims: tuple[int, ...]) -> tuple[HookList, list[torch.Tensor | None]]:
        columns: list[torch.Tensor | None] = [None] * len(self.hook_names)
        if not dims:
            return [], columns
        index = torch.tensor(dims, dtype=torch.long)

        def reader(h: int):  # noqa: ANN202
            def read(activation: torch.Tensor, hook: Any = None) -> None:  # noqa: ARG001
                columns[h] = activation.detach()[..., index.to(activation.device)].float()  # a copy

            return read

        return [(name, reader(h)) for h, name in enumerate(self.hook_names)], columns

    def hooks(self, batch: Batch) -> HookList:
        if not self.probed:
            self._probe(batch)
        dims = tuple(self.dims)
        hooks, columns = self._capture(dims)
        self._open = (dims, columns)
        return hooks

    def _probe(self, batch: Batch) -> None:
        """Scan the start of the batch's first input alone and follow its massive dims from the
        first batch on: the first batch then runs again only for dims that start lacks. The
        probe's numbers are not kept (the pass itself measures that input)."""
        self.probed = True
        length = min(int(batch.attention_mask[0].sum()), PROBE_TOKENS)
        with warnings.catch_warnings():  # the pass itself warns about what it meets
            warnings.simplefilter("ignore")
            probe = scan(self.model, batch.tokens[:1, :length], hooks=list(self.hook_names),
                         top_k=self.statistics.top_k, progress=False)
        stats = (probe.values, probe.positions, probe.dims, probe.token_ids, probe.medians, probe.nonfinite)
        self.dims.extend(sorted(set(self._entries(stats, probe.column_medians, probe.lengths)[:, 2].tolist())))

    def _entries(self, stats: tuple[torch.Tensor, ...], columns: torch.Tensor | None,
                 lengths: torch.Tensor) -> torch.Tensor:
        """(row, position, dim) of every token-sparse entry of a batch's statistics that passes the
        criterion: the records :meth:`found` keeps. Channel-wide entries (outlier channels,
        :meth:`~massact_lens.find.criterion.Criterion.channel_wide`: ``columns``, the entries'
        column medians, and ``lengths``, real tokens per row, decide) are no profile value:
        they are not followed. ``columns`` None (unknown): every entry that passes is."""
        values, positions, dims, _, medians, _ = stats
        passes = self.criterion.among_top(values, medians)
        if columns is not None:
            lengths = lengths.to(medians.device)[:, None].expand(medians.shape)
            passes &= ~self.criterion.channel_wide(columns.to(medians.device), medians, lengths)
        rows, hooks, ranks = passes.nonzero(as_tuple=True)
        found = torch.stack([rows, positions[rows, hooks, ranks].long(), dims[rows, hooks, ranks].long()], dim=1)
        return torch.unique(found, dim=0)

    def update(self, batch: Batch, output: torch.Tensor | None) -> None:  # noqa: ARG002
        if self._open is None:
            raise RuntimeError("update() before hooks(): the batch's readers were never attached.")
        (used, columns), self._open = self._open, None
        lengths = batch.attention_mask.bool().sum(dim=1).cpu()  # real tokens per row, as the scan counts them
        entries = self._entries(self.statistics.batch_stats, self.statistics.batch_columns, lengths)
        if len(entries) == 0:
            return
        found = set(entries[:, 2].tolist())
        if found - set(used):  # values at earlier hooks were not copied: run this batch again, reading only
            self.dims.extend(sorted(found - set(self.dims)))
            used = tuple(self.dims)
            hooks, columns = self._capture(used)
            plan = BatchPlan(batches=[batch], n_inputs=int(batch.tokens.shape[0]), prepend_bos=None)
            measure(self.model, plan, UserHooks(hooks), progress=False)
            self.reruns += 1
        if any(c is None for c in columns):
            raise RuntimeError("A followed hook did not fire in this forward pass: the model never reached it.")
        column = torch.tensor([used.index(d) for d in entries[:, 2].tolist()], dtype=torch.long)
        stacked = torch.stack([c.cpu() for c in columns if c is not None])  # [hook, batch, pos, n_dims]
        self._values.append(stacked[:, entries[:, 0], entries[:, 1], column].T.contiguous())
        self._keys += [(batch.input_index(r), p, d) for r, p, d in entries.tolist()]

    def found(self, stacklevel: int = 1) -> MassiveActivations:
        """The scan's massive records under the criterion (made once; ``stacklevel`` as
        :func:`warnings.warn` counts, for their warnings)."""
        if self._found is None:
            self._found = self.criterion.find(self.statistics.result(), delimiters=self.delimiters,
                                              stacklevel=stacklevel + 1)
        return self._found

    def result(self) -> tuple[ValueStat, ...]:
        """The profile's value statistics of the massive entries the scan found."""
        return self.value_stats(self.statistics.result(), self.found(stacklevel=2))

    def value_stats(self, result: ScanResult, found: MassiveActivations) -> tuple[ValueStat, ...]:
        """The value statistics of the entries ``found`` in ``result`` (the scan made in the same pass)."""
        if len(found) == 0:
            return ()
        followed = _Followed.of(found)
        where = {key: j for j, key in enumerate(self._keys)}
        rows, keys = [], []
        for i in sorted(followed.per_input):
            for p, d, key in followed.per_input[i]:
                j = where.get((i, p, d))
                if j is None:
                    raise RuntimeError(
                        f"Massive entry (input {i}, position {p}, dim {d}) was not followed in the scan's "
                        "pass; profile(..., scan_result=scan(...)) measures it in a second pass."
                    )
                rows.append(j)
                keys.append(key)
        values = torch.cat(self._values)[torch.tensor(rows, dtype=torch.long)].double()  # [entries, hooks]
        sums = torch.zeros(len(result.hook_names), 3, followed.n_keys, dtype=torch.float64)
        index = torch.tensor(keys, dtype=torch.long)
        for h in range(len(result.hook_names)):
            _add(sums, h, index, values[:, h].contiguous())
        return followed.stats(sums, result)
