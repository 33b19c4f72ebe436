"""The hooks and measurements behind :func:`~massact_lens.attention.bias_surgery`.

A head's output is ``z_h(q) = sum_k p_qk v_k``; its term from the key set C is
``term_h(q) = sum_{k in C} p_qk v_k`` (the implicit bias). :class:`HeadEdit` reads
``hook_pattern`` and ``hook_v`` of its layer, keeps them until ``hook_z`` of the same
layer fires, and rewrites the chosen heads there:

* ``"zero"``: ``z' = z - term`` (the term removed);
* ``"mean"``: ``z' = z - term + b_h`` (``b_h``: the term's mean over a reference corpus,
  an explicit constant bias per head);
* ``"redistribute"``: ``z' = (z - term) / sum_{k not in C} p_qk`` (C out of the softmax,
  the rest renormalised); a query with no mass on C keeps ``z``; a query whose every
  key is in C has nothing left to attend to and gets ``0``.

The edit is additive on whatever reaches ``hook_z`` (a hook of yours that ran before it
on ``hook_z`` is kept). C comes from a position rule read through a
:class:`~massact_lens.interventions.TokenTracker` (its hooks come first in the list).

>>> import torch
>>> from massact_lens.examples import tiny_model
>>> from massact_lens.interventions import start_token
>>> model = tiny_model("llama")
>>> hooks = surgery_hooks(model, {1: (0, 2)}, "zero", start_token())
>>> [name for name, _ in hooks][-3:]
['blocks.1.attn.hook_pattern', 'blocks.1.attn.hook_v', 'blocks.1.attn.hook_z']
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.batching import Batch
from massact_lens._core.hook_names import attention_hook
from massact_lens._core.types import HookList
from massact_lens.attention._passes import repeat_kv
from massact_lens.interventions.context import RunContext, TokenTracker
from massact_lens.interventions.positions import PositionRule

__all__ = [
    "MODES",
    "HeadEdit",
    "Losses",
    "Mode",
    "TermMeans",
    "c_term",
    "rule_mask",
    "surgery_hooks",
]

#: What a surgery does to a head's term from C.
Mode = Literal["mean", "zero", "redistribute"]
MODES: tuple[str, ...] = ("mean", "zero", "redistribute")


def rule_mask(
    rule: PositionRule, ctx: RunContext, width: int, device: torch.device
) -> Bool[torch.Tensor, "batch pos"]:
    """C of the pass: the real positions ``rule`` selects (``[batch, pos]``)."""
    n = int(ctx.tokens.shape[0]) if ctx.tokens is not None else 1
    if ctx.attention_mask is not None:
        n = int(ctx.attention_mask.shape[0])
    selected = rule.select(torch.zeros(n, width, 0, device=device), None, ctx)
    if selected.ndim == 3:
        selected = selected.any(dim=-1)
    real = (
        ctx.attention_mask.to(device).bool()
        if ctx.attention_mask is not None
        else torch.ones(n, width, dtype=torch.bool, device=device)
    )
    return selected.to(device).expand(n, width) & real


def c_term(
    pattern: Float[torch.Tensor, "batch n_heads query_pos key_pos"],
    v: Float[torch.Tensor, "batch key_pos n_kv_heads d_head"],
    c: Bool[torch.Tensor, "batch key_pos"],
    heads: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the heads ``heads``: the term from C ``[b, q, h, d]``, the mass on C and the mass
    outside C ``[b, q, h]``, in float32.

    >>> p = torch.tensor([[[[1.0, 0.0], [0.25, 0.75]]]])          # one head, two queries
    >>> v = torch.tensor([[[[2.0]], [[4.0]]]])                     # values 2 and 4
    >>> term, mass, rest = c_term(p, v, torch.tensor([[True, False]]), torch.tensor([0]))
    >>> term.flatten().tolist(), mass.flatten().tolist(), rest.flatten().tolist()
    ([2.0, 0.5], [1.0, 0.25], [0.0, 0.75])
    """
    n_heads = int(pattern.shape[1])
    p = pattern.float()[:, heads]
    values = repeat_kv(v.float(), n_heads)[:, :, heads]
    key_len = int(p.shape[-1])
    if int(values.shape[1]) != key_len or int(c.shape[1]) != key_len:
        raise RuntimeError(
            f"hook_pattern has {key_len} key positions, hook_v {values.shape[1]} and the pass "
            f"{c.shape[1]} tokens: the surgery needs one full pass (no KV cache, no extra key slots)."
        )
    in_c = p * c[:, None, None, :].to(p.dtype)
    term = torch.einsum("bhqk,bkhd->bqhd", in_c, values)
    mass = in_c.sum(-1).transpose(1, 2)
    outside = (p - in_c).sum(-1).transpose(1, 2)
    return term, mass, outside


