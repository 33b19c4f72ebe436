"""Shared forward plumbing of the attention measurements: checks, one pass per batch, helpers.

:func:`run_passes` runs each batch once with the measurement's hooks and, for
key sets that read the residual stream (:class:`~massact_lens.interventions.WhereMassive`),
hooks that record where they pass, then hands each batch and its C to ``finish``.

>>> from massact_lens.examples import tiny_model
>>> check_layers(tiny_model(), [1, 0], ("pattern",))
(0, 1)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.types import HookList, model_device
from massact_lens.attention.keys import fit_width, key_mask
from massact_lens._core.batching import LAST_READ, Batch, BatchPlan, run_batches
from massact_lens._core.hook_names import attention_hook, is_post_norm, resolve_hook_names
from massact_lens.interventions.positions import PositionRule, RunContext, WhereMassive


def check_layers(model: TransformerLensModel, layers: Sequence[int] | None, kinds: Sequence[str]) -> tuple[int, ...]:
    """The chosen layers, sorted; ValueError for a layer or hook point that does not exist."""
    n_layers = int(model.cfg.n_layers)
    if layers is None:
        chosen = list(range(n_layers))
    else:
        if isinstance(layers, int) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            raise TypeError(f"layers must be a list of ints or None, not {layers!r}.")
        chosen = list(layers)
        if not chosen:
            raise ValueError("layers is empty: pass None for all layers, or a non-empty list.")
        bad = [x for x in chosen if not 0 <= x < n_layers]
        if bad:
            raise ValueError(f"Layers {bad} do not exist: the model has {n_layers} layers (0..{n_layers - 1}).")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"layers {chosen} has duplicates.")
    resolve_hook_names(model, [attention_hook(kind, layer) for kind in kinds for layer in chosen])
    return tuple(sorted(chosen))


def check_heads(model: TransformerLensModel, heads: Sequence[int] | None) -> tuple[int, ...]:
    n_heads = int(model.cfg.n_heads)
    if heads is None:
        return tuple(range(n_heads))
    if not isinstance(heads, Sequence) or not all(isinstance(h, int) and not isinstance(h, bool) for h in heads):
        raise TypeError(f"heads must be a list of ints or None, not {heads!r}.")
    if len(heads) == 0:
        raise ValueError("heads is empty: pass None for all heads, or a non-empty list.")
    bad = [h for h in heads if not 0 <= h < n_heads]
    if bad:
        raise ValueError(f"Heads {bad} do not exist: each layer has {n_heads} heads (0..{n_heads - 1}).")
    if len(set(heads)) != len(heads):
        raise ValueError(f"heads {list(heads)} has duplicates.")
    return tuple(sorted(heads))


def output_hook(model: TransformerLensModel, layer: int) -> str:
    """The hook holding ``z @ W_O + b_O`` (``attn.o.hook_out``; else ``hook_attn_out``)."""
    name = attention_hook("o_out", layer)
    return name if name in model.hook_dict else attention_hook("attn_out", layer)  # type: ignore[attr-defined]


def feature_hook(model: TransformerLensModel, layer: int) -> str:
    """The post-LayerNorm input of a layer's attention."""
    return attention_hook("resid_pre" if is_post_norm(model) else "ln1_out", layer)


