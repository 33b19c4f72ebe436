"""The measurement behind :func:`~massact_lens.attention.implicit_bias` (its result and verb: decomposition.py)."""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.batching import Batch, BatchPlan
from massact_lens._core.blocks import attention_output_norm, norm_eps, norm_gain, rms_inverse
from massact_lens._core.hook_names import attention_hook
from massact_lens._core.loop import measure
from massact_lens._core.results import Keep, KeptInputs, keep_limit
from massact_lens._core.types import HookList
from massact_lens.attention._bias_stats import add_batch, gram, gram_root, new_sums, query_blocks
from massact_lens.attention._fused import SplitProbe
from massact_lens.attention._passes import (
    KeyedMeasurement,
    KeyPositions,
    detached,
    output_hook,
    real_keys,
    repeat_kv,
    w_o,
)
from massact_lens.attention.keys import fit_width

__all__ = ["KEPT", "Decomposition"]

#: Per-input tensors of an :class:`~massact_lens.attention.ImplicitBias`, input-first, and their position axes.
KEPT = {"bias_z": 2, "rest_z": 2, "c_mass": 2, "out_scale": 2, "key_mask": 1, "tokens": 1}

#: How many query positions of each batch the ``out_error`` check reads (spread evenly).
_CHECKED = 64


class Decomposition(KeyedMeasurement):
    """The measurement behind :func:`~massact_lens.attention.implicit_bias`.

    Eager route: per layer, ``hook_pattern``, ``hook_v`` and ``hook_z`` of the batch held
    until its pass ends (C may come from its residual stream), then split against C and
    folded into the running sums. Fused route (C known before the pass): each layer is
    split and folded as soon as its attention output exists, so nothing of a layer
    outlives it; a batch in which an input met a NaN or inf is folded again without it
    (the sums roll back to the batch's start and the batch runs once more).
    """

    def __init__(self, model: TransformerLensModel, plan: BatchPlan, keys: KeyPositions, layers: tuple[int, ...],
                 heads: tuple[int, ...], keep: Keep, *, fused: bool = False) -> None:
        super().__init__(model, plan, keys, layers)
        self.heads, self.keep = heads, keep
        self.fused = fused
        self.layer_probes: dict[int, SplitProbe] = {}
        self.n_heads = int(model.cfg.n_heads)
        self.d_head = int(model.cfg.d_head)
        self.weights = {layer: tuple(t.to(self.device) for t in w_o(model, layer)) for layer in layers}
        self.out_names = {layer: output_hook(model, layer, fused=fused) for layer in layers}
        self.head_index = torch.tensor(heads, device=self.device)
        # W_O of the chosen heads: views of the model's weights when every head is chosen (the
        # result's copy is made at the end, when the pass's own memory is free)
        every = tuple(heads) == tuple(range(self.n_heads))
        self.every_head = every
        self.chosen_w = {layer: self.weights[layer][0] if every else self.weights[layer][0][self.head_index]
                         for layer in layers}
        self.out_norm, offset = attention_output_norm(model)  # sandwich blocks: the post-attention norm
        self.out_gain = {layer: (norm_gain(model, layer, self.out_norm, offset) if self.out_norm
                                 else torch.ones(int(model.cfg.d_model))).to(self.device) for layer in layers}
        # the residual-space inner product per head, as a float32 root of its Gram matrix (the
        # per-query images are float32 anyway; the Gram matrices themselves are made at the end)
        self.roots = {layer: gram_root(gram(self._resid_w(layer))).float() for layer in layers}
        self.state: dict[int, dict[str, torch.Tensor]] = {}
        self.z_error = {layer: 0.0 for layer in layers}
        self.out_error = {layer: 0.0 for layer in layers}
        self.sums = new_sums(len(layers), len(heads), self.d_head, int(model.cfg.d_model), self.device)
        self.kept = KeptInputs(keep_limit(keep), KEPT)
        #: The kept rows of the batch in progress (written layer by layer) and, on the fused
        #: route, the sums as they were at its start and the rows left out when it is run again.
        self.buffer: dict[str, torch.Tensor] = {}
        self.kept_rows: tuple[list[int], list[int]] = ([], [])
        self.snapshot: tuple[dict[str, torch.Tensor], dict[int, float], dict[int, float]] | None = None
        self.exclude: torch.Tensor | None = None

    def _resid_w(self, layer: int) -> torch.Tensor:
        """``W_O`` of the chosen heads times the post-attention norm's gain (sandwich blocks), or
        ``W_O`` itself: what takes a head's output into the residual stream."""
        w = self.chosen_w[layer]
        return w if self.out_norm is None else w * self.out_gain[layer]

    def probes(self, batch: Batch) -> dict[int, SplitProbe]:
        """The fused route: one :class:`SplitProbe` per layer, with C of this batch."""
        if not self.fused:
            return {}
        assert self.keys.c_mask is not None, "KeyPositions (early) must give C before the pass"
        real = batch.attention_mask.to(self.device).bool()
        if self.exclude is None:  # a first run of the batch: remember where its sums started
            self.snapshot = ({k: v.clone() for k, v in self.sums.items()}, dict(self.z_error), dict(self.out_error))
            self.kept_rows, self.buffer = self.kept.choose(batch.input_indices), {}
        self.layer_probes = {layer: SplitProbe(self.keys.c_mask, real, self._note(layer)) for layer in self.layers}
        return dict(self.layer_probes)

    def _note(self, layer: int) -> Any:
        name = attention_hook("z", layer)
        return lambda tensor, real: None if self.exclude is not None else self.keys.nonfinite.note(name, tensor, real, 1)

    def hooks(self, batch: Batch) -> HookList:
        real = batch.attention_mask.to(self.device).bool()
        hooks: HookList = []
        for layer in self.layers:
            if not self.fused:
                hooks += [(attention_hook(kind, layer), self._store(layer, kind, real)) for kind in ("pattern", "v", "z")]
            if self.out_norm is not None and not self.fused:  # the full attention output, whose rms the norm divides by
                hooks.append((f"blocks.{layer}.{self.out_norm}.hook_in", self._store(layer, "out", real)))
            hooks.append((self.out_names[layer], self._check_output(layer, real)))
        return hooks

    def _store(self, layer: int, kind: str, real: torch.Tensor) -> Any:
        def read(tensor: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            self.state.setdefault(layer, {})[kind] = tensor.detach()
            name = f"blocks.{layer}.{self.out_norm}.hook_in" if kind == "out" else attention_hook(kind, layer)
            self.keys.nonfinite.note(name, tensor.detach(), real, 2 if kind == "pattern" else 1)

        return read

    def _check_output(self, layer: int, real: torch.Tensor) -> Any:
        def check_output(tensor: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            probe = self.layer_probes.get(layer)
            z = probe.parts.get("z") if self.fused and probe is not None else self.state.get(layer, {}).get("z")
            if z is None:
                return
            w, b = self.weights[layer]
            # a wrong W_O shows on any query: up to _CHECKED of them, spread over the input
            at = torch.linspace(0, int(z.shape[1]) - 1, min(_CHECKED, int(z.shape[1])), device=z.device).round().long()
            predicted = z[:, at].float().flatten(2) @ w.flatten(0, 1) + b
            err = (predicted - tensor.detach()[:, at].float()).abs().amax(-1)[real[:, at]]
            err = err[torch.isfinite(err)]  # an input with a NaN / inf is left out (NonFinite)
            self.out_error[layer] = max(self.out_error[layer], float(err.max()) if err.numel() else 0.0)
            if self.fused:  # fold this layer now; on sandwich blocks the output is what the norm divides
                self.state[layer] = {"out": tensor.detach()} if self.out_norm is not None else {}
                self._fold(layer, real)

        return check_output

    def _eager_terms(self, layer: int, real: torch.Tensor, c_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``bias``, ``rest``, ``z`` ``[b, q, h, d]``, the mass on C ``[b, q, h]`` and C of one layer,
        from ``hook_pattern`` / ``hook_v`` / ``hook_z``."""
        slot = self.state.get(layer, {})
        if not {"pattern", "v", "z"} <= set(slot):
            raise RuntimeError(
                f"Layer {layer}: hooks {sorted({'pattern', 'v', 'z'} - set(slot))} did not fire; load the "
                "model with eager attention (massact_lens.load_model does)."
            )
        pattern = slot["pattern"].float()[:, self.head_index]  # [b, h, q, k]
        v = repeat_kv(slot["v"].float(), self.n_heads)[:, :, self.head_index]  # [b, k, h, d]
        key_len = int(pattern.shape[-1])
        if v.shape[1] != key_len:
            raise ValueError(
                f"Layer {layer}: hook_pattern has {key_len} key positions but hook_v has {v.shape[1]}: "
                "the decomposition needs a value for every key (no extra key slots)."
            )
        in_c = fit_width(c_mask, key_len) & real_keys(real, key_len)
        c = in_c[:, None, None, :].float()
        q_real = real[:, :, None, None]
        bias = torch.einsum("bhqk,bkhd->bqhd", pattern * c, v).where(q_real, 0.0)
        rest = torch.einsum("bhqk,bkhd->bqhd", pattern * (1.0 - c), v).where(q_real, 0.0)
        mass = (pattern * c).sum(-1).transpose(1, 2).where(real[:, :, None], 0.0)  # [b, q, h]
        return bias, rest, slot["z"].float()[:, :, self.head_index], mass, in_c

    def _fused_terms(self, layer: int, real: torch.Tensor, c_mask: torch.Tensor) -> tuple[Any, ...]:
        """As :meth:`_eager_terms`, from the layer's :class:`SplitProbe` (the fused kernel); ``rest``
        is ``None``: it is ``z - bias`` by construction, made a block of queries at a time."""
        probe = self.layer_probes.get(layer)
        if probe is None or not probe.ran:
            raise RuntimeError(f"The attention of layer {layer} did not run through the probe kernel: a hook inside "
                               "attention was attached during the pass? Run with MASSACT_LENS_EAGER=1.")
        parts = probe.parts

        def chosen(t: torch.Tensor) -> torch.Tensor:  # the chosen heads (no copy when every head is)
            return t if self.every_head else t[:, :, self.head_index]

        mass = chosen(parts["mass"]).where(real[:, :, None], 0.0)
        return chosen(parts["bias"]), None, chosen(parts["z"]), mass, fit_width(c_mask, int(real.shape[1])) & real

    def _split(self, i: int, layer: int, real: torch.Tensor, c_mask: torch.Tensor) -> dict[str, Any]:
        """One layer of the batch, folded into the running sums and the error of ``bias + rest =
        hook_z``: returns a source of each term per query (``bias``, ``rest``: a block of queries
        -> ``[b, block, h, d]``, zero on padding), the mass on C ``[b, q, h]`` and the
        residual-space scale per query ``[b, q]``. Nothing of size ``[b, q, d_model]`` is made."""
        bias, rest, z, mass, _ = (self._fused_terms if self.fused else self._eager_terms)(layer, real, c_mask)
        slot = self.state.pop(layer, {})
        bad_rows = self.exclude if self.fused else self.keys.nonfinite.bad_rows  # on the CPU: no device sync
        used = ~bad_rows.to(real.device) if bad_rows is not None and bool(bad_rows.any()) else None
        valid = real if used is None else real & used[:, None]  # the queries every sum reads
        clean = bool(valid.all())

        def source(get: Any, mask: torch.Tensor) -> Any:  # zero outside ``mask`` (NaN * 0 is NaN)
            return get if clean else (lambda blk: get(blk).where(mask[:, blk, None, None], 0.0))

        rest_of = (lambda blk: rest[:, blk]) if rest is not None else (lambda blk: z[:, blk] - bias[:, blk])
        raw = (lambda blk: bias[:, blk], rest_of)
        terms = tuple(source(get, valid) for get in raw)
        err = torch.zeros((), device=bias.device)  # read back once per layer, not per block
        for blk in query_blocks(int(real.shape[1]), int(real.shape[0]) * int(bias.shape[2]) * int(bias.shape[3])):
            e = (bias[:, blk] + rest_of(blk) - z[:, blk]).abs().flatten(2).amax(-1).where(valid[:, blk], 0.0)
            err = torch.maximum(err, e.amax()) if e.numel() else err
        self.z_error[layer] = max(self.z_error[layer], float(err))
        scale = self._out_scale(layer, slot, bias)  # [b, q]: 1 / rms of the full output (sandwich), else 1
        resid_terms = None if self.out_norm is None else tuple(  # scaled, then masked (a NaN scale stays out)
            source(lambda blk, get=get: get(blk) * scale[:, blk, None, None], valid) for get in raw)
        outside = real & ~fit_width(c_mask, int(real.shape[1]))
        add_batch(self.sums, i, terms, mass if clean else mass.where(valid[:, :, None], 0.0),
                  (valid, outside & valid), self._resid_w(layer).flatten(0, 1), self.roots[layer],  # type: ignore[arg-type]
                  resid_terms=resid_terms)  # type: ignore[arg-type]
        padded = tuple(source(get, real) for get in raw)  # kept inputs: zero on padding
        return {"bias_z": padded[0], "rest_z": padded[1], "c_mass": mass, "out_scale": scale}

    def _out_scale(self, layer: int, slot: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Per query, ``1 / rms`` of the full attention output the post-attention norm divides by."""
        if self.out_norm is None:
            return torch.ones(like.shape[:2], device=like.device)
        if "out" not in slot:
            raise RuntimeError(f"Layer {layer}: the post-attention norm's input hook did not fire.")
        return rms_inverse(slot["out"], norm_eps(self.model, layer, self.out_norm))[..., 0]

    def _fold(self, layer: int, real: torch.Tensor) -> None:
        """Fused route: split and fold one layer of the batch in progress, keep its kept rows."""
        assert self.keys.c_mask is not None
        i = self.layers.index(layer)
        terms = self._split(i, layer, real, self.keys.c_mask)
        if self.exclude is None:
            self._keep_layer(i, terms)
        self.layer_probes.pop(layer).parts = {}  # the pass holds the probe until it ends: not its tensors

    def _keep_layer(self, i: int, terms: dict[str, Any]) -> None:
        """Write layer ``i``'s kept rows into the batch's buffer, a block of queries at a time
        (the buffer is made at the batch's first layer: no per-layer pieces and a stacked copy
        side by side, no whole-batch temporary)."""
        rows = self.kept_rows[0]
        if not rows:
            return
        mass = terms["c_mass"]
        at = torch.tensor(rows, dtype=torch.long, device=mass.device)
        n_q, n_h = int(mass.shape[1]), int(mass.shape[2])
        if not self.buffer:
            shapes = {"bias_z": (n_q, n_h, self.d_head), "rest_z": (n_q, n_h, self.d_head), "c_mass": (n_q, n_h),
                      "out_scale": (n_q,)}
            with torch.inference_mode(False):  # normal tensors, which the result holds without a copy
                self.buffer = {name: torch.zeros(len(rows), len(self.layers), *shape) for name, shape in shapes.items()}
        for blk in query_blocks(n_q, len(rows) * n_h * self.d_head):
            for name in ("bias_z", "rest_z"):
                self.buffer[name][:, i, blk] = terms[name](blk)[at].cpu()
        self.buffer["c_mass"][:, i] = mass[at].cpu()
        self.buffer["out_scale"][:, i] = terms["out_scale"][at].cpu()

    def add(self, batch: Batch, c_mask: torch.Tensor) -> None:
        real = batch.attention_mask.bool()
        if self.fused:
            return self._add_fused(batch, c_mask, real)
        self.kept_rows, self.buffer = self.kept.choose(batch.input_indices), {}
        for i, layer in enumerate(self.layers):
            self._keep_layer(i, self._split(i, layer, real, c_mask))
        self._keep(batch, c_mask)
        return None

    def _add_fused(self, batch: Batch, c_mask: torch.Tensor, real: torch.Tensor) -> None:
        missed = [layer for layer in self.layers if layer in self.layer_probes]
        if missed:
            raise RuntimeError(f"The attention output of layers {missed} was not folded in this pass: a hook inside "
                               "attention was attached during the pass? Run with MASSACT_LENS_EAGER=1.")
        bad = self.keys.nonfinite.bad_rows
        if bad is not None and bool(bad.any()):  # roll the batch back and fold it again without those inputs
            assert self.snapshot is not None
            sums, self.z_error, self.out_error = self.snapshot
            self.sums = {k: v.clone() for k, v in sums.items()}
            self.exclude = bad
            try:
                measure(self.model, BatchPlan([batch], int(real.shape[0]), self.prepend_bos), _Again(self),
                        progress=False)
            finally:
                self.exclude = None
        self._keep(batch, c_mask)

    def _keep(self, batch: Batch, c_mask: torch.Tensor) -> None:
        rows, inputs = self.kept_rows
        if not rows:
            return
        at = torch.tensor(rows, dtype=torch.long)
        in_c = fit_width(c_mask, int(batch.tokens.shape[1])).cpu() & batch.attention_mask.bool().cpu()
        buffer, self.buffer = self.buffer, {}
        self.kept.add(batch.attention_mask.cpu()[at], inputs, **buffer, key_mask=in_c[at], tokens=batch.tokens.cpu()[at])

    def result(self) -> dict[str, Any]:
        """The fields of :class:`~massact_lens.attention.ImplicitBias`."""
        n_layers, n_chosen, d_head = len(self.layers), len(self.heads), self.d_head
        empty = {"bias_z": torch.zeros(0, n_layers, 0, n_chosen, d_head), "rest_z": torch.zeros(0, n_layers, 0, n_chosen, d_head),
                 "c_mass": torch.zeros(0, n_layers, 0, n_chosen), "out_scale": torch.zeros(0, n_layers, 0),
                 "key_mask": torch.zeros(0, 0, dtype=torch.bool),
                 "attention_mask": torch.zeros(0, 0, dtype=torch.long), "tokens": torch.zeros(0, 0, dtype=torch.long)}
        full = self.kept.tensors(empty)
        return dict(
            **self.base_fields(),
            heads=self.heads,
            hook_names=tuple(f"blocks.{layer}.attn (fused kernel)" for layer in self.layers) if self.fused
            else tuple(attention_hook(k, layer) for layer in self.layers for k in ("pattern", "v", "z")),
            out_hooks=tuple(self.out_names[layer] for layer in self.layers),
            keep=self.keep,
            bias_z=full["bias_z"].transpose(0, 1),  # normal tensors already: no copy
            rest_z=full["rest_z"].transpose(0, 1),
            c_mass=full["c_mass"].transpose(0, 1),
            out_scale=full["out_scale"].transpose(0, 1),
            key_mask=full["key_mask"].bool(),
            attention_mask=full["attention_mask"].long(),
            tokens=full["tokens"].long(),
            gram=detached(torch.stack([gram(self._resid_w(layer)) for layer in self.layers])),
            W_O=None if keep_limit(self.keep) == 0 else  # a copy of its own, for written()
            torch.stack([self.chosen_w[layer] for layer in self.layers]).detach().cpu(),
            b_O=detached(torch.stack([self.weights[layer][1] for layer in self.layers])),
            out_gain=detached(torch.stack([self.out_gain[layer] for layer in self.layers])),
            z_error=torch.tensor([self.z_error[layer] for layer in self.layers]),
            out_error=torch.tensor([self.out_error[layer] for layer in self.layers]),
            sums={name: detached(t) for name, t in self.sums.items()},
        )


class _Again:
    """The one measurement of a batch's second run (its C is the first run's)."""

    reads_input_index = True
    needs_output = False

    def __init__(self, split: Decomposition) -> None:
        self.split = split

    def hooks(self, batch: Batch) -> HookList:
        return self.split.hooks(batch)

    def probes(self, batch: Batch) -> dict[int, SplitProbe]:
        return self.split.probes(batch)

    def update(self, batch: Batch, output: torch.Tensor | None) -> None:
        pass

    def result(self) -> None:
        return None
