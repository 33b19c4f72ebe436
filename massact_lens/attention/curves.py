"""The sink curve: attention on the key set C as a function of the query's position.

StreamingLLM-style questions (does every query, however far from the start, keep
putting attention on the first token?) need the mass on C per query position, per
layer and head, over a long context. :func:`sink_curve` reads it in the fused kernel
(:mod:`massact_lens.attention._fused`), so a pass over 8,192 tokens costs a forward pass.

>>> from massact_lens.examples import minilm
>>> curve = sink_curve(minilm(), ["The cat sat on the mat."], "start", layers=[2], progress=False)
>>> curve.mass.shape                       # layer, head, query position
torch.Size([1, 12, 9])
>>> round(float(curve.mass[0, :, 0].mean()), 2) == round(float(curve.layer_curve()["mass"][0]), 2)
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._plain_hf import refuse_plain_hf
from massact_lens._core.batching import Batch, BatchPlan
from massact_lens._core.fast_paths import fused_route
from massact_lens._core.hook_names import attention_hook
from massact_lens._core.loop import measure
from massact_lens._core.results import SummedResult, add_sums
from massact_lens._core.types import HookList, Inputs, is_causal
from massact_lens.attention._fused import MassProbe, visible_sums
from massact_lens.attention._passes import (
    KeyedFields,
    KeyedMeasurement,
    KeyPositions,
    attention_windows,
    check_layers,
    detached,
)
from massact_lens.attention.keys import Positions, fit_width, keyed_plan

__all__ = ["SinkCurve", "sink_curve"]


def _pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - int(t.shape[-1]))) if int(t.shape[-1]) < width else t


@dataclass(frozen=True, repr=False)
class SinkCurve(SummedResult, KeyedFields):
    """Attention mass on C per layer, head and query position, averaged over the inputs
    that have a real query at that position.

    ``sums`` (float64): ``mass`` ``[layer, head, query_pos]``, ``uniform`` ``[layer,
    query_pos]`` (what uniform attention over the keys a query sees would put on C),
    ``count`` ``[query_pos]`` (inputs with a real query there, every finite input).
    :meth:`merge` adds them (parts of other lengths are padded).

    >>> import torch
    >>> from massact_lens.examples import minilm
    >>> model = minilm()
    >>> parts = [sink_curve(model, [t], progress=False) for t in ("One two.", "One two three four.")]
    >>> SinkCurve.merge(parts).count.tolist()
    [2, 2, 2, 2, 2, 1, 1]
    """

    #: Heads per layer.
    n_heads: int
    #: The route: ``"fused kernel"`` (attention output of an indicator value column) or
    #: ``"hook_pattern"`` (eager patterns summed over C).
    route: str

    @property
    def count(self) -> torch.Tensor:
        """Per query position, how many inputs had a real query there."""
        return self.sums["count"].long()

    @property
    def mass(self) -> Float[torch.Tensor, "layer head query_pos"]:
        """The mean attention mass on C, per layer, head and query position (NaN where no input reached)."""
        return (self.sums["mass"] / self.sums["count"]).float()

    @property
    def uniform(self) -> Float[torch.Tensor, "layer query_pos"]:
        """What uniform attention over each query's visible keys would put on C."""
        return (self.sums["uniform"] / self.sums["count"]).float()

    def layer_curve(self) -> pd.DataFrame:
        """One row per (layer, query position): the mass on C averaged over heads, the
        least and most concentrated head, the uniform baseline and how many inputs."""
        mass, uniform, count = self.mass, self.uniform, self.count
        rows = [{"layer": layer, "query_pos": q, "mass": float(mass[i, :, q].mean()),
                 "min_head": float(mass[i, :, q].min()), "max_head": float(mass[i, :, q].max()),
                 "uniform": float(uniform[i, q]), "n_inputs": int(count[q])}
                for i, layer in enumerate(self.layers) for q in range(int(mass.shape[-1])) if count[q] > 0]
        return pd.DataFrame(rows)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (layer, head, query position) with an input: mass on C and the uniform baseline."""
        mass, uniform, count = self.mass, self.uniform, self.count
        positions = [q for q in range(int(mass.shape[-1])) if count[q] > 0]
        return pd.DataFrame([{"layer": layer, "head": h, "query_pos": q, "mass": float(mass[i, h, q]),
                              "uniform": float(uniform[i, q])}
                             for i, layer in enumerate(self.layers) for h in range(self.n_heads) for q in positions])

    def at(self, positions: Sequence[int]) -> pd.DataFrame:
        """The layers' curves (mean over heads) at a few query positions, one column each."""
        reached = [q for q in range(int(self.count.shape[-1])) if self.count[q] > 0]
        if isinstance(positions, str) or not isinstance(positions, Sequence) or \
                any(isinstance(q, bool) or not isinstance(q, int) or q not in reached for q in positions):
            raise ValueError(f"positions must be a list of query positions the curve reached (0..{len(reached) - 1}), "
                             f"not {positions!r}: pass e.g. at([1, {max(len(reached) - 1, 0)}]).")
        curve = self.layer_curve()
        table = curve[curve["query_pos"].isin(list(positions))].pivot(index="layer", columns="query_pos", values="mass")
        return table.rename(columns=lambda q: f"q={q}")

    def _summary_lines(self) -> list[str]:
        width = int(self.mass.shape[-1])
        last = width - 1
        mean_first = float(self.mass[:, :, min(1, last)].mean()) if width else math.nan
        return [f"{len(self.layers)} layers x {self.n_heads} heads x {width} query positions, C = {self.positions}",
                f"mass on C, mean over layers and heads: {mean_first:.3f} at query {min(1, last)}, "
                f"{float(self.mass[:, :, last].mean()):.3f} at query {last} ({self.route})"]

    merge_same = ("layers", "n_heads", "positions", "key_set", "prepend_bos")

    @classmethod
    def _merged(cls, parts: list[SinkCurve]) -> SinkCurve:
        width = max(int(p.sums["count"].shape[-1]) for p in parts)
        sums = add_sums([{name: _pad_to(t, width) for name, t in p.sums.items()} for p in parts])
        routes = sorted({p.route for p in parts})
        return replace(parts[0], n_inputs=sum(p.n_inputs for p in parts), sums=sums, route=" + ".join(routes))


