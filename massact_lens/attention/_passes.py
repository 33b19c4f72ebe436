"""Shared plumbing of the attention measurements: checks, the key set of each batch, helpers.

Every attention pass is :func:`~massact_lens._core.loop.measure` over two
measurements: :class:`KeyPositions` (C of each batch; for key sets that read the
residual stream, :class:`~massact_lens.interventions.WhereMassive`, hooks that
record where they pass) and, after it, the attention measurement, which reads
that C in its own ``update``.

>>> from massact_lens.examples import tiny_model
>>> check_layers(tiny_model(), [1, 0], ("pattern",))
(0, 1)
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._fingerprint import weights_fingerprint
from massact_lens._core.batching import Batch, BatchPlan
from massact_lens._core.hook_names import attention_hook, is_post_norm, resolve_hook_names
from massact_lens._core.loop import last_block_hook
from massact_lens._core.probes import delegates_attention
from massact_lens._core.types import HookList, Provenance, model_device
from massact_lens.attention.keys import fit_width, key_mask
from massact_lens.interventions.positions import (
    PositionRule,
    RunContext,
    WhereMassive,
    in_any_order,
)


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
            raise ValueError(f"layers {chosen} has duplicates: name each layer once.")
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
        raise ValueError(f"heads {list(heads)} has duplicates: name each head once.")
    return tuple(sorted(heads))


def output_hook(model: TransformerLensModel, layer: int, *, fused: bool = False) -> str:
    """The hook holding ``z @ W_O + b_O`` (``attn.o.hook_out``; else ``hook_attn_out``).

    ``fused``: a pass in the probe kernel reads no hook inside an attention the bridge
    runs by its lean path (a hook there switches it off): the component's own
    ``hook_out`` holds the same output there."""
    if fused and not delegates_attention(model, layer):
        return f"blocks.{layer}.attn.hook_out"
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


def allowed_keys(real: torch.Tensor, key_len: int, causal: bool, window: int | None = None) -> torch.Tensor:
    """Bool ``[batch, query_pos, key_pos]``: which keys each real query may attend to.

    ``window`` (a sliding-window layer, :func:`attention_windows`): a causal query ``q``
    sees only the keys ``q - window < k <= q`` (HF's sliding-window mask); a
    bidirectional one the keys ``|q - k| < window`` (Gemma 3's bidirectional window).
    Keys past the inputs' width (an always-present extra slot) are always visible.

    >>> allowed_keys(torch.ones(1, 4, dtype=torch.bool), 4, True, window=2)[0].int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    """
    n, t = real.shape
    real_k = fit_width(real, key_len) | (torch.arange(key_len, device=real.device) >= t)[None]
    out = real[:, :, None] & real_k[:, None, :]
    q = torch.arange(t, device=real.device)[:, None]
    k = torch.arange(key_len, device=real.device)[None, :]
    if causal:
        out = out & ((k <= q) | (k >= t))[None]
    if window is not None:
        near = (k > q - window) if causal else ((k - q).abs() < window)
        out = out & (near | (k >= t))[None]
    return out


def attention_windows(model: TransformerLensModel) -> tuple[int | None, ...]:
    """Per layer, the sliding window of its attention (None: a full layer), from the HF
    config (the bridge's ``cfg.window_size`` stays None): ``sliding_window`` with the
    per-layer ``layer_types``, or the older forms (Gemma 3's ``sliding_window_pattern``,
    Gemma 2's alternation: even layers slide; else every layer, as Mistral's).

    ValueError for a layer type that is neither full nor sliding while a window is set:
    which keys it sees is not known here.

    >>> from massact_lens.examples import tiny_model
    >>> attention_windows(tiny_model())
    (None, None)
    """
    n_layers = int(model.cfg.n_layers)
    config = getattr(getattr(model, "original_model", None), "config", None)
    text_config = getattr(config, "get_text_config", None)
    config = text_config() if callable(text_config) else (config if config is not None else model.cfg)
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) is not False else None
    if window is None:
        return (None,) * n_layers
    window = int(window)
    types = getattr(config, "layer_types", None)
    if types is not None:
        unknown = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
        if unknown or len(types) != n_layers:
            raise ValueError(
                f"The model's layer_types {list(types)} hold {unknown or f'{len(types)} layers, not {n_layers}'}: "
                "which keys each layer sees is not known, so no uniform baseline or logit gap is given."
            )
        return tuple(window if t == "sliding_attention" else None for t in types)
    pattern = getattr(config, "sliding_window_pattern", None) or getattr(config, "_sliding_window_pattern", None)
    if pattern:
        return tuple(window if (i + 1) % int(pattern) else None for i in range(n_layers))
    if getattr(config, "model_type", None) == "gemma2":
        return tuple(window if i % 2 == 0 else None for i in range(n_layers))
    return (window,) * n_layers



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


class NonFinite:
    """The one non-finite rule of the attention passes: an input whose hidden state held a
    NaN or an infinite value at any hook the pass reads (a user hook upstream, an overflow
    in half precision) is left out of every statistic of the pass, and reported once, after
    the pass: which input, at which hook, how many entries (:meth:`warn`).

    Hooks call :meth:`note` with what they read (only real positions count); the pass's
    :class:`KeyPositions` turns the counts of a batch into :attr:`bad_rows` once its forward
    pass ends, before the attention measurement folds the batch in.

    >>> import torch
    >>> from massact_lens._core.batching import Batch
    >>> nonfinite = NonFinite()
    >>> batch = Batch(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), 0)
    >>> x = torch.zeros(2, 3, 4); x[1, 2, :2] = float("nan")
    >>> nonfinite.note("blocks.0.hook_v", x, batch.attention_mask.bool(), 1)
    >>> nonfinite.end_batch(batch).tolist(), nonfinite.found
    ([False, True], {(1, 'blocks.0.hook_v'): 2})
    """

    def __init__(self) -> None:
        #: (input index, hook name) -> how many non-finite entries, over the whole pass.
        self.found: dict[tuple[int, str], int] = {}
        self._pending: list[tuple[str, torch.Tensor]] = []
        #: Per row of the batch just run: True when the input is left out.
        self.bad_rows: torch.Tensor | None = None

    def note(self, name: str, tensor: torch.Tensor, real: torch.Tensor, pos_dim: int) -> None:
        """Count the non-finite entries per row of ``tensor`` at real positions (``real``
        ``[batch, pos]`` along axis ``pos_dim``); no host sync until :meth:`end_batch`."""
        bad = ~torch.isfinite(tensor)
        shape = [1] * tensor.ndim
        shape[0], shape[pos_dim] = int(real.shape[0]), int(tensor.shape[pos_dim])
        bad = bad & fit_width(real.to(tensor.device), int(tensor.shape[pos_dim])).view(shape)
        self._pending.append((name, bad.flatten(1).sum(1)))

    def end_batch(self, batch: Batch) -> torch.Tensor:
        """Per row, whether its input is left out (also kept in :attr:`bad_rows`)."""
        n = int(batch.tokens.shape[0])
        bad_rows = torch.zeros(n, dtype=torch.bool)
        if self._pending:
            names = [name for name, _ in self._pending]
            device = self._pending[0][1].device
            counts = torch.stack([c.to(device) for _, c in self._pending], 1).cpu()  # [batch, hook]: one copy
            self._pending = []
            bad_rows = (counts > 0).any(1)
            for row, h in (counts > 0).nonzero().tolist():
                key = (batch.input_index(row), names[h])
                self.found[key] = self.found.get(key, 0) + int(counts[row, h])
        self.bad_rows = bad_rows
        return bad_rows

    def inputs(self) -> list[int]:
        """The inputs left out, in order."""
        return sorted({i for i, _ in self.found})

    def warn(self, what: str, stacklevel: int = 3) -> None:
        """One ``RuntimeWarning`` naming the inputs left out of ``what``, their hooks and counts."""
        if not self.found:
            return
        shown = ", ".join(f"input {i} at {name} ({count} entries)" for (i, name), count in
                          sorted(self.found.items())[:5])
        more = f" and {len(self.found) - 5} more" if len(self.found) > 5 else ""
        warnings.warn(
            f"{len(self.inputs())} input(s) held NaN or infinite values ({shown}{more}): they are left out "
            f"of every statistic of {what}. Check the model's dtype (float32 holds what half precision "
            "overflows) and any hook of yours that runs before these points.",
            RuntimeWarning,
            stacklevel=stacklevel,
        )


class KeyPositions:
    """The key set C of every batch: a :class:`~massact_lens._core.loop.Measurement` that
    runs first in each attention pass, so that the attention measurement after it reads
    C of the same batch (:attr:`c_mask`, :attr:`batch`) in its own ``update``.

    A :class:`~massact_lens.interventions.WhereMassive` leaf of the rule reads the
    residual stream of this very pass: C holds the positions where it passes at any
    of its hook points. :meth:`result` is ``|C|`` summed over every input.

    >>> import torch
    >>> from massact_lens.examples import tiny_model
    >>> from massact_lens._core.batching import plan_batches
    >>> from massact_lens._core.loop import measure
    >>> from massact_lens.attention.keys import as_rule
    >>> model = tiny_model()
    >>> keys = KeyPositions(model, as_rule(model, [0, 2], None))
    >>> measure(model, plan_batches(model, torch.ones(3, 4, dtype=torch.long)), keys, progress=False)
    3
    >>> keys.c_mask.tolist()[0], keys.result()
    ([True, False, True, False], 6)
    """

    needs_output = False

    def __init__(self, model: TransformerLensModel, rule: PositionRule, *, early: bool = False) -> None:
        self.rule = rule
        self.model = model
        #: C is known before each batch's pass (the fused route reads it inside the
        #: kernel): a rule that reads the residual stream gets a pass of its own first.
        self.early = early
        self.reads_input_index = in_any_order(rule)
        self.device = model_device(model)
        leaves = tuple(dict.fromkeys(leaf for leaf in rule.leaves() if isinstance(leaf, WhereMassive)))
        self.points = {leaf: leaf.key_hooks(model) for leaf in leaves}
        self.found: dict[PositionRule, torch.Tensor] = {}
        #: The batch of the pass in progress, on the model's device.
        self.batch: Batch | None = None
        #: C of that batch, ``[batch, pos]`` (real positions only), once its pass ran.
        self.c_mask: torch.Tensor | None = None
        self._count: torch.Tensor | int = 0
        #: The non-finite rule of the pass: every hook of the pass notes what it reads here.
        self.nonfinite = NonFinite()

    def hooks(self, batch: Batch) -> HookList:
        self.batch = on_device = batch.to(self.device)
        width = int(on_device.tokens.shape[1])
        ctx = RunContext(torch.arange(width, device=self.device)[None], on_device.tokens, on_device.attention_mask,
                         on_device)
        self.found = {leaf: torch.zeros(on_device.tokens.shape, dtype=torch.bool, device=self.device)
                      for leaf in self.points}
        readers = [(name, self._reader(leaf, ctx, name)) for leaf, names in self.points.items() for name in names]
        if not self.early:
            return readers
        if readers:  # C from the residual stream: a pass of its own, stopped after the last point it reads
            with contextlib.suppress(ValueError):  # a point after the blocks: the pass runs to the end
                readers.append((last_block_hook([name for name, _ in readers]), _stop))
            with self.model.hooks(fwd_hooks=readers), contextlib.suppress(_Stopped):  # type: ignore[attr-defined]
                self.model(on_device.tokens, attention_mask=on_device.attention_mask)  # type: ignore[operator]
        self.c_mask = key_mask(self.rule, on_device, self.found).to(self.device)
        return []

    def _reader(self, leaf: WhereMassive, ctx: RunContext, name: str) -> Callable[..., None]:
        def read(activation: torch.Tensor, hook: Any = None) -> None:  # noqa: ARG001
            self.found[leaf] |= leaf.select(activation, None, ctx).any(dim=-1)
            self.nonfinite.note(name, activation.detach(), ctx.real(activation), 1)

        return read

    def update(self, batch: Batch, output: torch.Tensor | None) -> None:  # noqa: ARG002
        assert self.batch is not None
        bad = self.nonfinite.end_batch(self.batch).to(self.device)
        if not self.early:
            self.c_mask = key_mask(self.rule, self.batch, self.found).to(self.device)
        assert self.c_mask is not None
        self._count = self._count + self.c_mask[~bad].sum()

    def result(self) -> int:
        """``|C|`` over every input (real key positions only)."""
        return int(self._count)

    def warn_if_empty(self) -> None:
        """UserWarning when C held no key position in any input (every C statistic is then zero or NaN)."""
        if self.result() == 0:
            warnings.warn(
                f"The position rule {self.rule.describe()} selected no key position in any input: C is empty, "
                "so every C statistic is zero or NaN. Lower the thresholds or choose other positions.",
                UserWarning,
                stacklevel=3,
            )


class _Stopped(Exception):
    """Ends the key set's own pass once the last point it reads has fired."""


def _stop(activation: torch.Tensor, hook: Any = None) -> None:  # noqa: ARG001
    raise _Stopped


def detached(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) CPU tensor, usable with autograd and in-place ops later."""
    return t.detach().cpu().clone()



@dataclass(frozen=True, kw_only=True, repr=False)
class KeyedFields:
    """The fields every attention result over a key set adds to its :class:`~massact_lens._core.results.Result` base."""

    #: The key set that defined C (its description).
    positions: str
    #: BOS / [CLS] prepended to strings (None: token tensors as given).
    prepend_bos: bool | None
    #: A digest of the key set's content (a mask's entries, a callable's code, ...): two
    #: key sets with one description but other content do not merge.
    key_set: str = field(default="", repr=False)
    #: A digest of the model's weights (:func:`~massact_lens._core._fingerprint.weights_fingerprint`):
    #: parts of other weights do not merge, even with one name and shape.
    weights: str = field(default="", repr=False)
    #: True when the key set names positions by input index (an ``[n_inputs, key_pos]``
    #: mask, ``find_massive`` records): such a result describes its own slice only.
    per_input_keys: bool = field(default=False, repr=False)

    def _merge_refusal(self) -> str | None:
        """Why this result cannot merge (None: it can), with what to do."""
        if not self.per_input_keys:
            return None
        return (f"its key set ({self.positions}) names positions by input index (an [n_inputs, key_pos] mask "
                "or find_massive records), so it describes its own slice of the corpus only. Measure the whole "
                "corpus in one call, or use a key set that does not depend on the input index (a rule such as "
                "'start', a [key_pos] mask, or a MassiveProfile).")


def key_set_identity(rule: PositionRule) -> tuple[str, bool]:
    """A digest of what ``rule`` selects (its description and each leaf's content), and
    whether it names positions by input index.

    >>> from massact_lens.examples import tiny_model
    >>> from massact_lens.attention.keys import as_rule
    >>> model = tiny_model()
    >>> a, b = (as_rule(model, torch.tensor(m), None) for m in ([True, False], [False, True]))
    >>> key_set_identity(a) != key_set_identity(b), key_set_identity(as_rule(model, torch.ones(3, 4, dtype=torch.bool), None))[1]
    (True, True)
    """
    digest = hashlib.sha256(rule.describe().encode())
    per_input = False
    for leaf in rule.leaves():
        own = getattr(leaf, "__dict__", {})
        digest.update(f"|{type(leaf).__qualname__}:{leaf.describe()}".encode())
        tensor = own.get("tensor")
        if isinstance(tensor, torch.Tensor):
            per_input |= tensor.ndim == 2
            digest.update(f"{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().bool().numpy().tobytes())
        found = own.get("found")
        if getattr(found, "per_input", False):
            per_input = True
            digest.update(repr([(r.input_index, r.position) for r in found]).encode())
        fn = own.get("fn")
        if callable(fn):
            digest.update(f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}".encode())
            code = getattr(fn, "__code__", None)
            if code is not None:
                digest.update(code.co_code + repr(code.co_consts).encode())
    return digest.hexdigest()[:16], per_input


class KeyedMeasurement:
    """The base of the attention measurements: reads C of each batch from the
    :class:`KeyPositions` that runs before it in the same pass.

    A subclass gives :meth:`hooks`, :meth:`add` (one batch, on the model's device,
    with its C) and ``result()``; :meth:`base_fields` are the result's fields that
    every attention result shares.
    """

    reads_input_index = True  # rows are named by batch.input_indices
    needs_output = False

    def __init__(self, model: TransformerLensModel, plan: BatchPlan, keys: KeyPositions, layers: tuple[int, ...]) -> None:
        self.model = model
        self.keys = keys
        self.layers = layers
        self.device = keys.device
        self.prepend_bos = plan.prepend_bos
        self.n_inputs = 0

    def hooks(self, batch: Batch) -> HookList:
        raise NotImplementedError

    def add(self, batch: Batch, c_mask: torch.Tensor) -> None:
        """Fold one batch (on the model's device) and its C into the running state."""
        raise NotImplementedError

    def update(self, batch: Batch, output: torch.Tensor | None) -> None:  # noqa: ARG002
        assert self.keys.batch is not None and self.keys.c_mask is not None, "KeyPositions must run first"
        self.add(self.keys.batch, self.keys.c_mask)
        self.n_inputs += int(batch.tokens.shape[0])

    def base_fields(self) -> dict[str, Any]:
        """``provenance``, ``layers``, ``n_inputs``, ``positions``, ``prepend_bos``, ``key_set``,
        ``per_input_keys``, ``weights`` of the result."""
        key_set, per_input = key_set_identity(self.keys.rule)
        return {"provenance": Provenance.of(self.model), "layers": self.layers, "n_inputs": self.n_inputs,
                "positions": self.keys.rule.describe(), "prepend_bos": self.prepend_bos,
                "key_set": key_set, "per_input_keys": per_input, "weights": weights_fingerprint(self.model)}
