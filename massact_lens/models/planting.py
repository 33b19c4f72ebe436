"""Plant a known massive activation into a small TransformerLens-native model.

Background
----------
To test a pipeline that *finds* massive activations you need a model where you know
the answer. :func:`plant_massive_activation` does weight surgery on a
``TransformerBridge.boot_native`` model (LayerNorm or RMSNorm, plain or gated MLP)
so that one MLP neuron of block ``layer`` fires only on one token (the BOS) and
writes ``value`` into residual dim ``dim``. From that block on, the residual stream
of that token carries the value; nothing else changes much:

1. a *marker* dim of the embedding is 1 for the chosen token and 0 for every other
   token and position, and no attention or MLP output writes to it, so the marker
   is exactly 0 off the BOS at every layer;
2. in block ``layer`` one MLP neuron reads the normalised marker (with a negative
   bias for LayerNorm, whose centring leaves small non-zero values) and writes
   into ``dim`` only; its output weight is calibrated with one forward pass so the
   planted entry is ``value``.

Usage
-----
>>> import torch
>>> from massact_lens.examples import tiny_model
>>> model = plant_massive_activation(tiny_model("llama", n_layers=3), layer=1, dim=5, value=500.0)
>>> _, cache = model.run_with_cache(torch.tensor([[0, 7, 9, 11]]))
>>> round(float(cache["blocks.1.hook_resid_post"][0, 0, 5]))
500
"""

from __future__ import annotations

import torch
from transformer_lens.model_bridge import TransformerBridge

__all__ = ["plant_massive_activation"]


def _params(model: TransformerBridge) -> dict[str, torch.nn.Parameter]:
    native = getattr(model, "original_model", None)
    if native is None or type(native).__name__ != "NativeModel":
        raise TypeError(
            "plant_massive_activation edits TransformerBridge.boot_native models only "
            "(e.g. massact_lens.examples.tiny_model()); this model wraps "
            f"{type(native).__name__}."
        )
    return {name.replace("_original_component.", ""): p for name, p in native.named_parameters()}


def _normalised_marker(model: TransformerBridge, layer: int, marker: int, token_id: int, device: torch.device) -> tuple[float, float]:
    """The marker dim after block ``layer``'s MLP LayerNorm: on the token, and at most elsewhere."""
    n_ctx, d_vocab = int(model.cfg.n_ctx), int(model.cfg.d_vocab)
    others = [t for t in range(d_vocab) if t != token_id]
    hook = f"blocks.{layer}.ln2.hook_out"
    values = []
    for start in range(0, len(others), n_ctx - 1):
        probe = torch.tensor([[token_id, *others[start : start + n_ctx - 1]]], device=device)
        _, cache = model.run_with_cache(probe, names_filter=[hook])
        values.append(cache[hook][0, :, marker].float())
    on = float(values[0][0])
    off = max(float(v[1:].max()) for v in values)
    return on, off


@torch.no_grad()
def plant_massive_activation(
    model: TransformerBridge,
    *,
    layer: int = 1,
    dim: int = 3,
    value: float | int = 1000.0,
    token_id: int = 0,
    marker_dim: int | None = None,
    neuron: int = 0,
) -> TransformerBridge:
    """Make ``token_id`` carry ``value`` at residual ``dim`` from block ``layer`` on.

    Edits the model in place and returns it. ``marker_dim`` (default: the last dim)
    is reserved as the token's marker and must differ from ``dim``. A sandwich-norm
    model (Gemma 2 / 3 bridged from HuggingFace, with ``blocks.{l}.ln2_post``) is
    planted through the post-feed-forward norm's gain instead, as real Gemma models
    carry theirs: the neuron writes a modest value and the gain at ``dim`` amplifies
    it to ``value``.

    Raises:
        ValueError: a layer, dim, token or neuron out of range.
        TypeError: not a TransformerLens-native model.
    """
    if getattr(model.blocks[0], "ln2_post", None) is not None:  # type: ignore[attr-defined]  # sandwich norms
        return _plant_through_gain(model, layer=layer, dim=dim, value=value, token_id=token_id,
                                   marker_dim=marker_dim, neuron=neuron)
    params = _params(model)
    cfg = model.cfg
    d_model, n_layers = int(cfg.d_model), int(cfg.n_layers)
    marker = d_model - 1 if marker_dim is None else marker_dim
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} does not exist (0..{n_layers - 1}).")
    if not 0 <= dim < d_model or not 0 <= marker < d_model or dim == marker:
        raise ValueError(f"dim {dim} and marker_dim {marker} must be distinct dims in 0..{d_model - 1}.")
    if not 0 <= token_id < int(cfg.d_vocab):
        raise ValueError(f"token_id {token_id} is outside the vocabulary (0..{int(cfg.d_vocab) - 1}).")
    gated = bool(cfg.gated_mlp)
    if not 0 <= neuron < int(cfg.d_mlp or 0):
        raise ValueError(f"neuron {neuron} does not exist (0..{int(cfg.d_mlp or 0) - 1}).")

    embed = params["tok_embed.weight"]
    embed[:, marker] = 0.0
    embed[token_id] = 0.0
    embed[token_id, marker] = 1.0
    if "pos.weight" in params:
        params["pos.weight"][:, marker] = 0.0
    for block in range(n_layers):
        for writer in ("attn.o", "mlp.fc_out" if not gated else "mlp.out"):
            params[f"layers.{block}.{writer}.weight"][marker] = 0.0
            if f"layers.{block}.{writer}.bias" in params:
                params[f"layers.{block}.{writer}.bias"][marker] = 0.0

    prefix = f"layers.{layer}.mlp."
    readers = ("gate", "in") if gated else ("fc_in",)
    scale, offset = 10.0, -20.0
    if any(prefix + reader + ".bias" in params for reader in readers):
        # LayerNorm centres and rescales the marker: read where the normalised marker
        # separates the token from every other one, at this block, and fire only above it.
        on, off = _normalised_marker(model, layer, marker, token_id, embed.device)
        if on - off <= 1e-6:
            raise RuntimeError("The token's marker does not stand out after the LayerNorm of this block.")
        scale = 20.0 / (on - off)
        offset = -scale * off - 10.0
    for reader in readers:
        weight = params[prefix + reader + ".weight"]
        weight[neuron] = 0.0
        weight[neuron, marker] = scale
        if prefix + reader + ".bias" in params:
            params[prefix + reader + ".bias"][neuron] = offset
    out = params[prefix + ("out" if gated else "fc_out") + ".weight"]
    out[:, neuron] = 0.0
    out[dim, neuron] = 1.0

    hook = f"blocks.{layer}.hook_resid_post"
    probe = torch.tensor([[token_id]], device=embed.device)

    def planted() -> float:
        _, cache = model.run_with_cache(probe, names_filter=[hook])
        return float(cache[hook][0, 0, dim])

    with_neuron = planted()
    out[dim, neuron] = 0.0
    without = planted()
    per_unit = with_neuron - without
    if per_unit <= 1e-3:
        raise RuntimeError("The planted neuron did not fire on the token; the model's norms may be unusual.")
    out[dim, neuron] = (value - without) / per_unit
    return model


