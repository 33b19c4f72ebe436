"""Attention measured inside the fused kernel: extra value columns ride along one SDPA call.

What the attention analyses report about a key set C needs no ``[query, key]`` tensor:
the mass on C is ``sum_{k in C} p_qk``, the attention output of a value column that is
1 on C and 0 elsewhere; the term from C is ``sum_{k in C} p_qk v_k``, the output of the
values masked to C. So a pass that measures C appends such columns to each layer's
values and lets the model's own fused attention (PyTorch's
``scaled_dot_product_attention``, flash-style: ``O(query x block)`` memory) weigh them
with the very probabilities it uses for the model's output: time and memory of a
forward pass, at any context length.

Mechanism: :data:`PROBE_KERNEL` is an attention function registered in HuggingFace's
``AttentionInterface`` (their public way to add a kernel; its masks are SDPA's, through
``AttentionMaskInterface``). While :func:`probing` holds a probe for a HuggingFace
attention module, each call of that module asks the probe for extra value columns
(:meth:`AttentionProbe.values`, which also sees the post-rotary queries and keys),
runs SDPA once over ``[values, extra]`` (the queries and keys padded with zeros to that
width, so that the kernel stays a fused one), hands the extra outputs to
:meth:`AttentionProbe.read` and returns the model's own columns. A module without a
probe gets plain SDPA.

Whether a model's attention reaches this kernel at all (the bridge must call the
HuggingFace module, not re-implement attention) is decided by
:func:`massact_lens._core.fast_paths.fused_route`; each probe records that it ran, and a
pass checks it (:meth:`AttentionProbe.ran`).

>>> import torch
>>> from massact_lens.examples import minilm
>>> from massact_lens._core.fast_paths import attention_implementation
>>> model = minilm()
>>> class Mass:
...     def values(self, query, key, value, scaling):
...         return torch.ones_like(value[..., :1])       # a column of ones: every key
...     def read(self, extra, output):
...         self.total = extra
>>> probe = Mass()
>>> with torch.no_grad(), attention_implementation(model, PROBE_KERNEL), probing({m: probe for m in hf_attention(model, 0).modules()}):
...     _ = model("The cat sat.")
>>> bool(torch.allclose(probe.total, torch.ones_like(probe.total)))   # softmax sums to 1
True
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from transformer_lens.model_protocol import TransformerLensModel

__all__ = ["PROBE_KERNEL", "AttentionProbe", "delegates_attention", "hf_attention", "probing", "register_probe_kernel"]

#: The name of the probe kernel in HuggingFace's attention registry.
PROBE_KERNEL = "massact_lens_probe"

_probes: weakref.WeakKeyDictionary[torch.nn.Module, AttentionProbe] = weakref.WeakKeyDictionary()
_registered = False


@runtime_checkable
class AttentionProbe(Protocol):
    """What :func:`probing` attaches to one HuggingFace attention module."""

    def values(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor | None:
        """Extra value columns ``[batch, kv_heads, key_pos, extra]`` for this call (None: none).

        ``query`` ``[batch, heads, query_pos, d_head]`` and ``key`` ``[batch, kv_heads,
        key_pos, d_head]`` are post-rotary, as the kernel gets them; ``scaling`` multiplies
        their dot products into the logits.
        """
        ...

    def read(self, extra: torch.Tensor, output: torch.Tensor) -> None:
        """The attention-weighted extra columns, ``[batch, query_pos, heads, extra]``, and
        the model's own output of the kernel (``hook_z``), ``[batch, query_pos, heads, d_head]``."""
        ...


def _probe_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    probe = _probes.get(module)
    scale = float(scaling) if scaling is not None else float(query.shape[-1]) ** -0.5
    extra = None
    if probe is not None:
        for name in ("softcap", "s_aux", "position_bias"):
            if kwargs.get(name) is not None:
                raise RuntimeError(
                    f"This attention passes {name!r} to its kernel, which the probe kernel does not model: run "
                    "with MASSACT_LENS_EAGER=1 (the eager pattern path) for this model."
                )
        extra = probe.values(query, key, value, scale)
    if extra is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    d, e = int(value.shape[-1]), int(extra.shape[-1])
    # Fused CPU / GPU kernels want one head width for queries, keys and values: the
    # queries and keys get zero columns (their dot products do not change; the scale
    # is the one of the real width), so the kernel stays flash-style, O(query x block).
    pad = (0, d + e - int(query.shape[-1]))
    joint = torch.cat([value, extra.to(value.dtype)], dim=-1)
    out, weights = sdpa_attention_forward(module, torch.nn.functional.pad(query, pad),
                                          torch.nn.functional.pad(key, pad), joint, attention_mask,
                                          dropout=dropout, scaling=scale, **kwargs)
    own = out[..., :d].contiguous()
    probe.read(out[..., d:], own)  # type: ignore[union-attr]
    return own, weights


def register_probe_kernel() -> bool:
    """Register :data:`PROBE_KERNEL` (and SDPA's masks for it) with HuggingFace, once.

    False when this transformers has no public attention registry (the fused route is
    then not taken).
    """
    global _registered
    if _registered:
        return True
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(PROBE_KERNEL, _probe_attention)
    AttentionMaskInterface.register(PROBE_KERNEL, sdpa_mask)
    _registered = True
    return True


@contextlib.contextmanager
def probing(probes: Mapping[torch.nn.Module, AttentionProbe]) -> Iterator[None]:
    """Inside: each HuggingFace attention module in ``probes`` calls its probe (when the
    model runs :data:`PROBE_KERNEL`); removed on exit, also on error."""
    added = [module for module in probes if module not in _probes]
    try:
        for module in added:
            _probes[module] = probes[module]
        yield
    finally:
        for module in added:
            _probes.pop(module, None)


def delegates_attention(model: TransformerLensModel, layer: int) -> bool:
    """True when ``layer``'s attention is the bridge's generic component, which calls its
    HuggingFace module as it is (BERT-style), hooks inside it or not."""
    return _delegates(model.blocks[layer].attn)  # type: ignore[index]


def _delegates(attention: Any) -> bool:
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    kind = type(attention)
    original = attention._modules.get("_original_component")
    return (kind.forward is AttentionBridge.forward and original is not None
            and not getattr(original, "accepts_pattern_fn", False)
            and not getattr(attention, "requires_relative_position_bias", False))


def hf_attention(model: TransformerLensModel, layer: int) -> torch.nn.Module:
    """The HuggingFace attention module of ``layer`` (what the kernel gets as ``module``)."""
    return model.blocks[layer].attn.original_component  # type: ignore[index]
