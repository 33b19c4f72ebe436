"""Keys, values and post-LayerNorm attention inputs of the tokens in C vs the other tokens.

>>> from massact_lens.examples import minilm
>>> feats = token_features(minilm(), ["The cat sat on the mat."], "start", layers=[3], progress=False)
>>> feats.counts.tolist()   # [CLS], and the 8 other tokens
[1, 8]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._plain_hf import refuse_plain_hf
from massact_lens._core.batching import Batch, BatchPlan
from massact_lens._core.fast_paths import fused_route
from massact_lens._core.hook_names import attention_hook, resolve_hook_names
from massact_lens._core.loop import measure
from massact_lens._core.probes import hf_attention
from massact_lens._core.results import SummedResult, add_sums
from massact_lens._core.types import HookList, Inputs, warn_if_processed
from massact_lens.attention._fused import NormProbe
from massact_lens.attention._passes import (
    KeyedFields,
    KeyedMeasurement,
    KeyPositions,
    check_layers,
    feature_hook,
    repeat_kv,
    w_o,
)
from massact_lens.attention.keys import Positions, fit_width, keyed_plan

__all__ = ["GROUPS", "TokenFeatures", "token_features"]

#: Order of the group axis of :class:`TokenFeatures`: tokens in C, the other real tokens.
GROUPS: tuple[str, ...] = ("in_c", "other")


@dataclass(frozen=True, repr=False)
class TokenFeatures(SummedResult, KeyedFields):
    """Keys, values and post-LayerNorm attention inputs of C tokens vs the other tokens.

    The ``group`` axis is :data:`GROUPS`. Norms are means over tokens (of every
    input). Under grouped-query attention a query head shows the key / value norms
    of the KV head it reads.

    :meth:`merge` (measurements of consecutive slices of a corpus): the sums add.
    Equal to one run over the concatenated inputs, to float rounding. The parts
    must come from the same model, layers, key set, feature hooks and BOS setting
    (ValueError otherwise).

    Non-finite values: an input whose keys, values, attention input or key-set
    residual held a NaN or inf is left out of every statistic (``counts`` and the
    sums) and reported once by a ``RuntimeWarning`` (input, hook, how many entries).

    >>> import torch
    >>> from massact_lens.examples import tiny_model
    >>> model, tokens = tiny_model(), torch.randint(0, 64, (4, 6))
    >>> parts = [token_features(model, t, progress=False) for t in (tokens[:1], tokens[1:])]
    >>> TokenFeatures.merge(parts).counts.tolist(), TokenFeatures.merge(parts).n_inputs
    ([4, 20], 4)
    """

    #: Heads per layer measured (``layers``).
    n_heads: int
    #: The post-LayerNorm attention input read per layer (``ln1.hook_out``;
    #: post-norm models: ``hook_resid_pre``).
    feature_hooks: tuple[str, ...]
    #: Tokens per group.
    counts: Int[torch.Tensor, " group"]
    #: Mean ``||v_i||`` per head.
    value_norm: Float[torch.Tensor, "layer group head"]
    #: Mean ``||k_i||`` per head.
    key_norm: Float[torch.Tensor, "layer group head"]
    #: Mean ``||v_i @ W_O[h]||``: what token i can write through head h when attended to.
    out_norm: Float[torch.Tensor, "layer group head"]
    #: Mean norm of the attention input.
    feature_norm: Float[torch.Tensor, "layer group"]
    #: Mean cosine of the attention inputs to their group mean.
    feature_cos_to_mean: Float[torch.Tensor, "layer group"]
    #: std norm / mean norm of the attention inputs.
    feature_rel_variation: Float[torch.Tensor, "layer group"]
    #: The group's mean attention input.
    feature_mean: Float[torch.Tensor, "layer group d_model"] = field(repr=False)
    #: The float64 running sums everything above comes from (what :meth:`merge`
    #: adds): ``count`` ``[layer, group]``; ``value``, ``key``, ``out``
    #: ``[layer, group, head]``; ``norm``, ``sq`` ``[layer, group]``; ``vec``,


    def top_feature_dims(self, layer: int, k: int = 5, group: Literal["in_c", "other"] = "in_c") -> list[tuple[int, float]]:
        """The ``k`` largest-magnitude dims of a group's mean attention input at a layer."""
        if layer not in self.layers:
            raise ValueError(f"Layer {layer} was not measured; this result has layers {list(self.layers)}.")
        mean = self.feature_mean[self.layers.index(layer), GROUPS.index(group)]
        top = mean.abs().topk(min(k, mean.shape[0])).indices
        return [(int(d), float(mean[d])) for d in top]

    merge_same = ("layers", "n_heads", "positions", "key_set", "prepend_bos", "feature_hooks")

    @classmethod
    def _merged(cls, parts: list[TokenFeatures]) -> TokenFeatures:
        first = parts[0]
        return cls._from_sums(add_sums([p.sums for p in parts]), provenance=first.provenance,
                              n_inputs=sum(p.n_inputs for p in parts),
                              weights=first.weights, **{name: getattr(first, name) for name in cls.merge_same})

    @classmethod
    def _from_sums(cls, sums: dict[str, torch.Tensor], **settings: Any) -> TokenFeatures:
        """The result from its running sums (one run, or the sum of several) and its
        settings (provenance, n_inputs and the fields of :attr:`merge_same`)."""
        counts = sums["count"]
        n = counts.clamp_min(1)
        mean_vec = sums["vec"] / n[..., None]
        mean_norm = mean_vec.norm(dim=-1)
        cos = (sums["unit"] / n[..., None] * mean_vec).sum(-1) / mean_norm
        variance = (sums["sq"] / n - mean_norm**2).clamp_min(0)
        empty = counts == 0
        nan = float("nan")
        return cls(
            **settings,
            counts=counts[0].long(),
            value_norm=(sums["value"] / n[..., None]).masked_fill(empty[..., None], nan).float(),
            key_norm=(sums["key"] / n[..., None]).masked_fill(empty[..., None], nan).float(),
            out_norm=(sums["out"] / n[..., None]).masked_fill(empty[..., None], nan).float(),
            feature_norm=(sums["norm"] / n).masked_fill(empty, nan).float(),
            feature_cos_to_mean=cos.masked_fill(empty, nan).float(),
            feature_rel_variation=(variance.sqrt() / mean_norm).masked_fill(empty, nan).float(),
            feature_mean=mean_vec.masked_fill(empty[..., None], nan).float(),
            sums={name: t.detach().clone() for name, t in sums.items()},
        )

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (layer, head): key / value / W_O-image norms for C and other tokens."""
        rows = []
        for i, layer in enumerate(self.layers):
            for head in range(self.n_heads):
                row: dict[str, Any] = {"layer": layer, "head": head}
                for name, t in (("value_norm", self.value_norm), ("key_norm", self.key_norm), ("out_norm", self.out_norm)):
                    row[f"{name}_c"] = float(t[i, 0, head])
                    row[f"{name}_other"] = float(t[i, 1, head])
                row["positions"] = self.positions
                rows.append(row)
        return pd.DataFrame(rows)

    def features_dataframe(self, k: int = 3) -> pd.DataFrame:
        """One row per layer: the attention inputs of C vs other tokens, and C's top dims."""
        rows = []
        for i, layer in enumerate(self.layers):
            top = self.top_feature_dims(layer, k)
            rows.append(
                {
                    "layer": layer,
                    "feature_hook": self.feature_hooks[i],
                    "norm_c": float(self.feature_norm[i, 0]),
                    "norm_other": float(self.feature_norm[i, 1]),
                    "cos_c": float(self.feature_cos_to_mean[i, 0]),
                    "cos_other": float(self.feature_cos_to_mean[i, 1]),
                    "rel_variation_c": float(self.feature_rel_variation[i, 0]),
                    "rel_variation_other": float(self.feature_rel_variation[i, 1]),
                    "top_dims_c": tuple(d for d, _ in top),
                    "top_values_c": tuple(round(v, 4) for _, v in top),
                }
            )
        return pd.DataFrame(rows)


