"""Attention concentration: how much each head attends to the key positions C (the sink).

>>> from massact_lens.examples import minilm
>>> sinks = attention_concentration(minilm(), ["The cat sat on the mat."], "start", layers=[2], progress=False)
>>> sinks.mass.shape   # inputs x layers x heads
torch.Size([1, 1, 12])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._plain_hf import refuse_plain_hf
from massact_lens._core.batching import Batch, BatchPlan
from massact_lens._core.fast_paths import fused_route
from massact_lens._core.hook_names import attention_hook
from massact_lens._core.loop import measure
from massact_lens._core.results import (
    Keep,
    KeptInputs,
    StreamedResult,
    add_sums,
    check_keep,
    keep_limit,
    merge_kept,
)
from massact_lens._core.types import HookList, Inputs, is_causal
from massact_lens.attention._fused import MassProbe
from massact_lens.attention._passes import (
    KeyedFields,
    KeyedMeasurement,
    KeyPositions,
    allowed_keys,
    attention_windows,
    centred_logits,
    check_layers,
    detached,
    real_keys,
)
from massact_lens.attention.keys import Positions, fit_width, keyed_plan

__all__ = ["AttentionConcentration", "attention_concentration"]


#: Per-input tensors of an :class:`AttentionConcentration` and their position axes (none).
_KEPT: dict[str, int | None] = {"mass": None, "uniform_mass": None, "logit_gap": None, "n_positions": None, "lengths": None,
                                "layer_uniform_mass": None}


@dataclass(frozen=True, repr=False)
class AttentionConcentration(StreamedResult, KeyedFields):
    """Attention mass on the key positions C per layer and head: over every input, and per input.

    Running sums over **every** input (``sums``; what :meth:`sink_scores`,
    :meth:`layer_mass`, :attr:`mean_mass` read and :meth:`merge` adds) and the
    per-input rows (``mass``, ``uniform_mass``, ``logit_gap``, ``n_positions``,
    ``lengths``) of the **first** ``n_kept`` inputs (``keep``).

    :meth:`merge` (measurements of consecutive slices of a corpus, in order): the
    sums add (minima take the minimum) and the kept rows concatenate up to
    ``keep``: the result of one run over the concatenated inputs, to float
    rounding. The parts must come from the same model, layers, key set, hooks,
    BOS setting and ``keep`` (ValueError otherwise).

    Non-finite values: an input whose attention pattern (or key-set residual) held a
    NaN or inf is left out of every statistic over inputs (``sums``: the means divide
    by :attr:`n_used`, not ``n_inputs``) and reported once by a ``RuntimeWarning``
    (input, hook, how many entries); its kept per-input rows show what was measured.

    >>> import torch
    >>> from massact_lens.examples import tiny_model
    >>> model, tokens = tiny_model(), torch.randint(0, 64, (4, 6))
    >>> parts = [attention_concentration(model, t, progress=False) for t in (tokens[:1], tokens[1:])]
    >>> merged = AttentionConcentration.merge(parts)
    >>> merged.n_inputs, merged.mass.shape
    (4, torch.Size([4, 2, 4]))
    """

    #: Heads per layer measured (``layers``).
    n_heads: int
    #: The hook points read.
    hook_names: tuple[str, ...]
    #: Per layer, where the logits came from: ``"hook_attn_scores"`` (real
    #: pre-softmax scores) or ``"log(hook_pattern)"`` (equal up to a per-query
    #: constant, which the logit gap does not depend on).
    logit_source: tuple[str, ...]
    #: Per kept input, the mean over its real queries of the attention probability on C.
    mass: Float[torch.Tensor, "n_kept layer head_index"]
    #: What uniform attention over each query's visible keys would put on C (kept inputs),
    #: averaged over the layers (they differ only where some layers have a sliding
    #: window: :attr:`layer_uniform_mass` has each).
    uniform_mass: Float[torch.Tensor, " n_kept"]
    #: Mean centred logit of (query, C key) pairs minus that of (query, other key)
    #: pairs, per kept input; NaN when a group is empty.
    logit_gap: Float[torch.Tensor, "n_kept layer head_index"]
    #: ``|C|`` per kept input (real key positions only).
    n_positions: Int[torch.Tensor, " n_kept"]
    #: Real tokens per kept input.
    lengths: Int[torch.Tensor, " n_kept"]
    # ``sums`` (from SummedResult), float64 over every input: ``mass``, ``mass_sq``, ``mass_min``,
    # ``gap``, ``gap_n`` (inputs with a finite gap) ``[layer, head]``; ``uniform_layer``
    # ``[layer]``; ``uniform``, ``n_positions``, ``lengths``, ``n_used`` (scalars).
    #: The uniform baseline per kept input and layer: a query of a sliding-window layer
    #: sees only the keys in its window (``sliding_window`` / ``layer_types`` of the HF
    #: config), so uniform attention over them puts a different share on C.
    layer_uniform_mass: Float[torch.Tensor, "n_kept layer"] | None = None


    @property
    def n_used(self) -> int:
        """How many inputs the statistics cover: every input but those that held a NaN or inf."""
        return int(self.sums["n_used"]) if "n_used" in self.sums else self.n_inputs

    @property
    def mean_mass(self) -> Float[torch.Tensor, "layer head_index"]:
        """The attention on C per layer and head, averaged over every (finite) input."""
        return (self.sums["mass"] / self.n_used).float()

    @property
    def mean_uniform_mass(self) -> float:
        """What uniform attention would put on C, averaged over every (finite) input (and over layers)."""
        return float(self.sums["uniform"]) / self.n_used if self.n_used else math.nan

    def layer_uniform(self, i: int) -> float:
        """The uniform baseline of the ``i``-th measured layer, averaged over every input."""
        if "uniform_layer" not in self.sums:
            return self.mean_uniform_mass
        return float(self.sums["uniform_layer"][i]) / self.n_used if self.n_used else math.nan

    def sink_scores(self) -> pd.DataFrame:
        """One row per (layer, head), sorted by ``mass`` (the sink score), largest first.

        Over every input: ``mass`` (mean), ``mass_std`` (sample std over inputs),
        ``mass_min``, ``uniform`` (mean uniform baseline), ``lift`` (mass / uniform),
        ``logit_gap`` (mean over inputs with a gap), ``positions``.
        """
        n = self.n_used
        mean = self.sums["mass"] / n
        std = ((self.sums["mass_sq"] - n * mean**2).clamp_min(0) / max(n - 1, 1)).sqrt() if n > 1 else torch.zeros_like(mean)
        gap = self.sums["gap"] / self.sums["gap_n"]
        rows = []
        for i, layer in enumerate(self.layers):
            uniform = self.layer_uniform(i)
            for head in range(self.n_heads):
                m = float(mean[i, head])
                rows.append(
                    {
                        "layer": layer,
                        "head": head,
                        "mass": m,
                        "mass_std": float(std[i, head]),
                        "mass_min": float(self.sums["mass_min"][i, head]),
                        "uniform": uniform,
                        "lift": m / uniform if uniform > 0 else math.inf,
                        "logit_gap": float(gap[i, head]),
                        "positions": self.positions,
                    }
                )
        return pd.DataFrame(rows).sort_values("mass", ascending=False, ignore_index=True)

    def layer_mass(self) -> pd.DataFrame:
        """Per layer: mass on C averaged over heads and every input, and the most concentrated head."""
        rows = []
        mean = self.sums["mass"] / self.n_used
        for i, layer in enumerate(self.layers):
            per_head = mean[i]
            rows.append(
                {
                    "layer": layer,
                    "mass": float(per_head.mean()),
                    "max_head_mass": float(per_head.max()),
                    "max_head": int(per_head.argmax()),
                    "uniform": self.layer_uniform(i),
                    "positions": self.positions,
                }
            )
        return pd.DataFrame(rows)

    def to_dataframe(self) -> pd.DataFrame:
        """Every (kept input, layer, head) as a row: mass, uniform baseline, logit gap, |C|, length."""
        n, n_layers, h = self.mass.shape
        i = torch.arange(n).repeat_interleave(n_layers * h)
        j = torch.arange(n_layers).repeat_interleave(h).repeat(n)
        k = torch.arange(h).repeat(n * n_layers)
        return pd.DataFrame(
            {
                "input_index": i.numpy(),
                "layer": [self.layers[x] for x in j.tolist()],
                "head": k.numpy(),
                "mass": self.mass.flatten().numpy(),
                "uniform": (self.uniform_mass[i] if self.layer_uniform_mass is None
                            else self.layer_uniform_mass[i, j]).numpy(),
                "logit_gap": self.logit_gap.flatten().numpy(),
                "n_positions": self.n_positions[i].numpy(),
                "length": self.lengths[i].numpy(),
            }
        )

    merge_same = ("layers", "n_heads", "positions", "key_set", "prepend_bos", "hook_names", "logit_source", "keep")

    @classmethod
    def _merged(cls, parts: list[AttentionConcentration]) -> AttentionConcentration:
        first = parts[0]
        rows = [(p.n_inputs, {name: getattr(p, name) for name in _KEPT} | {"attention_mask": p.lengths[:, None]})
                for p in parts]
        kept = merge_kept(rows, keep_limit(first.keep), _KEPT)
        kept.pop("attention_mask")
        return replace(first, n_inputs=sum(p.n_inputs for p in parts), **kept,
                       sums=add_sums([p.sums for p in parts], minimum=("mass_min",)))


def attention_concentration(
    model: TransformerLensModel,
    inputs: Inputs,
    positions: Positions = "start",
    *,
    layers: Sequence[int] | None = None,
    keep: Keep = 1000,
    batch_size: int = 16,
    prepend_bos: bool | None = None,
    attention_mask: torch.Tensor | None = None,
    progress: bool = True,
    by_length: bool | None = None,
) -> AttentionConcentration:
    """How much attention each head puts on the key positions C (the attention sink).

    Per input, layer and head: the attention probability on the keys in C, summed
    over C and averaged over the input's real (non-padding) queries (all of them,
    also queries in C); averaged over inputs in :meth:`AttentionConcentration.sink_scores`.

    Cost: one forward pass per batch. Fused route (the default wherever C is known before
    the pass and the model's attention runs through HF's kernel registry: the LLaMA family,
    Gemma 3, BERT): the attention kernel weighs one extra value column, 1 on C, so the mass
    on C comes out of the kernel with the output, and the logit gap from running sums of
    the keys; no ``[query, key]`` tensor exists (SmolLM2-135M, 2,000 tokens: about the scan's
    time and peak memory; bench/README.md, "Attention at forward cost"). Eager route (C read
    from the same pass's residual stream, GPT-2-style joint QKV, soft-capped logits, a hook
    of yours inside attention, ``MASSACT_LENS_EAGER=1``): per layer it reads ``hook_pattern``
    and ``hook_attn_scores`` and reduces them at once to ``[batch, head, key_pos]`` sums
    (memory ~ length^2). ``result.hook_names`` says which route ran. It keeps running sums
    over every input and the per-input rows (``2 x layers x heads`` floats each) of the
    first ``keep``.

    Args:
        model: a TransformerBridge (eager attention, so ``hook_pattern`` fires).
        inputs: strings, a token tensor, or an iterable of batches
            (see :mod:`massact_lens._core.batching`).
        positions: the key positions C (anything :func:`~massact_lens.attention.keys.as_rule` accepts).
        layers: layers to measure (default all).
        keep: how many inputs (the first ones) keep their per-input rows
            (``mass``, ``logit_gap``, ...; :meth:`AttentionConcentration.to_dataframe`);
            ``"all"`` for every input. The summaries cover every input either way.
        batch_size, prepend_bos, attention_mask, progress: as in :func:`massact_lens.scan`.
        by_length: batch the inputs longest first (little padding computed; results in
            input order). None (default): whenever the key set allows it (the library's
            rules; a callable or a rule of your own gets the batches in input order, as
            ``batch.start + row``); False: in input order (batch boundaries as given, e.g.
            for a merge equal bit for bit to one run).

    Non-finite values (a NaN or inf from a hook of yours upstream, an overflow): an input
    whose pattern or key-set residual held one is left out of every statistic (the pass
    does not raise) and reported once, after the pass, by a ``RuntimeWarning`` naming the
    input, the hook and how many entries.

    Raises:
        ValueError / TypeError: a layer that does not exist, an empty or malformed C,
            bad inputs: before any forward pass.

    >>> from massact_lens.examples import minilm
    >>> sinks = attention_concentration(minilm(), ["The cat sat on the mat.", "Hello world."],
    ...                                 "start", progress=False)
    >>> sinks.layer_mass()["mass"].round(1).tolist()
    [0.4, 0.7, 0.7, 0.6, 0.8, 0.6]
    """
    refuse_plain_hf(model, "attention_concentration")
    keep = check_keep(keep)
    chosen = check_layers(model, layers, ("pattern",))
    plan, rule = keyed_plan(model, inputs, positions, batch_size=batch_size, attention_mask=attention_mask,
                            prepend_bos=prepend_bos, by_length=by_length)
    fused = fused_route(model, chosen) is None
    keys = KeyPositions(model, rule, early=fused)
    sinks = _Concentration(model, plan, keys, chosen, keep, fused=fused)
    measure(model, plan, keys, sinks, progress=progress, desc="attention")
    keys.warn_if_empty()
    keys.nonfinite.warn("attention_concentration")
    return sinks.result()


class _Concentration(KeyedMeasurement):
    """The measurement behind :func:`attention_concentration`: per layer, ``hook_pattern``
    (and ``hook_attn_scores``) reduced at once to ``[batch, head, key_pos]`` sums, read
    against C once the pass ends."""

    def __init__(self, model: TransformerLensModel, plan: BatchPlan, keys: KeyPositions, layers: tuple[int, ...],
                 keep: Keep, *, fused: bool = False) -> None:
        super().__init__(model, plan, keys, layers)
        self.keep = keep
        self.fused = fused
        self.layer_probes: dict[int, MassProbe] = {}
        self.causal = is_causal(model)
        self.has_scores = all(attention_hook("scores", layer) in model.hook_dict for layer in layers)  # type: ignore[attr-defined]
        self.n_heads = int(model.cfg.n_heads)
        self.windows = attention_windows(model)  # per layer: the keys a query sees
        self.pending: dict[int, dict[str, Any]] = {}
        self.reduced: dict[int, dict[str, torch.Tensor]] = {}
        self.sources: dict[int, str] = {}
        n_layers = len(layers)
        sums = {name: torch.zeros(n_layers, self.n_heads, dtype=torch.float64) for name in ("mass", "mass_sq", "gap", "gap_n")}
        sums["mass_min"] = torch.full((n_layers, self.n_heads), math.inf, dtype=torch.float64)
        self.sums = sums | {name: torch.zeros((), dtype=torch.float64)
                            for name in ("uniform", "n_positions", "lengths", "n_used")}
        self.sums["uniform_layer"] = torch.zeros(n_layers, dtype=torch.float64)
        self.kept = KeptInputs(keep_limit(keep), _KEPT)

    def probes(self, batch: Batch) -> dict[int, MassProbe]:
        """The fused route: one :class:`MassProbe` per layer, with C of this batch."""
        if not self.fused:
            return {}
        assert self.keys.c_mask is not None, "KeyPositions (early) must give C before the pass"
        real = batch.attention_mask.to(self.device).bool()
        self.layer_probes = {layer: MassProbe(self.keys.c_mask, real, self.causal, self.windows[layer], self._note(layer))
                             for layer in self.layers}
        return dict(self.layer_probes)

    def _note(self, layer: int) -> Any:
        name = attention_hook("z", layer)
        return lambda tensor, real: self.keys.nonfinite.note(name, tensor, real, 1)

    def hooks(self, batch: Batch) -> HookList:
        if self.fused:
            return []
        real = batch.attention_mask.to(self.device).bool()
        kinds = ("pattern", "scores") if self.has_scores else ("pattern",)
        return [(attention_hook(kind, layer), self._store(layer, kind, real)) for layer in self.layers for kind in kinds]

    def _store(self, layer: int, kind: str, real: torch.Tensor) -> Any:
        def read(tensor: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            slot = self.pending.setdefault(layer, {})
            slot[kind] = tensor.detach()
            if kind == "pattern":  # scores hold -inf by design; a NaN there reaches the pattern
                self.keys.nonfinite.note(attention_hook(kind, layer), slot[kind], real, 2)
            if "pattern" in slot and ("scores" in slot or not self.has_scores):
                self._reduce(layer, real)

        return read

    def _reduce(self, layer: int, real: torch.Tensor) -> None:
        slot = self.pending.pop(layer)
        pattern = slot["pattern"]
        key_len = int(pattern.shape[-1])
        allowed = allowed_keys(real, key_len, self.causal, self.windows[layer])
        n_queries = real.sum(1).clamp_min(1).float()
        p = pattern.float().where(real[:, None, :, None], 0.0)
        centred, ok, source = centred_logits(pattern, slot.get("scores"), allowed)
        self.sources[layer] = source
        visible = allowed.float()
        self.reduced[layer] = {
            "mass": p.sum(2) / n_queries[:, None, None],
            "uniform": (visible / visible.sum(-1, keepdim=True).clamp_min(1)).sum(1) / n_queries[:, None],
            "gap_sum": centred.sum(2),
            "gap_count": ok.float().sum(2),
        }

    def _fused_rows(self, real: torch.Tensor, c_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        missed = [layer for layer, probe in self.layer_probes.items() if not probe.ran]
        if missed:
            raise RuntimeError(f"The attention of layers {missed} did not run through the probe kernel: a hook "
                               "inside attention was attached during the pass? Run with MASSACT_LENS_EAGER=1.")
        rows = [self.layer_probes[layer].rows for layer in self.layers]
        n_positions = (fit_width(c_mask, int(real.shape[1])) & real).sum(-1)
        return (torch.stack([r["mass"] for r in rows], 1).cpu(), torch.stack([r["gap"] for r in rows], 1).cpu(),
                torch.stack([r["uniform"] for r in rows], 1), n_positions)

    def _rows(self, real: torch.Tensor, c_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per input of the batch: mass and logit gap ``[batch, layer, head]`` (on the CPU), the uniform
        mass ``[batch, layer]`` and ``|C|``."""
        if self.fused:
            return self._fused_rows(real, c_mask)
        for layer in list(self.pending):  # a scores hook that never fired
            if "pattern" in self.pending[layer]:
                self._reduce(layer, real)
        missing = [layer for layer in self.layers if layer not in self.reduced]
        if missing:
            raise RuntimeError(
                f"hook_pattern did not fire in layers {missing}: load the model with eager attention "
                "(massact_lens.load_model does)."
            )
        masses, gaps, uniforms, n_positions = [], [], [], None
        for layer in self.layers:
            r = self.reduced.pop(layer)
            key_len = int(r["mass"].shape[-1])
            in_c = fit_width(c_mask, key_len) & real_keys(real, key_len)
            other = ~in_c & real_keys(real, key_len)
            c, o = in_c[:, None].float(), other[:, None].float()
            masses.append((r["mass"] * c).sum(-1))
            gap_c = (r["gap_sum"] * c).sum(-1) / (r["gap_count"] * c).sum(-1)
            gap_o = (r["gap_sum"] * o).sum(-1) / (r["gap_count"] * o).sum(-1)
            gaps.append(gap_c - gap_o)
            uniforms.append((r["uniform"] * in_c.float()).sum(-1))
            if n_positions is None:
                n_positions = in_c.sum(-1)
        assert n_positions is not None
        return torch.stack(masses, 1).cpu(), torch.stack(gaps, 1).cpu(), torch.stack(uniforms, 1), n_positions

    def add(self, batch: Batch, c_mask: torch.Tensor) -> None:
        mass, gap, by_layer, n_positions = self._rows(batch.attention_mask.bool(), c_mask)
        # one value per input: the layers' mean, or (no layer with a window) the first layer's exactly
        windowed = len({self.windows[layer] for layer in self.layers}) > 1
        uniform = by_layer.mean(1) if windowed else by_layer[:, 0]
        sums = self.sums
        used = ~self.keys.nonfinite.bad_rows if self.keys.nonfinite.bad_rows is not None else torch.ones(len(mass), dtype=torch.bool)
        m64, g64 = mass.double()[used], gap.double()[used]
        finite = ~torch.isnan(g64)
        sums["mass"] += m64.sum(0)
        sums["mass_sq"] += (m64**2).sum(0)
        if len(m64):
            sums["mass_min"] = torch.minimum(sums["mass_min"], m64.amin(0))
        sums["gap"] += g64.masked_fill(~finite, 0.0).sum(0)
        sums["gap_n"] += finite.sum(0)
        on_device = used.to(uniform.device)
        sums["uniform"] += uniform.double()[on_device].sum().cpu()
        sums["uniform_layer"] += by_layer.double()[on_device].sum(0).cpu()
        sums["n_positions"] += n_positions[on_device].sum().cpu()
        sums["lengths"] += batch.lengths[used.to(batch.lengths.device)].sum().cpu()
        sums["n_used"] += int(used.sum())
        rows, inputs = self.kept.choose(batch.input_indices)
        if rows:
            take = torch.tensor(rows, dtype=torch.long)
            self.kept.add(batch.lengths[:, None].cpu()[take], inputs, mass=mass[take], uniform_mass=uniform.cpu()[take],
                          logit_gap=gap[take], n_positions=n_positions.cpu().long()[take],
                          lengths=batch.lengths.cpu().long()[take], layer_uniform_mass=by_layer.cpu()[take])

    def result(self) -> AttentionConcentration:
        n_layers, n_heads = len(self.layers), self.n_heads
        kinds = ("pattern", "scores") if self.has_scores else ("pattern",)
        empty = {"mass": torch.zeros(0, n_layers, n_heads), "uniform_mass": torch.zeros(0),
                 "logit_gap": torch.zeros(0, n_layers, n_heads), "n_positions": torch.zeros(0, dtype=torch.long),
                 "lengths": torch.zeros(0, dtype=torch.long), "attention_mask": torch.zeros(0, 1, dtype=torch.long),
                 "layer_uniform_mass": torch.zeros(0, n_layers)}
        rows = self.kept.tensors(empty)
        return AttentionConcentration(
            **self.base_fields(),
            n_heads=n_heads,
            hook_names=tuple(f"blocks.{layer}.attn (fused kernel)" for layer in self.layers) if self.fused
            else tuple(attention_hook(k, layer) for layer in self.layers for k in kinds),
            logit_source=tuple("q.k (fused kernel)" if self.fused else self.sources.get(layer, "") for layer in self.layers),
            keep=self.keep,
            **{name: detached(rows[name]) for name in _KEPT},
            sums={name: detached(t) for name, t in self.sums.items()},
        )
