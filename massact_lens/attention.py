"""Attention sinks, attention logits, and the implicit attention bias of massive tokens.

Background
----------
Sun et al. (2024, section 4) find that from the layer where massive activations
appear, attention concentrates on the tokens that carry them (an attention sink),
and that the attention output of a query ``q`` splits into two terms,

    attn(q) = sum_{i in C} p_qi v_i  +  sum_{i not in C} p_qi v_i,     C = massive tokens,

of which the first is nearly the same vector for every query and every input: an
*implicit attention bias*. This module measures all of it on any TransformerBridge:

* :func:`attention_concentration`: per layer and head, the attention probability
  on the key positions C, averaged over real queries and inputs, next to what
  uniform attention would give, and the pre-softmax logit gap of C keys; a
  sortable per-head sink score (:meth:`AttentionConcentration.sink_scores`).
* :func:`attention_logits`: the pre-softmax logits of one input, for heat maps
  (the paper's attention-logit figure).
* :func:`implicit_bias`: the exact decomposition per layer and head, in head space
  (``hook_z``: ``[batch, query_pos, head_index, d_head]``) and written into the
  residual stream through ``W_O`` (per head ``z_h @ W_O[h]``), with its constancy
  across queries and inputs next to that of the rest term
  (:meth:`ImplicitBias.constancy`).
* :func:`token_features`: norms of keys, values and the ``W_O`` images of the
  values of C tokens vs the other tokens, and the post-LayerNorm attention inputs
  of C tokens (the paper's attention-LayerNorm analysis).

**The key positions C** (argument ``positions``) are a set of key positions per
input, i.e. a boolean mask over the key axis of ``hook_pattern``. Any of:

* ``"start"`` (position 0: BOS / [CLS]), ``"delimiters"`` (every token the library
  counts as a delimiter, see :data:`massact_lens.massive.DELIMITERS`),
  ``"first_delimiter"`` (the paper's first "." or newline), ``"massive"``
  (``MassiveTokens()`` with the paper's thresholds), or a list of these (union);
* explicit key indices: an ``int`` or a list of ints (an index at or beyond an
  input's length is absent from that input);
* a boolean tensor ``[key_pos]`` (same for every input) or ``[n_inputs, key_pos]``;
* a :class:`MassiveTokens` rule (positions whose residual state passes the
  paper's criterion in this very forward pass), a
  :class:`~massact_lens.massive.MassiveProfile` (its dims, hooks and thresholds)
  or a :class:`~massact_lens.massive.MassiveActivations` from
  :func:`~massact_lens.find_massive` on a scan of the same inputs;
* a token-level position rule of :mod:`massact_lens.interventions`
  (``start_token() | delimiter_positions(model)``, ``at_positions(0, -1)``, ...):
  the same vocabulary as ablation (``where_massive`` reads the edited activation,
  so for key positions use :class:`MassiveTokens`);
* any callable ``(batch: Batch) -> Bool[batch, key_pos]``.

Padding keys are never in C. Indices and masks address the key axis of
``hook_pattern``; an index past an input's length is simply absent from it. The
explicit attention-bias slot of :mod:`massact_lens.explicit_bias` is key position
0 (its value is ``hook_v[:, 0]``), so ``positions=[0]`` selects it and
:func:`implicit_bias` then gives the slot's exact contribution. (Were a key axis
ever longer than the token axis, the extra keys would count as real keys that
every query sees.)

Facts about TransformerLens 4.3 bridges this module relies on (measured, and
held by its tests):

* On the generic ``AttentionBridge`` (BERT, the native test models),
  ``hook_attn_scores`` fires with the *post*-softmax pattern, not the logits.
  HF decoders booted with ``boot_transformers`` (``PositionEmbeddingsAttentionBridge``,
  e.g. LLaMA) give the real pre-softmax scores there. The module detects which.
* On BERT bridges ``blocks.{l}.hook_attn_out`` is ``LayerNorm(resid_pre + attention
  output)``; the attention output ``z @ W_O + b_O`` is ``blocks.{l}.attn.o.hook_out``,
  which is what the exactness checks compare with (it equals ``hook_attn_out`` on
  pre-norm models).
* Under grouped-query attention ``hook_k`` / ``hook_v`` are
  ``[batch, pos, n_key_value_heads, d_head]``; query head ``h`` reads KV head
  ``h // (n_heads // n_key_value_heads)`` (``repeat_interleave``, HF ``repeat_kv``).
* On native rotary models ``hook_q`` / ``hook_k`` are taken before the rotation.

Usage
-----
>>> import torch
>>> from massact_lens.attention import attention_concentration, implicit_bias
>>> from massact_lens.examples import tiny_model
>>> model = tiny_model("llama")                 # rotary, grouped-query attention
>>> tokens = torch.randint(0, 64, (3, 7))
>>> sinks = attention_concentration(model, tokens, "start", progress=False)
>>> sinks.mass.shape                            # inputs x layers x heads
torch.Size([3, 2, 4])
>>> decomposition = implicit_bias(model, tokens, "start", layers=[1], progress=False)
>>> bool(decomposition.z_error.max() < 1e-5)    # bias + rest == hook_z
True

References
----------
Sun, Chen, Kolter, Liu. *Massive Activations in Large Language Models*, COLM 2024,
section 4 (attention concentration, implicit attention bias, Figures 6-9).
Xiao et al. *Efficient Streaming Language Models with Attention Sinks*, ICLR 2024.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens.batching import Batch, BatchPlan, Inputs, plan_batches, run_batches, token_strings
from massact_lens.hook_names import attention_hook, is_post_norm, resolve_hook_names
from massact_lens.interventions import PositionRule, RunContext, delimiter_positions, start_token
from massact_lens.massive import (
    MassiveActivations,
    MassiveProfile,
    massive_entries,
)
from massact_lens.models import model_description, warn_if_processed

__all__ = [
    "GROUPS",
    "TOKEN_RULES",
    "AttentionConcentration",
    "AttentionLogits",
    "ImplicitBias",
    "MassiveTokens",
    "Positions",
    "TokenFeatures",
    "attention_concentration",
    "attention_logits",
    "implicit_bias",
    "token_features",
]

#: Named token rules accepted as ``positions``.
TOKEN_RULES: tuple[str, ...] = ("start", "delimiters", "first_delimiter", "massive")
#: Order of the group axis of :class:`TokenFeatures`: tokens in C, the other real tokens.
GROUPS: tuple[str, ...] = ("in_c", "other")

HookList = list[tuple[str, Callable[..., Any]]]


@dataclass(frozen=True)
class MassiveTokens:
    """Key positions whose residual state is massive, found in the same forward pass.

    A position is in C for an input when, at any of ``hooks`` (default: the
    residual points of :func:`massact_lens.residual_hook_names`, all layers), one of
    its entries (in ``dims``, default any dim) has ``|x| > min_value`` and
    ``|x| >= min_ratio x`` the median ``|x|`` of that hidden state (real positions,
    all dims): the criterion of :func:`massact_lens.find_massive`, applied to every
    entry instead of a scan's top-k. The same C is used at every layer.

    >>> MassiveTokens(min_value=50, min_ratio=200).describe()
    'massive(min_value=50.0, min_ratio=200.0, hooks=residual, dims=any)'
    """

    min_value: float | int = 100.0
    min_ratio: float | int = 1000.0
    hooks: Sequence[str] | None = None
    dims: Sequence[int] | None = None

    def __post_init__(self) -> None:
        # Frozen and hashable whatever sequences were passed.
        if self.hooks is not None:
            object.__setattr__(self, "hooks", (self.hooks,) if isinstance(self.hooks, str) else tuple(self.hooks))
        if self.dims is not None:
            object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))

    @classmethod
    def from_profile(cls, massive_profile: MassiveProfile) -> MassiveTokens:
        """The rule a profile implies: its dims, at its hooks, with its thresholds."""
        if not massive_profile.massive_dims:
            raise ValueError(
                "This MassiveProfile found no massive dims, so it defines an empty set of key "
                "positions. Profile with lower min_value / min_ratio, or pass positions='start'."
            )
        return cls(
            min_value=massive_profile.min_value,
            min_ratio=massive_profile.min_ratio,
            hooks=tuple(massive_profile.hook_names),
            dims=tuple(massive_profile.massive_dims),
        )

    def describe(self) -> str:
        hooks = "residual" if self.hooks is None else ",".join(self.hooks)
        dims = "any" if self.dims is None else ",".join(str(d) for d in self.dims)
        return f"massive(min_value={float(self.min_value)}, min_ratio={float(self.min_ratio)}, hooks={hooks}, dims={dims})"


Positions = (
    str
    | int
    | Sequence[int]
    | Sequence[str]
    | torch.Tensor
    | MassiveTokens
    | PositionRule
    | MassiveProfile
    | MassiveActivations
    | Callable[[Batch], torch.Tensor]
)


# --------------------------------------------------------------------------------------
# Key-position rules


class _Rule:
    """A resolved ``positions`` argument: extra hooks to run, then a mask per batch."""

    description = ""

    def hooks(self, batch: Batch) -> HookList:  # noqa: ARG002
        return []

    def mask(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError


class _PositionRuleAdapter(_Rule):
    """A token-level :class:`~massact_lens.interventions.PositionRule` as a key-position rule.

    The named rules ``"start"``, ``"delimiters"`` and ``"first_delimiter"`` are the
    interventions module's ``start_token()`` and ``delimiter_positions(...)``, so
    attention and ablation agree on which tokens they mean.
    """

    def __init__(self, rule: PositionRule, description: str | None = None) -> None:
        self.rule = rule
        self.description = description or rule.describe()

    def mask(self, batch: Batch) -> torch.Tensor:
        tokens = batch.tokens
        context = RunContext(
            positions=torch.arange(tokens.shape[1], device=tokens.device)[None],
            tokens=tokens,
            attention_mask=batch.attention_mask.to(tokens.device),
        )
        selected = self.rule.select(tokens[:, :, None], None, context)
        if selected.ndim == 3:
            selected = selected.any(dim=-1)
        return (selected.expand(tokens.shape) & batch.attention_mask.bool().to(tokens.device)).cpu()


def _named_rule(model: TransformerLensModel, names: tuple[str, ...]) -> _Rule:
    rules: list[PositionRule] = []
    if "start" in names:
        rules.append(start_token())
    if "delimiters" in names:
        rules.append(delimiter_positions(model))
    elif "first_delimiter" in names:
        rules.append(delimiter_positions(model, first_only=True))
    combined = rules[0]
    for rule in rules[1:]:
        combined = combined | rule
    return _PositionRuleAdapter(combined, "+".join(names))


class _IndexRule(_Rule):
    def __init__(self, indices: tuple[int, ...]) -> None:
        self.indices = indices
        self.description = f"indices{list(indices)}"

    def mask(self, batch: Batch) -> torch.Tensor:
        width = max(int(batch.tokens.shape[1]), max(self.indices) + 1)
        out = torch.zeros((batch.tokens.shape[0], width), dtype=torch.bool)
        out[:, list(self.indices)] = True
        return out


class _MaskRule(_Rule):
    def __init__(self, mask: torch.Tensor) -> None:
        self.tensor = mask.detach().cpu().bool()
        self.description = f"mask{list(self.tensor.shape)}"

    def mask(self, batch: Batch) -> torch.Tensor:
        n = int(batch.tokens.shape[0])
        if self.tensor.ndim == 1:
            return self.tensor[None].expand(n, -1)
        rows = self.tensor[batch.start : batch.start + n]
        if rows.shape[0] != n:
            raise ValueError(
                f"The positions mask has {self.tensor.shape[0]} rows but there are at least "
                f"{batch.start + n} inputs: give one row per input."
            )
        return rows


class _CallableRule(_Rule):
    def __init__(self, fn: Callable[[Batch], torch.Tensor]) -> None:
        self.fn = fn
        self.description = f"callable:{getattr(fn, '__qualname__', type(fn).__name__)}"

    def mask(self, batch: Batch) -> torch.Tensor:
        out = self.fn(batch)
        n = int(batch.tokens.shape[0])
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != n:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"The positions callable must return a bool tensor [batch, key_pos] = [{n}, ...] "
                f"for a batch of {n} inputs; it returned {shape}."
            )
        if out.is_floating_point():
            raise ValueError("The positions callable returned a float tensor: return a bool mask (True = in C).")
        return out.detach().cpu().bool()


class _MassiveRule(_Rule):
    def __init__(self, spec: MassiveTokens, names: tuple[str, ...]) -> None:
        self.spec = spec
        self.names = names
        self.description = spec.describe()
        self.found: torch.Tensor | None = None

    def hooks(self, batch: Batch) -> HookList:
        real = batch.attention_mask.bool()
        self.found = torch.zeros(real.shape, dtype=torch.bool, device=real.device)
        dims = None if self.spec.dims is None else torch.tensor(self.spec.dims, device=real.device)
        spec = self.spec

        def read(activation: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            passes = massive_entries(activation, real, spec.min_value, spec.min_ratio, dims)
            assert self.found is not None
            self.found |= passes.any(dim=-1)

        return [(name, read) for name in self.names]

    def mask(self, batch: Batch) -> torch.Tensor:  # noqa: ARG002
        assert self.found is not None
        return self.found.cpu()


class _RecordsRule(_Rule):
    def __init__(self, found: MassiveActivations) -> None:
        self.found = found
        self.by_input: dict[int, set[int]] = {}
        for record in found:
            self.by_input.setdefault(record.input_index, set()).add(record.position)
        self.description = (
            f"find_massive(min_value={found.min_value}, min_ratio={found.min_ratio}, "
            f"{len(found)} records)"
        )

    def check(self, batch: Batch) -> None:
        lengths = self.found.scan.lengths
        n = int(batch.tokens.shape[0])
        if batch.start + n > lengths.shape[0]:
            raise ValueError(
                f"positions came from a scan of {lengths.shape[0]} inputs, but there are at least "
                f"{batch.start + n}: pass the inputs that were scanned."
            )
        if not torch.equal(batch.lengths.cpu(), lengths[batch.start : batch.start + n].cpu()):
            raise ValueError(
                "positions came from a scan of other inputs (token counts differ): pass the same "
                "inputs, with the same prepend_bos, as the scan that find_massive read."
            )

    def mask(self, batch: Batch) -> torch.Tensor:
        self.check(batch)
        out = torch.zeros(batch.tokens.shape, dtype=torch.bool)
        for row in range(out.shape[0]):
            for position in self.by_input.get(batch.start + row, ()):
                out[row, position] = True
        return out


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{name} must be a positive finite number, not {value!r}. The paper uses "
            "min_value=100, min_ratio=1000; small models need lower ones (e.g. 50 and 200)."
        )


def _resolve_positions(model: TransformerLensModel, positions: Any, plan: BatchPlan) -> _Rule:
    """Check ``positions`` and turn it into a rule, before any forward pass."""
    n_ctx = int(model.cfg.n_ctx)
    if isinstance(positions, MassiveProfile):
        positions = MassiveTokens.from_profile(positions)
    if isinstance(positions, str):
        positions = [positions]
    if isinstance(positions, MassiveTokens):
        _check_positive("min_value", positions.min_value)
        _check_positive("min_ratio", positions.min_ratio)
        d_model = int(model.cfg.d_model)
        if positions.dims is not None:
            dims = list(positions.dims)
            if not dims:
                raise ValueError("MassiveTokens.dims is empty: pass None for any dim, or some dims.")
            bad = [d for d in dims if not 0 <= int(d) < d_model]
            if bad:
                raise ValueError(f"MassiveTokens dims {bad} do not exist: d_model is {d_model}.")
        names = resolve_hook_names(model, None if positions.hooks is None else list(positions.hooks))
        return _MassiveRule(positions, names)
    if isinstance(positions, MassiveActivations):
        if len(positions) == 0:
            raise ValueError(
                "positions is an empty MassiveActivations: find_massive found nothing, so C would be "
                "empty. Lower min_value / min_ratio, or pass positions='start'."
            )
        n_scanned = positions.scan.n_inputs
        if plan.n_inputs is not None and plan.n_inputs != n_scanned:
            raise ValueError(
                f"positions came from a scan of {n_scanned} inputs, but {plan.n_inputs} inputs were "
                "given: pass the inputs that were scanned."
            )
        rule = _RecordsRule(positions)
        if isinstance(plan.batches, list):
            for batch in plan.batches:
                rule.check(batch)
        return rule
    if isinstance(positions, PositionRule):
        if positions.reads_activation:
            raise TypeError(
                "where_massive() decides per edited hook point; for key positions use "
                "MassiveTokens(min_value, min_ratio), which tests the residual stream of the same pass."
            )
        positions.check(model)
        return _PositionRuleAdapter(positions)
    if isinstance(positions, torch.Tensor):
        if positions.is_floating_point() or positions.ndim not in (1, 2):
            raise ValueError(
                f"A positions tensor must be a bool mask [key_pos] or [n_inputs, key_pos]; got "
                f"{positions.dtype} {tuple(positions.shape)}."
            )
        mask = positions.bool()
        if not bool(mask.any()):
            raise ValueError("The positions mask is all False: C is empty. Mark at least one key position.")
        if mask.ndim == 2 and plan.n_inputs is not None and mask.shape[0] != plan.n_inputs:
            raise ValueError(
                f"The positions mask has {mask.shape[0]} rows for {plan.n_inputs} inputs: give one row per input."
            )
        return _MaskRule(mask)
    if callable(positions):
        return _CallableRule(cast(Callable[[Batch], torch.Tensor], positions))
    if isinstance(positions, int) and not isinstance(positions, bool):
        positions = [positions]
    if isinstance(positions, Sequence):
        items = list(positions)
        if not items:
            raise ValueError(
                "positions is empty: C needs at least one key position (e.g. 'start', [0], or a mask)."
            )
        if all(isinstance(p, str) for p in items):
            unknown = [p for p in items if p not in TOKEN_RULES]
            if unknown:
                raise ValueError(f"Unknown position rule(s) {unknown}: use {list(TOKEN_RULES)}, indices, a mask or a callable.")
            if "massive" in items:
                if len(items) > 1:
                    raise ValueError("'massive' cannot be combined with other rules; pass a callable for unions.")
                return _resolve_positions(model, MassiveTokens(), plan)
            if ("delimiters" in items or "first_delimiter" in items) and getattr(model, "tokenizer", None) is None:
                raise ValueError(
                    "The 'delimiters' rules need the model's tokenizer to read tokens; this model has none. "
                    "Pass key indices or a mask instead."
                )
            return _named_rule(model, tuple(dict.fromkeys(items)))
        if all(isinstance(p, int) and not isinstance(p, bool) for p in items):
            bad = [p for p in items if not 0 <= p < n_ctx]
            if bad:
                raise ValueError(
                    f"Key positions {bad} do not exist: indices must lie in [0, {n_ctx}) (n_ctx); "
                    "negative indices are not supported (padding makes them ambiguous)."
                )
            return _IndexRule(tuple(sorted(set(items))))
    raise TypeError(
        f"Cannot use positions of type {type(positions).__name__}: pass a rule name {list(TOKEN_RULES)}, "
        "key indices, a bool mask, MassiveTokens / MassiveProfile / MassiveActivations, or a callable "
        "(batch) -> bool mask [batch, key_pos]."
    )


def _fit(mask: torch.Tensor, width: int) -> torch.Tensor:
    """A C mask cut or padded (with False) to ``width`` key positions."""
    if mask.shape[1] >= width:
        return mask[:, :width]
    return torch.nn.functional.pad(mask, (0, width - mask.shape[1]), value=False)


# --------------------------------------------------------------------------------------
# Shared plumbing


def _device(model: TransformerLensModel) -> Any:
    return getattr(model.cfg, "device", None) or "cpu"


def _on(batch: Batch, device: Any) -> Batch:
    return Batch(batch.tokens.to(device), batch.attention_mask.to(device), batch.start)


def _check_layers(model: TransformerLensModel, layers: Sequence[int] | None, kinds: Sequence[str]) -> tuple[int, ...]:
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


def _check_heads(model: TransformerLensModel, heads: Sequence[int] | None) -> tuple[int, ...]:
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


def _output_hook(model: TransformerLensModel, layer: int) -> str:
    """The hook holding ``z @ W_O + b_O`` (``attn.o.hook_out``; else ``hook_attn_out``)."""
    name = attention_hook("o_out", layer)
    return name if name in model.hook_dict else attention_hook("attn_out", layer)  # type: ignore[attr-defined]


def _feature_hook(model: TransformerLensModel, layer: int) -> str:
    """The post-LayerNorm input of a layer's attention."""
    return attention_hook("resid_pre" if is_post_norm(model) else "ln1_out", layer)