def token_features(
    model: TransformerLensModel,
    inputs: Inputs,
    positions: Positions = "start",
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    prepend_bos: bool | None = None,
    attention_mask: torch.Tensor | None = None,
    progress: bool = True,
    by_length: bool | None = None,
) -> TokenFeatures:
    """Norms of keys, values and value updates, and attention inputs, of C tokens vs others.

    Per layer and head: the mean norm of ``hook_k`` and ``hook_v`` and of each
    value's image ``v_i @ W_O[h]`` over the tokens in C and over the other real
    tokens; per layer: the post-LayerNorm input of attention (``ln1.hook_out`` for
    pre-norm models; for post-norm BERT-style models the block input
    ``hook_resid_pre``, which is already normalised) of both groups: norm, mean
    vector and constancy.

    ``by_length``: as in :func:`massact_lens.implicit_bias` (the sums do not depend on
    the order; only float32 rounding may differ with the batches' shapes).

    Cost: one forward pass per batch. Fused route (attention through HF's kernel registry
    with no norm on the keys inside it, so not Gemma 3's ``k_norm``): the norms of the keys and values are read as the kernel
    gets them, with no extra column and no pattern. Eager route (otherwise, or
    ``MASSACT_LENS_EAGER=1``): it reads ``hook_k``, ``hook_v`` of each chosen layer. Both
    read the feature hook; norms are reduced at once, the features of the current batch are
    held until its pass ends; the result is streaming sums.

    Non-finite values (a NaN or inf from a hook of yours upstream, an overflow): an input
    whose keys, values, attention input or key-set residual held one is left out of every
    statistic (the pass does not raise) and reported once, after the pass, by a
    ``RuntimeWarning`` naming the input, the hook and how many entries.

    >>> from massact_lens.examples import minilm
    >>> feats = token_features(minilm(), ["The cat sat on the mat.", "Hello world."],
    ...                        "start", layers=[3], progress=False)
    >>> feats.feature_hooks, feats.value_norm.shape
    (('blocks.3.hook_resid_pre',), torch.Size([1, 2, 12]))
    """
    refuse_plain_hf(model, "token_features")
    chosen = check_layers(model, layers, ("v", "k"))
    resolve_hook_names(model, [feature_hook(model, layer) for layer in chosen])
    plan, rule = keyed_plan(model, inputs, positions, batch_size=batch_size, attention_mask=attention_mask,
                            prepend_bos=prepend_bos, by_length=by_length)
    warn_if_processed(model)
    # keys as the kernel gets them equal hook_k in norm (rotary keeps norms) unless a norm sits between
    fused = fused_route(model, chosen) is None and not any(
        hasattr(hf_attention(model, layer), "k_norm") for layer in chosen)
    keys = KeyPositions(model, rule, early=fused)
    features = _Features(model, plan, keys, chosen, fused=fused)
    measure(model, plan, keys, features, progress=progress, desc="token features")
    keys.warn_if_empty()
    keys.nonfinite.warn("token_features")
    return features.result()


