"""What :func:`~massact_lens.trace.writers.lineage` returns: the first writing blocks, the
MLP channels behind them and their down-projection weights (super weights).

A :class:`Lineage` holds one :class:`BlockWrite` per (target, first writing block) and
one :class:`ChannelContribution` per reported channel.

>>> from massact_lens.find.criterion import Criterion
>>> from massact_lens._core.types import Provenance
>>> from massact_lens.examples import tiny_model
>>> empty = Lineage(provenance=Provenance.of(tiny_model()), layers=(0, 1), n_inputs=2, hook_names=(),
...                 weight="", prepend_bos=None, criterion=Criterion(100, 1000), top_channels=3,
...                 targets=((3, "start"),), blocks=(), channels=())
>>> empty.not_found, empty.n_layers_traced, empty.writers().empty
(((3, 'start'),), 2, True)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd

from massact_lens._core.results import CorpusResult
from massact_lens.find.criterion import Criterion

__all__ = ["BlockWrite", "ChannelContribution", "Lineage"]


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


@dataclass(frozen=True, repr=False)
class Lineage(CorpusResult):
    """What writes each massive activation, and how it was measured.

    Attributes:
        layers: the blocks traced, ``0..L`` (``L``: the massive set's last massive layer).
        hook_names: the hook templates read, ``{layer}`` over ``layers``.
        weight: which matrix ``super_weights`` reads, and its index convention.
        prepend_bos: BOS put before strings (None: token tensors used as given).
        criterion: the massive set's criterion, applied at every residual point.
        targets: the (dim, token kind) pairs traced.
        blocks, channels: the records behind :meth:`writers` and :meth:`super_weights`.
    """

    hook_names: tuple[str, ...]
    weight: str
    prepend_bos: bool | None
    criterion: Criterion
    top_channels: int
    targets: tuple[tuple[int, str], ...]
    blocks: tuple[BlockWrite, ...]
    channels: tuple[ChannelContribution, ...]

    @property
    def n_layers_traced(self) -> int:
        """How many blocks were traced (``len(layers)``)."""
        return len(self.layers)

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
