"""Which block, which MLP channels and which weights write a massive activation.

For every massive (dim, token kind) of a profile or of :func:`find_massive`'s records,
:func:`lineage` runs the inputs once (one hooked forward pass per batch, streaming
sums, no cache) and reports the first block after which the entry is massive, that
block's direct writes (attention and MLP), the MLP hidden channels that carry it and
the down-projection weights behind them: the *super weight* of Yu et al. (2024).

>>> import torch
>>> from massact_lens import find_massive, scan
>>> from massact_lens.examples import tiny_model
>>> from massact_lens.models.planting import plant_massive_activation
>>> model = plant_massive_activation(tiny_model("llama", n_layers=3), layer=1, dim=5,
...                                  value=500.0, neuron=7)
>>> tokens = torch.randint(1, 64, (4, 8), generator=torch.Generator().manual_seed(0))
>>> tokens[:, 0] = 0                                   # the planted token starts each input
>>> found = find_massive(scan(model, tokens, progress=False), min_value=100, min_ratio=100)
>>> result = lineage(model, tokens, found, progress=False)
>>> result.writers()[["dim", "kind", "layer", "n_positions"]].values.tolist()
[[5, 'start', 1, 4]]
>>> result.super_weights()[["layer", "row", "column"]].iloc[0].tolist()
[1, 5, 7]

References: Sun et al., *Massive Activations in Large Language Models* (2024);
Yu et al., *The Super Weight in Large Language Models* (2024).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.types import Provenance
from massact_lens._core.batching import (
    Batch,
    Inputs,
    last_block_hook,
    plan_batches,
    run_batches,
    token_strings,
)
from massact_lens._core.hook_names import attention_hook, mlp_hook, residual_hook_names
from massact_lens.find.criterion import (
    DELIMITERS,
    TOKEN_KINDS,
    MassiveActivations,
    passes_criterion,
    token_kind,
)
from massact_lens._core.types import warn_if_processed
from massact_lens.find.profiles import MassiveProfile
from massact_lens.find.scanner import hidden_state_medians
from massact_lens.interventions.weights import projection_weight

__all__ = ["BlockWrite", "ChannelContribution", "Lineage", "lineage"]

#: Layer reported for an entry that is already massive in the embedding output.
EMBEDDING = -1

# Columns of the per-(layer) sums, one row per target (dim, kind).
_COUNT, _INPUTS, _BEFORE, _AFTER, _MEDIAN, _ATTN, _MLP = range(7)


@dataclass(frozen=True)
class BlockWrite:
    """The first block that makes one (dim, token kind) massive, and its direct writes.

    Means over the positions whose entry first becomes massive in this block.
    ``layer`` is -1 for entries already massive in the embedding output (no block
    writes them; the write columns are NaN). ``value_before`` is the residual stream
    entering the block, ``value_after`` its last residual point (pre-norm: the block
    output; post-norm: the pre-LayerNorm sum after the MLP), ``attention`` and ``mlp``
    the two sub-layers' direct writes into that entry (output projections, bias
    included). ``share``: fraction of the target's positions that start here.
    """

    dim: int
    kind: str
    layer: int
    n_positions: int
    n_inputs: int
    share: float
    value_before: float
    value_after: float
    ratio_after: float  # |value_after| / mean median |x| of that hidden state
    attention: float
    mlp: float


@dataclass(frozen=True)
class ChannelContribution:
    """One MLP hidden channel of a writing block, and the down-projection weight it goes through.

    ``row`` is the residual dim written (= ``dim``), ``column`` the hidden channel;
    ``weight = W_down[row, column]`` (:func:`massact_lens.interventions.weights.projection_weight`
    layout), ``weight_ratio = |weight| / median |W_down|`` over that block's matrix.
    ``activation`` is the channel's mean input to the down projection at the
    massive positions; ``activation_elsewhere`` / ``max_abs_elsewhere`` the mean and
    largest magnitude at the other real positions of the same inputs.
    ``contribution = activation * weight``; ``share`` = contribution / the MLP write.
    """

    dim: int
    kind: str
    layer: int
    rank: int
    row: int
    column: int
    weight: float
    weight_ratio: float
    activation: float
    activation_elsewhere: float
    max_abs_elsewhere: float
    contribution: float
    share: float


@dataclass(frozen=True)
class Lineage:
    """What writes each massive activation, and how it was measured.

    Attributes:
        provenance: the model as it was measured (:class:`massact_lens.Provenance`).
        hook_names: the hook templates read, ``{layer}`` over ``0..n_layers_traced-1``.
        weight: which matrix ``super_weights`` reads, and its index convention.
        prepend_bos: BOS put before strings (None: token tensors used as given).
        n_inputs: inputs run. ``min_value``, ``min_ratio``: the criterion (from the
            massive set). ``targets``: the (dim, token kind) pairs traced.
        blocks, channels: the records behind :meth:`writers` and :meth:`super_weights`.
    """

    provenance: Provenance
    hook_names: tuple[str, ...]
    weight: str
    prepend_bos: bool | None
    n_inputs: int
    n_layers_traced: int
    min_value: float
    min_ratio: float
    top_channels: int
    targets: tuple[tuple[int, str], ...]
    blocks: tuple[BlockWrite, ...]
    channels: tuple[ChannelContribution, ...]

    @property
    def not_found(self) -> tuple[tuple[int, str], ...]:
        """Targets that were never massive on these inputs."""
        seen = {(b.dim, b.kind) for b in self.blocks}
        return tuple(t for t in self.targets if t not in seen)

    def writers(self) -> pd.DataFrame:
        """One row per (dim, kind, first writing block), most frequent block first."""
        return pd.DataFrame([asdict(b) for b in self.blocks], columns=list(BlockWrite.__dataclass_fields__))

    def super_weights(self) -> pd.DataFrame:
        """Per writing block, its ``top_channels`` channels by |contribution|, largest first.

        Columns include ``layer, row, column, weight, weight_ratio, activation,
        contribution``; :func:`massact_lens.interventions.weights.edits_from_rows` turns rows
        into edits for :func:`massact_lens.interventions.weights.edited_weights`.
        """
        return pd.DataFrame(
            [asdict(c) for c in self.channels], columns=list(ChannelContribution.__dataclass_fields__)
        )

    def to_dataframe(self) -> pd.DataFrame:
        """The same table as :meth:`writers`."""
        return self.writers()


@dataclass(frozen=True)
class _Targets:
    pairs: tuple[tuple[int, str], ...]
    min_value: float
    min_ratio: float
    last_layer: int
    delimiters: frozenset[str]
    prepend_bos: bool | None


def _targets(model: TransformerLensModel, massive: Any) -> _Targets:
    """Validate the massive set against the model and list what to trace."""
    if isinstance(massive, MassiveProfile):
        recorded, prepend_bos = massive.provenance, massive.prepend_bos
        pairs = sorted({(d.dim, kind) for d in massive.dims for kind in d.kinds})
        last = max((d.last_layer for d in massive.dims), default=-1)
        delimiters = frozenset(massive.delimiters)
    elif isinstance(massive, MassiveActivations):
        recorded, prepend_bos = massive.scan.provenance, massive.scan.prepend_bos
        pairs = sorted({(r.dim, r.kind) for r in massive})
        last = max((r.layer for r in massive), default=-1)
        delimiters = DELIMITERS
    else:
        raise TypeError(
            f"massive must be a MassiveProfile (from profile) or MassiveActivations (from "
            f"find_massive), not {type(massive).__name__}."
        )
    here = Provenance.of(model)
    differ = here.differences(recorded, ignore=("model_name", "dtype"))
    if differ:
        raise ValueError(
            "The massive activations were measured on another model (this model vs recorded: "
            + "; ".join(differ)
            + "). Trace them on the model they came from, or measure this model first."
        )
    if not pairs:
        raise ValueError(
            "The massive set is empty: there is nothing to trace. Lower min_value / min_ratio "
            "in find_massive or profile (small models need e.g. 50 and 200)."
        )
    d_model = here.d_model
    bad = sorted({d for d, _ in pairs if not 0 <= d < d_model})
    if bad:
        raise ValueError(f"Dims {bad} are out of range: the model has d_model={d_model}.")
    unknown = sorted({k for _, k in pairs if k not in TOKEN_KINDS})
    if unknown:
        raise ValueError(f"Unknown token kinds {unknown}; expected {TOKEN_KINDS}.")
    min_value = float(massive.min_value)
    min_ratio = float(massive.min_ratio)
    return _Targets(tuple(pairs), min_value, min_ratio, last, delimiters, prepend_bos)


def _check_model(model: TransformerLensModel, n_layers: int) -> tuple[str, ...]:
    """The hook templates to read; every name and down projection checked to exist."""
    known = model.hook_dict  # type: ignore[attr-defined]
    d_model, d_mlp = int(model.cfg.d_model), model.cfg.d_mlp
    for layer in range(n_layers):
        missing = [name for name in _hook_names(model, layer) if name not in known]
        if missing:
            raise ValueError(
                f"lineage needs the hook points {missing}, which this model lacks: it traces "
                "dense blocks with an attention output projection and an MLP down projection "
                "(mixture-of-experts and other MLPs are not supported)."
            )
        shape = tuple(projection_weight(model, layer, "mlp.out").shape)
        if shape[0] != d_model or (d_mlp is not None and shape[1] != int(d_mlp)):
            raise ValueError(
                f"Block {layer}'s mlp.out weight is {shape}, not [d_model={d_model}, d_mlp={d_mlp}]: "
                "cannot read it as the down projection."
            )
    return tuple(re.sub(r"^blocks\.0\.", "blocks.{layer}.", name) for name in _hook_names(model, 0))


def _hook_names(model: TransformerLensModel, layer: int) -> tuple[str, ...]:
    """Residual before the block, attention write, MLP hidden, MLP write, the block's residual points."""
    return (
        attention_hook("resid_pre", layer),
        attention_hook("o_out", layer),
        mlp_hook("hidden", layer),
        mlp_hook("out", layer),
        *residual_hook_names(model, [layer]),
    )


