"""From the running sums of a lineage pass to its records: the block writes and the
channels (with their down-projection weights) behind each writing block.

>>> from massact_lens.examples import tiny_model
>>> from massact_lens.trace._measurement import WriterSums
>>> lineage_records(tiny_model(), [(3, "start")], WriterSums(1), top_channels=2)   # nothing was massive
((), ())
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens.interventions.weights import projection_weight
from massact_lens.trace._measurement import (
    AFTER,
    ATTN,
    BEFORE,
    COUNT,
    EMBEDDING,
    INPUTS,
    MEDIAN,
    MLP,
    WriterSums,
)
from massact_lens.trace.records import BlockWrite, ChannelContribution


def lineage_records(
    model: TransformerLensModel,
    pairs: Sequence[tuple[int, str]],
    sums: WriterSums,
    top_channels: int,
) -> tuple[tuple[BlockWrite, ...], tuple[ChannelContribution, ...]]:
    """The block writes (most frequent block first per target) and the top channels of each
    writing block, from the running sums of a pass."""
    totals = sum((s[:, COUNT] for s in sums.stats.values()), torch.zeros(len(pairs), dtype=torch.float64))
    blocks: list[BlockWrite] = []
    channels: list[ChannelContribution] = []
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
                )
            )
            if layer != EMBEDDING:
                where = _Where(dim, kind, layer, target, count)
                channels += _channels(model, where, float(mean[MLP]), sums, top_channels)
    return tuple(blocks), tuple(channels)


@dataclass(frozen=True)
class _Where:
    """One target's writing block: its dim and kind, the layer, its row in the sums, its positions."""

    dim: int
    kind: str
    layer: int
    target: int
    count: float


def _channels(
    model: TransformerLensModel, where: _Where, mlp_write: float, sums: WriterSums, top_channels: int
) -> list[ChannelContribution]:
    dim, layer, target = where.dim, where.layer, where.target
    weight: Float[torch.Tensor, "d_model d_mlp"] = projection_weight(model, layer, "mlp.out").detach().float().cpu()
    median = float(weight.abs().median())
    row = weight[dim].double()
    activation = sums.hidden[layer][target] / where.count
    n_other = float(sums.other_count[layer][target])
    elsewhere = sums.other[layer][target] / n_other if n_other else torch.full_like(activation, float("nan"))
    contribution = activation * row
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
            max_abs_elsewhere=float(sums.other_absmax[layer][target, column]) if n_other else float("nan"),
            contribution=float(contribution[column]),
            share=float(contribution[column]) / mlp_write if mlp_write else float("nan"),
        )
        for rank, column in enumerate(order)
    ]
