"""Attention variants reported to remove sinks: softmax-off-by-one and head-wise sigmoid gates.

Background
----------
Two changes to attention are reported to remove attention sinks and the massive
activations that build them (docs/beyond_the_paper.md measures both on the
Bigram-Backcopy decoders):

* **softmax-off-by-one** ("softmax1"): an extra logit fixed at 0 in every softmax,
  ``p_i = exp(s_i) / (1 + sum_j exp(s_j))``, so a head can attend to *nothing*
  instead of dumping its attention on a sink token.
* **gated attention** (Qiu et al. 2025): per head ``h`` and query position ``q``,
  ``z'[q, h] = sigmoid(x_q . w_h + b_h) * z[q, h]``, with ``x_q`` the attention's
  input at ``q`` (the normed residual in a pre-norm block) and ``z`` the head's
  output before ``W_O``; a head can switch itself off at a query.

**Mechanism.** Both are hook components, like
:mod:`massact_lens.models.explicit_bias`:

* :class:`SoftmaxOffByOne` *is* an explicit bias slot with ``k' = 0`` and
  ``v' = 0``, frozen (buffers, not parameters): the slot's logit ``q . 0`` is 0
  and its value adds nothing, which is exactly the formula above. It reuses the
  slot at position 0 (placeholder ``<slot>`` in the project's models), so
  ``hook_pattern[..., 0]`` is the mass a head gives to "nothing".
* :class:`HeadGate` adds learnable ``w [n_layers, n_heads, d_model]`` and
  ``b [n_layers, n_heads]``, and two permanent hooks per layer: one on
  ``blocks.{l}.attn.hook_in`` keeps the attention's input, one on
  ``blocks.{l}.attn.hook_z`` multiplies each head's output by its gate. It is
  registered on ``model.original_model`` as ``massact_gate``, so the optimizer
  trains it and :func:`massact_lens.models.checkpoints.save_checkpoint` saves it.

Gotchas
-------
* ``hook_z`` of a gated model is the *gated* head output (what ``W_O`` reads), for
  analysis hooks added after the gate; the ungated output is not kept.
* The gate reads ``attn.hook_in`` before any hook added later on that point: a
  hook that edits the attention's input changes q, k and v but not the gate.
* ``model.reset_hooks(including_permanent=True)`` removes the hooks but not the
  parameters; use :func:`detach_gate` (and
  :func:`~massact_lens.models.explicit_bias.detach_prefix` for softmax1).

>>> import torch
>>> from massact_lens.examples import tiny_model
>>> model = tiny_model("gpt2", n_layers=2)
>>> gate = attach_head_gate(model)
>>> tuple(gate.w.shape), tuple(gate.b.shape)          # layer, head, d_model
((2, 4, 32), (2, 4))
>>> _, cache = model.run_with_cache(torch.tensor([[3, 5, 6]]))
>>> tuple(gate.gates(cache["blocks.0.attn.hook_in"], 0).shape)   # batch, pos, head
(1, 3, 4)
>>> detach_gate(model)

References
----------
Qiu et al. *Gated Attention for Large Language Models: Non-linearity, Sparsity, and
Attention-Sink-Free*, 2025. Miller, *Attention Is Off By One*, 2023 (softmax1).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import nn
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._plain_hf import refuse_plain_hf
from massact_lens._core.hook_names import attention_hook
from massact_lens.models.explicit_bias import ExplicitAttentionBias, HookComponent, prefix_component

__all__ = [
    "HeadGate",
    "SoftmaxOffByOne",
    "attach_head_gate",
    "attach_softmax_one",
    "detach_gate",
]  # gate_component(model): the attached gate, for the trainer's evaluation

#: Attribute name of the gate on ``model.original_model``.
GATE_NAME = "massact_gate"


class SoftmaxOffByOne(ExplicitAttentionBias):
    """An explicit bias slot frozen at ``k' = 0``, ``v' = 0``: softmax with an extra zero logit.

    ``k`` and ``v`` are zero buffers (not trained, not saved: the zeros are the
    definition). Everything else is :class:`~massact_lens.models.explicit_bias.ExplicitAttentionBias`.
    """

    kind = "a softmax-off-by-one zero slot"

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        d_head: int,
        *,
        placeholder_id: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            n_layers, n_kv_heads, d_head, placeholder_id=placeholder_id, device=device, dtype=dtype
        )
        del self.k, self.v
        zeros = torch.zeros(n_layers, n_kv_heads, d_head, device=device, dtype=dtype)
        self.register_buffer("k", zeros, persistent=False)
        self.register_buffer("v", zeros.clone(), persistent=False)

    def _replacement_specs(self) -> list[tuple[str, Any]]:
        # Zeros made at call time: a buffer closed over would stay behind on model.to(device).
        def zero_first(values: torch.Tensor, hook: Any) -> torch.Tensor:  # noqa: ARG001
            if values.ndim != 4 or values.shape[2] != self.k.shape[1]:
                raise ValueError(
                    f"Expected keys/values [batch, pos, {self.k.shape[1]} heads, d_head], got "
                    f"{tuple(values.shape)}: the softmax-off-by-one slot was built for another model."
                )
            return torch.cat([torch.zeros_like(values[:, :1]), values[:, 1:]], dim=1)

        return [
            (attention_hook(kind, layer), zero_first)
            for layer in range(self.n_layers)
            for kind in ("k", "v")
        ]


def attach_softmax_one(
    model: TransformerLensModel, *, placeholder_id: int | None
) -> SoftmaxOffByOne:
    """Make every head's softmax off by one: a frozen zero key/value slot at position 0.

    Inputs must carry the placeholder token at position 0 (real tokens start at
    1), as for :func:`~massact_lens.models.explicit_bias.attach_explicit_bias`.

    Raises:
        ValueError: the model already has a prefix component, or lacks the hooks.

    >>> from massact_lens.examples import tiny_model
    >>> model = tiny_model("gpt2")
    >>> slot = attach_softmax_one(model, placeholder_id=0)
    >>> float(slot.k.abs().sum()), any(p is slot.k for p in model.parameters())
    (0.0, False)
    """
    _check_bridge(model, "attach_softmax_one")
    existing = prefix_component(model)
    if existing is not None:
        raise ValueError(
            f"This model already has {existing.kind} attached. Call "
            "massact_lens.models.explicit_bias.detach_prefix(model) first."
        )
    cfg = model.cfg
    vocab = int(cfg.d_vocab)
    if isinstance(placeholder_id, int) and not isinstance(placeholder_id, bool) and placeholder_id >= vocab:
        raise ValueError(f"placeholder_id {placeholder_id} is not a token of this model (d_vocab {vocab}): pass "
                         f"a token id 0..{vocab - 1} that every input carries at position 0.")
    parameter = next(model.parameters())  # type: ignore[attr-defined]
    n_kv_heads = int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    component = SoftmaxOffByOne(
        int(cfg.n_layers),
        n_kv_heads,
        int(cfg.d_head),
        placeholder_id=placeholder_id,
        device=parameter.device,
        dtype=parameter.dtype,
    )
    component._attach(model)
    return component


class HeadGate(HookComponent):
    """Head-wise sigmoid gates on the attention output: ``z'[q, h] = sigmoid(x_q . w_h + b_h) z[q, h]``.

    Attributes:
        w: ``[n_layers, n_heads, d_model]``, the gate weights (small random init).
        b: ``[n_layers, n_heads]``, the gate biases (zero init: every gate starts near 0.5).
    """

    kind = "a head gate"
    module_name = GATE_NAME

    def __init__(
        self,
        n_layers: int,
        n_heads: int,
        d_model: int,
        *,
        init_std: float = 0.02,
        seed: int | None = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        w = torch.randn(n_layers, n_heads, d_model, generator=generator) * init_std
        self.w = nn.Parameter(w.to(device=device, dtype=dtype))
        self.b = nn.Parameter(torch.zeros(n_layers, n_heads, device=device, dtype=dtype))
        self._inputs: dict[int, torch.Tensor] = {}

    @property
    def n_layers(self) -> int:
        return int(self.w.shape[0])

    def gates(
        self, attention_input: Float[torch.Tensor, "batch pos d_model"], layer: int
    ) -> Float[torch.Tensor, "batch pos head_index"]:
        """The gate values of ``layer`` for an attention input (``blocks.{layer}.attn.hook_in``)."""
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} does not exist: the gate has {self.n_layers} layers; pass "
                             f"0..{self.n_layers - 1}.")
        if attention_input.shape[-1] != self.w.shape[-1]:
            raise ValueError(
                f"Expected an attention input [batch, pos, {self.w.shape[-1]}], got "
                f"{tuple(attention_input.shape)}: the gate was built for another model."
            )
        x = attention_input.to(self.w.dtype)
        return torch.sigmoid(torch.einsum("bpm,hm->bph", x, self.w[layer]) + self.b[layer])

    def hook_specs(self) -> list[tuple[str, Any]]:
        """``(hook name, fn)`` pairs that implement the gate, in forward order per layer."""
        specs: list[tuple[str, Any]] = []
        for layer in range(self.n_layers):
            specs.append((f"blocks.{layer}.attn.hook_in", self._keeper(layer)))
            specs.append((attention_hook("z", layer), self._gater(layer)))
        return specs

    def _keeper(self, layer: int) -> Any:
        def keep(x: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            self._inputs[layer] = x

        return keep

    def _gater(self, layer: int) -> Any:
        def gate(z: torch.Tensor, hook: Any) -> torch.Tensor:  # noqa: ARG001
            x = self._inputs.pop(layer, None)
            if (
                x is None
                or z.ndim != 4
                or x.shape[:2] != z.shape[:2]
                or z.shape[2] != self.w.shape[1]
            ):
                raise ValueError(
                    f"The head gate of layer {layer} expected hook_z [batch, pos, {self.w.shape[1]} heads, "
                    f"d_head] after the attention input of the same pass, got {tuple(z.shape)}: was the "
                    "gate built for another model, or its attn.hook_in hook removed?"
                )
            return z * self.gates(x, layer).to(z.dtype)[..., None]

        return gate

    def _detach(self, model: TransformerLensModel) -> None:
        self._inputs.clear()
        super()._detach(model)


def attach_head_gate(
    model: TransformerLensModel, *, init_std: float = 0.02, seed: int | None = 0
) -> HeadGate:
    """Give every attention head of ``model`` a learnable sigmoid gate on its output.

    Args:
        model: a TransformerBridge with ``attn.hook_in`` / ``attn.hook_z`` per layer.
        init_std: standard deviation of the initial ``w`` (``b`` starts at 0).
        seed: seed of the initial ``w`` (None: the global generator).

    Raises:
        ValueError: the model already has a gate, or lacks the hooks.

    >>> from massact_lens.examples import tiny_model
    >>> tuple(attach_head_gate(tiny_model("llama")).w.shape)     # 4 query heads
    (2, 4, 32)
    """
    _check_bridge(model, "attach_head_gate")
    if isinstance(init_std, bool) or not isinstance(init_std, int | float) or not 0 <= init_std < float("inf"):
        raise ValueError(f"init_std must be a finite number >= 0 (the spread of the initial w), not {init_std!r}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None (the global generator), not {seed!r}.")
    if gate_component(model) is not None:
        raise ValueError(
            "This model already has a head gate. Call massact_lens.models.attention_variants.detach_gate(model) first."
        )
    cfg = model.cfg
    parameter = next(model.parameters())  # type: ignore[attr-defined]
    gate = HeadGate(
        int(cfg.n_layers),
        int(cfg.n_heads),
        int(cfg.d_model),
        init_std=init_std,
        seed=seed,
        device=parameter.device,
        dtype=parameter.dtype,
    )
    gate._attach(model)
    return gate


def _check_bridge(model: Any, verb: str) -> None:
    """TypeError unless ``model`` is a TransformerBridge (a plain HF model: wrap it with load_model)."""
    refuse_plain_hf(model, verb)
    if not (hasattr(model, "cfg") and hasattr(model, "blocks") and hasattr(model, "original_model")):
        raise TypeError(f"{verb} takes a TransformerBridge (massact_lens.load_model(...) or "
                        f"massact_lens.examples.tiny_model()), not {type(model).__name__}.")


def gate_component(model: TransformerLensModel) -> HeadGate | None:
    """The head gate attached to ``model``, or None.

    >>> from massact_lens.examples import tiny_model
    >>> gate_component(tiny_model()) is None
    True
    """
    original = getattr(model, "original_model", None)
    modules = getattr(original, "_modules", {}) if original is not None else {}
    component = modules.get(GATE_NAME)
    return component if isinstance(component, HeadGate) else None


def detach_gate(model: TransformerLensModel) -> None:
    """Remove the head gate (hooks and parameters) from ``model``; nothing when none is attached."""
    gate = gate_component(model)
    if gate is not None:
        gate._detach(model)
