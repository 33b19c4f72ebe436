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

from massact_lens._core.types import HookList, Inputs, Provenance, model_device
from massact_lens.attention._passes import (
    check_layers,
    feature_hook,
    repeat_kv,
    run_passes,
    w_o,
    warn_empty,
)
from massact_lens._core.results import add_sums, check_parts
from massact_lens.attention.keys import Positions, fit_width, keyed_plan
from massact_lens._core.batching import Batch
from massact_lens._core.hook_names import attention_hook, resolve_hook_names
from massact_lens._core.types import warn_if_processed

__all__ = ["GROUPS", "TokenFeatures", "token_features"]

#: Order of the group axis of :class:`TokenFeatures`: tokens in C, the other real tokens.
GROUPS: tuple[str, ...] = ("in_c", "other")


@dataclass(frozen=True)
class TokenFeatures:
    """Keys, values and post-LayerNorm attention inputs of C tokens vs the other tokens.

    The ``group`` axis is :data:`GROUPS`. Norms are means over tokens (of every
    input). Under grouped-query attention a query head shows the key / value norms
    of the KV head it reads.
    """

    #: The model as it was when it ran.
    provenance: Provenance
    #: The layers measured, ``n_heads`` heads each.
    layers: tuple[int, ...]
    n_heads: int
    #: The key set that defined C (its description).
    positions: str
    #: BOS / [CLS] prepended to strings (None: token tensors as given).
    prepend_bos: bool | None
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
    #: How many inputs were measured.
    n_inputs: int = 0
    #: The float64 running sums everything above comes from (what :meth:`merge`
    #: adds): ``count`` ``[layer, group]``; ``value``, ``key``, ``out``
    #: ``[layer, group, head]``; ``norm``, ``sq`` ``[layer, group]``; ``vec``,
    #: ``unit`` ``[layer, group, d_model]``.
    sums: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)


    def top_feature_dims(self, layer: int, k: int = 5, group: Literal["in_c", "other"] = "in_c") -> list[tuple[int, float]]:
        """The ``k`` largest-magnitude dims of a group's mean attention input at a layer."""
        if layer not in self.layers:
            raise ValueError(f"Layer {layer} was not measured; this result has layers {list(self.layers)}.")
        mean = self.feature_mean[self.layers.index(layer), GROUPS.index(group)]
        top = mean.abs().topk(min(k, mean.shape[0])).indices
        return [(int(d), float(mean[d])) for d in top]

    @classmethod
    def merge(cls, parts: Sequence[TokenFeatures]) -> TokenFeatures:
        """One result from measurements of consecutive slices of a corpus: the sums add.

        Equal to one run over the concatenated inputs, to float rounding. The parts
        must come from the same model, layers, key set, feature hooks and BOS
        setting (ValueError otherwise).

        >>> import torch
        >>> from massact_lens.examples import tiny_model
        >>> model, tokens = tiny_model(), torch.randint(0, 64, (4, 6))
        >>> parts = [token_features(model, t, progress=False) for t in (tokens[:1], tokens[1:])]
        >>> TokenFeatures.merge(parts).counts.tolist(), TokenFeatures.merge(parts).n_inputs
        ([4, 20], 4)
        """
        parts = check_parts(parts, cls, ("layers", "n_heads", "positions", "prepend_bos", "feature_hooks"))
        first = parts[0]
        return _summarise(first.provenance, first.layers, first.n_heads, first.positions, first.prepend_bos,
                          first.feature_hooks, sum(p.n_inputs for p in parts), add_sums([p.sums for p in parts]))

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

    Cost: one forward pass per batch reading ``hook_k``, ``hook_v`` and the feature
    hook of each chosen layer; norms are reduced at once, the features of the
    current batch are held until its pass ends; the result is streaming sums.

    >>> from massact_lens.examples import minilm
    >>> feats = token_features(minilm(), ["The cat sat on the mat.", "Hello world."],
    ...                        "start", layers=[3], progress=False)
    >>> feats.feature_hooks, feats.value_norm.shape
    (('blocks.3.hook_resid_pre',), torch.Size([1, 2, 12]))
    """
    chosen = check_layers(model, layers, ("v", "k"))
    feature_names = tuple(feature_hook(model, layer) for layer in chosen)
    resolve_hook_names(model, list(feature_names))
    plan, rule = keyed_plan(model, inputs, positions, batch_size=batch_size, attention_mask=attention_mask,
                            prepend_bos=prepend_bos, by_length=by_length)
    warn_if_processed(model)
    n_heads, d_model = int(model.cfg.n_heads), int(model.cfg.d_model)
    device = model_device(model)
    weights = {layer: w_o(model, layer)[0].to(device) for layer in chosen}
    state: dict[int, dict[str, torch.Tensor]] = {}
    n_layers = len(chosen)
    sums = {
        "value": torch.zeros(n_layers, 2, n_heads, dtype=torch.float64),
        "key": torch.zeros(n_layers, 2, n_heads, dtype=torch.float64),
        "out": torch.zeros(n_layers, 2, n_heads, dtype=torch.float64),
        "norm": torch.zeros(n_layers, 2, dtype=torch.float64),
        "sq": torch.zeros(n_layers, 2, dtype=torch.float64),
        "vec": torch.zeros(n_layers, 2, d_model, dtype=torch.float64),
        "unit": torch.zeros(n_layers, 2, d_model, dtype=torch.float64),
    }
    counts = torch.zeros(n_layers, 2, dtype=torch.float64)
    seen = [0]

    def layer_hooks(batch: Batch) -> HookList:  # noqa: ARG001
        hooks: HookList = []
        for layer in chosen:

            def read_v(tensor: torch.Tensor, hook: Any, layer: int = layer) -> None:  # noqa: ARG001
                v = repeat_kv(tensor.detach().float(), n_heads)
                state.setdefault(layer, {})["value"] = v.norm(dim=-1)
                state[layer]["out"] = torch.einsum("bkhd,hdm->bkhm", v, weights[layer]).norm(dim=-1)

            def read_k(tensor: torch.Tensor, hook: Any, layer: int = layer) -> None:  # noqa: ARG001
                state.setdefault(layer, {})["key"] = repeat_kv(tensor.detach().float(), n_heads).norm(dim=-1)

            def read_feature(tensor: torch.Tensor, hook: Any, layer: int = layer) -> None:  # noqa: ARG001
                state.setdefault(layer, {})["feature"] = tensor.detach().float()

            hooks += [
                (attention_hook("v", layer), read_v),
                (attention_hook("k", layer), read_k),
                (feature_hook(model, layer), read_feature),
            ]
        return hooks

    def finish(batch: Batch, c_mask: torch.Tensor) -> None:
        real = batch.attention_mask.bool()
        in_c = fit_width(c_mask, real.shape[1]) & real
        groups = (in_c, ~in_c & real)
        seen[0] += int(real.shape[0])
        for i, layer in enumerate(chosen):
            slot = state.pop(layer, {})
            missing = {"value", "key", "feature"} - set(slot)
            if missing:
                raise RuntimeError(f"Layer {layer}: hooks for {sorted(missing)} did not fire.")
            x = slot["feature"]
            norms = x.norm(dim=-1)
            unit = x / norms.clamp_min(1e-12)[..., None]
            for g, mask in enumerate(groups):
                counts[i, g] += float(mask.sum())
                for name in ("value", "key", "out"):
                    sums[name][i, g] += slot[name][mask].double().sum(0).cpu()
                sums["norm"][i, g] += float(norms[mask].double().sum())
                sums["sq"][i, g] += float((norms[mask].double() ** 2).sum())
                sums["vec"][i, g] += x[mask].double().sum(0).cpu()
                sums["unit"][i, g] += unit[mask].double().sum(0).cpu()

    run_passes(model, plan, rule, layer_hooks, finish, progress=progress, desc="token features")
    warn_empty(counts[:1, 0], rule.describe())
    return _summarise(Provenance.of(model), chosen, n_heads, rule.describe(), plan.prepend_bos, feature_names,
                      seen[0], {"count": counts, **sums})


def _summarise(
    provenance: Provenance,
    layers: tuple[int, ...],
    n_heads: int,
    positions: str,
    prepend_bos: bool | None,
    feature_hooks: tuple[str, ...],
    n_inputs: int,
    sums: dict[str, torch.Tensor],
) -> TokenFeatures:
    """The result from its running sums (one run, or the sum of several)."""
    counts = sums["count"]
    n = counts.clamp_min(1)
    mean_vec = sums["vec"] / n[..., None]
    mean_norm = mean_vec.norm(dim=-1)
    cos = (sums["unit"] / n[..., None] * mean_vec).sum(-1) / mean_norm
    variance = (sums["sq"] / n - mean_norm**2).clamp_min(0)
    empty = counts == 0
    nan = float("nan")
    return TokenFeatures(
        provenance=provenance,
        layers=layers,
        n_heads=n_heads,
        positions=positions,
        prepend_bos=prepend_bos,
        feature_hooks=feature_hooks,
        counts=counts[0].long(),
        value_norm=(sums["value"] / n[..., None]).masked_fill(empty[..., None], nan).float(),
        key_norm=(sums["key"] / n[..., None]).masked_fill(empty[..., None], nan).float(),
        out_norm=(sums["out"] / n[..., None]).masked_fill(empty[..., None], nan).float(),
        feature_norm=(sums["norm"] / n).masked_fill(empty, nan).float(),
        feature_cos_to_mean=cos.masked_fill(empty, nan).float(),
        feature_rel_variation=(variance.sqrt() / mean_norm).masked_fill(empty, nan).float(),
        feature_mean=mean_vec.masked_fill(empty[..., None], nan).float(),
        n_inputs=n_inputs,
        sums={name: t.detach().clone() for name, t in sums.items()},
    )