def w_o(model: TransformerLensModel, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``W_O [head_index, d_head, d_model]`` and ``b_O [d_model]`` (zeros when absent), float32."""
    attn = model.blocks[layer].attn  # type: ignore[attr-defined]
    try:
        w_o = attn.W_O
    except AttributeError:
        w_o = model.W_O[layer]  # type: ignore[attr-defined]
    try:
        b_o = attn.b_O
    except AttributeError:
        b_o = None
    w_o = w_o.detach().float()
    expected = (int(model.cfg.n_heads), int(model.cfg.d_head), int(model.cfg.d_model))
    if tuple(w_o.shape) != expected:
        raise ValueError(f"W_O of layer {layer} has shape {tuple(w_o.shape)}, expected {expected}.")
    b_o = torch.zeros(expected[2], device=w_o.device) if b_o is None else b_o.detach().float()
    return w_o, b_o


def repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[batch, pos, n_kv_heads, d]`` -> ``[batch, pos, n_heads, d]`` in HF ``repeat_kv`` order."""
    n_kv = int(x.shape[2])
    if n_kv == n_heads:
        return x
    if n_heads % n_kv:
        raise ValueError(f"hook_v / hook_k have {n_kv} heads, which does not divide n_heads={n_heads}.")
    return x.repeat_interleave(n_heads // n_kv, dim=2)


def allowed_keys(real: torch.Tensor, key_len: int, causal: bool) -> torch.Tensor:
    """Bool ``[batch, query_pos, key_pos]``: which keys each real query may attend to."""
    n, t = real.shape
    real_k = fit_width(real, key_len) | (torch.arange(key_len, device=real.device) >= t)[None]
    out = real[:, :, None] & real_k[:, None, :]
    if causal:
        q = torch.arange(t, device=real.device)[:, None]
        k = torch.arange(key_len, device=real.device)[None, :]
        out = out & ((k <= q) | (k >= t))[None]
    return out



def real_keys(real: torch.Tensor, key_len: int) -> torch.Tensor:
    t = real.shape[1]
    return fit_width(real, key_len) | (torch.arange(key_len, device=real.device) >= t)[None]


def centred_logits(
    pattern: torch.Tensor, scores: torch.Tensor | None, allowed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Pre-softmax logits ``[batch, head, q, k]`` centred per query over its allowed keys.

    Softmax ignores a per-query constant, so centred logits are the same whether
    read from a real ``hook_attn_scores`` or from ``log(hook_pattern)``.
    """
    if scores is not None and scores is not pattern and not torch.equal(scores, pattern):
        logits = scores.float()
        ok = allowed[:, None] & torch.isfinite(logits) & (logits > torch.finfo(scores.dtype).min / 2)
        source = "hook_attn_scores"
    else:
        p = pattern.float()
        logits = p.clamp_min(torch.finfo(torch.float32).tiny).log()
        ok = allowed[:, None].expand_as(logits)
        source = "log(hook_pattern)"
    logits = logits.masked_fill(~ok, 0.0)
    count = ok.sum(-1, keepdim=True).clamp_min(1)
    centred = (logits - logits.sum(-1, keepdim=True) / count).masked_fill(~ok, 0.0)
    return centred, ok, source


def run_passes(
    model: TransformerLensModel,
    plan: BatchPlan,
    rule: PositionRule,
    layer_hooks: Callable[[Batch], HookList],
    finish: Callable[[Batch, torch.Tensor], None],
    *,
    progress: bool,
    desc: str,
) -> int:
    """One forward pass per batch under the key set's and the measurement's hooks.

    ``finish(batch, c_mask)`` runs after each pass, when C is known: a
    :class:`~massact_lens.interventions.WhereMassive` leaf of ``rule`` is the union,
    over its hook points, of the positions where it passes in this very pass.
    """
    device = model_device(model)
    leaves = tuple(dict.fromkeys(leaf for leaf in rule.leaves() if isinstance(leaf, WhereMassive)))
    points = {leaf: leaf.key_hooks(model) for leaf in leaves}
    found: dict[PositionRule, torch.Tensor] = {}

    def make_hooks(batch: Batch) -> HookList:
        on_device = batch.to(device)
        width = int(on_device.tokens.shape[1])
        ctx = RunContext(torch.arange(width, device=device)[None], on_device.tokens, on_device.attention_mask, on_device)
        hooks: HookList = []
        for leaf in leaves:
            found[leaf] = torch.zeros(on_device.tokens.shape, dtype=torch.bool, device=device)

            def read(activation: torch.Tensor, hook: Any = None, leaf: WhereMassive = leaf) -> None:  # noqa: ARG001
                found[leaf] |= leaf.select(activation, None, ctx).any(dim=-1)

            hooks += [(name, read) for name in points[leaf]]
        return hooks + layer_hooks(on_device)

    def after_batch(batch: Batch) -> None:
        on_device = batch.to(device)
        finish(on_device, key_mask(rule, on_device, found).to(device))

    return run_batches(model, plan, make_hooks, progress=progress, desc=desc, after_batch=after_batch,
                       stop_after=LAST_READ)


def warn_empty(n_positions: torch.Tensor, description: str) -> None:
    if int(n_positions.sum()) == 0:
        warnings.warn(
            f"The position rule {description} selected no key position in any input: C is empty, "
            "so every C statistic is zero or NaN. Lower the thresholds or choose other positions.",
            UserWarning,
            stacklevel=3,
        )


def detached(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) CPU tensor, usable with autograd and in-place ops later."""
    return t.detach().cpu().clone()