def sink_curve(
    model: TransformerLensModel,
    inputs: Inputs,
    positions: Positions = "start",
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 1,
    prepend_bos: bool | None = None,
    attention_mask: torch.Tensor | None = None,
    progress: bool = True,
) -> SinkCurve:
    """Attention mass on the key positions C as a function of the query position, per layer and head.

    For one long text (or several: each query position averages the inputs that reach
    it), the curve StreamingLLM-style analyses read: does a query thousands of tokens
    from the start still attend to it, and how far above the uniform baseline?

    Cost: on the fused route (:func:`~massact_lens._core.fast_paths.fused_route`: the
    LLaMA family, Gemma 3, BERT, ...) one forward pass with one extra value column per
    layer: no ``[query, key]`` tensor, so memory is a forward pass's at any context
    length. Elsewhere (GPT-2-style joint QKV, soft-capped logits,
    ``MASSACT_LENS_EAGER=1``) each layer's ``hook_pattern`` is read and summed over C at
    once (``[batch, head, query, key]`` per layer, as eager attention holds anyway).
    The result holds ``layers x heads x positions`` float64 sums.

    Args:
        positions: the key set C (anything :func:`~massact_lens.attention.keys.as_rule` accepts);
            C is found before each batch's pass (a key set read from the residual
            stream gets a pass of its own).
        layers: layers to measure (default all).
        batch_size: inputs per pass (1: one long text at a time).
        prepend_bos, attention_mask, progress: as in :func:`massact_lens.scan`.

    >>> from massact_lens.examples import minilm
    >>> curve = sink_curve(minilm(), ["The cat sat on the mat."], layers=[3], progress=False)
    >>> list(curve.at([0, 8]).columns)
    ['q=0', 'q=8']
    """
    refuse_plain_hf(model, "sink_curve")
    chosen = check_layers(model, layers, ("pattern",))
    plan, rule = keyed_plan(model, inputs, positions, batch_size=batch_size, attention_mask=attention_mask,
                            prepend_bos=prepend_bos, by_length=None)
    fused = fused_route(model, chosen) is None
    keys = KeyPositions(model, rule, early=True)
    curve = _Curve(model, plan, keys, chosen, fused=fused)
    measure(model, plan, keys, curve, progress=progress, desc="sink curve")
    keys.warn_if_empty()
    keys.nonfinite.warn("sink_curve")
    return curve.result()