class _Sums:
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
        b, p, t = new.nonzero(as_tuple=True)
        stats = self.stats.setdefault(layer, torch.zeros(self.n_targets, 7, dtype=torch.float64))
        t_cpu = t.cpu()
        stats[:, _COUNT].index_add_(0, t_cpu, torch.ones(len(t_cpu), dtype=torch.float64))
        stats[:, _INPUTS] += new.any(dim=1).sum(dim=0).double().cpu()
        for column, values in columns.items():
            picked = values[b] if values.ndim == 1 else values[b, p, t]  # medians: per input
            stats[:, column].index_add_(0, t_cpu, picked.double().cpu())
        if hidden is None:
            return
        h = hidden.float()
        d_mlp = h.shape[-1]
        zeros = torch.zeros(self.n_targets, d_mlp, dtype=torch.float64)
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


class _BatchTrace:
    """The hooks of one batch: read each block's entries, decide where they first turn massive."""

    def __init__(
        self,
        sums: _Sums,
        real: Bool[torch.Tensor, "batch pos"],
        match: Bool[torch.Tensor, "batch pos targets"],
        dims: torch.Tensor,
        min_value: float,
        min_ratio: float,
    ) -> None:
        self.sums, self.real, self.match, self.dims = sums, real, match, dims
        self.min_value, self.min_ratio = min_value, min_ratio
        self.crossed = torch.zeros_like(match)
        self.new = torch.zeros_like(match)
        self.read: dict[str, torch.Tensor] = {}
        self.hidden: torch.Tensor | None = None

    def _massive(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        medians = hidden_state_medians(x, self.real).to(x.device)
        values = x[..., self.dims].float()
        massive = passes_criterion(values.abs(), medians[:, None, None], self.min_value, self.min_ratio)
        return values, medians, massive & self.match

    def before(self, layer: int):  # noqa: ANN201
        def read(x: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            x = x.detach()
            self.read["before"] = x[..., self.dims].float()
            if layer == 0:  # the embedding output: massive before any block writes
                values, medians, massive = self._massive(x)
                if bool(massive.any()):
                    nan = torch.full_like(values, float("nan"))
                    columns = {_BEFORE: nan, _AFTER: values, _MEDIAN: medians, _ATTN: nan, _MLP: nan}
                    self.sums.add_block(EMBEDDING, massive, self.real, columns, None)
                self.crossed |= massive

        return read

    def keep(self, key: str):  # noqa: ANN201
        def read(x: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            self.read[key] = x.detach()[..., self.dims].float()

        return read

    def keep_hidden(self, x: torch.Tensor, hook: Any) -> None:  # noqa: ARG002
        self.hidden = x.detach()

    def residual(self, layer: int, last: bool):  # noqa: ANN201
        def read(x: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            values, medians, massive = self._massive(x.detach())
            self.new |= massive & ~self.crossed
            self.crossed |= massive
            if not last:
                return
            if bool(self.new.any()):
                columns = {
                    _BEFORE: self.read["before"],
                    _AFTER: values,
                    _MEDIAN: medians,
                    _ATTN: self.read["attention"],
                    _MLP: self.read["mlp"],
                }
                self.sums.add_block(layer, self.new, self.real, columns, self.hidden)
                self.new.zero_()
            self.read.clear()
            self.hidden = None

        return read


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


def lineage(
    model: TransformerLensModel,
    inputs: Inputs,
    massive: MassiveProfile | MassiveActivations,
    *,
    top_channels: int = 10,
    batch_size: int = 16,
    prepend_bos: bool | None = None,
    attention_mask: torch.Tensor | None = None,
    progress: bool = True,
) -> Lineage:
    """Trace each massive (dim, token kind) to its first writing block, channels and weights.

    One hooked forward pass per batch over blocks ``0..L`` (``L``: the last layer
    where the massive set saw anything massive; later blocks are skipped). At every
    position of the target's token kind, the entry is tested with the massive set's
    own criterion (``min_value``, ``min_ratio``, against the median of its hidden
    state) at the embedding output and at each residual point of each block
    (pre-norm: the block output; post-norm: the two pre-LayerNorm sums); the first
    block where it passes is its writer. Running sums per (target, writing block)
    then give the block's attention and MLP writes, the mean input of every MLP
    hidden channel to the down projection there and elsewhere, and, with the
    down-projection weights, each channel's contribution. Memory does not grow with
    the number of inputs. Inputs may differ from those the massive set came from.

    Args:
        model: the model the massive set was measured on (same name, n_layers, d_model).
        inputs: strings, a token tensor ``[batch, pos]`` or an iterable of batches.
        massive: a :class:`~massact_lens.find.criterion.MassiveProfile` or
            :class:`~massact_lens.find.criterion.MassiveActivations`.
        top_channels: hidden channels reported per writing block.
        batch_size: inputs per forward pass. Inputs run longest first (a list or a
            tensor as a whole, an iterable of batches within each item): little padding
            is computed, and the sums depend on the order only in float64 rounding.
        prepend_bos: for strings; None uses what the massive set used (else the model's default).
        attention_mask: with a token tensor, 1 for real tokens, 0 for right padding.
        progress: show a progress bar.

    Raises:
        TypeError: ``massive`` is neither a profile nor records.
        ValueError: the massive set comes from another model, is empty, has dims out
            of range; the model lacks an attention output or an MLP down projection;
            bad inputs; all before any forward pass.

    >>> import torch
    >>> from massact_lens import profile
    >>> from massact_lens.examples import tiny_model
    >>> from massact_lens.models.planting import plant_massive_activation
    >>> model = plant_massive_activation(tiny_model("gpt2", n_layers=3), layer=1, dim=4,
    ...                                  value=800.0, neuron=9)
    >>> tokens = torch.randint(1, 64, (3, 6), generator=torch.Generator().manual_seed(1))
    >>> tokens[:, 0] = 0
    >>> prof = profile(model, tokens, min_value=100, min_ratio=100, progress=False)
    >>> result = lineage(model, tokens, prof, top_channels=3, progress=False)
    >>> row = result.writers().iloc[0]
    >>> int(row.layer), round(float(row.mlp)) > 700, abs(float(row.attention)) < 10
    (1, True, True)
    """
    if isinstance(top_channels, bool) or not isinstance(top_channels, int) or top_channels < 1:
        raise ValueError(f"top_channels must be a positive integer, not {top_channels!r}.")
    targets = _targets(model, massive)
    n_layers = targets.last_layer + 1
    templates = _check_model(model, n_layers)
    bos = targets.prepend_bos if prepend_bos is None else prepend_bos
    plan = plan_batches(
        model, inputs, batch_size=batch_size, attention_mask=attention_mask, prepend_bos=bos, by_length=True
    )
    warn_if_processed(model)

    device = getattr(model.cfg, "device", None) or "cpu"
    dims = torch.tensor([d for d, _ in targets.pairs], dtype=torch.long)
    kinds = torch.tensor([TOKEN_KINDS.index(k) for _, k in targets.pairs], dtype=torch.long)
    sums = _Sums(len(targets.pairs))
    kind_cache: dict[int, int] = {}
    n_inputs = 0

    def make_hooks(batch: Batch) -> list[tuple[str, Any]]:
        nonlocal n_inputs
        n_inputs += int(batch.tokens.shape[0])
        real = batch.attention_mask.bool()
        position_kinds = _position_kinds(model, batch.tokens, targets.delimiters, kind_cache)
        match = real[:, :, None] & (position_kinds[:, :, None] == kinds)
        trace = _BatchTrace(
            sums, real.to(device), match.to(device), dims.to(device), targets.min_value, targets.min_ratio
        )
        hooks: list[tuple[str, Any]] = []
        for layer in range(n_layers):
            before, attention, hidden, mlp, *points = _hook_names(model, layer)
            hooks += [
                (before, trace.before(layer)),
                (attention, trace.keep("attention")),
                (hidden, trace.keep_hidden),
                (mlp, trace.keep("mlp")),
            ]
            hooks += [(name, trace.residual(layer, last=i == len(points) - 1)) for i, name in enumerate(points)]
        return hooks

    stop_after = last_block_hook(residual_hook_names(model, [n_layers - 1]))
    run_batches(model, plan, make_hooks, progress=progress, desc="lineage", stop_after=stop_after)
    blocks, channels = _results(model, targets.pairs, sums, top_channels)
    result = Lineage(
        provenance=Provenance.of(model),
        hook_names=templates,
        weight="blocks.{layer}.mlp.out weight, as W_down[row = output dim, column = input channel]",
        prepend_bos=plan.prepend_bos,
        n_inputs=n_inputs,
        n_layers_traced=n_layers,
        min_value=targets.min_value,
        min_ratio=targets.min_ratio,
        top_channels=top_channels,
        targets=targets.pairs,
        blocks=blocks,
        channels=channels,
    )
    if result.not_found:
        warnings.warn(
            f"Never massive on these inputs (dim, kind): {list(result.not_found)}. They have no rows.",
            UserWarning,
            stacklevel=2,
        )
    return result


def _results(
    model: TransformerLensModel,
    pairs: Sequence[tuple[int, str]],
    sums: _Sums,
    top_channels: int,
) -> tuple[tuple[BlockWrite, ...], tuple[ChannelContribution, ...]]:
    totals = sum((s[:, _COUNT] for s in sums.stats.values()), torch.zeros(len(pairs), dtype=torch.float64))
    blocks: list[BlockWrite] = []
    channels: list[ChannelContribution] = []
    for target, (dim, kind) in enumerate(pairs):
        found = [(layer, s[target]) for layer, s in sums.stats.items() if s[target, _COUNT] > 0]
        found.sort(key=lambda item: (-float(item[1][_COUNT]), item[0]))
        for layer, s in found:
            count = float(s[_COUNT])
            mean = s / count
            blocks.append(
                BlockWrite(
                    dim=dim,
                    kind=kind,
                    layer=layer,
                    n_positions=int(count),
                    n_inputs=int(s[_INPUTS]),
                    share=count / float(totals[target]),
                    value_before=float(mean[_BEFORE]),
                    value_after=float(mean[_AFTER]),
                    ratio_after=abs(float(mean[_AFTER])) / float(mean[_MEDIAN]) if mean[_MEDIAN] else float("inf"),
                    attention=float(mean[_ATTN]),
                    mlp=float(mean[_MLP]),
                )
            )
            if layer != EMBEDDING:
                channels += _channels(model, dim, kind, layer, target, count, float(mean[_MLP]), sums, top_channels)
    return tuple(blocks), tuple(channels)


def _channels(
    model: TransformerLensModel,
    dim: int,
    kind: str,
    layer: int,
    target: int,
    count: float,
    mlp_write: float,
    sums: _Sums,
    top_channels: int,
) -> list[ChannelContribution]:
    weight: Float[torch.Tensor, "d_model d_mlp"] = projection_weight(model, layer, "mlp.out").detach().float().cpu()
    median = float(weight.abs().median())
    row = weight[dim].double()
    activation = sums.hidden[layer][target] / count
    n_other = float(sums.other_count[layer][target])
    elsewhere = sums.other[layer][target] / n_other if n_other else torch.full_like(activation, float("nan"))
    contribution = activation * row
    order = contribution.abs().argsort(descending=True)[:top_channels].tolist()
    return [
        ChannelContribution(
            dim=dim,
            kind=kind,
            layer=layer,
            rank=rank,
            row=dim,
            column=column,
            weight=float(row[column]),
            weight_ratio=abs(float(row[column])) / median if median else float("inf"),
            activation=float(activation[column]),
            activation_elsewhere=float(elsewhere[column]),
            max_abs_elsewhere=float(sums.other_absmax[layer][target, column]) if n_other else float("nan"),
            contribution=float(contribution[column]),
            share=float(contribution[column]) / mlp_write if mlp_write else float("nan"),
        )
        for rank, column in enumerate(order)
    ]
