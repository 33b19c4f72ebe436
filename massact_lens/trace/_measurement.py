"""The measurement behind :func:`~massact_lens.trace.writers.lineage`: where each target
first turns massive, and running sums per (target, writing block).

:class:`FirstWriters` is one :class:`~massact_lens._core.loop.Measurement`: for every
batch it hooks the blocks ``0..L`` (a fresh :class:`_BatchTrace` per batch reads the
entries and decides where they cross the criterion), and its result is a
:class:`WriterSums`, a few numbers and ``d_mlp`` vectors per target and writing block,
whatever the number of inputs.

>>> import torch
>>> from massact_lens.examples import tiny_model
>>> from massact_lens.find.criterion import Criterion
>>> from massact_lens._core.batching import plan_batches
>>> from massact_lens._core.loop import measure
>>> model = tiny_model()
>>> writers = FirstWriters(model, ((3, "start"),), Criterion(100, 1000), frozenset("."), n_layers=2)
>>> measure(model, plan_batches(model, torch.ones(2, 5, dtype=torch.long)), writers, progress=False)
2
>>> writers.result().stats          # a random model: nothing massive, no writing block
{}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Bool
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.batching import Batch, token_strings
from massact_lens._core.hook_names import attention_hook, mlp_hook, residual_hook_names
from massact_lens._core.statistics import hidden_state_medians
from massact_lens._core.types import HookList
from massact_lens.find.criterion import TOKEN_KINDS, Criterion, token_kind

#: Layer reported for an entry that is already massive in the embedding output.
EMBEDDING = -1

# Columns of the per-(layer) sums, one row per target (dim, kind).
COUNT, INPUTS, BEFORE, AFTER, MEDIAN, ATTN, MLP = range(7)


def block_hook_names(model: TransformerLensModel, layer: int) -> tuple[str, ...]:
    """Residual before the block, attention write, MLP hidden, MLP write, the block's residual points."""
    return (
        attention_hook("resid_pre", layer),
        attention_hook("o_out", layer),
        mlp_hook("hidden", layer),
        mlp_hook("out", layer),
        *residual_hook_names(model, [layer]),
    )