def _w_o(model: TransformerLensModel, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def _repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[batch, pos, n_kv_heads, d]`` -> ``[batch, pos, n_heads, d]`` in HF ``repeat_kv`` order."""
    n_kv = int(x.shape[2])
    if n_kv == n_heads:
        return x
    if n_heads % n_kv:
        raise ValueError(f"hook_v / hook_k have {n_kv} heads, which does not divide n_heads={n_heads}.")
    return x.repeat_interleave(n_heads // n_kv, dim=2)


def _allowed(real: torch.Tensor, key_len: int, causal: bool) -> torch.Tensor:
    """Bool ``[batch, query_pos, key_pos]``: which keys each real query may attend to."""
    n, t = real.shape
    real_k = _fit(real, key_len) | (torch.arange(key_len, device=real.device) >= t)[None]
    out = real[:, :, None] & real_k[:, None, :]
    if causal:
        q = torch.arange(t, device=real.device)[:, None]
        k = torch.arange(key_len, device=real.device)[None, :]
        out = out & ((k <= q) | (k >= t))[None]
    return out


def _is_causal(model: TransformerLensModel) -> bool:
    return str(getattr(model.cfg, "attention_dir", "causal")) != "bidirectional"


def _real_keys(real: torch.Tensor, key_len: int) -> torch.Tensor:
    t = real.shape[1]
    return _fit(real, key_len) | (torch.arange(key_len, device=real.device) >= t)[None]


def _centred_logits(
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


def _pad_cat(parts: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """Concatenate along dim 0, right-padding ``dim`` to the widest part with zeros (False)."""
    width = max(int(p.shape[dim]) for p in parts)
    out = []
    for p in parts:
        pad = [0, 0] * (p.ndim - dim - 1) + [0, width - int(p.shape[dim])]
        out.append(torch.nn.functional.pad(p, pad) if pad[-1] else p)
    return torch.cat(out, dim=0)


def _run(
    model: TransformerLensModel,
    plan: BatchPlan,
    rule: _Rule,
    layer_hooks: Callable[[Batch], HookList],
    finish: Callable[[Batch, torch.Tensor], None],
    *,
    progress: bool,
    desc: str,
) -> int:
    """One forward pass per batch under the rule's and the measurement's hooks.

    ``finish(batch, c_mask)`` runs after each forward pass, when C is known
    (a :class:`MassiveTokens` rule reads it from the residual stream of the same pass).
    """
    device = _device(model)

    def make_hooks(batch: Batch) -> HookList:
        on_device = _on(batch, device)
        return rule.hooks(on_device) + layer_hooks(on_device)

    def on_batch(batch: Batch, logits: Any) -> None:  # noqa: ARG001
        on_device = _on(batch, device)
        c_mask = rule.mask(on_device).to(device)
        finish(on_device, c_mask)

    return run_batches(model, plan, make_hooks, progress=progress, desc=desc, on_batch=on_batch)


def _warn_empty(n_positions: torch.Tensor, description: str) -> None:
    if int(n_positions.sum()) == 0:
        warnings.warn(
            f"The position rule {description} selected no key position in any input: C is empty, "
            "so every C statistic is zero or NaN. Lower the thresholds or choose other positions.",
            UserWarning,
            stacklevel=3,
        )


def _detach(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) CPU tensor, usable with autograd and in-place ops later."""
    return t.detach().cpu().clone()


# --------------------------------------------------------------------------------------
# Attention concentration


@dataclass(frozen=True)
class AttentionConcentration:
    """Attention mass on the key positions C, per input, layer and head.

    Attributes:
        model: how the model was loaded (:func:`massact_lens.model_description`).
        layers: the layers measured; ``n_heads`` heads each.
        positions: the position rule that defined C.
        prepend_bos: BOS / [CLS] prepended to strings (None: token tensors as given).
        hook_names: the hook points read.
        logit_source: per layer, where the logits came from: ``"hook_attn_scores"``
            (real pre-softmax scores) or ``"log(hook_pattern)"`` (equal up to a
            per-query constant, which the logit gap does not depend on).
        mass: per input, the mean over its real queries of the attention
            probability on the keys in C, ``[n_inputs, layer, head_index]``.
        uniform_mass: what uniform attention over each query's visible keys would put
            on C (the baseline a sink is judged against), ``[n_inputs]``.
        logit_gap: mean pre-softmax logit of (query, C key) pairs minus that of
            (query, other key) pairs, each query's logits centred over its visible
            keys; NaN when a group is empty. ``[n_inputs, layer, head_index]``.
        n_positions: ``|C|`` per input (real key positions only); ``lengths``: real tokens.
    """

    model: dict[str, Any]
    layers: tuple[int, ...]
    n_heads: int
    positions: str
    prepend_bos: bool | None
    hook_names: tuple[str, ...]
    logit_source: tuple[str, ...]
    mass: Float[torch.Tensor, "n_inputs layer head_index"]
    uniform_mass: Float[torch.Tensor, " n_inputs"]
    logit_gap: Float[torch.Tensor, "n_inputs layer head_index"]
    n_positions: Int[torch.Tensor, " n_inputs"]
    lengths: Int[torch.Tensor, " n_inputs"]

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
        positions: the key positions C (see the module docstring).
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
    chosen = _check_layers(model, layers, ("pattern",))
    plan = plan_batches(model, inputs, batch_size=batch_size, attention_mask=attention_mask, prepend_bos=prepend_bos)
    rule = _resolve_positions(model, positions, plan)
    causal = _is_causal(model)
    has_scores = all(attention_hook("scores", layer) in model.hook_dict for layer in chosen)  # type: ignore[attr-defined]
    pending: dict[int, dict[str, Any]] = {}
    reduced: dict[int, dict[str, torch.Tensor]] = {}
    sources: dict[int, str] = {}
    out: dict[str, list[torch.Tensor]] = {"mass": [], "uniform": [], "gap": [], "n": [], "len": []}

    def reduce(layer: int, real: torch.Tensor) -> None:
        slot = pending.pop(layer)
        pattern = slot["pattern"]
        key_len = int(pattern.shape[-1])
        allowed = _allowed(real, key_len, causal)
        n_queries = real.sum(1).clamp_min(1).float()
        p = pattern.float() * real[:, None, :, None]
        centred, ok, source = _centred_logits(pattern, slot.get("scores"), allowed)
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
            in_c = _fit(c_mask, key_len) & _real_keys(real, key_len)
            other = ~in_c & _real_keys(real, key_len)
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

    _run(model, plan, rule, layer_hooks, finish, progress=progress, desc="attention")
    n_positions = torch.cat(out["n"]).long()
    _warn_empty(n_positions, rule.description)
    names = tuple(attention_hook(k, layer) for layer in chosen for k in (("pattern", "scores") if has_scores else ("pattern",)))
    return AttentionConcentration(
        model=model_description(model),
        layers=chosen,
        n_heads=int(model.cfg.n_heads),
        positions=rule.description,
        prepend_bos=plan.prepend_bos,
        hook_names=names,
        logit_source=tuple(sources.get(layer, "") for layer in chosen),
        mass=_detach(torch.cat(out["mass"])),
        uniform_mass=_detach(torch.cat(out["uniform"])),
        logit_gap=_detach(torch.cat(out["gap"])),
        n_positions=_detach(n_positions),
        lengths=_detach(torch.cat(out["len"]).long()),
    )


# --------------------------------------------------------------------------------------
# Attention logits of one input (heat maps)


@dataclass(frozen=True)
class AttentionLogits:
    """The pre-softmax attention logits of one input, for heat maps.

    Attributes:
        logits: ``[layer, head_index, query_pos, key_pos]``; NaN where a query cannot
            see a key (causal mask).
        pattern: the attention probabilities (``hook_pattern``), same shape.
        source: per layer, how the logits were obtained: ``"hook_attn_scores"``
            (real pre-softmax scores), ``"q.k"`` (rebuilt from ``hook_q`` and
            ``hook_k`` with the model's scale, and checked: their softmax matches
            ``hook_pattern``), or ``"log(hook_pattern) centred"`` (exact up to a
            per-query constant; each query's row has mean 0 over its visible keys).
        tokens: the token strings of the input.
    """

    model: dict[str, Any]
    layers: tuple[int, ...]
    source: tuple[str, ...]
    prepend_bos: bool | None
    tokens: tuple[str, ...]
    token_ids: Int[torch.Tensor, " pos"]
    logits: Float[torch.Tensor, "layer head_index query_pos key_pos"]
    pattern: Float[torch.Tensor, "layer head_index query_pos key_pos"]

    def to_dataframe(self) -> pd.DataFrame:
        """Every visible (layer, head, query, key) as a row with tokens, logit and probability."""
        idx = (~torch.isnan(self.logits)).nonzero()
        lay, h, q, k = idx.unbind(1)
        names = list(self.tokens) + ["<slot>"] * max(0, self.logits.shape[-1] - len(self.tokens))
        return pd.DataFrame(
            {
                "layer": [self.layers[x] for x in lay.tolist()],
                "head": h.numpy(),
                "query": q.numpy(),
                "key": k.numpy(),
                "query_token": [names[x] for x in q.tolist()],
                "key_token": [names[x] for x in k.tolist()],
                "logit": self.logits[lay, h, q, k].numpy(),
                "prob": self.pattern[lay, h, q, k].numpy(),
            }
        )


def _attn_scale(model: TransformerLensModel) -> float:
    cfg = model.cfg
    if getattr(cfg, "use_attn_scale", True) is False:
        return 1.0
    scale = getattr(cfg, "attn_scale", -1.0)
    return float(scale) if scale is not None and scale > 0 else math.sqrt(int(cfg.d_head))


def attention_logits(
    model: TransformerLensModel,
    text: str | torch.Tensor,
    *,
    layers: Sequence[int] | None = None,
    prepend_bos: bool | None = None,
) -> AttentionLogits:
    """The pre-softmax attention logits of one input, per layer and head, for heat maps.

    Where ``hook_attn_scores`` holds real pre-softmax scores they are used; where it
    holds the pattern (BERT and native bridges of TransformerLens 4.3) the logits
    are rebuilt as ``q . k / scale`` from ``hook_q`` / ``hook_k`` and kept only if
    their softmax reproduces ``hook_pattern`` (1e-4, float32); otherwise (rotary
    models whose ``hook_q`` precedes the rotation) they are ``log(hook_pattern)``
    centred per query, which differs from the logits by a per-query constant only.

    Cost: one forward pass; caches ``hook_pattern``, ``hook_attn_scores``,
    ``hook_q`` and ``hook_k`` of the chosen layers for this input.

    >>> from massact_lens.examples import minilm
    >>> heat = attention_logits(minilm(), "The cat sat.", layers=[2])
    >>> heat.logits.shape, heat.source
    (torch.Size([1, 12, 6, 6]), ('q.k',))
    """
    chosen = _check_layers(model, layers, ("pattern", "q", "k"))
    if isinstance(text, torch.Tensor) and text.ndim == 2 and text.shape[0] != 1:
        raise ValueError(f"attention_logits reads one input; got a token tensor of {text.shape[0]} rows.")
    if not isinstance(text, str | torch.Tensor):
        raise TypeError(f"attention_logits reads one input (a string or a token tensor), not {type(text).__name__}.")
    plan = plan_batches(model, text, batch_size=1, prepend_bos=prepend_bos)
    causal = _is_causal(model)
    kinds = ["pattern", "q", "k"] + (["scores"] if all(attention_hook("scores", x) in model.hook_dict for x in chosen) else [])  # type: ignore[attr-defined]
    cache: dict[tuple[int, str], torch.Tensor] = {}
    seen: list[Batch] = []

    def make_hooks(batch: Batch) -> HookList:
        seen.append(batch)
        hooks: HookList = []
        for layer in chosen:
            for kind in kinds:

                def read(tensor: torch.Tensor, hook: Any, key: tuple[int, str] = (layer, kind)) -> None:  # noqa: ARG001
                    cache[key] = tensor.detach()

                hooks.append((attention_hook(kind, layer), read))
        return hooks

    run_batches(model, plan, make_hooks, progress=False, desc="logits")
    batch = seen[0]
    n_heads = int(model.cfg.n_heads)
    scale = _attn_scale(model)
    logits_all, patterns, sources = [], [], []
    real = batch.attention_mask.bool().to(cache[(chosen[0], "pattern")].device)
    for layer in chosen:
        pattern = cache[(layer, "pattern")].float()
        key_len = int(pattern.shape[-1])
        allowed = _allowed(real, key_len, causal)[:, None]
        scores = cache.get((layer, "scores"))
        if scores is not None and not torch.equal(scores, cache[(layer, "pattern")]):
            logits = scores.float()
            source = "hook_attn_scores"
        else:
            q = cache[(layer, "q")].float()
            k = _repeat_kv(cache[(layer, "k")].float(), n_heads)
            logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / scale if k.shape[1] == key_len else None
            source = "q.k"
            if logits is not None:
                rebuilt = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
                if float((rebuilt - pattern).abs().max()) > 1e-4:
                    logits = None
            if logits is None:
                centred, _, _ = _centred_logits(cache[(layer, "pattern")], None, allowed[:, 0])
                logits = centred
                source = "log(hook_pattern) centred"
        visible = allowed & torch.isfinite(logits) & (logits > -1e30)
        logits_all.append(logits.masked_fill(~visible, float("nan"))[0])
        patterns.append(pattern[0])
        sources.append(source)
    ids = batch.tokens[0]
    strings = token_strings(model, ids.tolist())
    return AttentionLogits(
        model=model_description(model),
        layers=chosen,
        source=tuple(sources),
        prepend_bos=plan.prepend_bos,
        tokens=tuple(strings[int(i)] for i in ids.tolist()),
        token_ids=_detach(ids.long()),
        logits=_detach(torch.stack(logits_all)),
        pattern=_detach(torch.stack(patterns)),
    )


# --------------------------------------------------------------------------------------
# Implicit attention bias


@dataclass(frozen=True)
class ImplicitBias:
    """The decomposition ``attn(q) = bias(q) + rest(q)`` per layer and head.

    ``bias(q) = sum_{i in C} p_qi v_i`` and ``rest(q) = sum_{i not in C} p_qi v_i`` in
    head space (``hook_z`` space). Their images in the residual stream are, per
    head, ``z_h @ W_O[h]`` (:meth:`written`). The output bias ``b_O`` belongs to
    neither term: ``sum_h (written(bias) + written(rest)) + b_O`` is the attention
    output. Padding queries hold zeros.

    Attributes:
        layers, heads: what was decomposed (``heads`` index the model's heads).
        positions: the position rule that defined C; ``key_mask`` the C of each input.
        bias_z, rest_z: ``[layer, n_inputs, query_pos, head, d_head]``.
        c_mass: attention probability on C per query, ``[layer, n_inputs, query_pos, head]``.
        W_O: ``[layer, head, d_head, d_model]`` of the chosen heads; ``b_O``: ``[layer, d_model]``.
        z_error: per layer, max ``|bias + rest - hook_z|`` over real queries and chosen heads.
        out_error: per layer, max ``|sum_h hook_z_h @ W_O[h] + b_O - attention output|``
            over real queries (all heads), the attention output read at ``out_hooks``.
        attention_mask: 1 for real query positions; ``tokens``: the token ids.
    """

    model: dict[str, Any]
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    positions: str
    prepend_bos: bool | None
    hook_names: tuple[str, ...]
    out_hooks: tuple[str, ...]
    bias_z: Float[torch.Tensor, "layer n_inputs query_pos head d_head"]
    rest_z: Float[torch.Tensor, "layer n_inputs query_pos head d_head"]
    c_mass: Float[torch.Tensor, "layer n_inputs query_pos head"]
    key_mask: Bool[torch.Tensor, "n_inputs key_pos"]
    attention_mask: Int[torch.Tensor, "n_inputs query_pos"]
    tokens: Int[torch.Tensor, "n_inputs query_pos"]
    W_O: Float[torch.Tensor, "layer head d_head d_model"] = field(repr=False)
    b_O: Float[torch.Tensor, "layer d_model"] = field(repr=False)
    z_error: Float[torch.Tensor, " layer"]
    out_error: Float[torch.Tensor, " layer"]

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
            mask = mask & ~_fit(self.key_mask, mask.shape[1])
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
        positions: the key positions C (see the module docstring); they must be
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
    chosen = _check_layers(model, layers, ("pattern", "v", "z"))
    head_list = _check_heads(model, heads)
    plan = plan_batches(model, inputs, batch_size=batch_size, attention_mask=attention_mask, prepend_bos=prepend_bos)
    rule = _resolve_positions(model, positions, plan)
    warn_if_processed(model)
    n_heads = int(model.cfg.n_heads)
    device = _device(model)
    weights = {layer: tuple(t.to(device) for t in _w_o(model, layer)) for layer in chosen}
    out_names = {layer: _output_hook(model, layer) for layer in chosen}
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
            v = _repeat_kv(slot["v"].float(), n_heads)[:, :, head_index]  # [b, k, h, d]
            key_len = int(pattern.shape[-1])
            if v.shape[1] != key_len:
                raise ValueError(
                    f"Layer {layer}: hook_pattern has {key_len} key positions but hook_v has {v.shape[1]}: "
                    "the decomposition needs a value for every key (no extra key slots)."
                )
            in_c = _fit(c_mask, key_len) & _real_keys(real, key_len)
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

    _run(model, plan, rule, layer_hooks, finish, progress=progress, desc="implicit bias")
    key_mask = _pad_cat(parts["keys"], 1)
    _warn_empty(key_mask.sum(1), rule.description)
    names = tuple(attention_hook(k, layer) for layer in chosen for k in ("pattern", "v", "z"))
    return ImplicitBias(
        model=model_description(model),
        layers=chosen,
        heads=head_list,
        positions=rule.description,
        prepend_bos=plan.prepend_bos,
        hook_names=names,
        out_hooks=tuple(out_names[layer] for layer in chosen),
        bias_z=_detach(_pad_cat(parts["bias"], 2).transpose(0, 1)),
        rest_z=_detach(_pad_cat(parts["rest"], 2).transpose(0, 1)),
        c_mass=_detach(_pad_cat(parts["mass"], 2).transpose(0, 1)),
        key_mask=_detach(key_mask),
        attention_mask=_detach(_pad_cat(parts["mask"], 1).long()),
        tokens=_detach(_pad_cat(parts["tokens"], 1).long()),
        W_O=_detach(torch.stack([weights[layer][0][head_index] for layer in chosen])),
        b_O=_detach(torch.stack([weights[layer][1] for layer in chosen])),
        z_error=torch.tensor([z_error[layer] for layer in chosen]),
        out_error=torch.tensor([out_error[layer] for layer in chosen]),
    )


# --------------------------------------------------------------------------------------
# Keys, values and attention inputs of C tokens


@dataclass(frozen=True)
class TokenFeatures:
    """Keys, values and post-LayerNorm attention inputs of C tokens vs the other tokens.

    The ``group`` axis is :data:`GROUPS`: ``0`` = tokens in C, ``1`` = the other real
    tokens. Norms are means over tokens (of every input). Under grouped-query
    attention a query head shows the key / value norms of the KV head it reads.

    Attributes:
        value_norm, key_norm: mean ``||v_i||`` / ``||k_i||`` per head, ``[layer, group, head]``.
        out_norm: mean ``||v_i @ W_O[h]||``, the size of what token i can write through
            head h when attended to (the paper's "value update"), ``[layer, group, head]``.
        feature_norm: mean norm of the post-LayerNorm attention input
            (``ln1.hook_out``; post-norm models: ``hook_resid_pre``), ``[layer, group]``.
        feature_cos_to_mean, feature_rel_variation: how constant those inputs are
            across tokens and inputs (cosine to the group mean; std norm / mean norm).
        feature_mean: the group's mean attention input, ``[layer, group, d_model]``.
        counts: tokens per group, ``[group]``.
    """

    model: dict[str, Any]
    layers: tuple[int, ...]
    n_heads: int
    positions: str
    prepend_bos: bool | None
    feature_hooks: tuple[str, ...]
    counts: Int[torch.Tensor, " group"]
    value_norm: Float[torch.Tensor, "layer group head"]
    key_norm: Float[torch.Tensor, "layer group head"]
    out_norm: Float[torch.Tensor, "layer group head"]
    feature_norm: Float[torch.Tensor, "layer group"]
    feature_cos_to_mean: Float[torch.Tensor, "layer group"]
    feature_rel_variation: Float[torch.Tensor, "layer group"]
    feature_mean: Float[torch.Tensor, "layer group d_model"] = field(repr=False)

    def top_feature_dims(self, layer: int, k: int = 5, group: Literal["in_c", "other"] = "in_c") -> list[tuple[int, float]]:
        """The ``k`` largest-magnitude dims of a group's mean attention input at a layer."""
        if layer not in self.layers:
            raise ValueError(f"Layer {layer} was not measured; this result has layers {list(self.layers)}.")
        mean = self.feature_mean[self.layers.index(layer), GROUPS.index(group)]
        top = mean.abs().topk(min(k, mean.shape[0])).indices
        return [(int(d), float(mean[d])) for d in top]

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
) -> TokenFeatures:
    """Norms of keys, values and value updates, and attention inputs, of C tokens vs others.

    Per layer and head: the mean norm of ``hook_k`` and ``hook_v`` and of each
    value's image ``v_i @ W_O[h]`` over the tokens in C and over the other real
    tokens; per layer: the post-LayerNorm input of attention (``ln1.hook_out`` for
    pre-norm models; for post-norm BERT-style models the block input
    ``hook_resid_pre``, which is already normalised) of both groups: norm, mean
    vector and constancy.

    Cost: one forward pass per batch reading ``hook_k``, ``hook_v`` and the feature
    hook of each chosen layer; norms are reduced at once, the features of the
    current batch are held until its pass ends; the result is streaming sums.

    >>> from massact_lens.examples import minilm
    >>> feats = token_features(minilm(), ["The cat sat on the mat.", "Hello world."],
    ...                        "start", layers=[3], progress=False)
    >>> feats.feature_hooks, feats.value_norm.shape
    (('blocks.3.hook_resid_pre',), torch.Size([1, 2, 12]))
    """
    chosen = _check_layers(model, layers, ("v", "k"))
    feature_names = tuple(_feature_hook(model, layer) for layer in chosen)
    resolve_hook_names(model, list(feature_names))
    plan = plan_batches(model, inputs, batch_size=batch_size, attention_mask=attention_mask, prepend_bos=prepend_bos)
    rule = _resolve_positions(model, positions, plan)
    warn_if_processed(model)
    n_heads, d_model = int(model.cfg.n_heads), int(model.cfg.d_model)
    device = _device(model)
    weights = {layer: _w_o(model, layer)[0].to(device) for layer in chosen}
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

    def layer_hooks(batch: Batch) -> HookList:  # noqa: ARG001
        hooks: HookList = []
        for layer in chosen:

            def read_v(tensor: torch.Tensor, hook: Any, layer: int = layer) -> None:  # noqa: ARG001
                v = _repeat_kv(tensor.detach().float(), n_heads)
                state.setdefault(layer, {})["value"] = v.norm(dim=-1)
                state[layer]["out"] = torch.einsum("bkhd,hdm->bkhm", v, weights[layer]).norm(dim=-1)

            def read_k(tensor: torch.Tensor, hook: Any, layer: int = layer) -> None:  # noqa: ARG001
                state.setdefault(layer, {})["key"] = _repeat_kv(tensor.detach().float(), n_heads).norm(dim=-1)

            def read_feature(tensor: torch.Tensor, hook: Any, layer: int = layer) -> None:  # noqa: ARG001
                state.setdefault(layer, {})["feature"] = tensor.detach().float()

            hooks += [
                (attention_hook("v", layer), read_v),
                (attention_hook("k", layer), read_k),
                (_feature_hook(model, layer), read_feature),
            ]
        return hooks

    def finish(batch: Batch, c_mask: torch.Tensor) -> None:
        real = batch.attention_mask.bool()
        in_c = _fit(c_mask, real.shape[1]) & real
        groups = (in_c, ~in_c & real)
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

    _run(model, plan, rule, layer_hooks, finish, progress=progress, desc="token features")
    _warn_empty(counts[:1, 0], rule.description)
    n = counts.clamp_min(1)
    mean_vec = sums["vec"] / n[..., None]
    mean_norm = mean_vec.norm(dim=-1)
    cos = (sums["unit"] / n[..., None] * mean_vec).sum(-1) / mean_norm
    variance = (sums["sq"] / n - mean_norm**2).clamp_min(0)
    empty = counts == 0
    nan = float("nan")
    return TokenFeatures(
        model=model_description(model),
        layers=chosen,
        n_heads=n_heads,
        positions=rule.description,
        prepend_bos=plan.prepend_bos,
        feature_hooks=feature_names,
        counts=counts[0].long(),
        value_norm=(sums["value"] / n[..., None]).masked_fill(empty[..., None], nan).float(),
        key_norm=(sums["key"] / n[..., None]).masked_fill(empty[..., None], nan).float(),
        out_norm=(sums["out"] / n[..., None]).masked_fill(empty[..., None], nan).float(),
        feature_norm=(sums["norm"] / n).masked_fill(empty, nan).float(),
        feature_cos_to_mean=cos.masked_fill(empty, nan).float(),
        feature_rel_variation=(variance.sqrt() / mean_norm).masked_fill(empty, nan).float(),
        feature_mean=mean_vec.masked_fill(empty[..., None], nan).float(),
    )
