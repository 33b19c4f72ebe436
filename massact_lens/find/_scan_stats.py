"""The scan's statistics as a :class:`~massact_lens._core.loop.Measurement`: one reader per hook point.

Each reader copies its hidden state (float32, as the statistics read it) into a group
of at most :data:`GROUP_BYTES`, whose statistics are one
:func:`~massact_lens._core.statistics.grouped_stats` call (a hidden state too large to
share a group is computed at once, with no copy). They stay on the model's device
until the batch's forward pass is over; :meth:`ScanStatistics.update` then moves the
batch's statistics to the host in one transfer per field (no sync per hook) and keeps
them as :attr:`ScanStatistics.batch_stats`, where a measurement that runs after it in
the same pass reads them (:class:`~massact_lens.find.profile_values.CandidateValues`).

>>> import torch
>>> from massact_lens.examples import tiny_model
>>> from massact_lens._core.loop import measure
>>> statistics, plan = scan_plan(tiny_model(), torch.randint(0, 64, (3, 8)), top_k=4)
>>> measure(tiny_model(), plan, statistics, progress=False)
3
>>> statistics.result().values.shape, tuple(statistics.batch_stats[0].shape)  # the last batch's values
(torch.Size([3, 2, 4]), (3, 2, 4))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._fingerprint import weights_fingerprint
from massact_lens._core.batching import Batch, BatchPlan, plan_batches, token_strings
from massact_lens._core.hook_names import HookSelection, layer_of, resolve_hook_names
from massact_lens._core.statistics import HiddenStateStats, RealLayout, grouped_stats
from massact_lens._core.types import HookList, Inputs, Provenance, model_device, warn_if_processed
from massact_lens.find.scan_result import ScanResult, check_range

__all__ = ["GROUP_BYTES", "ScanStatistics", "check_top_k", "scan_plan"]

#: Hidden states of one batch whose statistics are computed in one call, up to this
#: many bytes (float32 copies): a few hooks of a short batch (MiniLM, 16 inputs of 13
#: tokens: 4 of its 12), one at a time for long inputs. The statistics work in the
#: copy itself, so at most one group exists beyond the forward pass's own memory:
#: bigger groups would save little more Python and cost more than the short forward
#: pass's own peak (7.9 MiB above baseline there).
GROUP_BYTES = 2 << 20

#: A batch's statistics on the host: values, positions, dims, token_ids
#: ``[batch, hook, k]``, medians and nonfinite ``[batch, hook]`` (the column medians
#: of the entries are kept apart: :attr:`ScanStatistics.batch_columns`).
BatchStats = tuple[torch.Tensor, ...]


class _BatchRun:
    """One batch's readers: each hook copies its hidden state into the current group; a
    full group goes to :func:`grouped_stats` at once."""

    def __init__(self, batch: Batch, n_hooks: int, top_k: int, device: torch.device | None) -> None:
        self.n_hooks, self.top_k = n_hooks, top_k
        self.tokens = batch.tokens.to(device) if device is not None else batch.tokens
        self.layout = RealLayout.of(batch.attention_mask.cpu().bool())  # on the host, once per batch
        self.mask = batch.attention_mask.to(self.tokens.device).bool()
        self.fired: set[int] = set()
        self.members: list[list[int]] = []  # hook indices of each group computed, in order
        self.parts: list[HiddenStateStats] = []
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
        if self._buffer is not None and tuple(self._buffer.shape[1:]) != tuple(x.shape):
            self._compute_buffer()
        if self._buffer is None:
            left = self.n_hooks - len(self.fired) + 1
            slots = max(1, min(left, GROUP_BYTES // max(1, x.numel() * 4)))
            if slots == 1:  # computed now: no copy needed
                self._compute(x[None], [index], overwrite=False)
                return
            self._buffer = torch.empty((slots, *x.shape), dtype=torch.float32, device=x.device)
        # A copy now: later layers or hooks may write into x before the statistics run.
        self._buffer[len(self._filled)].copy_(x)
        self._filled.append(index)
        if len(self._filled) == self._buffer.shape[0]:
            self._compute_buffer()

    def _compute_buffer(self) -> None:
        if self._buffer is not None:
            states, members = self._buffer[: len(self._filled)], self._filled
            self._buffer, self._filled = None, []
            self._compute(states, members, overwrite=True)

    def _compute(self, states: torch.Tensor, members: list[int], overwrite: bool) -> None:
        self.members.append(members)
        self.parts.append(grouped_stats(states, self.mask.to(states.device), self.top_k, self.layout, overwrite))

    def finish(self) -> BatchStats:
        """The forward pass is over: every hook must have fired; the batch's statistics on the
        host (:data:`BatchStats`, then the column medians ``[batch, hook, k]``)."""
        missing = sorted(set(range(self.n_hooks)) - self.fired)
        if missing:
            raise RuntimeError(
                f"Hook(s) {missing} did not fire in this forward pass: the model never reached them. "
                "Check the hook names against model.hook_dict."
            )
        self._compute_buffer()
        parts = self.parts
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
        fields = (stacked("values"), positions, stacked("dims"), token_ids, stacked("medians"), stacked("nonfinite"),
                  stacked("column_medians"))
        return tuple(f.contiguous().cpu() for f in fields)


class ScanStatistics:
    """The scan as a :class:`~massact_lens._core.loop.Measurement`: per batch, one reader
    per hook point; :meth:`update` folds the batch's statistics in (and keeps them as
    :attr:`batch_stats` for a measurement after it in the same pass); :meth:`result` is
    the :class:`ScanResult`, in the order the inputs were given whatever the batches' order."""

    reads_input_index = True  # rows are named by Batch.input_index: the plan may run longest first
    needs_output = False

    def __init__(self, model: TransformerLensModel, hook_names: Sequence[str], top_k: int,
                 prepend_bos: bool | None) -> None:
        self.model = model
        self.hook_names = tuple(hook_names)
        self.top_k = top_k
        self.prepend_bos = prepend_bos
        self.device = model_device(model)
        self.batch_stats: BatchStats = ()
        #: The last batch's column medians ``[batch, hook, k]`` (see :class:`ScanResult`).
        self.batch_columns: torch.Tensor | None = None
        self._run: _BatchRun | None = None
        self._host: list[BatchStats] = []
        self._lengths: list[torch.Tensor] = []
        self._rows: list[int] = []  # the input index of every row so far, in run order
        self._result: ScanResult | None = None

    def hooks(self, batch: Batch) -> HookList:
        self._run = _BatchRun(batch, len(self.hook_names), self.top_k, self.device)
        return [(name, self._run.reader(i)) for i, name in enumerate(self.hook_names)]

    def update(self, batch: Batch, output: torch.Tensor | None) -> None:  # noqa: ARG002
        run, self._run = self._run, None
        if run is None:
            raise RuntimeError("update() before hooks(): the batch's readers were never attached.")
        *stats, self.batch_columns = run.finish()
        self.batch_stats = tuple(stats)
        self._host.append((*self.batch_stats, self.batch_columns))
        self._lengths.append(torch.tensor(run.layout.counts, dtype=torch.long))
        self._rows += batch.input_indices

    def _input_order(self) -> torch.Tensor | None:
        """The rows' input indices when the batches ran out of order (None: in order)."""
        rows = self._rows
        if rows == list(range(len(rows))):
            return None
        if sorted(rows) != list(range(len(rows))):
            missing = sorted(set(range(len(rows))) - set(rows))
            raise RuntimeError(
                f"The batches did not hold every input exactly once (inputs {missing[:5]} missing): the "
                "indices of a plan's batches must be a permutation of its inputs."
            )
        return torch.tensor(rows, dtype=torch.long)

    def result(self) -> ScanResult:
        """The :class:`ScanResult` of every batch so far (made once)."""
        if self._result is not None:
            return self._result
        if not self._host:
            raise ValueError("The inputs were empty: nothing was scanned. Pass at least one input.")
        order = self._input_order()

        def in_input_order(rows: torch.Tensor) -> torch.Tensor:
            if order is None:
                return rows
            out = torch.empty_like(rows)
            out[order] = rows
            return out

        values, positions, dims, token_ids, medians, nonfinite, columns = (
            in_input_order(torch.cat([part[i] for part in self._host])) for i in range(7)
        )
        seen = token_ids.flatten()
        self._result = ScanResult(
            provenance=Provenance.of(self.model), layers=tuple(layer_of(n) for n in self.hook_names),
            n_inputs=int(values.shape[0]), hook_names=self.hook_names, prepend_bos=self.prepend_bos,
            top_k=self.top_k, values=values, positions=positions, dims=dims, token_ids=token_ids, medians=medians,
            lengths=in_input_order(torch.cat(self._lengths)), nonfinite=nonfinite, column_medians=columns,
            tokens=token_strings(self.model, seen[seen >= 0].unique().tolist()),  # unique first: 30k ids, 4 ms of Python
            weights=weights_fingerprint(self.model),
        )
        return self._result

    def checked_result(self, stacklevel: int) -> ScanResult:
        """:meth:`result`, warning about non-finite states and the dtype's range (``stacklevel``
        1: at the caller's line, 2: at its caller's, as :func:`warnings.warn` counts)."""
        result = self.result()
        result.warn_nonfinite(stacklevel=stacklevel + 2)
        check_range(result, stacklevel=stacklevel + 2)
        return result