class WriterSums:
    """Corpus-level sums per writing layer: a few numbers and d_mlp vectors per target."""

    def __init__(self, n_targets: int) -> None:
        self.n_targets = n_targets
        self.stats: dict[int, torch.Tensor] = {}  # layer -> [targets, 7] float64
        self.hidden: dict[int, torch.Tensor] = {}  # layer -> [targets, d_mlp], sum at the positions
        self.other: dict[int, torch.Tensor] = {}  # layer -> [targets, d_mlp], sum elsewhere
        self.other_count: dict[int, torch.Tensor] = {}  # layer -> [targets]
        self.other_absmax: dict[int, torch.Tensor] = {}  # layer -> [targets, d_mlp]

    def add_block(
        self,
        layer: int,
        new: Bool[torch.Tensor, "batch pos targets"],
        real: Bool[torch.Tensor, "batch pos"],
        columns: dict[int, torch.Tensor],
        hidden: torch.Tensor | None,
    ) -> None:
        """Fold in the positions ``new`` that first turn massive in ``layer``: the ``columns``
        read there (per position, or per input for the medians) and the MLP ``hidden`` state."""
        b, p, t = new.nonzero(as_tuple=True)
        stats = self.stats.setdefault(layer, torch.zeros(self.n_targets, 7, dtype=torch.float64))
        t_cpu = t.cpu()
        stats[:, COUNT].index_add_(0, t_cpu, torch.ones(len(t_cpu), dtype=torch.float64))
        stats[:, INPUTS] += new.any(dim=1).sum(dim=0).double().cpu()
        for column, values in columns.items():
            picked = values[b] if values.ndim == 1 else values[b, p, t]  # medians: per input
            stats[:, column].index_add_(0, t_cpu, picked.double().cpu())
        if hidden is not None:
            self._add_hidden(layer, new, real, hidden.float(), (b, p, t_cpu))

    def _add_hidden(
        self,
        layer: int,
        new: Bool[torch.Tensor, "batch pos targets"],
        real: Bool[torch.Tensor, "batch pos"],
        h: torch.Tensor,
        where: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> None:
        b, p, t_cpu = where
        zeros = torch.zeros(self.n_targets, h.shape[-1], dtype=torch.float64)
        self.hidden.setdefault(layer, zeros.clone()).index_add_(0, t_cpu, h[b, p].double().cpu())
        has = new.any(dim=1)  # [batch, targets]
        other = real[:, :, None] & has[:, None, :] & ~new  # [batch, pos, targets]
        weights = other.to(h.dtype)
        self.other.setdefault(layer, zeros.clone()).add_(torch.einsum("bpt,bpd->td", weights, h).double().cpu())
        count = self.other_count.setdefault(layer, torch.zeros(self.n_targets, dtype=torch.float64))
        count += other.sum(dim=(0, 1)).double().cpu()
        absmax = self.other_absmax.setdefault(layer, zeros.clone())
        magnitude = h.abs()
        for target in has.any(dim=0).nonzero()[:, 0].tolist():
            rows = magnitude[other[:, :, target]]
            if rows.shape[0]:
                absmax[target] = torch.maximum(absmax[target], rows.amax(dim=0).double().cpu())


Hook = Callable[[torch.Tensor, Any], None]


class _BatchTrace:
    """The hooks of one batch: read each block's entries, decide where they first turn massive."""

    def __init__(
        self,
        sums: WriterSums,
        real: Bool[torch.Tensor, "batch pos"],
        match: Bool[torch.Tensor, "batch pos targets"],
        dims: torch.Tensor,
        criterion: Criterion,
    ) -> None:
        self.sums, self.real, self.match, self.dims, self.criterion = sums, real, match, dims, criterion
        self.crossed = torch.zeros_like(match)
        self.new = torch.zeros_like(match)
        self.read: dict[str, torch.Tensor] = {}
        self.hidden: torch.Tensor | None = None

    def _massive(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        medians = hidden_state_medians(x, self.real).to(x.device)
        values = x[..., self.dims].float()
        massive = self.criterion.passes(values.abs(), medians[:, None, None])
        return values, medians, massive & self.match

    def before(self, layer: int) -> Hook:
        def read(x: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            x = x.detach()
            self.read["before"] = x[..., self.dims].float()
            if layer == 0:  # the embedding output: massive before any block writes
                values, medians, massive = self._massive(x)
                if bool(massive.any()):
                    nan = torch.full_like(values, float("nan"))
                    columns = {BEFORE: nan, AFTER: values, MEDIAN: medians, ATTN: nan, MLP: nan}
                    self.sums.add_block(EMBEDDING, massive, self.real, columns, None)
                self.crossed |= massive

        return read

    def keep(self, key: str) -> Hook:
        def read(x: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            self.read[key] = x.detach()[..., self.dims].float()

        return read

    def keep_hidden(self, x: torch.Tensor, hook: Any) -> None:  # noqa: ARG002
        self.hidden = x.detach()

    def residual(self, layer: int, last: bool) -> Hook:
        def read(x: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            values, medians, massive = self._massive(x.detach())
            self.new |= massive & ~self.crossed
            self.crossed |= massive
            if not last:
                return
            if bool(self.new.any()):
                columns = {
                    BEFORE: self.read["before"],
                    AFTER: values,
                    MEDIAN: medians,
                    ATTN: self.read["attention"],
                    MLP: self.read["mlp"],
                }
                self.sums.add_block(layer, self.new, self.real, columns, self.hidden)
                self.new.zero_()
            self.read.clear()
            self.hidden = None

        return read

    def hooks(self, model: TransformerLensModel, n_layers: int) -> HookList:
        """Every hook of the pass, blocks ``0..n_layers-1`` in forward order."""
        hooks: HookList = []
        for layer in range(n_layers):
            before, attention, hidden, mlp, *points = block_hook_names(model, layer)
            hooks += [
                (before, self.before(layer)),
                (attention, self.keep("attention")),
                (hidden, self.keep_hidden),
                (mlp, self.keep("mlp")),
            ]
            hooks += [(name, self.residual(layer, last=i == len(points) - 1)) for i, name in enumerate(points)]
        return hooks


def _position_kinds(
    model: TransformerLensModel, tokens: torch.Tensor, delimiters: frozenset[str], cache: dict[int, int]
) -> torch.Tensor:
    """Token kind index (TOKEN_KINDS) of every position: start at 0, else delimiter / other."""
    ids = tokens.flatten().tolist()
    unknown = {i for i in ids if i not in cache}
    if unknown:
        for i, text in token_strings(model, unknown).items():
            cache[i] = TOKEN_KINDS.index(token_kind(1, text, delimiters))
    kinds = torch.tensor([cache[i] for i in ids], dtype=torch.long).reshape(tokens.shape)
    kinds[:, 0] = TOKEN_KINDS.index("start")
    return kinds


class FirstWriters:
    """Where each target (dim, token kind) first passes ``criterion`` over blocks
    ``0..n_layers-1``, and the sums of what that block wrote there (a measurement).

    The running sums depend on the order of the inputs only in float64 rounding, so
    the plan may run them longest first.
    """

    reads_input_index = True
    needs_output = False

    def __init__(
        self,
        model: TransformerLensModel,
        targets: Sequence[tuple[int, str]],
        criterion: Criterion,
        delimiters: frozenset[str],
        n_layers: int,
    ) -> None:
        self.model, self.criterion, self.delimiters, self.n_layers = model, criterion, delimiters, n_layers
        self.device = getattr(model.cfg, "device", None) or "cpu"
        self.dims = torch.tensor([d for d, _ in targets], dtype=torch.long)
        self.kinds = torch.tensor([TOKEN_KINDS.index(k) for _, k in targets], dtype=torch.long)
        self.sums = WriterSums(len(targets))
        self.kind_cache: dict[int, int] = {}

    def hooks(self, batch: Batch) -> HookList:
        real = batch.attention_mask.bool()
        position_kinds = _position_kinds(self.model, batch.tokens, self.delimiters, self.kind_cache)
        match = real[:, :, None] & (position_kinds[:, :, None] == self.kinds)
        trace = _BatchTrace(
            self.sums, real.to(self.device), match.to(self.device), self.dims.to(self.device), self.criterion
        )
        return trace.hooks(self.model, self.n_layers)

    def update(self, batch: Batch, output: torch.Tensor | None) -> None:
        pass  # the last residual hook of each batch folds it into the sums

    def result(self) -> WriterSums:
        return self.sums