class _Curve(KeyedMeasurement):
    """The measurement behind :func:`sink_curve`: per layer, the mass on C of every query."""

    def __init__(self, model: TransformerLensModel, plan: BatchPlan, keys: KeyPositions, layers: tuple[int, ...], *,
                 fused: bool) -> None:
        super().__init__(model, plan, keys, layers)
        self.fused = fused
        self.causal = is_causal(model)
        self.windows = attention_windows(model)
        self.n_heads = int(model.cfg.n_heads)
        self.per_query: dict[int, torch.Tensor] = {}
        self.layer_probes: dict[int, MassProbe] = {}
        self.sums: dict[str, torch.Tensor] = {}

    def probes(self, batch: Batch) -> dict[int, MassProbe]:
        if not self.fused:
            return {}
        assert self.keys.c_mask is not None
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
        return [(attention_hook("pattern", layer), self._reader(layer, real)) for layer in self.layers]

    def _reader(self, layer: int, real: torch.Tensor) -> Any:
        def read(pattern: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            self.keys.nonfinite.note(attention_hook("pattern", layer), pattern.detach(), real, 2)
            assert self.keys.c_mask is not None
            c = fit_width(self.keys.c_mask, int(pattern.shape[-1])).to(pattern.device)
            self.per_query[layer] = (pattern.detach().float() * c[:, None, None, :]).sum(-1).transpose(1, 2)

        return read

    def add(self, batch: Batch, c_mask: torch.Tensor) -> None:
        real = batch.attention_mask.bool()
        used = real.clone()
        if self.keys.nonfinite.bad_rows is not None:
            used &= ~self.keys.nonfinite.bad_rows.to(real.device)[:, None]
        width = int(real.shape[1])
        masses, uniforms = [], []
        for layer in self.layers:
            per_query = self.layer_probes[layer].rows.get("per_query") if self.fused else self.per_query.pop(layer, None)
            if per_query is None:
                raise RuntimeError(f"The attention of layer {layer} was not measured in this pass: a hook inside "
                                   "attention was attached during the pass? Run with MASSACT_LENS_EAGER=1.")
            # where(), not a product: NaN * 0 is NaN, and a left-out input must add nothing
            masses.append(torch.where(used[:, :, None], per_query.double(), 0.0).sum(0).T)  # [head, q]
            ones = torch.ones(real.shape[0], 1, width, 1, device=real.device)
            c = fit_width(c_mask, width) & real
            _, n_c = visible_sums(ones, c, causal=self.causal, window=self.windows[layer])
            _, n = visible_sums(ones, real, causal=self.causal, window=self.windows[layer])
            uniforms.append((n_c[:, 0] / n[:, 0].clamp_min(1) * used).sum(0))  # [q]
        batch_sums = {"mass": torch.stack(masses).cpu(), "uniform": torch.stack(uniforms).cpu(),
                      "count": used.double().sum(0).cpu()}
        if not self.sums:
            self.sums = batch_sums
        else:
            self.sums = add_sums([{k: _pad_to(t, max(int(t.shape[-1]), width)) for k, t in self.sums.items()},
                                  {k: _pad_to(t, max(int(self.sums["count"].shape[-1]), width))
                                   for k, t in batch_sums.items()}])

    def result(self) -> SinkCurve:
        if not self.sums:
            n = len(self.layers)
            self.sums = {"mass": torch.zeros(n, self.n_heads, 0, dtype=torch.float64),
                         "uniform": torch.zeros(n, 0, dtype=torch.float64), "count": torch.zeros(0, dtype=torch.float64)}
        return SinkCurve(**self.base_fields(), n_heads=self.n_heads, route="fused kernel" if self.fused else "hook_pattern",
                         sums={name: detached(t) for name, t in self.sums.items()})
