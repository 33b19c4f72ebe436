"""Attention concentration: how much each head attends to the key positions C (the sink).

>>> from massact_lens.examples import minilm
>>> sinks = attention_concentration(minilm(), ["The cat sat on the mat."], "start", layers=[2], progress=False)
>>> sinks.mass.shape   # inputs x layers x heads
torch.Size([1, 1, 12])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._types import HookList, Inputs, Provenance, is_causal
from massact_lens.attention._passes import (
    allowed_keys,
    centred_logits,
    check_layers,
    detached,
    real_keys,
    run_passes,
    warn_empty,
)
from massact_lens.attention.keys import Positions, as_rule, fit_width
from massact_lens.batching import Batch, plan_batches
from massact_lens.hook_names import attention_hook

__all__ = ["AttentionConcentration", "attention_concentration"]


@dataclass(frozen=True)
class AttentionConcentration:
    """Attention mass on the key positions C, per input, layer and head."""

    #: The model as it was when it ran.
    provenance: Provenance
    #: The layers measured, ``n_heads`` heads each.
    layers: tuple[int, ...]
    n_heads: int
    #: The key set that defined C (its description).
    positions: str
    #: BOS / [CLS] prepended to strings (None: token tensors as given).
    prepend_bos: bool | None
    #: The hook points read.
    hook_names: tuple[str, ...]
    #: Per layer, where the logits came from: ``"hook_attn_scores"`` (real
    #: pre-softmax scores) or ``"log(hook_pattern)"`` (equal up to a per-query
    #: constant, which the logit gap does not depend on).
    logit_source: tuple[str, ...]
    #: Per input, the mean over its real queries of the attention probability on C.
    mass: Float[torch.Tensor, "n_inputs layer head_index"]
    #: What uniform attention over each query's visible keys would put on C.
    uniform_mass: Float[torch.Tensor, " n_inputs"]
    #: Mean centred logit of (query, C key) pairs minus that of (query, other key)
    #: pairs; NaN when a group is empty.
    logit_gap: Float[torch.Tensor, "n_inputs layer head_index"]
    #: ``|C|`` per input (real key positions only).
    n_positions: Int[torch.Tensor, " n_inputs"]
    #: Real tokens per input.
    lengths: Int[torch.Tensor, " n_inputs"]

    @property
    def model(self) -> Provenance:
        """The provenance (the name of this field before 0.2; reads like the dict it was)."""
        return self.provenance

    @property
    def n_inputs(self) -> int:
        return int(self.mass.shape[0])

    def sink_scores(self) -> pd.DataFrame:
        """One row per (layer, head), sorted by ``mass`` (the sink score), largest first.

        Columns: ``mass`` (mean over inputs), ``mass_std`` (over inputs),
        ``mass_min``, ``uniform`` (mean uniform baseline), ``lift`` (mass / uniform),
        ``logit_gap`` (mean over inputs), ``positions``.
        """
        rows = []
        uniform = float(self.uniform_mass.mean())
        for i, layer in enumerate(self.layers):
            for head in range(self.n_heads):
                m = self.mass[:, i, head]
                rows.append(
                    {
                        "layer": layer,
                        "head": head,
                        "mass": float(m.mean()),
                        "mass_std": float(m.std()) if self.n_inputs > 1 else 0.0,
                        "mass_min": float(m.min()),
                        "uniform": uniform,
                        "lift": float(m.mean()) / uniform if uniform > 0 else math.inf,
                        "logit_gap": float(self.logit_gap[:, i, head].nanmean()),
                        "positions": self.positions,
                    }
                )
        return pd.DataFrame(rows).sort_values("mass", ascending=False, ignore_index=True)

    def layer_mass(self) -> pd.DataFrame:
        """Per layer: mass on C averaged over heads and inputs, and the most concentrated head."""
        rows = []
        for i, layer in enumerate(self.layers):
            per_head = self.mass[:, i].mean(0)
            rows.append(
                {
                    "layer": layer,
                    "mass": float(per_head.mean()),
                    "max_head_mass": float(per_head.max()),
                    "max_head": int(per_head.argmax()),
                    "uniform": float(self.uniform_mass.mean()),
                    "positions": self.positions,
                }
            )
        return pd.DataFrame(rows)

    def to_dataframe(self) -> pd.DataFrame:
        """Every (input, layer, head) as a row: mass, uniform baseline, logit gap, |C|, length."""
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
                "uniform": self.uniform_mass[i].numpy(),
                "logit_gap": self.logit_gap.flatten().numpy(),
                "n_positions": self.n_positions[i].numpy(),
                "length": self.lengths[i].numpy(),
            }
        )


def attention_concentration(
    model: TransformerLensModel,
    inputs: Inputs,
    positions: Positions = "start",
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    prepend_bos: bool | None = None,
    attention_mask: torch.Tensor | None = None,
    progress: bool = True,
) -> AttentionConcentration:
    """How much attention each head puts on the key positions C (the attention sink).

    Per input, layer and head: the attention probability on the keys in C, summed
    over C and averaged over the input's real (non-padding) queries (all of them,
    also queries in C); averaged over inputs in :meth:`AttentionConcentration.sink_scores`.

    Cost: one forward pass per batch. Per layer it reads ``hook_pattern`` and
    ``hook_attn_scores`` and reduces them at once to ``[batch, head, key_pos]``
    sums; no cache. A :class:`MassiveTokens` rule also reads the residual stream
    (reduced to one bool per position).

    Args:
        model: a TransformerBridge (eager attention, so ``hook_pattern`` fires).
        inputs: strings, a token tensor, or an iterable of batches
            (see :mod:`massact_lens.batching`).
        positions: the key positions C (anything :func:`~massact_lens.attention.keys.as_rule` accepts).
        layers: layers to measure (default all).
        batch_size, prepend_bos, attention_mask, progress: as in :func:`massact_lens.scan`.

    Raises:
        ValueError / TypeError: a layer that does not exist, an empty or malformed C,
            bad inputs: before any forward pass.

    >>> from massact_lens.examples import minilm
    >>> sinks = attention_concentration(minilm(), ["The cat sat on the mat.", "Hello world."],
    ...                                 "start", progress=False)
    >>> sinks.layer_mass()["mass"].round(1).tolist()
    [0.4, 0.7, 0.7, 0.6, 0.8, 0.6]
    """
    chosen = check_layers(model, layers, ("pattern",))
    plan = plan_batches(model, inputs, batch_size=batch_size, attention_mask=attention_mask, prepend_bos=prepend_bos)
    rule = as_rule(model, positions, plan)
    causal = is_causal(model)
    has_scores = all(attention_hook("scores", layer) in model.hook_dict for layer in chosen)  # type: ignore[attr-defined]
    pending: dict[int, dict[str, Any]] = {}
    reduced: dict[int, dict[str, torch.Tensor]] = {}
    sources: dict[int, str] = {}
    out: dict[str, list[torch.Tensor]] = {"mass": [], "uniform": [], "gap": [], "n": [], "len": []}

    def reduce(layer: int, real: torch.Tensor) -> None:
        slot = pending.pop(layer)
        pattern = slot["pattern"]
        key_len = int(pattern.shape[-1])
        allowed = allowed_keys(real, key_len, causal)
        n_queries = real.sum(1).clamp_min(1).float()
        p = pattern.float() * real[:, None, :, None]
        centred, ok, source = centred_logits(pattern, slot.get("scores"), allowed)
        sources[layer] = source
        visible = allowed.float()
        reduced[layer] = {
            "mass": p.sum(2) / n_queries[:, None, None],
            "uniform": (visible / visible.sum(-1, keepdim=True).clamp_min(1)).sum(1) / n_queries[:, None],
            "gap_sum": centred.sum(2),
            "gap_count": ok.float().sum(2),
        }

    def layer_hooks(batch: Batch) -> HookList:
        real = batch.attention_mask.bool()
        hooks: HookList = []
        for layer in chosen:

            def store(kind: str, layer: int = layer):
                def read(tensor: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
                    pending.setdefault(layer, {})[kind] = tensor.detach()
                    slot = pending[layer]
                    if "pattern" in slot and ("scores" in slot or not has_scores):
                        reduce(layer, real)

                return read

            hooks.append((attention_hook("pattern", layer), store("pattern")))
            if has_scores:
                hooks.append((attention_hook("scores", layer), store("scores")))
        return hooks

    def finish(batch: Batch, c_mask: torch.Tensor) -> None:
        real = batch.attention_mask.bool()
        for layer in list(pending):  # a scores hook that never fired
            if "pattern" in pending[layer]:
                reduce(layer, real)
        missing = [layer for layer in chosen if layer not in reduced]
        if missing:
            raise RuntimeError(
                f"hook_pattern did not fire in layers {missing}: load the model with eager attention "
                "(massact_lens.load_model does)."
            )
        masses, gaps = [], []
        uniform = None
        n_positions = None
        for layer in chosen:
            r = reduced.pop(layer)
            key_len = int(r["mass"].shape[-1])
            in_c = fit_width(c_mask, key_len) & real_keys(real, key_len)
            other = ~in_c & real_keys(real, key_len)
            c, o = in_c[:, None].float(), other[:, None].float()
            masses.append((r["mass"] * c).sum(-1))
            gap_c = (r["gap_sum"] * c).sum(-1) / (r["gap_count"] * c).sum(-1)
            gap_o = (r["gap_sum"] * o).sum(-1) / (r["gap_count"] * o).sum(-1)
            gaps.append(gap_c - gap_o)
            if uniform is None:
                uniform = (r["uniform"] * in_c.float()).sum(-1)
                n_positions = in_c.sum(-1)
        assert uniform is not None and n_positions is not None
        out["mass"].append(torch.stack(masses, 1).cpu())
        out["gap"].append(torch.stack(gaps, 1).cpu())
        out["uniform"].append(uniform.cpu())
        out["n"].append(n_positions.cpu())
        out["len"].append(batch.lengths.cpu())

    run_passes(model, plan, rule, layer_hooks, finish, progress=progress, desc="attention")
    n_positions = torch.cat(out["n"]).long()
    warn_empty(n_positions, rule.describe())
    names = tuple(attention_hook(k, layer) for layer in chosen for k in (("pattern", "scores") if has_scores else ("pattern",)))
    return AttentionConcentration(
        provenance=Provenance.of(model),
        layers=chosen,
        n_heads=int(model.cfg.n_heads),
        positions=rule.describe(),
        prepend_bos=plan.prepend_bos,
        hook_names=names,
        logit_source=tuple(sources.get(layer, "") for layer in chosen),
        mass=detached(torch.cat(out["mass"])),
        uniform_mass=detached(torch.cat(out["uniform"])),
        logit_gap=detached(torch.cat(out["gap"])),
        n_positions=detached(n_positions),
        lengths=detached(torch.cat(out["len"]).long()),
    )