class _Features(KeyedMeasurement):
    """The measurement behind :func:`token_features`: per layer, key / value norms reduced
    at once and the feature hook held until the pass ends, then summed per group."""

    def __init__(self, model: TransformerLensModel, plan: BatchPlan, keys: KeyPositions, layers: tuple[int, ...], *,
                 fused: bool = False) -> None:
        super().__init__(model, plan, keys, layers)
        self.fused = fused
        self.layer_probes: dict[int, NormProbe] = {}
        self.n_heads = int(model.cfg.n_heads)
        self.feature_names = tuple(feature_hook(model, layer) for layer in layers)
        self.weights = {layer: w_o(model, layer)[0].to(self.device) for layer in layers}
        self.state: dict[int, dict[str, torch.Tensor]] = {}
        n_layers, d_model = len(layers), int(model.cfg.d_model)
        self.sums = {name: torch.zeros(n_layers, 2, self.n_heads, dtype=torch.float64) for name in ("value", "key", "out")}
        self.sums |= {name: torch.zeros(n_layers, 2, dtype=torch.float64) for name in ("norm", "sq")}
        self.sums |= {name: torch.zeros(n_layers, 2, d_model, dtype=torch.float64) for name in ("vec", "unit")}
        self.counts = torch.zeros(n_layers, 2, dtype=torch.float64)

    def probes(self, batch: Batch) -> dict[int, NormProbe]:
        """The fused route: one :class:`NormProbe` per layer (keys and values as the kernel gets them)."""
        if not self.fused:
            return {}
        real = batch.attention_mask.to(self.device).bool()
        self.layer_probes = {layer: NormProbe(self.weights[layer], real, self._note(layer)) for layer in self.layers}
        return dict(self.layer_probes)

    def _note(self, layer: int) -> Any:
        names = {"key": attention_hook("k", layer), "value": attention_hook("v", layer)}
        return lambda kind, tensor, real: self.keys.nonfinite.note(names[kind], tensor, real, 1)

    def hooks(self, batch: Batch) -> HookList:
        real = batch.attention_mask.to(self.device).bool()
        hooks: HookList = []
        for layer, feature_name in zip(self.layers, self.feature_names, strict=True):
            if not self.fused:
                hooks += [(attention_hook("v", layer), self._reader(layer, "value", real, attention_hook("v", layer))),
                          (attention_hook("k", layer), self._reader(layer, "key", real, attention_hook("k", layer)))]
            hooks.append((feature_name, self._reader(layer, "feature", real, feature_name)))
        return hooks

    def _reader(self, layer: int, kind: str, real: torch.Tensor, name: str) -> Any:
        def read(tensor: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            self.keys.nonfinite.note(name, tensor.detach(), real, 1)
            slot = self.state.setdefault(layer, {})
            if kind == "feature":
                slot["feature"] = tensor.detach().float()
            elif kind == "key":
                slot["key"] = repeat_kv(tensor.detach().float(), self.n_heads).norm(dim=-1)
            else:
                v = repeat_kv(tensor.detach().float(), self.n_heads)
                slot["value"] = v.norm(dim=-1)
                slot["out"] = torch.einsum("bkhd,hdm->bkhm", v, self.weights[layer]).norm(dim=-1)

        return read

    def add(self, batch: Batch, c_mask: torch.Tensor) -> None:
        real = batch.attention_mask.bool()
        if self.keys.nonfinite.bad_rows is not None:  # inputs with a NaN / inf: out of every sum
            real = real & ~self.keys.nonfinite.bad_rows.to(real.device)[:, None]
        in_c = fit_width(c_mask, real.shape[1]) & real
        groups = (in_c, ~in_c & real)
        sums = self.sums
        for i, layer in enumerate(self.layers):
            slot = self.state.pop(layer, {})
            probe = self.layer_probes.get(layer)
            if self.fused and probe is not None and probe.ran:
                slot |= probe.norms
            missing = {"value", "key", "feature"} - set(slot)
            if missing:
                raise RuntimeError(f"Layer {layer}: hooks for {sorted(missing)} did not fire.")
            x = slot["feature"]
            norms = x.norm(dim=-1)
            unit = x / norms.clamp_min(1e-12)[..., None]
            for g, mask in enumerate(groups):
                self.counts[i, g] += float(mask.sum())
                for name in ("value", "key", "out"):
                    sums[name][i, g] += slot[name][mask].double().sum(0).cpu()
                sums["norm"][i, g] += float(norms[mask].double().sum())
                sums["sq"][i, g] += float((norms[mask].double() ** 2).sum())
                sums["vec"][i, g] += x[mask].double().sum(0).cpu()
                sums["unit"][i, g] += unit[mask].double().sum(0).cpu()

    def result(self) -> TokenFeatures:
        return TokenFeatures._from_sums({"count": self.counts, **self.sums}, **self.base_fields(), n_heads=self.n_heads,
                                        feature_hooks=self.feature_names)
