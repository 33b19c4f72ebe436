"""Where a block reads the residual stream and where each sublayer's write enters it.

One :class:`BlockModel` per architecture family the library claims:

* ``"pre-norm"`` (GPT-2, LLaMA, Mistral, the TransformerLens-native models): the
  block reads ``hook_resid_pre``; the attention output projection
  (``attn.o.hook_out``) and the MLP down projection (``mlp.out.hook_out``) are
  added as they are, ``hook_resid_post = hook_resid_pre + attention + MLP``.
* ``"post-norm"`` (BERT and its family): each write is added to the stream and the
  sum is normalised: ``ln1.hook_in = hook_resid_pre + attention`` and
  ``ln2.hook_in = ln1.hook_out + MLP``. The two sums are the residual points.
* ``"sandwich"`` (Gemma 2 / Gemma 3): each sublayer's output is normalised again
  before it is added, so the writes as they enter the stream are
  ``ln1_post.hook_out`` and ``ln2_post.hook_out``, not the raw projections:
  ``hook_resid_post = hook_resid_pre + ln1_post(attention) + ln2_post(MLP)``.
  Each write passes a norm whose gain (``1 + weight`` under Gemma's offset,
  ``cfg.rmsnorm_uses_offset``) can amplify one dim by orders of magnitude.

The family is told from the model's hook points, then **checked** on a tiny
forward pass the first time a model is asked for (cached per model): the writes of
every block must add up to the change of its residual stream, and a post-sublayer
norm must be ``x / rms(x) * gain``; otherwise :func:`block_model` raises a
``ValueError`` naming the block and the family, never a silent number. Other
families (mixture-of-experts MLPs, blocks without an attention output or an MLP
down projection, blocks whose writes do not add up) raise.

>>> from massact_lens.examples import tiny_model
>>> blocks = block_model(tiny_model("llama"))
>>> blocks.family, blocks.writes(1)
('pre-norm', ('blocks.1.attn.o.hook_out', 'blocks.1.mlp.out.hook_out'))
>>> blocks.segments(0)
((('blocks.0.hook_resid_pre',), ('blocks.0.attn.o.hook_out', 'blocks.0.mlp.out.hook_out'), 'blocks.0.hook_resid_post'),)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.hook_names import is_post_norm
from massact_lens._core.types import model_device

__all__ = ["FAMILIES", "BlockModel", "attention_output_norm", "block_model", "norm_eps", "norm_gain", "rms_inverse"]

Family = Literal["pre-norm", "post-norm", "sandwich"]
#: The families the library claims; every other architecture raises.
FAMILIES: tuple[str, ...] = ("pre-norm", "post-norm", "sandwich")

_RAW = {"attention": "blocks.{layer}.attn.o.hook_out", "mlp": "blocks.{layer}.mlp.out.hook_out"}
_POST_NORM = {"attention": "ln1_post", "mlp": "ln2_post"}


@dataclass(frozen=True)
class BlockModel:
    """Where each block of one model reads the residual stream and where its writes enter it.

    Attributes:
        family: ``"pre-norm"``, ``"post-norm"`` or ``"sandwich"``.
        norm_offset: the post-sublayer norms scale by ``1 + weight`` (Gemma), not ``weight``.
    """

    family: str
    norm_offset: bool = False

    def resid_pre(self, layer: int) -> str:
        """The residual stream entering the block."""
        return f"blocks.{layer}.hook_resid_pre"

    def raw(self, sublayer: Literal["attention", "mlp"], layer: int) -> str:
        """The sublayer's own output (the output projection), before any post-sublayer norm."""
        return _RAW[sublayer].format(layer=layer)

    def norm(self, sublayer: Literal["attention", "mlp"]) -> str | None:
        """The component of the post-sublayer norm the write passes (``"ln2_post"``), or None."""
        return _POST_NORM[sublayer] if self.family == "sandwich" else None

    def write(self, sublayer: Literal["attention", "mlp"], layer: int) -> str:
        """The hook of the sublayer's write as it is added to the residual stream."""
        norm = self.norm(sublayer)
        return self.raw(sublayer, layer) if norm is None else f"blocks.{layer}.{norm}.hook_out"

    def writes(self, layer: int) -> tuple[str, str]:
        """The attention and MLP writes as added (in that order)."""
        return self.write("attention", layer), self.write("mlp", layer)

    def segments(self, layer: int) -> tuple[tuple[tuple[str, ...], tuple[str, ...], str], ...]:
        """``(stream in, writes, stream out)`` per residual sum of the block: ``out - in = sum(writes)``.

        Pre-norm and sandwich blocks have one sum (``hook_resid_pre`` to
        ``hook_resid_post``); post-norm blocks two (each pre-LayerNorm sum minus the
        normalised stream it adds to).
        """
        attention, mlp = self.writes(layer)
        if self.family == "post-norm":
            return (
                ((self.resid_pre(layer),), (attention,), f"blocks.{layer}.ln1.hook_in"),
                ((f"blocks.{layer}.ln1.hook_out",), (mlp,), f"blocks.{layer}.ln2.hook_in"),
            )
        return (((self.resid_pre(layer),), (attention, mlp), f"blocks.{layer}.hook_resid_post"),)

    def hook_names(self, layer: int) -> tuple[str, ...]:
        """Every hook point the model of one block reads, without repeats."""
        names = [n for ins, writes, out in self.segments(layer) for n in (*ins, *writes, out)]
        names += [self.raw(s, layer) for s in ("attention", "mlp")]  # type: ignore[arg-type]
        names += [f"blocks.{layer}.{n}.hook_in" for n in (self.norm("attention"), self.norm("mlp")) if n]
        return tuple(dict.fromkeys(names))


