"""From the running sums of a lineage pass to its records: the block writes, the
channels (with their down-projection weights) behind each writing block, and the
post-sublayer norms the writes pass on sandwich blocks (the amplifiers).

>>> from massact_lens.examples import tiny_model
>>> from massact_lens.trace._measurement import WriterSums
>>> lineage_records(tiny_model(), [(3, "start")], WriterSums(1), top_channels=2)   # nothing was massive
((), (), ())
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.blocks import BlockModel, block_model, norm_gain
from massact_lens.interventions.weights import projection_weight
from massact_lens.trace._measurement import (
    AFTER,
    ATTN,
    ATTN_RAW,
    ATTN_SCALE,
    BEFORE,
    CHANGE,
    COUNT,
    EMBEDDING,
    INPUTS,
    MEDIAN,
    MLP,
    MLP_RAW,
    MLP_SCALE,
    WriterSums,
)
from massact_lens.trace.records import Amplifier, BlockWrite, ChannelContribution

_NAN = float("nan")


def lineage_records(
    model: TransformerLensModel,
    pairs: Sequence[tuple[int, str]],
    sums: WriterSums,
    top_channels: int,
) -> tuple[tuple[BlockWrite, ...], tuple[ChannelContribution, ...], tuple[Amplifier, ...]]:
    """The block writes (most frequent block first per target), the top channels of each
    writing block and its amplifiers, from the running sums of a pass."""
    blocks_model = block_model(model)
    totals = sum((s[:, COUNT] for s in sums.stats.values()), torch.zeros(len(pairs), dtype=torch.float64))
    blocks: list[BlockWrite] = []
    channels: list[ChannelContribution] = []
    amplifiers: list[Amplifier] = []
    for target, (dim, kind) in enumerate(pairs):
        found = [(layer, s[target]) for layer, s in sums.stats.items() if s[target, COUNT] > 0]
        found.sort(key=lambda item: (-float(item[1][COUNT]), item[0]))
        for layer, s in found:
            count = float(s[COUNT])
            mean = s / count
            blocks.append(
                BlockWrite(
                    dim=dim,
                    kind=kind,
                    layer=layer,
                    n_positions=int(count),
                    n_inputs=int(s[INPUTS]),
                    share=count / float(totals[target]),
                    value_before=float(mean[BEFORE]),
                    value_after=float(mean[AFTER]),
                    ratio_after=abs(float(mean[AFTER])) / float(mean[MEDIAN]) if mean[MEDIAN] else float("inf"),
                    attention=float(mean[ATTN]),
                    mlp=float(mean[MLP]),
                    residual_change=float(mean[CHANGE]),
                )
            )
            if layer != EMBEDDING:
                where = _Where(dim, kind, layer, target, count)
                channels += _channels(model, blocks_model, where, float(mean[MLP]), sums, top_channels)
                amplifiers += _amplifiers(model, blocks_model, where, mean)
    return tuple(blocks), tuple(channels), tuple(amplifiers)


@dataclass(frozen=True)
class _Where:
    """One target's writing block: its dim and kind, the layer, its row in the sums, its positions."""

    dim: int
    kind: str
    layer: int
    target: int
    count: float


def _amplifiers(model: TransformerLensModel, blocks: BlockModel, where: _Where, mean: torch.Tensor) -> list[Amplifier]:
    rows = []
    for write, value, raw, scale in (("attention", ATTN, ATTN_RAW, ATTN_SCALE), ("mlp", MLP, MLP_RAW, MLP_SCALE)):
        norm = blocks.norm(write)  # type: ignore[arg-type]
        if norm is None:
            continue
        gains = norm_gain(model, where.layer, norm, blocks.norm_offset).cpu()
        gain = float(gains[where.dim])
        median = float(gains.abs().median())
        stored = float(norm_gain(model, where.layer, norm, False)[where.dim])
        written = float(mean[value])
        contribution = written * (gain - median) / gain if gain else _NAN
        rows.append(
            Amplifier(
                dim=where.dim, kind=where.kind, layer=where.layer, write=write, norm=norm, gain=gain,
                weight=stored, median_gain=median, gain_ratio=abs(gain) / median if median else float("inf"),
                raw=float(mean[raw]), scale=float(mean[scale]), value=written, contribution=contribution,
                share=contribution / written if written and math.isfinite(contribution) else _NAN,
            )
        )
    return rows


def _channels(
    model: TransformerLensModel, blocks: BlockModel, where: _Where, mlp_write: float, sums: WriterSums,
    top_channels: int,
) -> list[ChannelContribution]:
    dim, layer, target = where.dim, where.layer, where.target
    weight: Float[torch.Tensor, "d_model d_mlp"] = projection_weight(model, layer, "mlp.out").detach().float().cpu()
    median = float(weight.abs().median())
    row = weight[dim].double()
    activation = sums.hidden[layer][target] / where.count
    norm = blocks.norm("mlp")
    if norm is not None:  # the write passes the post-feed-forward norm: each position times gain / rms
        contribution = sums.scaled[layer][target] / where.count * row
        gain = float(norm_gain(model, layer, norm, blocks.norm_offset)[dim])
    else:
        contribution, gain = activation * row, _NAN
    n_other = float(sums.other_count[layer][target])
    elsewhere = sums.other[layer][target] / n_other if n_other else torch.full_like(activation, _NAN)
    order = contribution.abs().argsort(descending=True)[:top_channels].tolist()
    return [
        ChannelContribution(
            dim=dim,
            kind=where.kind,
            layer=layer,
            rank=rank,
            row=dim,
            column=column,
            weight=float(row[column]),
            weight_ratio=abs(float(row[column])) / median if median else float("inf"),
            activation=float(activation[column]),
            activation_elsewhere=float(elsewhere[column]),
            max_abs_elsewhere=float(sums.other_absmax[layer][target, column]) if n_other else _NAN,
            contribution=float(contribution[column]),
            share=float(contribution[column]) / mlp_write if mlp_write else _NAN,
            gain=gain,
        )
        for rank, column in enumerate(order)
    ]
