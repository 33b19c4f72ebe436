"""Explicit attention bias (learnable k', v') and a learnable sink token, as hook components.

Background
----------
Sun et al. (2024, section 5) argue that massive activations are the model's way of
building an *implicit attention bias*: a key that attracts attention and a value
that contributes an almost constant vector. Give every head an explicit bias,

    attention(q) = softmax([q K^T, q k'^T] / sqrt(d_head)) @ [V; v'^T],

with learnable ``k'``, ``v'`` per head, and the model trained from scratch no
longer develops massive activations. A learnable *sink token* prepended to every
sequence instead moves them onto that token.

**Mechanism: one prefix position, filled through hooks.** Both components occupy
position 0 of the sequence (:data:`PREFIX_POSITION`), which holds a placeholder
token (``<slot>`` or ``<sink>`` in the project's models; any id you choose on
your own model):

* :class:`ExplicitAttentionBias` replaces, in every layer, the key and the value
  at position 0 by ``k'[layer]`` and ``v'[layer]``: permanent hooks on
  ``blocks.{l}.attn.hook_k`` / ``hook_v``. Every later query sees the keys
  ``[k', K]`` and values ``[v', V]``: exactly the formula above. With rotary
  embeddings the rotation at position 0 is the identity, so the score is
  ``(R_q q) . k'``: the slot carries no position. Grouped-query models get one
  ``k'``, ``v'`` per key/value head, shared by its query heads.
* :class:`SinkToken` replaces the token embedding at position 0 by a learnable
  vector: a permanent hook on ``hook_embed``. That position is then an ordinary
  token whose residual stream, keys and values the network computes.

Because the slot is a real key position, everything in the library sees it
without special cases: ``hook_pattern[..., 0]`` is the attention on the bias slot
(or the sink token), ``hook_v[:, 0]`` is ``v'``, and an attention decomposition
``attn(q) = sum_{i in C} p_qi v_i W_O + sum_{i not in C} p_qi v_i W_O`` with
``C = {0}`` gives, for the bias model, *exactly* the explicit bias contribution
:meth:`ExplicitAttentionBias.bias_term` (a test checks the identity). The
permanent hooks are registered before any analysis hook, so analysis hooks on
``hook_k`` / ``hook_v`` see ``k'`` / ``v'`` (a hook added with ``prepend=True``
would see the placeholder's own key instead).

The parameters are registered on ``model.original_model`` under
``massact_prefix``, so ``model.parameters()`` (and so any optimizer built from
it) trains them, and ``model.to(...)`` moves them. ``model.state_dict()`` (the
bridge's TransformerLens-format dict) does not list them:
:func:`massact_lens.models.checkpoints.save_checkpoint` writes them next to it.

Gotchas
-------
* **Position 0 of an explicit-bias model is not a token.** Its key and value are
  replaced in every layer, so nothing reads its residual stream: the numbers
  there are whatever the weights make of the placeholder, with no function.
  Residual statistics of such a model should start at
  :func:`first_token_position` (= 1); :func:`massact_lens.scan` reads every
  position, position 0 included, and labels it with the placeholder token.
* **Every input must start with the placeholder.** A permanent hook on
  ``embed.hook_in`` raises ``ValueError`` (at the embedding, before any block
  runs) when position 0 holds another id; strings are safe with the project's
  tokenizers, which prepend it. Generation with a KV cache feeds new tokens
  without position 0 and is therefore refused; generate without the cache.
* **``v' = 0`` does not make the bias a no-op.** The slot adds nothing to the
  value sum, but it still takes softmax mass ``p_slot``, so each head's output is
  scaled by ``1 - p_slot``. No finite ``k'`` gives every query ``p_slot = 0``.
* **BOS and "set to mean".** In a causal model the state at position 0 depends
  on the token there and on nothing else, so with a BOS token it is *identical
  for every input* (and so is the BOS state at position 1 behind a fixed prefix).
  Replacing a massive activation at BOS by its mean over inputs is then the
  identity and proves nothing; zeroing it is the informative ablation there.
  Sun et al. ran LLaMA without BOS, where the first token, and its massive
  activation, varies with the input. The library's BOS option
  (``prepend_bos``) decides which of the two experiments you run.
* ``model.reset_hooks(including_permanent=True)`` removes the components' hooks
  but not their parameters; use :func:`detach_prefix`.

Usage
-----
>>> import torch
>>> from massact_lens.examples import tiny_model
>>> from massact_lens.models.explicit_bias import attach_explicit_bias, detach_prefix
>>> model = tiny_model("gpt2", n_layers=2)
>>> bias = attach_explicit_bias(model, placeholder_id=0)
>>> tuple(bias.k.shape)                     # layer, key/value head, d_head
(2, 4, 8)
>>> _, cache = model.run_with_cache(torch.tensor([[0, 5, 6, 7]]))
>>> bool(torch.equal(cache["blocks.1.attn.hook_v"][0, 0], bias.v[1]))
True
>>> detach_prefix(model)

References
----------
Sun, Chen, Kolter, Liu. *Massive Activations in Large Language Models*, COLM 2024,
section 5 (explicit attention biases). Xiao et al. *Efficient Streaming Language
Models with Attention Sinks*, ICLR 2024 (a learnable sink token). Guo et al.
*Active-Dormant Attention Heads*, arXiv 2410.13835 (BOS sinks in small models).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import nn
from transformer_lens.hook_points import HookPoint, LensHandle
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.hook_names import EMBED_OUT, EMBED_TOKENS, attention_hook

__all__ = [
    "ExplicitAttentionBias",
    "SinkToken",
    "attach_explicit_bias",
    "attach_sink_token",
    "detach_prefix",
]

#: The sequence position that holds the bias slot or the sink token.
PREFIX_POSITION = 0
#: Attribute name of the component on ``model.original_model``.
MODULE_NAME = "massact_prefix"

HookFn = Callable[..., Any]


class HookComponent(nn.Module):
    """A module that lives in a bridge's hook system: permanent hooks and parameters on
    ``model.original_model`` under :attr:`module_name` (the bookkeeping every component here
    and in :mod:`massact_lens.models.attention_variants` shares)."""

    kind: str = ""
    module_name: str = MODULE_NAME

    def __init__(self) -> None:
        super().__init__()
        self._handles: list[tuple[HookPoint, LensHandle]] = []

    def hook_specs(self) -> list[tuple[str, HookFn]]:  # pragma: no cover - abstract
        """``(hook name, fn)`` pairs that implement the component."""
        raise NotImplementedError

    def _attach(self, model: TransformerLensModel) -> None:
        hook_dict = model.hook_dict  # type: ignore[attr-defined]
        specs = self.hook_specs()
        missing = [name for name, _ in specs if name not in hook_dict]
        if missing:
            raise ValueError(
                f"The model has no hook points {missing}: {self.kind} needs them "
                "(TransformerBridge models with split q/k/v hooks have them)."
            )
        original = model.original_model  # type: ignore[attr-defined]
        original.add_module(self.module_name, self)
        try:
            for name, fn in specs:
                point = hook_dict[name]
                self._handles.append((point, point.add_hook(fn, is_permanent=True)))
        except BaseException:
            self._detach(model)
            raise

    def hooks_attached(self) -> bool:
        """Whether every hook of the component is still on its hook point (a user's
        ``model.reset_hooks(including_permanent=True)`` removes them, the parameters stay)."""
        return all(handle in point.fwd_hooks for point, handle in self._handles)

    def _detach(self, model: TransformerLensModel) -> None:
        for point, handle in self._handles:
            handle.hook.remove()
            if handle in point.fwd_hooks:
                point.fwd_hooks.remove(handle)
        self._handles.clear()
        original = model.original_model  # type: ignore[attr-defined]
        if getattr(original, "_modules", {}).get(self.module_name) is self:
            del original._modules[self.module_name]


class _PrefixComponent(HookComponent):
    """Shared plumbing: the placeholder check."""

    def __init__(self, placeholder_id: int | None) -> None:
        super().__init__()
        if placeholder_id is not None and (not isinstance(placeholder_id, int) or placeholder_id < 0):
            raise ValueError(f"placeholder_id must be a token id (int >= 0) or None, not {placeholder_id!r}.")
        self.placeholder_id = placeholder_id

    def hook_specs(self) -> list[tuple[str, HookFn]]:
        """``(hook name, fn)`` pairs that implement the component (also usable in ``model.hooks``)."""
        specs: list[tuple[str, HookFn]] = []
        if self.placeholder_id is not None:
            specs.append((EMBED_TOKENS, self._check_tokens))
        return specs + self._replacement_specs()

    def _replacement_specs(self) -> list[tuple[str, HookFn]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_tokens(self, tokens: torch.Tensor, hook: Any) -> None:  # noqa: ARG002
        if tokens.is_floating_point() or tokens.ndim != 2 or tokens.shape[1] == 0:
            return
        first = tokens[:, PREFIX_POSITION]
        if bool((first != self.placeholder_id).any()):
            bad = int(first[first != self.placeholder_id][0])
            raise ValueError(
                f"This model has {self.kind} at position {PREFIX_POSITION}: every input must start "
                f"with the placeholder token id {self.placeholder_id}, but one starts with {bad}. "
                "Prepend it to token tensors (strings get it from the model's tokenizer). "
                "Generation with a KV cache feeds inputs without it: generate with "
                "use_past_kv_cache=False."
            )


def _replace_first(values: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
    """``values`` with position 0 (dim 1) set to ``replacement``, differentiably (no in-place)."""
    head = replacement.to(values.dtype).expand(values.shape[0], 1, *values.shape[2:])
    return torch.cat([head, values[:, 1:]], dim=1)


class ExplicitAttentionBias(_PrefixComponent):
    """Learnable ``k'``, ``v'`` per layer and key/value head, entering at position 0.

    Attributes:
        k: ``[n_layers, n_kv_heads, d_head]``, the bias keys (small random init).
        v: ``[n_layers, n_kv_heads, d_head]``, the bias values (zero init).
        placeholder_id: the token id every input must carry at position 0
            (None: not checked).
    """

    kind = "an explicit attention bias slot"

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        d_head: int,
        *,
        placeholder_id: int | None = None,
        key_init_std: float = 0.02,
        seed: int | None = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(placeholder_id)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        k = torch.randn(n_layers, n_kv_heads, d_head, generator=generator) * key_init_std
        self.k = nn.Parameter(k.to(device=device, dtype=dtype))
        self.v = nn.Parameter(torch.zeros(n_layers, n_kv_heads, d_head, device=device, dtype=dtype))

    @property
    def n_layers(self) -> int:
        return int(self.k.shape[0])

    def _replacement_specs(self) -> list[tuple[str, HookFn]]:
        specs: list[tuple[str, HookFn]] = []
        for layer in range(self.n_layers):
            specs.append((attention_hook("k", layer), self._replacer(self.k, layer)))
            specs.append((attention_hook("v", layer), self._replacer(self.v, layer)))
        return specs

    @staticmethod
    def _replacer(parameter: nn.Parameter, layer: int) -> HookFn:
        def replace(values: torch.Tensor, hook: Any) -> torch.Tensor:  # noqa: ARG001
            if values.ndim != 4 or values.shape[2] != parameter.shape[1]:
                raise ValueError(
                    f"Expected keys/values [batch, pos, {parameter.shape[1]} heads, d_head], got "
                    f"{tuple(values.shape)}: the explicit bias was built for another model."
                )
            return _replace_first(values, parameter[layer])

        return replace

    def bias_term(
        self,
        model: TransformerLensModel,
        layer: int,
        pattern: Float[torch.Tensor, "batch head_index query_pos key_pos"],
    ) -> Float[torch.Tensor, "batch query_pos d_model"]:
        """The explicit bias contribution to a layer's attention output.

        ``sum_h pattern[:, h, q, 0] * v'_h @ W_O[h]``: what the slot adds to
        ``hook_attn_out`` (the output bias ``b_O`` is not part of it). It equals the
        ``C = {0}`` term of the attention decomposition computed from ``hook_pattern``
        and ``hook_v``.

        Args:
            model: the model this component is attached to.
            layer: the block index.
            pattern: that layer's ``hook_pattern``.
        """
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} does not exist: the bias has {self.n_layers} layers.")
        w_o = model.blocks[layer].attn.W_O  # type: ignore[attr-defined]  # [head, d_head, d_model]
        n_heads = int(w_o.shape[0])
        values = self.v[layer].repeat_interleave(n_heads // int(self.v.shape[1]), dim=0)
        per_head = torch.einsum("hd,hdm->hm", values.to(w_o.dtype), w_o)
        return torch.einsum("bhq,hm->bqm", pattern[..., PREFIX_POSITION].to(w_o.dtype), per_head)


class SinkToken(_PrefixComponent):
    """A learnable embedding that replaces the token embedding at position 0.

    Attributes:
        embedding: ``[d_model]``, the sink token's input embedding.
        placeholder_id: the token id every input must carry at position 0
            (None: not checked).
    """

    kind = "a learnable sink token"

    def __init__(
        self,
        d_model: int,
        *,
        placeholder_id: int | None = None,
        init_std: float = 0.02,
        seed: int | None = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(placeholder_id)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        embedding = torch.randn(d_model, generator=generator) * init_std
        self.embedding = nn.Parameter(embedding.to(device=device, dtype=dtype))

    def _replacement_specs(self) -> list[tuple[str, HookFn]]:
        def replace(embeddings: torch.Tensor, hook: Any) -> torch.Tensor:  # noqa: ARG001
            return _replace_first(embeddings, self.embedding)

        return [(EMBED_OUT, replace)]


def _model_device_dtype(model: TransformerLensModel) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())  # type: ignore[attr-defined]
    return parameter.device, parameter.dtype


def _refuse_second(model: TransformerLensModel) -> None:
    existing = prefix_component(model)
    if existing is not None:
        raise ValueError(
            f"This model already has {existing.kind} attached. Call "
            "massact_lens.models.explicit_bias.detach_prefix(model) first."
        )


def attach_explicit_bias(
    model: TransformerLensModel,
    *,
    placeholder_id: int | None,
    key_init_std: float = 0.02,
    seed: int | None = 0,
) -> ExplicitAttentionBias:
    """Give every attention head of ``model`` a learnable key/value slot at position 0.

    The model must then see the placeholder token at position 0 of every input;
    real tokens start at position 1. ``v'`` starts at zero, ``k'`` at
    ``N(0, key_init_std^2)``.

    Args:
        model: a TransformerBridge with ``hook_k`` / ``hook_v`` per layer.
        placeholder_id: the token id inputs carry at position 0 (checked on every
            forward pass); None skips the check.
        key_init_std: standard deviation of the initial ``k'``.
        seed: seed of the initial ``k'`` (None: the global generator).

    Returns:
        The attached :class:`ExplicitAttentionBias` (its parameters are in
        ``model.parameters()``).

    Raises:
        ValueError: the model already has a prefix component, or lacks the hooks.

    >>> from massact_lens.examples import tiny_model
    >>> model = tiny_model("llama")           # grouped-query: 2 key/value heads
    >>> tuple(attach_explicit_bias(model, placeholder_id=0).v.shape)
    (2, 2, 8)
    """
    _refuse_second(model)
    cfg = model.cfg
    device, dtype = _model_device_dtype(model)
    n_kv_heads = int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    component = ExplicitAttentionBias(
        int(cfg.n_layers),
        n_kv_heads,
        int(cfg.d_head),
        placeholder_id=placeholder_id,
        key_init_std=key_init_std,
        seed=seed,
        device=device,
        dtype=dtype,
    )
    component._attach(model)
    return component


def attach_sink_token(
    model: TransformerLensModel,
    *,
    placeholder_id: int | None,
    init_std: float = 0.02,
    seed: int | None = 0,
) -> SinkToken:
    """Make position 0 a learnable sink token: its embedding becomes a parameter.

    Args:
        model: a TransformerBridge with a ``hook_embed`` point.
        placeholder_id: the token id inputs carry at position 0 (checked on every
            forward pass); None skips the check.
        init_std: standard deviation of the initial embedding.
        seed: seed of the initial embedding (None: the global generator).

    Returns:
        The attached :class:`SinkToken`.

    >>> from massact_lens.examples import tiny_model
    >>> model = tiny_model()
    >>> tuple(attach_sink_token(model, placeholder_id=1).embedding.shape)
    (32,)
    """
    _refuse_second(model)
    device, dtype = _model_device_dtype(model)
    component = SinkToken(
        int(model.cfg.d_model),
        placeholder_id=placeholder_id,
        init_std=init_std,
        seed=seed,
        device=device,
        dtype=dtype,
    )
    component._attach(model)
    return component


def prefix_component(model: TransformerLensModel) -> ExplicitAttentionBias | SinkToken | None:
    """The explicit bias or sink token attached to ``model``, or None.

    >>> from massact_lens.examples import tiny_model
    >>> prefix_component(tiny_model()) is None
    True
    """
    original = getattr(model, "original_model", None)
    modules = getattr(original, "_modules", {}) if original is not None else {}
    component = modules.get(MODULE_NAME)
    return component if isinstance(component, ExplicitAttentionBias | SinkToken) else None


def first_token_position(model: TransformerLensModel) -> int:
    """Where the input's own tokens start: 1 with a bias slot or sink token, else 0.

    >>> from massact_lens.examples import tiny_model
    >>> first_token_position(tiny_model())
    0
    """
    return PREFIX_POSITION + 1 if prefix_component(model) is not None else 0


def detach_prefix(model: TransformerLensModel) -> None:
    """Remove the explicit bias / sink token (hooks and parameters) from ``model``.

    Does nothing when none is attached.
    """
    component = prefix_component(model)
    if component is not None:
        component._detach(model)
