"""The implicit attention bias: each head's output split into the part from C and the rest.

``bias(q) = sum_{i in C} p_qi v_i`` and ``rest(q) = sum_{i not in C} p_qi v_i``,
exactly (``bias + rest = hook_z``), with how constant each term is
(the paper's section 4; see ``docs/concepts.md``).

>>> from massact_lens.examples import minilm
>>> split = implicit_bias(minilm(), ["The cat sat on the mat."], "start", layers=[2], progress=False)
>>> bool(split.z_error.max() < 1e-4)
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._types import HookList, Inputs, Provenance, model_device
from massact_lens.attention._passes import (
    check_heads,
    check_layers,
    detached,
    output_hook,
    pad_cat,
    real_keys,
    repeat_kv,
    run_passes,
    w_o,
    warn_empty,
)
from massact_lens.attention.keys import Positions, as_rule, fit_width
from massact_lens.batching import Batch, plan_batches
from massact_lens.hook_names import attention_hook
from massact_lens.models import warn_if_processed

__all__ = ["ImplicitBias", "implicit_bias"]


@dataclass(frozen=True)
class ImplicitBias:
    """The decomposition ``attn(q) = bias(q) + rest(q)`` per layer and head.

    Both terms are in head space (``hook_z``); their images in the residual stream
    are, per head, ``z_h @ W_O[h]`` (:meth:`written`). The output bias ``b_O``
    belongs to neither: ``sum_h (written(bias) + written(rest)) + b_O`` is the
    attention output. Padding queries hold zeros.
    """

    #: The model as it was when it ran.
    provenance: Provenance
    #: The layers decomposed.
    layers: tuple[int, ...]
    #: The heads decomposed (indices of the model's heads).
    heads: tuple[int, ...]
    #: The key set that defined C (its description).
    positions: str
    #: BOS / [CLS] prepended to strings (None: token tensors as given).
    prepend_bos: bool | None
    #: The hook points decomposed (pattern, v, z per layer).
    hook_names: tuple[str, ...]
    #: Per layer, where the attention output was read for ``out_error``.
    out_hooks: tuple[str, ...]
    #: ``sum_{i in C} p_qi v_i``.
    bias_z: Float[torch.Tensor, "layer n_inputs query_pos head d_head"]
    #: ``sum_{i not in C} p_qi v_i``.
    rest_z: Float[torch.Tensor, "layer n_inputs query_pos head d_head"]
    #: Attention probability on C per query.
    c_mass: Float[torch.Tensor, "layer n_inputs query_pos head"]
    #: C of each input.
    key_mask: Bool[torch.Tensor, "n_inputs key_pos"]
    #: 1 for real query positions.
    attention_mask: Int[torch.Tensor, "n_inputs query_pos"]
    #: The token ids.
    tokens: Int[torch.Tensor, "n_inputs query_pos"]
    #: ``W_O`` of the chosen heads.
    W_O: Float[torch.Tensor, "layer head d_head d_model"] = field(repr=False)
    #: ``b_O`` per layer.
    b_O: Float[torch.Tensor, "layer d_model"] = field(repr=False)
    #: Per layer, max ``|bias + rest - hook_z|`` over real queries and chosen heads.
    z_error: Float[torch.Tensor, " layer"]
    #: Per layer, max ``|sum_h hook_z_h @ W_O[h] + b_O - attention output|`` over
    #: real queries (all heads).
    out_error: Float[torch.Tensor, " layer"]

    @property
    def model(self) -> Provenance:
        """The provenance (the name of this field before 0.2; reads like the dict it was)."""
        return self.provenance

    def _layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"Layer {layer} was not decomposed; this result has layers {list(self.layers)}.")
        return self.layers.index(layer)

    def written(self, layer: int, term: Literal["bias", "rest"] = "bias") -> Float[torch.Tensor, "n_inputs query_pos head d_model"]:
        """The term's image in the residual stream, per head: ``z_h @ W_O[h]`` (no ``b_O``)."""
        if term not in ("bias", "rest"):
            raise ValueError(f"term must be 'bias' or 'rest', not {term!r}.")
        i = self._layer_index(layer)
        z = (self.bias_z if term == "bias" else self.rest_z)[i]
        return torch.einsum("nqhd,hdm->nqhm", z, self.W_O[i])

    def _queries(self, queries: str) -> torch.Tensor:
        mask = self.attention_mask.bool()
        if queries == "outside":
            mask = mask & ~fit_width(self.key_mask, mask.shape[1])
        elif queries != "all":
            raise ValueError(f"queries must be 'all' or 'outside' (drop queries that are themselves in C), not {queries!r}.")
        return mask

    def constancy(self, queries: Literal["all", "outside"] = "all") -> pd.DataFrame:
        """How constant the bias term is, next to the rest term: the paper's contrast as numbers.

        For each layer, head (``-1``: the sum over the chosen heads, residual space
        only), term (``bias`` / ``rest``), space (``head``: hook_z; ``resid``: through
        ``W_O``) and scope, with ``m`` the mean vector of the scope:

        * ``cos_to_mean``: mean cosine similarity of the vectors to ``m``;
        * ``rel_variation``: ``sqrt(mean ||x - m||^2) / ||m||`` (std norm / mean norm);
        * ``mean_norm``: ``||m||``; ``n``: how many vectors.

        Scopes: ``all`` (every real query of every input), ``within_input`` (across
        the queries of one input, averaged over inputs), ``across_inputs`` (the
        per-input means across inputs). ``queries="outside"`` drops queries that are
        themselves in C (in a causal model the first token's query sees only itself).
        """
        qmask = self._queries(queries)
        rows = []
        for i, layer in enumerate(self.layers):
            for term in ("bias", "rest"):
                z = (self.bias_z if term == "bias" else self.rest_z)[i]
                for space in ("head", "resid"):
                    if space == "head":
                        x, heads = z, list(self.heads)
                    else:
                        resid = torch.einsum("nqhd,hdm->nqhm", z, self.W_O[i])
                        x, heads = torch.cat([resid, resid.sum(2, keepdim=True)], 2), [*self.heads, -1]
                    for scope, (cos, rel, norm, n) in _constancy(x, qmask).items():
                        for j, head in enumerate(heads):
                            rows.append(
                                {
                                    "layer": layer,
                                    "head": head,
                                    "term": term,
                                    "space": space,
                                    "scope": scope,
                                    "cos_to_mean": float(cos[j]),
                                    "rel_variation": float(rel[j]),
                                    "mean_norm": float(norm[j]),
                                    "n": n,
                                }
                            )
        return pd.DataFrame(rows)

    def to_dataframe(self, queries: Literal["all", "outside"] = "all") -> pd.DataFrame:
        """One row per (layer, head; ``-1`` = sum over heads): the bias-vs-rest contrast.

        Residual space (through ``W_O``), scope ``all``: ``c_mass`` (mean attention on
        C), ``bias_norm`` / ``rest_norm`` (mean vector norms), ``bias_cos`` /
        ``rest_cos`` (cosine to the mean), ``bias_rel_variation`` / ``rest_rel_variation``.
        """
        qmask = self._queries(queries)
        rows = []
        for i, layer in enumerate(self.layers):
            mass = self.c_mass[i]  # [n, q, head]
            masses = torch.cat([mass[qmask].mean(0), mass.mean(-1)[qmask].mean()[None]])
            stats = {}
            for term in ("bias", "rest"):
                w = self.written(layer, term)  # type: ignore[arg-type]
                w = torch.cat([w, w.sum(2, keepdim=True)], 2)[qmask].double()  # [N, head + 1, d_model]
                cos, rel, _ = _spread(w)
                stats[term] = (w.norm(dim=-1).mean(0), cos, rel)
            for j, head in enumerate([*self.heads, -1]):
                rows.append(
                    {
                        "layer": layer,
                        "head": head,
                        "c_mass": float(masses[j]),
                        "bias_norm": float(stats["bias"][0][j]),
                        "rest_norm": float(stats["rest"][0][j]),
                        "bias_cos": float(stats["bias"][1][j]),
                        "rest_cos": float(stats["rest"][1][j]),
                        "bias_rel_variation": float(stats["bias"][2][j]),
                        "rest_rel_variation": float(stats["rest"][2][j]),
                        "positions": self.positions,
                    }
                )
        return pd.DataFrame(rows)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last dim; NaN where a vector is exactly zero."""
    denominator = a.norm(dim=-1) * b.norm(dim=-1)
    return (a * b).sum(-1) / denominator.masked_fill(denominator == 0, float("nan"))


def _constancy(x: torch.Tensor, qmask: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """Cosine-to-mean, relative variation and mean norm per head, for the three scopes.

    ``x``: ``[n_inputs, query_pos, head, m]``; ``qmask``: ``[n_inputs, query_pos]``.
    Zero vectors (a query that gives C no attention at all) have no direction: they
    are left out of the cosine means, not out of the variation.
    """
    x = x.double()
    out = {}
    pooled = x[qmask]  # [N, head, m]
    out["all"] = (*_spread(pooled), int(pooled.shape[0]))
    w = qmask[:, :, None].double()  # [n, q, 1]
    counts = qmask.sum(1)
    keep = counts > 0
    means = (x * w[..., None]).sum(1) / counts.clamp_min(1)[:, None, None]  # [n, head, m]
    cos = _cosine(x, means[:, None]).masked_fill(~qmask[:, :, None], float("nan"))  # [n, q, head]
    var = (((x - means[:, None]) ** 2).sum(-1) * w).sum(1) / counts.clamp_min(1)[:, None]
    norm = means.norm(dim=-1)
    within = (cos.nanmean(1)[keep].nanmean(0), (var.sqrt() / norm)[keep].nanmean(0), norm[keep].mean(0))
    out["within_input"] = (*within, int(keep.sum()))
    out["across_inputs"] = (*_spread(means[keep]), int(keep.sum()))
    return out


def _spread(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [N, head, m]`` -> mean cosine to the mean, relative variation, mean norm, per head."""
    if x.shape[0] == 0:
        nan = torch.full(x.shape[1:2], float("nan"), dtype=x.dtype)
        return nan, nan, nan
    mean = x.mean(0)
    norm = mean.norm(dim=-1)
    rel = ((x - mean[None]) ** 2).sum(-1).mean(0).sqrt() / norm
    return _cosine(x, mean[None]).nanmean(0), rel, norm