def _weight(model: TransformerBridge, layer: int, component: str) -> torch.Tensor:
    module = model.blocks[layer]  # type: ignore[attr-defined]
    for part in component.split("."):
        module = getattr(module, part)
    return getattr(module, "original_component", module).weight


@torch.no_grad()
def _plant_through_gain(
    model: TransformerBridge,
    *,
    layer: int = 1,
    dim: int = 3,
    value: float | int = 1000.0,
    token_id: int = 0,
    marker_dim: int | None = None,
    neuron: int = 0,
) -> TransformerBridge:
    """Make ``token_id`` carry ``value`` at residual ``dim`` of a sandwich-norm model (Gemma 2 / 3),
    through the post-feed-forward norm's gain, as in the real Gemma models.

    The token's embedding is a marker dim only (no attention or MLP writes to it);
    in block ``layer`` one MLP neuron reads the normalised marker, and the down
    projection's row ``dim`` keeps that neuron only, so the MLP output at ``dim`` is 0
    on every other token. The post-feed-forward norm caps what it passes at about
    ``sqrt(d_model) * gain``: its gain at ``dim`` is calibrated (the write is linear
    in the gain) so that the planted entry is ``value``. Edits the model in place.

    Raises:
        ValueError: a layer, dim, token or neuron out of range, or a model without
            post-sublayer norms (``blocks.{l}.ln2_post``).
    """
    cfg = model.cfg
    d_model, n_layers = int(cfg.d_model), int(cfg.n_layers)
    marker = d_model - 1 if marker_dim is None else marker_dim
    if getattr(model.blocks[0], "ln2_post", None) is None:  # type: ignore[attr-defined]
        raise ValueError("Planting through a gain needs sandwich-norm blocks (ln2_post).")
    if not 0 <= layer < n_layers or not 0 <= dim < d_model or not 0 <= marker < d_model or dim == marker:
        raise ValueError(f"layer {layer} (0..{n_layers - 1}), dim {dim} and marker_dim {marker} (distinct, 0..{d_model - 1}).")
    if not 0 <= token_id < int(cfg.d_vocab) or not 0 <= neuron < int(cfg.d_mlp or 0):
        raise ValueError(f"token_id {token_id} or neuron {neuron} is out of range.")
    embed = model.embed.original_component.weight  # type: ignore[attr-defined]
    embed[:, marker] = 0.0
    embed[token_id] = 0.0
    embed[token_id, marker] = 1.0
    for block in range(n_layers):
        for writer in ("attn.o", "mlp.out"):
            _weight(model, block, writer)[marker] = 0.0
    hook = f"blocks.{layer}.ln2.hook_out"
    _, cache = model.run_with_cache(torch.tensor([[token_id]], device=embed.device), names_filter=[hook])
    on = float(cache[hook][0, 0, marker])
    if abs(on) < 1e-6:
        raise RuntimeError("The token's marker does not reach the MLP of this block.")
    for reader in ("mlp.gate", "mlp.in"):
        weight = _weight(model, layer, reader)
        weight[neuron] = 0.0
        weight[neuron, marker] = 3.0 / on
    out = _weight(model, layer, "mlp.out")
    out[dim] = 0.0
    out[dim, neuron] = 1.0
    gain = _weight(model, layer, "ln2_post")
    offset = 1.0 if getattr(cfg, "rmsnorm_uses_offset", False) else 0.0
    resid = f"blocks.{layer}.hook_resid_post"
    probe = torch.tensor([[token_id]], device=embed.device)

    def planted(g: float) -> float:
        gain[dim] = g - offset
        _, cache = model.run_with_cache(probe, names_filter=[resid])
        return float(cache[resid][0, 0, dim])

    at_one, at_two = planted(1.0), planted(2.0)
    if at_two - at_one <= 1e-3:
        raise RuntimeError("The planted neuron did not fire on the token; the model's norms may be unusual.")
    planted(1.0 + (float(value) - at_one) / (at_two - at_one))
    return model
