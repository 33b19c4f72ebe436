"""Streaming per-layer statistics of hidden states: top-k entries and medians.

Background
----------
Sun et al. (2024) find massive activations by looking, per layer, at the largest
magnitudes of a hidden state next to its median magnitude (their layer-wise
top-1/2/3 vs median plot). :func:`scan` computes exactly that in one forward pass
per batch, reading each hidden state inside a hook and keeping only

* the ``top_k`` largest ``|activation|`` entries of each (input, hook): signed
  value, position, feature dim, token id;
* the median ``|activation|`` of that hidden state, over its real (non-padding)
  positions and all dims, as the paper defines it (``torch.median``: for an even
  count the lower of the two middle values);
* the input's length.

That is ``O(n_hooks x top_k)`` numbers per input and never a cache of
``[pos, d_model]`` tensors: 10,000 inputs over 12 hooks with ``top_k=10`` keep
about 12 MB. Statistics are computed in float32 whatever the model dtype.

Usage
-----
>>> from massact_lens import scan
>>> from massact_lens.examples import tiny_model
>>> import torch
>>> result = scan(tiny_model(), torch.randint(0, 64, (3, 8)), progress=False)
>>> result.values.shape   # inputs x hooks x top_k
torch.Size([3, 2, 10])
>>> list(result.layer_stats().columns)[:6]
['layer', 'hook_name', 'top1', 'top2', 'top3', 'median']
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.types import HookList, Inputs, Provenance, model_device
from massact_lens._core.batching import Batch, last_block_hook, plan_batches, run_batches, token_strings
from massact_lens._core.hook_names import layer_of, resolve_hook_names
from massact_lens._core.types import warn_if_processed
from massact_lens._core.overlap import Beside, spare_core
from massact_lens._core.statistics import (
    HiddenStateStats,
    RealLayout,
    grouped_stats,
    hidden_state_medians,
)

__all__ = ["BatchFollower", "ScanResult", "hidden_state_medians", "scan"]  # hidden_state_medians: see statistics


@dataclass(frozen=True)
class ScanResult:
    """The top-k entries and medians of every (input, hook) hidden state.

    Attributes:
        provenance: the model as it was measured (:class:`massact_lens.Provenance`).
        hook_names: the hook points read, in forward order; ``layers`` their blocks.
        prepend_bos: BOS prepended to strings (None: token tensors used as given).
        values: signed values of the top-k ``|x|`` entries, ``[input, hook, k]``
            (NaN where a hidden state has fewer than k entries).
        positions, dims, token_ids: where each entry sits (-1 for NaN entries).
        medians: median ``|x|`` of each hidden state, ``[input, hook]``.
        lengths: real tokens per input.
        first_token_ids: the token at position 0 of each input.
        tokens: id -> readable string, for the ids that appear in the entries.
        nonfinite: ``[input, hook]``, True where the hidden state held a NaN or an
            infinite entry: its median is NaN and :func:`find_massive` and
            :meth:`layer_stats` leave it out, saying so.
    """

    provenance: Provenance
    hook_names: tuple[str, ...]
    layers: tuple[int, ...]
    prepend_bos: bool | None
    top_k: int
    values: Float[torch.Tensor, "n_inputs n_hooks k"]
    positions: Int[torch.Tensor, "n_inputs n_hooks k"]  # int32, like dims and token_ids
    dims: Int[torch.Tensor, "n_inputs n_hooks k"]
    token_ids: Int[torch.Tensor, "n_inputs n_hooks k"]
    medians: Float[torch.Tensor, "n_inputs n_hooks"]
    lengths: Int[torch.Tensor, " n_inputs"]
    tokens: dict[int, str] = field(repr=False)
    nonfinite: Bool[torch.Tensor, "n_inputs n_hooks"] | None = None

    @property
    def n_inputs(self) -> int:
        return int(self.values.shape[0])


    @classmethod
    def merge(cls, parts: Sequence[ScanResult]) -> ScanResult:
        """One result from scans of consecutive slices of a corpus, in order.

        Exactly the result one scan of the concatenated inputs gives (input ``i`` of
        part ``j`` becomes input ``sum(n_inputs of parts before j) + i``). The parts
        must come from the same model, hooks, top_k and BOS setting (ValueError
        otherwise); parts with no input (empty shards) are allowed.

        >>> import torch
        >>> from massact_lens.examples import tiny_model
        >>> model = tiny_model()
        >>> tokens = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(0))
        >>> parts = [scan(model, tokens[:1], progress=False), scan(model, tokens[1:], progress=False)]
        >>> merged, whole = ScanResult.merge(parts), scan(model, tokens, progress=False)
        >>> merged.n_inputs, torch.allclose(merged.values, whole.values, atol=1e-6)  # batch shapes round apart
        (4, True)
        """
        parts = list(parts)
        if not parts:
            raise ValueError("ScanResult.merge needs at least one result.")
        first = parts[0]
        for i, part in enumerate(parts[1:], 1):
            if not isinstance(part, ScanResult):
                raise TypeError(f"Part {i} is a {type(part).__name__}, not a ScanResult.")
            first.provenance.check_same(part.provenance, f"Scan results 0 and {i}")
            for name in ("hook_names", "top_k", "prepend_bos"):
                if getattr(part, name) != getattr(first, name):
                    raise ValueError(
                        f"Scan results 0 and {i} differ in {name} ({getattr(first, name)!r} != "
                        f"{getattr(part, name)!r}): scan every slice with the same settings."
                    )

        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(p, name) for p in parts])

        tokens: dict[int, str] = {}
        for part in parts:
            tokens.update(part.tokens)
        nonfinite = torch.cat(
            [p.nonfinite if p.nonfinite is not None else torch.zeros(p.medians.shape, dtype=torch.bool) for p in parts]
        )
        return cls(
            provenance=first.provenance,
            hook_names=first.hook_names,
            layers=first.layers,
            prepend_bos=first.prepend_bos,
            top_k=first.top_k,
            values=cat("values"),
            positions=cat("positions"),
            dims=cat("dims"),
            token_ids=cat("token_ids"),
            medians=cat("medians"),
            lengths=cat("lengths"),
            tokens=tokens,
            nonfinite=nonfinite,
        )

    @classmethod
    def empty(
        cls, provenance: Provenance, hook_names: Sequence[str], top_k: int, prepend_bos: bool | None
    ) -> ScanResult:
        """A result of no input (what a rank with an empty shard contributes to a merge)."""
        n_hooks = len(hook_names)
        ints = torch.zeros(0, n_hooks, top_k, dtype=torch.int32)
        return cls(
            provenance=provenance,
            hook_names=tuple(hook_names),
            layers=tuple(layer_of(n) for n in hook_names),
            prepend_bos=prepend_bos,
            top_k=top_k,
            values=torch.zeros(0, n_hooks, top_k),
            positions=ints,
            dims=ints.clone(),
            token_ids=ints.clone(),
            medians=torch.zeros(0, n_hooks),
            lengths=torch.zeros(0, dtype=torch.long),
            tokens={},
            nonfinite=torch.zeros(0, n_hooks, dtype=torch.bool),
        )

    def nonfinite_states(self) -> list[tuple[int, str]]:
        """(input index, hook name) of every hidden state that held a NaN or inf."""
        if self.nonfinite is None:
            return []
        return [(int(i), self.hook_names[int(h)]) for i, h in self.nonfinite.nonzero().tolist()]

    def warn_nonfinite(self, stacklevel: int = 2) -> None:
        """Warn (``RuntimeWarning``) when some hidden state held a NaN or inf."""
        bad = self.nonfinite_states()
        if bad:
            shown = ", ".join(f"input {i} at {h}" for i, h in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            warnings.warn(
                f"{len(bad)} hidden state(s) held NaN or infinite values ({shown}{more}): their "
                "medians are NaN and find_massive / layer_stats leave them out. Check the "
                "model's dtype and any hook that runs before these points.",
                RuntimeWarning,
                stacklevel=stacklevel,
            )

    def token(self, token_id: int) -> str:
        """The readable string of a token id seen in the entries."""
        return self.tokens.get(int(token_id), str(int(token_id)))

    def layer_stats(self) -> pd.DataFrame:
        """The paper's layer-wise plot data: per hook, top-1/2/3 ``|x|`` and median.

        Each column is the mean over inputs; ``ratio`` is the mean of top1/median,
        ``top1_std`` the spread of top-1 across inputs. Hidden states that held a NaN
        or inf are left out: ``n_inputs`` counts those used, ``n_nonfinite`` the others.
        """
        bad = self.nonfinite if self.nonfinite is not None else torch.zeros(self.medians.shape, dtype=torch.bool)
        mags = self.values.abs().masked_fill(bad[..., None], float("nan"))
        rows = []
        for h, name in enumerate(self.hook_names):
            top = [mags[:, h, i] if i < self.top_k else torch.full_like(mags[:, h, 0], float("nan")) for i in range(3)]
            med = self.medians[:, h].masked_fill(bad[:, h], float("nan"))
            finite_top1 = top[0][~torch.isnan(top[0])]
            rows.append(
                {
                    "layer": self.layers[h],
                    "hook_name": name,
                    "top1": float(top[0].nanmean()),
                    "top2": float(top[1].nanmean()),
                    "top3": float(top[2].nanmean()),
                    "median": float(med.nanmean()),
                    "ratio": float((top[0] / med).nanmean()),
                    "top1_std": float(finite_top1.std()) if finite_top1.numel() > 1 else 0.0,
                    "n_inputs": self.n_inputs - int(bad[:, h].sum()),
                    "n_nonfinite": int(bad[:, h].sum()),
                }
            )
        return pd.DataFrame(rows)

    def to_dataframe(self) -> pd.DataFrame:
        """Every kept entry as a row: input, layer, hook, rank, position, token, dim, value, median, ratio."""
        n, h, k = self.values.shape
        keep = ~torch.isnan(self.values)
        idx = keep.nonzero()
        i, j, r = idx[:, 0], idx[:, 1], idx[:, 2]
        values = self.values[i, j, r]
        medians = self.medians[i, j]
        return pd.DataFrame(
            {
                "input_index": i.numpy(),
                "layer": [self.layers[x] for x in j.tolist()],
                "hook_name": [self.hook_names[x] for x in j.tolist()],
                "rank": r.numpy(),
                "position": self.positions[i, j, r].numpy(),
                "token": [self.token(t) for t in self.token_ids[i, j, r].tolist()],
                "dim": self.dims[i, j, r].numpy(),
                "value": values.numpy(),
                "median": medians.numpy(),
                "ratio": (values.abs() / medians).numpy(),
            }
        )


#: Hidden states of one batch whose statistics are computed in one call, up to this
#: many bytes (float32 copies): a few hooks of a short batch (MiniLM, 16 inputs of 13
#: tokens: 4 of its 12), one at a time for long inputs. The statistics work in the
#: copy itself, so at most two groups exist beyond the forward pass's own memory:
#: bigger groups would save little more Python and cost more than the short forward
#: pass's own peak (7.9 MiB above baseline there).
GROUP_BYTES = 2 << 20


class _BatchRun:
    """One batch's readers: each hook copies its hidden state into the current group;
    a full group goes to :func:`grouped_stats` (on the worker, or at once). The last
    group's call also assembles the batch's fields, so that the forward pass's thread
    only copies."""

    def __init__(self, batch: Batch, n_hooks: int, top_k: int, beside: Beside, device: torch.device | None) -> None:
        self.batch = batch
        self.n_hooks, self.top_k, self.beside = n_hooks, top_k, beside
        self.tokens = batch.tokens.to(device) if device is not None else batch.tokens
        self.layout = RealLayout.of(batch.attention_mask.cpu().bool())  # on the host, once per batch
        self.mask = batch.attention_mask.to(self.tokens.device).bool()
        self.fired: set[int] = set()
        self.members: list[list[int]] = []  # hook indices of each group sent, in order
        self.futures: list[Future[HiddenStateStats]] = []
        self.assembled: Future[tuple[torch.Tensor, ...]] | None = None
        self._buffer: torch.Tensor | None = None
        self._filled: list[int] = []

    def reader(self, index: int) -> Any:
        def read(activation: torch.Tensor, hook: Any = None) -> None:
            self.add(index, activation.detach(), getattr(hook, "name", None))

        return read

    def add(self, index: int, x: torch.Tensor, name: str | None) -> None:
        if index in self.fired:
            raise RuntimeError(
                f"Hook {name or index} fired twice in one forward pass: scan reads each hidden state "
                "once. Scan the two calls' hook points under their own names."
            )
        self.fired.add(index)
        last = len(self.fired) == self.n_hooks
        if self._buffer is not None and tuple(self._buffer.shape[1:]) != tuple(x.shape):
            self._send_buffer(last=False)
        if self._buffer is None:
            left = self.n_hooks - len(self.fired) + 1
            slots = max(1, min(left, GROUP_BYTES // max(1, x.numel() * 4)))
            if slots == 1 and not self.beside.enabled:  # computed now: no copy needed
                self._send(x[None], [index], overwrite=False, last=last)
                return
            self._buffer = torch.empty((slots, *x.shape), dtype=torch.float32, device=x.device)
        # A copy now: later layers or hooks may write into x before the statistics run.
        self._buffer[len(self._filled)].copy_(x)
        self._filled.append(index)
        if len(self._filled) == self._buffer.shape[0]:
            self._send_buffer(last=last)

    def _send_buffer(self, last: bool) -> None:
        if self._buffer is not None:
            states, members = self._buffer[: len(self._filled)], self._filled
            self._buffer, self._filled = None, []
            self._send(states, members, overwrite=True, last=last)

    def _send(self, states: torch.Tensor, members: list[int], overwrite: bool, last: bool) -> None:
        real = self.mask.to(states.device)
        self.members.append(members)
        if last:
            self.assembled = self.beside.submit(self._last_group, list(self.futures), states, real, overwrite)
        else:
            self.futures.append(self.beside.submit(grouped_stats, states, real, self.top_k, self.layout, overwrite))

    def _last_group(
        self, earlier: list[Future[HiddenStateStats]], states: torch.Tensor, real: torch.Tensor, overwrite: bool
    ) -> tuple[torch.Tensor, ...]:
        # The worker runs calls in order: the earlier groups are done.
        parts = [f.result() for f in earlier] + [grouped_stats(states, real, self.top_k, self.layout, overwrite)]
        return self._assemble(parts)

    def finish(self) -> None:
        """The forward pass is over: every hook must have fired; the last group is sent."""
        missing = sorted(set(range(self.n_hooks)) - self.fired)
        if missing:
            raise RuntimeError(
                f"Hook(s) {missing} did not fire in this forward pass: the model never reached them. "
                "Check the hook names against model.hook_dict."
            )
        self._send_buffer(last=True)

    def collect(self) -> tuple[torch.Tensor, ...]:
        """The batch's statistics on the host (waits for them): values, positions, dims,
        token_ids ``[batch, hook, k]``, medians and nonfinite ``[batch, hook]``."""
        if self.assembled is None:  # finish() raised, or was never called
            raise RuntimeError("collect() before the batch's last group was sent.")
        return self.assembled.result()

    def _assemble(self, parts: list[HiddenStateStats]) -> tuple[torch.Tensor, ...]:
        device = parts[0].values.device
        order = [i for members in self.members for i in members]
        where = torch.argsort(torch.tensor(order), stable=True).to(device)

        def stacked(field: str) -> torch.Tensor:  # [hook, batch, ...] in hook order -> [batch, hook, ...]
            joined = torch.cat([getattr(p, field).to(device) for p in parts])
            return joined[where].transpose(0, 1)

        positions = stacked("positions")
        tokens = self.tokens.to(device)
        token_ids = tokens.gather(1, positions.clamp(min=0).flatten(1).long()).view_as(positions)
        token_ids = token_ids.masked_fill(positions < 0, -1).to(torch.int32)
        fields = (stacked("values"), positions, stacked("dims"), token_ids, stacked("medians"), stacked("nonfinite"))
        return tuple(f.contiguous().cpu() for f in fields)


class _Collector:
    """Per-batch statistics of every hook, kept on the model's device until the batch's
    results are gathered, then moved to the host in one transfer per field (no sync
    per hook).

    Each hook copies its hidden state (float32, as the statistics read it) into a group
    (:data:`GROUP_BYTES`) whose statistics are computed in one call. Where a CPU core is
    spare (:func:`massact_lens._core.overlap.spare_core`) a worker thread computes them beside
    the forward pass, and a batch's results are gathered when the next batch has run
    (its last group overlaps that pass); the results are the same to the bit."""

    def __init__(
        self, n_hooks: int, top_k: int, device: torch.device | None, follower: BatchFollower | None = None
    ) -> None:
        self.n_hooks = n_hooks
        self.top_k = top_k
        self.follower = follower
        self.beside = Beside(enabled=spare_core(device))
        self.current: _BatchRun | None = None
        self.waiting: list[_BatchRun] = []
        self.host: list[tuple[torch.Tensor, ...]] = []
        self.lengths: list[torch.Tensor] = []
        self.rows: list[int] = []  # the input index of every row so far, in run order
        self.order: torch.Tensor | None = None  # set by flush(): rows' input indices, when out of order

    def start(self, batch: Batch, device: torch.device | None) -> list[Any]:
        """End the previous batch; return one reader per hook for ``batch``."""
        self._end_current()
        self._gather(keep=1 if self.beside.enabled else 0)
        self.current = _BatchRun(batch, self.n_hooks, self.top_k, self.beside, device)
        self.lengths.append(torch.tensor(self.current.layout.counts, dtype=torch.long))
        self.rows += batch.input_indices
        return [self.current.reader(i) for i in range(self.n_hooks)]

    def _end_current(self) -> None:
        if self.current is not None:
            run, self.current = self.current, None
            run.finish()
            self.waiting.append(run)

    def _gather(self, keep: int) -> None:
        while len(self.waiting) > keep:
            run = self.waiting.pop(0)
            self.host.append(run.collect())
            if self.follower is not None:
                self.follower.batch_done(run.batch, self.host[-1])

    def flush(self) -> None:
        """End the last batch and gather every result; note the input order of the rows."""
        self._end_current()
        self._gather(keep=0)
        if self.rows != list(range(len(self.rows))):
            if sorted(self.rows) != list(range(len(self.rows))):
                missing = sorted(set(range(len(self.rows))) - set(self.rows))
                raise RuntimeError(
                    f"The batches did not hold every input exactly once (inputs {missing[:5]} missing): the "
                    "indices of a plan's batches must be a permutation of its inputs."
                )
            self.order = torch.tensor(self.rows, dtype=torch.long)

    def in_input_order(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (one per input, in run order) in the order the inputs were given."""
        if self.order is None:
            return rows
        out = torch.empty_like(rows)
        out[self.order] = rows
        return out

    def stacked(self, field_index: int) -> torch.Tensor:
        return self.in_input_order(torch.cat([part[field_index] for part in self.host]))


