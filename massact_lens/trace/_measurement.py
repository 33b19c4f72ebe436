"""The measurement behind :func:`~massact_lens.trace.writers.lineage`: where each target
first turns massive, and running sums per (target, writing block).

:class:`FirstWriters` is one :class:`~massact_lens._core.loop.Measurement`: for every
batch it hooks the blocks ``0..L`` where the block model
(:func:`~massact_lens._core.blocks.block_model`) says the stream is read and the
writes enter it (a fresh :class:`_BatchTrace` per batch reads the entries and
decides where they cross the criterion), and its result is a :class:`WriterSums`, a
few numbers and ``d_mlp`` vectors per target and writing block, whatever the number
of inputs. An input whose hidden states hold a NaN or an infinite value is left out
of every sum and listed in ``FirstWriters.nonfinite`` (input, first hook, how many).

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
from massact_lens._core.blocks import BlockModel, block_model, norm_eps, norm_gain, rms_inverse
from massact_lens._core.hook_names import mlp_hook
from massact_lens._core.statistics import hidden_state_medians
from massact_lens._core.types import HookList
from massact_lens.find.criterion import TOKEN_KINDS, Criterion, token_kind

#: Layer reported for an entry that is already massive in the embedding output.
EMBEDDING = -1

# Columns of the per-(layer) sums, one row per target (dim, kind). CHANGE: what the
# block's residual sums changed at the entry (out - in, summed over the sums); *_RAW:
# the sublayer's output before its post-sublayer norm; *_SCALE: that norm's gain / rms at the dim.
COUNT, INPUTS, BEFORE, AFTER, MEDIAN, ATTN, MLP, CHANGE, ATTN_RAW, MLP_RAW, ATTN_SCALE, MLP_SCALE = range(12)
N_COLUMNS = 12
_SUBLAYERS = (("attention", ATTN, ATTN_RAW, ATTN_SCALE), ("mlp", MLP, MLP_RAW, MLP_SCALE))


def block_hook_names(model: TransformerLensModel, layer: int) -> tuple[str, ...]:
    """Every hook point lineage reads in one block: the block model's, and the MLP hidden state."""
    return (*block_model(model).hook_names(layer), mlp_hook("hidden", layer))