class _Store:
    """Keeps one attention tensor of a layer until that layer's ``hook_z`` fires."""

    def __init__(self, owner: HeadEdit, kind: str) -> None:
        self.owner, self.kind = owner, kind

    def __call__(self, tensor: torch.Tensor, hook: Any = None) -> None:  # noqa: ARG002
        self.owner.state[self.kind] = tensor.detach()


class HeadEdit:
    """The ``hook_z`` edit of one layer's chosen heads (see the module text).

    ``bias``: ``[heads, d_head]`` in the order of ``heads`` (mode ``"mean"`` only).
    """

    def __init__(
        self,
        layer: int,
        heads: Sequence[int],
        mode: str,
        rule: PositionRule,
        tracker: TokenTracker,
        bias: torch.Tensor | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, not {mode!r}.")
        if (mode == "mean") != (bias is not None):
            raise ValueError(
                "mode 'mean' needs the bias (the term's mean per head); the other modes take none."
            )
        self.layer, self.mode, self.rule, self.tracker = layer, mode, rule, tracker
        self.heads = tuple(heads)
        self.bias = bias
        self.state: dict[str, torch.Tensor] = {}

    def hooks(self) -> HookList:
        """The layer's three hooks: read ``hook_pattern`` and ``hook_v``, edit ``hook_z``."""
        return [
            (attention_hook("pattern", self.layer), _Store(self, "pattern")),
            (attention_hook("v", self.layer), _Store(self, "v")),
            (attention_hook("z", self.layer), self),
        ]

    def __call__(
        self,
        z: Float[torch.Tensor, "batch pos n_heads d_head"],
        hook: Any = None,  # noqa: ARG002
    ) -> torch.Tensor:
        state, self.state = self.state, {}
        if not {"pattern", "v"} <= set(state):
            raise RuntimeError(
                f"Layer {self.layer}: hook_pattern / hook_v did not fire before hook_z; the surgery needs eager "
                "attention (massact_lens.load_model boots with it)."
            )
        ctx = self.tracker.context(z)
        c = rule_mask(self.rule, ctx, int(z.shape[1]), z.device)
        heads = torch.tensor(self.heads, device=z.device)
        term, mass, outside = c_term(state["pattern"], state["v"], c, heads)
        z_h = z[:, :, heads].float()
        if self.mode == "zero":
            new = z_h - term
        elif self.mode == "mean":
            assert self.bias is not None
            new = z_h - term + self.bias.to(z.device, torch.float32)
        else:
            rest = (z_h - term) / outside.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
            new = torch.where((outside > 0)[..., None], rest, torch.zeros_like(rest))
            new = torch.where((mass > 0)[..., None], new, z_h)
        out = z.clone()
        out[:, :, heads] = new.to(z.dtype)
        return out


def surgery_hooks(
    model: TransformerLensModel,
    heads: Mapping[int, Sequence[int]],
    mode: str,
    rule: PositionRule,
    means: Mapping[int, torch.Tensor] | None = None,
) -> HookList:
    """A self-contained hook list: a token tracker, then per layer of ``heads`` ({layer: heads})
    its :class:`HeadEdit` hooks. ``means``: per layer ``[heads of that layer, d_head]`` (mode ``"mean"``)."""
    tracker = TokenTracker()
    out: HookList = list(tracker.hooks(model))
    for layer in sorted(heads):
        bias = None if means is None else means[layer]
        out += HeadEdit(layer, heads[layer], mode, rule, tracker, bias).hooks()
    return out


class TermMeans:
    """A measurement: per chosen layer and head, the sums over real queries of the term from C
    (float64, ``[layer, head, d_head]``) and of the mass on C; inputs with a NaN / inf term are
    left out and counted."""

    reads_input_index = True
    needs_output = False

    def __init__(
        self, layers: Sequence[int], heads: Sequence[int], d_head: int, rule: PositionRule
    ) -> None:
        self.layers, self.heads, self.rule = tuple(layers), tuple(heads), rule
        self.term = torch.zeros(len(layers), len(heads), d_head, dtype=torch.float64)
        self.mass = torch.zeros(len(layers), len(heads), dtype=torch.float64)
        self.n_queries = 0
        self.c_keys = 0
        self.bad_inputs: set[int] = set()
        self.state: dict[int, dict[str, torch.Tensor]] = {}
        self.found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hooks(self, batch: Batch) -> HookList:
        self.found = {}
        out: HookList = []
        for layer in self.layers:
            out += [(attention_hook(k, layer), self._store(layer, k)) for k in ("pattern", "v")]
            out.append((attention_hook("z", layer), self._fold(layer, batch)))
        return out

    def _store(self, layer: int, kind: str) -> Any:
        def read(tensor: torch.Tensor, hook: Any = None) -> None:  # noqa: ARG001
            self.state.setdefault(layer, {})[kind] = tensor.detach()

        return read

    def _fold(self, layer: int, batch: Batch) -> Any:
        def fold(z: torch.Tensor, hook: Any = None) -> None:  # noqa: ARG001
            state = self.state.pop(layer, {})
            if not {"pattern", "v"} <= set(state):
                raise RuntimeError(
                    f"Layer {layer}: hook_pattern / hook_v did not fire before hook_z; the surgery "
                    "needs eager attention (massact_lens.load_model boots with it)."
                )
            on = batch.to(z.device)
            ctx = RunContext(
                torch.arange(int(z.shape[1]), device=z.device)[None],
                on.tokens,
                on.attention_mask,
                on,
            )
            c = rule_mask(self.rule, ctx, int(z.shape[1]), z.device)
            term, mass, _ = c_term(
                state["pattern"], state["v"], c, torch.tensor(self.heads, device=z.device)
            )
            real = on.attention_mask.bool()
            self.found[layer] = (
                term.where(real[:, :, None, None], 0.0).sum(1),
                mass.where(real[:, :, None], 0.0).sum(1),
            )
            if layer == self.layers[0]:
                self.c_keys += int(c.sum())

        return fold

    def update(self, batch: Batch, output: torch.Tensor | None) -> None:  # noqa: ARG002
        if len(self.found) != len(self.layers):
            raise RuntimeError(
                "hook_z did not fire in every chosen layer: the surgery needs eager attention."
            )
        terms = (
            torch.stack([self.found[layer][0] for layer in self.layers], 1).double().cpu()
        )  # [b, layer, h, d]
        masses = torch.stack([self.found[layer][1] for layer in self.layers], 1).double().cpu()
        ok = torch.isfinite(terms).flatten(1).all(1) & torch.isfinite(masses).flatten(1).all(1)
        self.bad_inputs |= {batch.input_index(row) for row in (~ok).nonzero().flatten().tolist()}
        self.term += terms[ok].sum(0)
        self.mass += masses[ok].sum(0)
        self.n_queries += int(batch.attention_mask[ok].sum())

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean term ``[layer, head, d_head]`` and the mean mass on C ``[layer, head]``, float32."""
        if self.bad_inputs:
            shown = sorted(self.bad_inputs)
            warnings.warn(
                f"Inputs {shown[:5]}{' ...' if len(shown) > 5 else ''} held NaN or infinite attention terms: "
                "left out of the means (check the model's dtype and any hook of yours).",
                RuntimeWarning,
                stacklevel=3,
            )
        n = max(self.n_queries, 1)
        return (self.term / n).float(), (self.mass / n).float()


class Losses:
    """A measurement: the summed next-token loss over real positions (float64) and the number
    of tokens predicted (each input's tokens after its first). A non-finite loss stays in the
    sum: the perplexity is then ``inf`` or ``nan``, never a number that left it out."""

    reads_input_index = True
    needs_output = True

    def __init__(self) -> None:
        self.nll = torch.zeros((), dtype=torch.float64)
        self.tokens = 0

    def hooks(self, batch: Batch) -> HookList:  # noqa: ARG002
        return []

    def update(self, batch: Batch, output: torch.Tensor | None) -> None:
        assert output is not None
        tokens = batch.tokens.to(output.device)
        valid = batch.attention_mask.to(output.device).bool()[:, 1:]
        losses = F.cross_entropy(
            output[:, :-1].float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none"
        )
        self.nll += losses.view_as(valid)[valid].double().sum().cpu()
        self.tokens += int(valid.sum())

    def result(self) -> float:
        """The mean loss per predicted token (nats)."""
        return float(self.nll) / max(self.tokens, 1) if self.tokens else math.nan