@runtime_checkable
class BatchFollower(Protocol):
    """What :func:`scan` runs for its ``follower`` argument in its own pass, batch by batch.

    A batch's row ``r`` is input ``batch.input_index(r)``. A follower that names its rows
    so sets a class attribute ``reads_input_index = True``: the scan then batches longest
    first (see :func:`scan`'s ``by_length``); without it the batches come in input order,
    so that a follower written as ``batch.start + r`` stays right.
    """

    def hooks(self, batch: Batch) -> HookList:
        """Extra hooks for this batch's forward pass (they fire after the scan's readers)."""
        ...

    def batch_done(self, batch: Batch, stats: tuple[torch.Tensor, ...]) -> None:
        """The batch's statistics on the host: values, positions, dims, token_ids
        ``[batch, hook, k]``, medians and nonfinite ``[batch, hook]``. Called in batch
        order, once per batch, possibly after the next batch's forward pass (while the
        statistics run beside it), so keep per-batch state keyed by the batch."""
        ...


def scan(
    model: TransformerLensModel,
    inputs: Inputs,
    *,
    hooks: str | Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    top_k: int = 10,
    batch_size: int = 16,
    prepend_bos: bool | None = None,
    attention_mask: torch.Tensor | None = None,
    progress: bool = True,
    follower: BatchFollower | None = None,
    by_length: bool | None = None,
) -> ScanResult:
    """One streaming pass: the top-k ``|activation|`` entries and median per hidden state.

    Args:
        model: a TransformerBridge (raw weights: see :func:`massact_lens.load_model`).
        inputs: strings, a token tensor ``[batch, pos]``, or an iterable of batches
            (see :mod:`massact_lens._core.batching`).
        hooks: hook points to read; default the residual stream
            (:func:`massact_lens._core.hook_names.residual_hook_names`). ``{layer}``
            templates are expanded.
        layers: restrict to these layers.
        top_k: entries kept per hidden state. :func:`massact_lens.find_massive`
            warns when all k pass its criterion (raise top_k then).
        batch_size: inputs per forward pass; padding never enters a statistic.
        prepend_bos: for strings, put BOS / [CLS] first (None: model default).
            Recorded in the result.
        attention_mask: with a token tensor, 1 for real tokens, 0 for right padding.
        progress: show a tqdm bar over batches.
        follower: a :class:`BatchFollower` whose hooks run in the same forward
            passes and whose ``batch_done`` gets each batch's statistics: one-pass
            measurements that need the scan's findings (:func:`massact_lens.profile`).
            Its batches may hold inputs out of order: :meth:`Batch.input_index` names them.
        by_length: run the inputs longest first, in batches of similar length, so that
            little padding is computed (a list or a tensor as a whole, an iterable of
            batches within each of its items: see
            :func:`massact_lens._core.batching.plan_batches`). The result is in the order the
            inputs were given either way, with the same records: padding never enters a
            statistic, and only float32 rounding may differ with the batch's shape.
            ``None`` (default): longest first, unless a ``follower`` does not say it
            reads :meth:`Batch.input_index` (see :class:`BatchFollower`).

    Returns:
        A frozen :class:`ScanResult`.

    Raises:
        ValueError: empty input, an input longer than the context, an unknown hook
            or layer, ``top_k < 1``: all before any forward pass.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, not {top_k!r}.")
    most = int(model.cfg.n_ctx) * int(model.cfg.d_model)
    if top_k > most:
        raise ValueError(
            f"top_k={top_k:,} is more than a hidden state holds (n_ctx x d_model = {most:,}); "
            "the paper's few massive entries need top_k of 10 or so."
        )
    names = resolve_hook_names(model, hooks, layers)
    if by_length is None:
        by_length = follower is None or bool(getattr(follower, "reads_input_index", False))
    plan = plan_batches(
        model, inputs, batch_size=batch_size, attention_mask=attention_mask, prepend_bos=prepend_bos, by_length=by_length
    )
    warn_if_processed(model)
    device = model_device(model)
    collector = _Collector(len(names), top_k, device, follower)

    def make_hooks(batch: Batch) -> HookList:
        readers = list(zip(names, collector.start(batch, device), strict=True))
        return readers + list(follower.hooks(batch)) if follower is not None else readers

    try:
        run_batches(model, plan, make_hooks, progress=progress, desc="scan", stop_after=last_block_hook(names))
        collector.flush()
    finally:
        collector.beside.close()
    if not collector.host:
        raise ValueError("The inputs were empty: nothing was scanned. Pass at least one input.")
    token_ids = collector.stacked(3)
    seen = token_ids.flatten()
    result = ScanResult(
        provenance=Provenance.of(model),
        hook_names=names,
        layers=tuple(layer_of(n) for n in names),
        prepend_bos=plan.prepend_bos,
        top_k=top_k,
        values=collector.stacked(0),
        positions=collector.stacked(1),
        dims=collector.stacked(2),
        token_ids=token_ids,
        medians=collector.stacked(4),
        lengths=collector.in_input_order(torch.cat(collector.lengths)),
        tokens=token_strings(model, seen[seen >= 0].unique().tolist()),  # unique first: 30k ids make 4 ms of Python
        nonfinite=collector.stacked(5),
    )
    result.warn_nonfinite(stacklevel=3)
    from massact_lens.find.precision import check_range  # a leaf module that imports scan

    check_range(result, stacklevel=3)
    return result
