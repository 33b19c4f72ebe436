"""What :func:`~massact_lens.trace.writers.lineage` returns: the first writing blocks, the
MLP channels behind them and their down-projection weights (super weights).

A :class:`Lineage` holds one :class:`BlockWrite` per (target, first writing block), one
:class:`ChannelContribution` per reported channel and, on sandwich blocks, one
:class:`Amplifier` per write that passes a post-sublayer norm.

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

__all__ = ["Amplifier", "BlockWrite", "ChannelContribution", "Lineage"]


@dataclass(frozen=True)
class BlockWrite:
    """The first block that makes one (dim, token kind) massive, and its direct writes.

    Means over the positions whose entry first becomes massive in this block.
    ``layer`` is -1 for entries already massive in the embedding output (no block
    writes them; the write columns are NaN). ``value_before`` is the residual stream
    entering the block, ``value_after`` its last residual point (pre-norm and sandwich:
    the block output; post-norm: the pre-LayerNorm sum after the MLP). ``attention``
    and ``mlp`` are the two sublayers' writes as they enter the residual stream
    (:mod:`massact_lens._core.blocks`): the output projections, bias included, on
    pre-norm and post-norm blocks; after the post-sublayer norm on sandwich blocks
    (Gemma 2 / 3). ``residual_change`` is what the block's residual sums changed at
    the entry (pre-norm and sandwich: ``value_after - value_before``; post-norm: each
    pre-LayerNorm sum minus the normalised stream it adds to, summed), so
    ``attention + mlp = residual_change`` to float rounding. ``share``: fraction of
    the target's positions that start here.
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
    residual_change: float = float("nan")


@dataclass(frozen=True)
class ChannelContribution:
    """One MLP hidden channel of a writing block, and the down-projection weight it goes through.

    ``row`` is the residual dim written (= ``dim``), ``column`` the hidden channel;
    ``weight = W_down[row, column]`` (:func:`massact_lens.interventions.weights.projection_weight`
    layout), ``weight_ratio = |weight| / median |W_down|`` over that block's matrix.
    ``activation`` is the channel's mean input to the down projection at the
    massive positions; ``activation_elsewhere`` / ``max_abs_elsewhere`` the mean and
    largest magnitude at the other real positions of the same inputs.
    ``contribution`` is the channel's part of the MLP write as it enters the residual
    stream: ``activation * weight`` on pre-norm and post-norm blocks; on sandwich
    blocks the mean over the positions of ``h * weight * gain / rms`` (the
    post-feed-forward norm's multiplier there), with ``gain`` that norm's gain at
    ``row`` (NaN where the write passes no norm). ``share`` = contribution / the MLP write.
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
    gain: float = float("nan")


@dataclass(frozen=True)
class Amplifier:
    """The post-sublayer norm a write passes on a sandwich block, at the written dim.

    A sandwich block (Gemma 2 / 3) adds ``norm(x) = x / rms(x) * gain`` of each
    sublayer output ``x``, so a large ``gain`` at one dim amplifies the write there
    whatever the sublayer wrote. Means over the positions whose entry first becomes
    massive in this block:

    * ``write``: ``"attention"`` or ``"mlp"``; ``norm``: the component (``"ln2_post"``);
    * ``gain``: the norm's multiplier at ``dim`` (``1 + weight`` under Gemma's offset),
      ``weight``: the stored parameter ``edited_weights`` sets with the key
      ``(layer, norm, dim)``; ``median_gain``: the median ``|gain|`` of that norm over
      its dims; ``gain_ratio = |gain| / median_gain``;
    * ``raw``: the sublayer's output at ``dim`` before the norm; ``scale``: the
      norm's ``gain / rms`` there; ``value``: the write as it enters (``raw * scale``);
    * ``contribution = value * (gain - median_gain) / gain``: the part of the write
      the gain adds above its block median (what setting it to the median removes in
      this block); ``share = contribution / value``.
    """

    dim: int
    kind: str
    layer: int
    write: str
    norm: str
    gain: float
    weight: float
    median_gain: float
    gain_ratio: float
    raw: float
    scale: float
    value: float
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
        amplifier_rows: the records behind :meth:`amplifiers` (sandwich blocks only).
    """

    hook_names: tuple[str, ...]
    weight: str
    prepend_bos: bool | None
    criterion: Criterion
    top_channels: int
    targets: tuple[tuple[int, str], ...]
    blocks: tuple[BlockWrite, ...]
    channels: tuple[ChannelContribution, ...]
    amplifier_rows: tuple[Amplifier, ...] = ()

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
        """The ``top_channels`` channels of each writing block, all sorted by |contribution|,
        strongest first (``rank`` is the channel's place within its block).

        Columns include ``layer, row, column, weight, weight_ratio, activation,
        contribution`` (and ``gain``: the post-feed-forward norm's gain at ``row`` on
        sandwich blocks); :func:`massact_lens.interventions.weights.edits_from_rows` turns
        rows into edits for :func:`massact_lens.interventions.weights.edited_weights`.
        """
        rows = sorted(self.channels, key=lambda c: -abs(c.contribution))
        return pd.DataFrame([asdict(c) for c in rows], columns=list(ChannelContribution.__dataclass_fields__))

    def amplifiers(self) -> pd.DataFrame:
        """The post-sublayer norms the writes pass (sandwich blocks; empty elsewhere), one row
        per (dim, kind, writing block, write), sorted by |contribution|, strongest first.

        See :class:`Amplifier` for the columns; ``(layer, norm, dim)`` is the key of
        :func:`massact_lens.interventions.weights.edited_weights` that edits the gain.
        """
        rows = sorted(self.amplifier_rows, key=lambda a: -abs(a.contribution))
        return pd.DataFrame([asdict(a) for a in rows], columns=list(Amplifier.__dataclass_fields__))

    def to_dataframe(self) -> pd.DataFrame:
        """The same table as :meth:`writers`."""
        return self.writers()