def implicit_bias(
    model: TransformerLensModel,
    inputs: Inputs,
    positions: Positions = "start",
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    batch_size: int = 16,
    prepend_bos: bool | None = None,
    attention_mask: torch.Tensor | None = None,
    progress: bool = True,
) -> ImplicitBias:
    """Split each head's attention output into the term from C and the rest, exactly.

    ``bias(q) = sum_{i in C} p_qi v_i`` and ``rest(q) = sum_{i not in C} p_qi v_i``
    with ``p = hook_pattern`` and ``v = hook_v`` (KV heads repeated under
    grouped-query attention), so ``bias + rest = hook_z``; through ``W_O`` per head
    they are the head's write into the residual stream, and their sum over heads
    plus ``b_O`` (in neither term) is the attention output. The result records the
    measured errors of both identities (``z_error``, ``out_error``) and
    :meth:`ImplicitBias.constancy` gives the paper's contrast.

    Cost: one forward pass per batch. Per chosen layer it holds ``hook_pattern``,
    ``hook_v`` and ``hook_z`` of the current batch until the pass ends (C may come
    from the residual stream of the same pass) and reads the attention output once
    for the check. It keeps ``2 x layers x inputs x pos x heads x d_head`` floats
    (head space); residual-space images are computed on demand (:meth:`ImplicitBias.written`).
    Meant for a batch of inputs (tens to hundreds), not a corpus.

    Args:
        positions: the key positions C (anything :func:`~massact_lens.attention.keys.as_rule` accepts); they must be
            token positions (``hook_v`` has no entry for extra key slots).
        layers, heads: what to decompose (default all). Other arguments as in
            :func:`attention_concentration`.

    Raises:
        ValueError / TypeError: a layer or head that does not exist, an empty or
            malformed C, bad inputs: before any forward pass.

    >>> from massact_lens.examples import minilm
    >>> split = implicit_bias(minilm(), ["The cat sat on the mat.", "A dog ran home."],
    ...                       "start", layers=[2], progress=False)
    >>> split.bias_z.shape        # layer, input, query, head, d_head
    torch.Size([1, 2, 9, 12, 32])
    >>> bool(split.z_error.max() < 1e-4 and split.out_error.max() < 1e-3)
    True
    """
    chosen = check_layers(model, layers, ("pattern", "v", "z"))
    head_list = check_heads(model, heads)
    plan = plan_batches(model, inputs, batch_size=batch_size, attention_mask=attention_mask, prepend_bos=prepend_bos)
    rule = as_rule(model, positions, plan)
    warn_if_processed(model)
    n_heads = int(model.cfg.n_heads)
    device = model_device(model)
    weights = {layer: tuple(t.to(device) for t in w_o(model, layer)) for layer in chosen}
    out_names = {layer: output_hook(model, layer) for layer in chosen}
    head_index = torch.tensor(head_list, device=device)
    state: dict[int, dict[str, torch.Tensor]] = {}
    z_error = {layer: 0.0 for layer in chosen}
    out_error = {layer: 0.0 for layer in chosen}
    parts: dict[str, list[torch.Tensor]] = {"bias": [], "rest": [], "mass": [], "keys": [], "mask": [], "tokens": []}

    def layer_hooks(batch: Batch) -> HookList:
        real = batch.attention_mask.bool()
        hooks: HookList = []
        for layer in chosen:

            def store(kind: str, layer: int = layer):
                def read(tensor: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
                    state.setdefault(layer, {})[kind] = tensor.detach()

                return read

            def check_output(tensor: torch.Tensor, hook: Any, layer: int = layer) -> None:  # noqa: ARG001
                z = state.get(layer, {}).get("z")
                if z is None:
                    return
                w_o, b_o = weights[layer]
                predicted = torch.einsum("bqhd,hdm->bqm", z.float(), w_o) + b_o
                err = (predicted - tensor.detach().float()).abs().amax(-1)[real]
                out_error[layer] = max(out_error[layer], float(err.max()) if err.numel() else 0.0)

            hooks += [
                (attention_hook("pattern", layer), store("pattern")),
                (attention_hook("v", layer), store("v")),
                (attention_hook("z", layer), store("z")),
                (out_names[layer], check_output),
            ]
        return hooks

    def finish(batch: Batch, c_mask: torch.Tensor) -> None:
        real = batch.attention_mask.bool()
        bias_l, rest_l, mass_l = [], [], []
        key_mask = None
        for layer in chosen:
            slot = state.pop(layer, {})
            if not {"pattern", "v", "z"} <= set(slot):
                raise RuntimeError(
                    f"Layer {layer}: hooks {sorted({'pattern', 'v', 'z'} - set(slot))} did not fire; load the "
                    "model with eager attention (massact_lens.load_model does)."
                )
            pattern = slot["pattern"].float()[:, head_index]  # [b, h, q, k]
            v = repeat_kv(slot["v"].float(), n_heads)[:, :, head_index]  # [b, k, h, d]
            key_len = int(pattern.shape[-1])
            if v.shape[1] != key_len:
                raise ValueError(
                    f"Layer {layer}: hook_pattern has {key_len} key positions but hook_v has {v.shape[1]}: "
                    "the decomposition needs a value for every key (no extra key slots)."
                )
            in_c = fit_width(c_mask, key_len) & real_keys(real, key_len)
            c = in_c[:, None, None, :].float()
            bias = torch.einsum("bhqk,bkhd->bqhd", pattern * c, v)
            rest = torch.einsum("bhqk,bkhd->bqhd", pattern * (1.0 - c), v)
            z = slot["z"].float()[:, :, head_index]
            err = (bias + rest - z).abs()[real]
            z_error[layer] = max(z_error[layer], float(err.max()) if err.numel() else 0.0)
            q_real = real[:, :, None, None].float()
            bias_l.append((bias * q_real).cpu())
            rest_l.append((rest * q_real).cpu())
            mass_l.append(((pattern * c).sum(-1).transpose(1, 2) * real[:, :, None]).cpu())
            key_mask = in_c
        assert key_mask is not None
        parts["bias"].append(torch.stack(bias_l, 1))
        parts["rest"].append(torch.stack(rest_l, 1))
        parts["mass"].append(torch.stack(mass_l, 1))
        parts["keys"].append(key_mask.cpu())
        parts["mask"].append(batch.attention_mask.cpu())
        parts["tokens"].append(batch.tokens.cpu())

    run_passes(model, plan, rule, layer_hooks, finish, progress=progress, desc="implicit bias")
    key_mask = pad_cat(parts["keys"], 1)
    warn_empty(key_mask.sum(1), rule.describe())
    names = tuple(attention_hook(k, layer) for layer in chosen for k in ("pattern", "v", "z"))
    return ImplicitBias(
        provenance=Provenance.of(model),
        layers=chosen,
        heads=head_list,
        positions=rule.describe(),
        prepend_bos=plan.prepend_bos,
        hook_names=names,
        out_hooks=tuple(out_names[layer] for layer in chosen),
        bias_z=detached(pad_cat(parts["bias"], 2).transpose(0, 1)),
        rest_z=detached(pad_cat(parts["rest"], 2).transpose(0, 1)),
        c_mass=detached(pad_cat(parts["mass"], 2).transpose(0, 1)),
        key_mask=detached(key_mask),
        attention_mask=detached(pad_cat(parts["mask"], 1).long()),
        tokens=detached(pad_cat(parts["tokens"], 1).long()),
        W_O=detached(torch.stack([weights[layer][0][head_index] for layer in chosen])),
        b_O=detached(torch.stack([weights[layer][1] for layer in chosen])),
        z_error=torch.tensor([z_error[layer] for layer in chosen]),
        out_error=torch.tensor([out_error[layer] for layer in chosen]),
    )