def check_top_k(model: TransformerLensModel, top_k: Any) -> int:
    """``top_k`` as given; ValueError unless a positive integer a hidden state can hold."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, not {top_k!r}.")
    most = int(model.cfg.n_ctx) * int(model.cfg.d_model)
    if top_k > most:
        raise ValueError(
            f"top_k={top_k:,} is more than a hidden state holds (n_ctx x d_model = {most:,}); "
            "the paper's few massive entries need top_k of 10 or so."
        )
    return top_k


def scan_plan(
    model: TransformerLensModel,
    inputs: Inputs,
    *,
    hooks: HookSelection | None = None,
    layers: Sequence[int] | None = None,
    top_k: int = 10,
    batch_size: int = 16,
    prepend_bos: bool | None = None,
    attention_mask: torch.Tensor | None = None,
    by_length: bool = True,
) -> tuple[ScanStatistics, BatchPlan]:
    """The checked arguments of a scan as its measurement and its batches (longest first
    unless ``by_length=False``): every check before any forward pass."""
    check_top_k(model, top_k)
    names = resolve_hook_names(model, hooks, layers)
    plan = plan_batches(
        model, inputs, batch_size=batch_size, attention_mask=attention_mask, prepend_bos=prepend_bos, by_length=by_length
    )
    warn_if_processed(model)
    return ScanStatistics(model, names, top_k, plan.prepend_bos), plan