def norm_gain(model: TransformerLensModel, layer: int, component: str, offset: bool) -> torch.Tensor:
    """The multiplier a block's norm applies per dim: its weight, or ``1 + weight`` under ``offset``.

    >>> from massact_lens.examples import tiny_model
    >>> norm_gain(tiny_model("llama"), 0, "ln2", offset=False).shape
    torch.Size([32])
    """
    module: Any = getattr(model.blocks[layer], component)  # type: ignore[attr-defined]
    weight = getattr(getattr(module, "original_component", module), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 1:
        raise ValueError(f"Block {layer}'s {component} has no 1-D weight: it is not a norm with a gain.")
    gain = weight.detach().float()
    return gain + 1.0 if offset else gain


def norm_eps(model: TransformerLensModel, layer: int, component: str) -> float:
    """The epsilon of a block's RMS norm (its own attribute, else ``cfg.eps``)."""
    module: Any = getattr(model.blocks[layer], component)  # type: ignore[attr-defined]
    original = getattr(module, "original_component", module)
    for name in ("eps", "variance_epsilon"):
        value = getattr(original, name, None)
        if isinstance(value, int | float):
            return float(value)
    return float(getattr(model.cfg, "eps", 1e-5))


def _family(model: TransformerLensModel) -> Family:
    known = model.hook_dict  # type: ignore[attr-defined]
    architecture = str(getattr(model.cfg, "architecture", None) or "unknown")
    needed = ["blocks.0.hook_resid_pre", _RAW["attention"].format(layer=0), _RAW["mlp"].format(layer=0)]
    missing = [n for n in needed if n not in known]
    if missing:
        raise ValueError(
            f"Block 0 of this {architecture} lacks the hook points {missing}: the library models dense "
            f"blocks of the families {FAMILIES} (an attention output projection and an MLP down "
            "projection); mixture-of-experts and other blocks are not supported."
        )
    if is_post_norm(model):
        return "post-norm"
    if all(f"blocks.0.{n}.hook_out" in known for n in _POST_NORM.values()):
        return "sandwich"
    return "pre-norm"


_CHECKED: weakref.WeakKeyDictionary[Any, BlockModel] = weakref.WeakKeyDictionary()


def block_model(model: TransformerLensModel) -> BlockModel:
    """The block model of ``model``, checked on a tiny forward pass the first time (then cached).

    Raises:
        ValueError: an architecture outside :data:`FAMILIES`, or a block whose writes
            do not add up to its residual change (the message names the block and the family).
    """
    if model in _CHECKED:
        return _CHECKED[model]
    family = _family(model)
    blocks = BlockModel(family, norm_offset=family == "sandwich" and bool(getattr(model.cfg, "rmsnorm_uses_offset", False)))
    _check(model, blocks)
    _CHECKED[model] = blocks
    return blocks


def _probe_tokens(model: TransformerLensModel) -> torch.Tensor:
    n = max(2, min(6, int(getattr(model.cfg, "n_ctx", 6) or 6)))
    vocab = int(model.cfg.d_vocab)
    ids = torch.arange(1, n + 1) * 7919 % max(vocab - 1, 1) + 1
    return ids.clamp_max(vocab - 1)[None].to(model_device(model))


@torch.no_grad()
def _check(model: TransformerLensModel, blocks: BlockModel) -> None:
    """On a tiny forward: each block's writes add up to its residual change, and each
    post-sublayer norm is ``x / rms(x) * gain``."""
    n_layers = int(model.cfg.n_layers)
    names = {n for layer in range(n_layers) for n in blocks.hook_names(layer)}
    missing = sorted(names - set(model.hook_dict))  # type: ignore[attr-defined]
    if missing:
        raise ValueError(
            f"This model lacks the hook points {missing[:3]} of the {blocks.family!r} block model (read "
            f"from block 0): its blocks differ from one another; supported families are {FAMILIES}."
        )
    seen: dict[str, torch.Tensor] = {}
    hooks = [(name, _keeper(seen, name)) for name in sorted(names)]
    with model.hooks(fwd_hooks=hooks):  # type: ignore[attr-defined]  # leaves hooks of the user's in place
        model(_probe_tokens(model), return_type=None)
    architecture = str(getattr(model.cfg, "architecture", None) or "unknown")
    for layer in range(n_layers):
        for ins, writes, out in blocks.segments(layer):
            change = seen[out] - sum(seen[n] for n in ins)
            total = sum(seen[w] for w in writes)
            scale = max(float(seen[out].abs().max()), *(float(seen[n].abs().max()) for n in ins), 1.0)
            error = float((change - total).abs().max())
            if not error <= 1e-4 * scale:
                raise ValueError(
                    f"Block {layer} of this {architecture} does not fit the {blocks.family!r} block model: "
                    f"{' + '.join(writes)} differs from {out} - {' - '.join(ins)} by {error:.3g} (scale "
                    f"{scale:.3g}). The library cannot say what writes its residual stream; supported "
                    f"families are {FAMILIES}."
                )
        for sublayer in ("attention", "mlp"):
            norm = blocks.norm(sublayer)  # type: ignore[arg-type]
            if norm is not None:
                _check_norm(model, blocks, layer, norm, seen)


def _keeper(seen: dict[str, torch.Tensor], name: str) -> Any:
    def keep(x: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
        seen[name] = x.detach().float()

    return keep


def _check_norm(model: TransformerLensModel, blocks: BlockModel, layer: int, norm: str,
                seen: dict[str, torch.Tensor]) -> None:
    x, out = seen[f"blocks.{layer}.{norm}.hook_in"], seen[f"blocks.{layer}.{norm}.hook_out"]
    predicted = x * rms_inverse(x, norm_eps(model, layer, norm)) * norm_gain(model, layer, norm, blocks.norm_offset).to(x.device)
    scale = max(float(out.abs().max()), 1.0)
    error = float((predicted - out).abs().max())
    if not error <= 1e-4 * scale:
        raise ValueError(
            f"Block {layer}'s {norm} is not x / rms(x) * gain (off by {error:.3g}, scale {scale:.3g}; "
            f"offset gain 1 + weight: {blocks.norm_offset}): the library cannot split its write into "
            "the sublayer's output and the norm's gain for this architecture."
        )


def rms_inverse(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(mean(x^2) + eps)`` over the last dim, in float32, keeping that dim."""
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)


def attention_output_norm(model: TransformerLensModel) -> tuple[str | None, bool]:
    """The norm the attention output passes before it enters the residual stream, and whether
    its gain is ``1 + weight``: ``("ln1_post", True)`` on Gemma 2 / 3, ``(None, False)`` on a
    model without post-attention norms (no block check is run for those).

    >>> from massact_lens.examples import tiny_model
    >>> attention_output_norm(tiny_model())
    (None, False)
    """
    if f"blocks.0.{_POST_NORM['attention']}.hook_out" not in model.hook_dict:  # type: ignore[attr-defined]
        return None, False
    blocks = block_model(model)
    return blocks.norm("attention"), blocks.norm_offset
