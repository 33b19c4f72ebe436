"""Which block, which MLP channels and which weights write a massive activation.

For every massive (dim, token kind) of a massive set (a profile or :func:`find_massive`'s
records), :func:`lineage` runs the inputs once (one hooked forward pass per batch, streaming
sums, no cache: :class:`~massact_lens.trace._measurement.FirstWriters`) and reports the first block after which the entry is massive, that
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
from typing import Any

import torch
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._plain_hf import refuse_plain_hf
from massact_lens._core.batching import plan_batches
from massact_lens._core.blocks import block_model
from massact_lens._core.loop import measure
from massact_lens._core.types import Inputs, Provenance, warn_if_processed
from massact_lens.find.criterion import TOKEN_KINDS, MassiveActivations, MassiveSet
from massact_lens.find.profiles import MassiveProfile
from massact_lens.interventions.coerce import check_profile_matches
from massact_lens.interventions.weights import projection_weight
from massact_lens.trace._measurement import FirstWriters, block_hook_names
from massact_lens.trace._tables import lineage_records
from massact_lens.trace.records import BlockWrite, ChannelContribution, Lineage

__all__ = ["BlockWrite", "ChannelContribution", "Lineage", "lineage"]

#: What ``Lineage.weight`` says ``super_weights`` reads.
_WEIGHT = "blocks.{layer}.mlp.out weight, as W_down[row = output dim, column = input channel]"


def _massive_layers(massive: MassiveSet) -> list[int]:
    """Every layer the massive set names (its records', or its profile's first and last layers)."""
    if massive.per_input:
        return sorted({int(r.layer) for r in massive})  # type: ignore[attr-defined]
    dims: Any = getattr(massive, "dims", ())
    return sorted({int(x) for d in dims for x in (d.first_layer, d.last_layer)})


def _targets(model: TransformerLensModel, massive: MassiveSet) -> tuple[tuple[int, str], ...]:
    """The (dim, token kind) pairs to trace, once the massive set is checked against the model."""
    if not isinstance(massive, MassiveSet):
        raise TypeError(
            f"massive must be a massive set: a MassiveProfile (from profile) or MassiveActivations (from "
            f"find_massive), not {type(massive).__name__}."
        )
    pairs = massive.dim_kinds()
    here = Provenance.of(model)
    differ = here.differences(massive.provenance, ignore=("model_name", "dtype"))
    if differ:
        raise ValueError(
            "The massive activations were measured on another model (this model vs recorded: "
            + "; ".join(differ)
            + "). Trace them on the model they came from, or measure this model first."
        )
    n_layers = int(model.cfg.n_layers)
    outside = [layer for layer in _massive_layers(massive) if not 0 <= layer < n_layers]
    if outside:
        raise ValueError(
            f"The massive set names layers {outside[:5]}, but this model has {n_layers} layers: valid "
            f"layers are 0..{n_layers - 1}. It describes another model or was edited: trace a massive set "
            "measured on this model (find_massive(scan(model, inputs)) or profile(model, inputs))."
        )
    check_profile_matches(model, massive)  # another model name (same shape) warns, as ablation and attention do
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
    return tuple(pairs)


def _check_model(model: TransformerLensModel, n_layers: int) -> tuple[str, ...]:
    """The hook templates to read, once the block model is checked (:func:`block_model`) and
    every down projection read as ``[d_model, d_mlp]``."""
    block_model(model)  # an architecture outside the block models raises, naming the block and family
    d_model, d_mlp = int(model.cfg.d_model), model.cfg.d_mlp
    for layer in range(n_layers):
        shape = tuple(projection_weight(model, layer, "mlp.out").shape)
        if shape[0] != d_model or (d_mlp is not None and shape[1] != int(d_mlp)):
            raise ValueError(
                f"Block {layer}'s mlp.out weight is {shape}, not [d_model={d_model}, d_mlp={d_mlp}]: "
                "cannot read it as the down projection."
            )
    return tuple(re.sub(r"^blocks\.0\.", "blocks.{layer}.", name) for name in block_hook_names(model, 0))


def lineage(
    model: TransformerLensModel,
    inputs: Inputs,
    massive: MassiveProfile | MassiveActivations,  # the massive sets the library makes, read as MassiveSet
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
    own criterion (its ``criterion``, against the median of its hidden
    state) at the embedding output and at each residual point of each block
    (pre-norm and sandwich: the block output; post-norm: the two pre-LayerNorm sums);
    the first block where it passes is its writer. Running sums per (target, writing
    block) then give the block's attention and MLP writes as they enter the residual
    stream (:mod:`massact_lens._core.blocks`: after the post-sublayer norms on
    sandwich blocks, which add up to the block's ``residual_change``), the mean input
    of every MLP hidden channel to the down projection there and elsewhere, and, with
    the down-projection weights, each channel's contribution to the write; on
    sandwich blocks also each norm's gain at the dim and its share of the write
    (:meth:`~massact_lens.trace.records.Lineage.amplifiers`). Memory does not grow
    with the number of inputs. Inputs may differ from those the massive set came
    from. An input whose hidden states hold a NaN or an infinite value is left out
    of every statistic, with one warning naming it, the hook and how many values.

    Args:
        model: the model the massive set was measured on (same name, n_layers, d_model).
        inputs: strings, a token tensor ``[batch, pos]`` or an iterable of batches.
        massive: a :class:`~massact_lens.find.criterion.MassiveSet`: a
            :class:`~massact_lens.find.profiles.MassiveProfile` or
            :class:`~massact_lens.find.criterion.MassiveActivations`.
        top_channels: hidden channels reported per writing block.
        batch_size: inputs per forward pass. Inputs run longest first (a list or a
            tensor as a whole, an iterable of batches within each item): little padding
            is computed, and the sums depend on the order only in float64 rounding.
        prepend_bos: for strings; None uses what the massive set used (else the model's default).
        attention_mask: with a token tensor, 1 for real tokens, 0 for right padding.
        progress: show a progress bar.

    Raises:
        TypeError: ``massive`` is not a massive set (neither a profile nor records).
        ValueError: the massive set comes from another model, is empty, has dims or
            layers out of range; bad inputs: all before any forward pass. The model
            is not one of the block models (:data:`massact_lens._core.blocks.FAMILIES`)
            or its writes do not add up (checked on one tiny forward pass).

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
    refuse_plain_hf(model, "lineage")
    if isinstance(top_channels, bool) or not isinstance(top_channels, int) or top_channels < 1:
        raise ValueError(f"top_channels must be a positive integer, not {top_channels!r}.")
    targets = _targets(model, massive)
    n_layers = massive.last_layer() + 1
    bos = massive.prepend_bos if prepend_bos is None else prepend_bos
    plan = plan_batches(
        model, inputs, batch_size=batch_size, attention_mask=attention_mask, prepend_bos=bos, by_length=True
    )
    templates = _check_model(model, n_layers)
    warn_if_processed(model)
    writers = FirstWriters(model, targets, massive.criterion, frozenset(massive.delimiters), n_layers)
    n_inputs = measure(model, plan, writers, progress=progress, desc="lineage")
    _warn_nonfinite(writers.nonfinite)
    blocks, channels, amplifiers = lineage_records(model, targets, writers.result(), top_channels)
    result = Lineage(
        provenance=Provenance.of(model),
        layers=tuple(range(n_layers)),
        n_inputs=n_inputs,
        hook_names=templates,
        weight=_WEIGHT,
        prepend_bos=plan.prepend_bos,
        criterion=massive.criterion,
        top_channels=top_channels,
        targets=targets,
        blocks=blocks,
        channels=channels,
        amplifier_rows=amplifiers,
    )
    if result.not_found:
        warnings.warn(
            f"Never massive on these inputs (dim, kind): {list(result.not_found)}. They have no rows.",
            UserWarning,
            stacklevel=2,
        )
    return result


def _warn_nonfinite(nonfinite: dict[int, tuple[str, int]]) -> None:
    """One warning for every input left out because a hidden state held NaN or inf."""
    if not nonfinite:
        return
    listed = "; ".join(f"input {i}: {n} in {hook}" for i, (hook, n) in sorted(nonfinite.items())[:5])
    more = f" and {len(nonfinite) - 5} more" if len(nonfinite) > 5 else ""
    warnings.warn(
        f"{len(nonfinite)} input(s) hold NaN or infinite values in their hidden states ({listed}{more}; "
        "first hook where seen, how many values there): they are left out of every lineage statistic. "
        "Find what produced them (a hook of yours, a float16 overflow: load the model in float32) and "
        "rerun, or drop those inputs.",
        UserWarning,
        stacklevel=3,
    )