class WriterSums:
    """Corpus-level sums per writing layer: a few numbers and d_mlp vectors per target."""

    def __init__(self, n_targets: int) -> None:
        self.n_targets = n_targets
        self.stats: dict[int, torch.Tensor] = {}  # layer -> [targets, N_COLUMNS] float64
        self.hidden: dict[int, torch.Tensor] = {}  # layer -> [targets, d_mlp], sum at the positions
        self.scaled: dict[int, torch.Tensor] = {}  # the same, each position times the MLP norm's gain / rms
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
        scaled: bool = False,
    ) -> None:
        """Fold in the positions ``new`` that first turn massive in ``layer``: the ``columns``
        read there (per position, or per input for the medians) and the MLP ``hidden`` state
        (``scaled``: also times the MLP norm's gain / rms, column ``MLP_SCALE``)."""
        b, p, t = new.nonzero(as_tuple=True)
        stats = self.stats.setdefault(layer, torch.zeros(self.n_targets, N_COLUMNS, dtype=torch.float64))
        t_cpu = t.cpu()
        stats[:, COUNT].index_add_(0, t_cpu, torch.ones(len(t_cpu), dtype=torch.float64))
        stats[:, INPUTS] += new.any(dim=1).sum(dim=0).double().cpu()
        for column, values in columns.items():
            picked = values[b] if values.ndim == 1 else values[b, p, t]  # medians: per input
            stats[:, column].index_add_(0, t_cpu, picked.double().cpu())
        if hidden is not None:
            scale = columns[MLP_SCALE][b, p, t] if scaled else None
            self._add_hidden(layer, new, real, hidden.float(), (b, p, t_cpu), scale)

    def _add_hidden(
        self,
        layer: int,
        new: Bool[torch.Tensor, "batch pos targets"],
        real: Bool[torch.Tensor, "batch pos"],
        h: torch.Tensor,
        where: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        scale: torch.Tensor | None,
    ) -> None:
        b, p, t_cpu = where
        zeros = torch.zeros(self.n_targets, h.shape[-1], dtype=torch.float64)
        self.hidden.setdefault(layer, zeros.clone()).index_add_(0, t_cpu, h[b, p].double().cpu())
        if scale is not None:  # the MLP write passes a norm: channel x (gain / rms) at each position
            self.scaled.setdefault(layer, zeros.clone()).index_add_(0, t_cpu, (h[b, p] * scale[:, None].float()).double().cpu())
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
    """The hooks of one batch: read each block's entries, decide where they first turn massive.

    Folding waits for the end of the batch, so that an input with a non-finite value
    in any hidden state read is left out of every sum.
    """

    def __init__(self, owner: FirstWriters, real: Bool[torch.Tensor, "batch pos"],
                 match: Bool[torch.Tensor, "batch pos targets"], dims: torch.Tensor) -> None:
        self.owner, self.real, self.match, self.dims = owner, real, match, dims
        self.blocks: BlockModel = owner.blocks
        self.crossed = torch.zeros_like(match)
        self.new = torch.zeros_like(match)
        self.read: dict[str, torch.Tensor] = {}
        self.hidden: torch.Tensor | None = None
        self.pending: list[tuple[int, torch.Tensor, dict[int, torch.Tensor], torch.Tensor | None]] = []
        self.bad: dict[int, tuple[str, int]] = {}  # row -> (first hook, how many non-finite values)

    def _check_finite(self, name: str, x: torch.Tensor) -> None:
        counts = ((~torch.isfinite(x)) & self.real[:, :, None]).sum(dim=(1, 2))
        for row in counts.nonzero()[:, 0].tolist():
            self.bad.setdefault(row, (name, int(counts[row])))

    def _massive(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        medians = hidden_state_medians(x, self.real).to(x.device)
        values = x[..., self.dims].float()
        massive = self.owner.criterion.passes(values.abs(), medians[:, None, None])
        return values, medians, massive & self.match

    def keep(self, name: str, layer: int) -> Hook:
        """Keep the target dims of a hook point (and test the embedding output at block 0)."""
        def read(x: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            x = x.detach()
            self._check_finite(name, x)
            self.read[name] = x[..., self.dims].float()
            if layer == 0 and name == self.blocks.resid_pre(0):  # massive before any block writes
                values, medians, massive = self._massive(x)
                if bool(massive.any()):
                    nan = torch.full_like(values, float("nan"))
                    columns = {c: nan for c in range(BEFORE, N_COLUMNS) if c != MEDIAN}
                    self.pending.append((EMBEDDING, massive, {**columns, AFTER: values, MEDIAN: medians}, None))
                self.crossed |= massive

        return read

    def keep_norm_input(self, name: str, layer: int, norm: str) -> Hook:
        """Keep the target dims of a post-sublayer norm's input and its gain / rms there."""
        gain = norm_gain(self.owner.model, layer, norm, self.blocks.norm_offset)[self.dims.cpu()].to(self.dims.device)
        eps = norm_eps(self.owner.model, layer, norm)

        def read(x: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            x = x.detach()
            self._check_finite(name, x)
            self.read[name] = x[..., self.dims].float()
            self.read[name + "#scale"] = rms_inverse(x, eps) * gain  # [b, p, targets]

        return read

    def keep_hidden(self, name: str) -> Hook:
        def read(x: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            self._check_finite(name, x.detach())
            self.hidden = x.detach()

        return read

    def residual(self, layer: int, name: str, last: bool) -> Hook:
        def read(x: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            x = x.detach()
            self._check_finite(name, x)
            values, medians, massive = self._massive(x)
            self.read[name] = values
            self.new |= massive & ~self.crossed
            self.crossed |= massive
            if not last:
                return
            if bool(self.new.any()):
                self.pending.append((layer, self.new.clone(), self._columns(layer, values, medians), self.hidden))
                self.new.zero_()
            self.read.clear()
            self.hidden = None
            if layer == self.owner.n_layers - 1:
                self.flush()

        return read

    def _columns(self, layer: int, after: torch.Tensor, medians: torch.Tensor) -> dict[int, torch.Tensor]:
        blocks, read = self.blocks, self.read
        change = sum(read[out] - sum(read[n] for n in ins) for ins, _, out in blocks.segments(layer))
        columns = {BEFORE: read[blocks.resid_pre(layer)], AFTER: after, MEDIAN: medians, CHANGE: change}
        for sublayer, write, raw, inverse in _SUBLAYERS:
            columns[write] = read[blocks.write(sublayer, layer)]  # type: ignore[arg-type]
            norm = blocks.norm(sublayer)  # type: ignore[arg-type]
            if norm is None:
                columns[raw] = columns[write]
                columns[inverse] = torch.full_like(after, float("nan"))
            else:
                columns[raw] = read[f"blocks.{layer}.{norm}.hook_in"]
                columns[inverse] = read[f"blocks.{layer}.{norm}.hook_in#scale"]
        return columns

    def flush(self) -> None:
        """Fold the batch into the sums, without the inputs that held a non-finite value."""
        keep = torch.ones(self.real.shape[0], dtype=torch.bool, device=self.real.device)
        if self.bad:
            keep[list(self.bad)] = False
        for layer, new, columns, hidden in self.pending:
            new = new & keep[:, None, None]
            if bool(new.any()):
                self.owner.sums.add_block(layer, new, self.real, columns, hidden, scaled=self.blocks.norm("mlp") is not None)
        self.pending.clear()
        self.owner.report(self.bad)

    def hooks(self, n_layers: int) -> HookList:
        """Every hook of the pass, blocks ``0..n_layers-1``; the last residual sum of each block last."""
        hooks: HookList = []
        blocks = self.blocks
        for layer in range(n_layers):
            segments = blocks.segments(layer)
            outs = [out for _, _, out in segments]
            norms = {f"blocks.{layer}.{n}.hook_in": n for n in (blocks.norm("attention"), blocks.norm("mlp")) if n}
            for name in blocks.hook_names(layer):
                if name in outs:
                    hooks.append((name, self.residual(layer, name, last=name == outs[-1])))
                elif name in norms:
                    hooks.append((name, self.keep_norm_input(name, layer, norms[name])))
                else:
                    hooks.append((name, self.keep(name, layer)))
            hooks.append((mlp_hook("hidden", layer), self.keep_hidden(mlp_hook("hidden", layer))))
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
    the plan may run them longest first. ``nonfinite`` maps each input left out (a NaN
    or infinite value in a hidden state read) to the first hook where it was seen and
    how many such values that hook held.
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
        self.blocks = block_model(model)
        self.device = getattr(model.cfg, "device", None) or "cpu"
        self.dims = torch.tensor([d for d, _ in targets], dtype=torch.long)
        self.kinds = torch.tensor([TOKEN_KINDS.index(k) for _, k in targets], dtype=torch.long)
        self.sums = WriterSums(len(targets))
        self.kind_cache: dict[int, int] = {}
        self.nonfinite: dict[int, tuple[str, int]] = {}
        self._rows: list[int] = []

    def hooks(self, batch: Batch) -> HookList:
        real = batch.attention_mask.bool()
        position_kinds = _position_kinds(self.model, batch.tokens, self.delimiters, self.kind_cache)
        match = real[:, :, None] & (position_kinds[:, :, None] == self.kinds)
        self._rows = batch.input_indices
        trace = _BatchTrace(self, real.to(self.device), match.to(self.device), self.dims.to(self.device))
        return trace.hooks(self.n_layers)

    def report(self, bad: dict[int, tuple[str, int]]) -> None:
        """Note the batch's rows left out, by input index."""
        for row, seen in bad.items():
            self.nonfinite.setdefault(self._rows[row], seen)

    def update(self, batch: Batch, output: torch.Tensor | None) -> None:
        pass  # the last residual hook of each batch folds it into the sums

    def result(self) -> WriterSums:
        return self.sums
