"""Interventions on massive activations: edit hooks, position rules, ablation, patching.

Background
----------
Sun et al. (2024, section 3) test what massive activations do by editing them:
set them to zero at the layers where they appear and the model breaks (LLaMA2-7B
WikiText perplexity 5.47 -> inf); set them to their mean over many inputs and
nothing changes (5.47). Their code hard-codes the coordinates and the mean values
for two models. Here every edit is a TransformerLens forward hook,
``fn(activation, *, hook)``, built from what the library measured itself:

* **edit hooks** (:func:`zero_hook`, :func:`value_hook`, :func:`scale_hook`,
  :func:`mean_hook`) rewrite chosen feature dims at chosen positions of a
  ``[batch, pos, d_model]`` hidden state, and nothing else;
* **position rules** say where: explicit indices (:func:`at_positions`), the start
  token (:func:`start_token`), delimiter tokens (:func:`delimiter_positions`), or
  wherever the entry is massive in *this* input (:func:`where_massive`, decided at
  run time from the activation, so one hook list serves a whole batch). Rules
  combine with ``|``, ``&`` and ``~``;
* :func:`ablation_hooks` turns a :class:`~massact_lens.massive.MassiveProfile` into
  the paper's hook list (``mode="zero"`` or ``"mean"``: the profile's mean per
  (hook, dim, token kind)); :func:`ablated` is the same as a context manager;
* :func:`patching_hooks` / :func:`massive_patching` copy the massive entries of a
  source input into a target run: the paper's "input-agnostic bias" claim, tested
  directly.

**How a hook knows the tokens.** Rules that need the token ids or the absolute
position of the batch in progress read them from a :class:`TokenTracker`, a
pair of read-only hooks on ``embed.hook_in`` (token ids) and, where the model has
one, ``pos_embed.hook_in`` (position ids). The list builders
(:func:`intervention_hooks`, :func:`edit_hooks`, :func:`ablation_hooks`) put one
tracker first in the list they return and bind every edit hook to it, so the list
is self-contained: pass it to ``run_with_hooks``, ``run_with_cache``, ``generate``
or ``model.hooks()``, alone or concatenated with your own hooks. Edits of a list
run in list order, before or after your hooks on the same point as you place them.

**Generation with a KV cache.** A decoding step sees only the new token. The
tracker takes its absolute position from the position ids when the model has
learned positions; otherwise it treats a one-token pass with the batch size of the
pass before as the continuation of that pass. The prompt pass is edited as usual
and the edited keys and values stay in the cache.

**In place.** Edits write into the activation in place (cheap: only the chosen
entries are touched) unless it requires grad, in which case it is cloned first. A
hook *before* an edit on the same point that kept a reference to the tensor sees
the edit; keep a ``.clone()`` there if you need the unedited value.

Usage
-----
>>> import torch
>>> from massact_lens.examples import tiny_model
>>> model = tiny_model()
>>> hooks = edit_hooks(model, zero_hook(dims=[3], positions=start_token()), layers=[0, 1])
>>> [name for name, _ in hooks]
['embed.hook_in', 'pos_embed.hook_in', 'blocks.0.hook_resid_post', 'blocks.1.hook_resid_post']
>>> with model.hooks(fwd_hooks=hooks):
...     _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
>>> float(cache["blocks.1.hook_resid_post"][0, 0, 3])
0.0

References
----------
Sun, Chen, Kolter, Liu. *Massive Activations in Large Language Models*, COLM 2024,
section 3 and Table 3 (zero vs mean). The hook factories follow TransformerLens'
``direct_path_patching`` (clone before an in-place edit when grad is needed).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens.batching import Batch, Inputs, plan_batches, run_batches
from massact_lens.hook_names import layer_of, resolve_hook_names
from massact_lens.massive import DELIMITERS, TOKEN_KINDS, MassiveProfile, massive_entries
from massact_lens.models import model_description

__all__ = [
    "EditHook",
    "HookList",
    "PatchHook",
    "PatchingResult",
    "PositionRule",
    "RunContext",
    "TokenTracker",
    "ablated",
    "ablation_hooks",
    "all_positions",
    "announce_batch",
    "at_positions",
    "check_profile_matches",
    "delimiter_positions",
    "edit_hooks",
    "hook_names_of",
    "intervention_hooks",
    "kind_positions",
    "massive_patching",
    "mean_hook",
    "patching_hooks",
    "scale_hook",
    "start_token",
    "value_hook",
    "where_massive",
    "zero_hook",
]

HookFn = Callable[..., Any]
#: What ``fwd_hooks`` takes: (hook name, fn(tensor, *, hook)) pairs.
HookList = list[tuple[str, HookFn]]

_TOKENS_HOOK = "embed.hook_in"
_POSITIONS_HOOK = "pos_embed.hook_in"
#: Hook-name endings whose last axis is d_model (dims are checked before running).
_RESIDUAL_SUFFIXES = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_in",
    "hook_out",
    "hook_attn_out",
    "hook_mlp_out",
)
_RESIDUAL_EXCEPTIONS = (".mlp.in.", ".mlp.out.hook_in", ".attn.q.", ".attn.k.", ".attn.v.", ".attn.o.hook_in", "embed.hook_in", "pos_embed.hook_in")


# --------------------------------------------------------------------------- context


@dataclass(frozen=True)
class RunContext:
    """What a position rule knows about the forward pass in progress.

    Attributes:
        positions: absolute position of each slot, ``[1 or batch, pos]`` (not
            ``arange(pos)`` during a KV-cached decoding step).
        tokens: the token ids, ``[batch, pos]``; None when no tracker saw them.
        attention_mask: 1 = real token, when the batch's padding is known.
    """

    positions: Int[torch.Tensor, "_ pos"]
    tokens: Int[torch.Tensor, "batch pos"] | None = None
    attention_mask: Int[torch.Tensor, "batch pos"] | None = None

    @property
    def starts_sequence(self) -> bool:
        """True when this pass holds position 0 (not a KV-cached continuation)."""
        return bool((self.positions == 0).any())


class TokenTracker:
    """Read-only hooks that tell position rules the tokens of the pass in progress.

    :meth:`hooks` gives the hook pairs to put *first* in a hook list. The list
    builders of this module do that for you.

    >>> from massact_lens.examples import tiny_model
    >>> [name for name, _ in TokenTracker().hooks(tiny_model("llama"))]
    ['embed.hook_in']
    """

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        self._expected_mask: torch.Tensor | None = None
        self._end: tuple[int, int] | None = None  # (batch, absolute end) of the last pass

    def hooks(self, model: TransformerLensModel) -> HookList:
        """The tracker's hooks for this model (token ids; position ids where the model has them)."""
        known = model.hook_dict  # type: ignore[attr-defined]
        if _TOKENS_HOOK not in known:
            raise ValueError(
                f"The model has no {_TOKENS_HOOK!r} hook point, so rules cannot see the tokens. "
                "Use position rules that need no tokens (at_positions, start_token, where_massive, "
                "all_positions) and pass the edit hooks to fwd_hooks directly."
            )
        out: HookList = [(_TOKENS_HOOK, self.on_tokens)]
        if _POSITIONS_HOOK in known:
            out.append((_POSITIONS_HOOK, self.on_position_ids))
        return out

    def expect(self, attention_mask: torch.Tensor | None) -> None:
        """Announce the padding mask of the next forward pass (used by the evaluation loops)."""
        self._expected_mask = attention_mask

    def on_tokens(self, tokens: torch.Tensor, *, hook: Any = None) -> None:  # noqa: ARG002
        if tokens.is_floating_point() or tokens.ndim not in (1, 2):
            self.tokens = None  # embeddings were passed in: no ids to read
            return
        if tokens.ndim == 1:
            tokens = tokens[None]
        batch, n = (int(s) for s in tokens.shape)
        offset = 0
        if n == 1 and self._end is not None and self._end[0] == batch:
            offset = self._end[1]  # a KV-cached decoding step continues the last pass
        self.tokens = tokens
        self.positions = torch.arange(offset, offset + n, device=tokens.device)[None]
        self._end = (batch, offset + n)
        mask = self._expected_mask
        self._expected_mask = None
        if mask is not None and tuple(mask.shape) == (batch, n):
            self.attention_mask = mask.to(tokens.device)
        else:
            self.attention_mask = None

    def on_position_ids(self, ids: torch.Tensor, *, hook: Any = None) -> None:  # noqa: ARG002
        if ids.is_floating_point() or self.tokens is None or ids.shape[-1] != self.tokens.shape[-1]:
            return
        ids = ids if ids.ndim == 2 else ids.reshape(1, -1)
        self.positions = ids
        self._end = (int(self.tokens.shape[0]), int(ids.max()) + 1)

    def context(self, activation: torch.Tensor) -> RunContext:
        """The context of ``activation``, a ``[batch, pos, ...]`` hidden state of this pass."""
        batch, n = int(activation.shape[0]), int(activation.shape[1])
        tokens = self.tokens
        if tokens is None or tuple(tokens.shape) != (batch, n) or self.positions is None:
            return _default_context(activation)
        return RunContext(self.positions.to(activation.device), tokens.to(activation.device), self.attention_mask)


def _default_context(activation: torch.Tensor) -> RunContext:
    n = int(activation.shape[1])
    return RunContext(torch.arange(n, device=activation.device)[None])


# --------------------------------------------------------------------------- position rules

class PositionRule:
    """Where an edit applies. Subclasses implement :meth:`select`.

    ``select`` returns a boolean mask of the positions, ``[1 or batch, pos]``, or of
    single entries, ``[1 or batch, pos, n_dims]`` (one column per edited dim).
    Rules combine: ``a | b``, ``a & b``, ``~a``.
    """

    #: The rule reads token ids (needs a :class:`TokenTracker`).
    needs_tokens: bool = False
    #: The rule reads the edited activation itself (:func:`where_massive`).
    reads_activation: bool = False

    def select(self, activation: torch.Tensor, dims: torch.Tensor | None, context: RunContext) -> torch.Tensor:
        raise NotImplementedError

    def check(self, model: TransformerLensModel) -> None:  # noqa: ARG002
        """Validate against a model before any forward pass (raise ValueError)."""
        return

    def describe(self) -> str:
        return type(self).__name__

    def __or__(self, other: PositionRule) -> PositionRule:
        return _Combined("|", (self, _rule(other)))

    def __and__(self, other: PositionRule) -> PositionRule:
        return _Combined("&", (self, _rule(other)))

    def __invert__(self) -> PositionRule:
        return _Not(self)

    def __repr__(self) -> str:
        return self.describe()


def _rule(value: Any) -> PositionRule:
    if not isinstance(value, PositionRule):
        raise TypeError(
            f"Expected a position rule (start_token(), at_positions(...), delimiter_positions(...), "
            f"where_massive(...), all_positions()), not {type(value).__name__}."
        )
    return value


class _All(PositionRule):
    def select(self, activation: torch.Tensor, dims: torch.Tensor | None, context: RunContext) -> torch.Tensor:  # noqa: ARG002
        return torch.ones(1, int(activation.shape[1]), dtype=torch.bool, device=activation.device)

    def describe(self) -> str:
        return "all positions"


class _Start(PositionRule):
    def select(self, activation: torch.Tensor, dims: torch.Tensor | None, context: RunContext) -> torch.Tensor:  # noqa: ARG002
        return context.positions == 0

    def describe(self) -> str:
        return "start token"


class _At(PositionRule):
    def __init__(self, indices: tuple[int, ...]) -> None:
        self.indices = indices

    def check(self, model: TransformerLensModel) -> None:
        n_ctx = int(model.cfg.n_ctx)
        bad = [i for i in self.indices if not -n_ctx <= i < n_ctx]
        if bad:
            raise ValueError(f"Positions {bad} do not exist: the model's context has {n_ctx} positions (0..{n_ctx - 1}, or -1..-{n_ctx}).")

    def select(self, activation: torch.Tensor, dims: torch.Tensor | None, context: RunContext) -> torch.Tensor:  # noqa: ARG002
        n = int(activation.shape[1])
        positions = context.positions
        out = torch.zeros_like(positions, dtype=torch.bool)
        fresh = context.starts_sequence
        if context.attention_mask is not None:
            lengths = context.attention_mask.sum(dim=1, keepdim=True)
        else:
            lengths = torch.full((1, 1), n, device=activation.device)
        local = torch.arange(n, device=activation.device)[None]
        for index in self.indices:
            if index >= 0:
                if fresh and index >= int(positions.max()) + 1:
                    raise ValueError(
                        f"Position {index} does not exist in this input: it has {int(positions.max()) + 1} "
                        "positions. Choose positions inside every input (or a negative index from the end)."
                    )
                out = out | (positions == index)
            elif fresh:
                if bool((lengths + index < 0).any()):
                    raise ValueError(f"Position {index} does not exist in an input of {int(lengths.min())} tokens.")
                out = out | (local == lengths + index)
        return out

    def describe(self) -> str:
        return f"positions {list(self.indices)}"


class _TokenIds(PositionRule):
    needs_tokens = True

    def __init__(self, token_ids: frozenset[int], first_only: bool, label: str) -> None:
        self.token_ids = token_ids
        self.first_only = first_only
        self.label = label
        self._ids: dict[torch.device, torch.Tensor] = {}

    def select(self, activation: torch.Tensor, dims: torch.Tensor | None, context: RunContext) -> torch.Tensor:  # noqa: ARG002
        if context.tokens is None:
            raise RuntimeError(
                f"The rule '{self.describe()}' needs the token ids of this batch, but no token tracker "
                "saw them. Build the hook list with intervention_hooks / edit_hooks / ablation_hooks "
                "(they put a TokenTracker first), and pass token ids, not embeddings."
            )
        device = context.tokens.device
        if device not in self._ids:
            self._ids[device] = torch.tensor(sorted(self.token_ids), dtype=torch.long, device=device)
        out = torch.isin(context.tokens, self._ids[device]) & (context.positions != 0)
        if context.attention_mask is not None:
            out = out & context.attention_mask.bool()
        if self.first_only:
            out = out & (out.cumsum(dim=1) == 1)
        return out

    def describe(self) -> str:
        return self.label + (" (first)" if self.first_only else "")


class _WhereMassive(PositionRule):
    reads_activation = True

    def __init__(self, min_value: float, min_ratio: float) -> None:
        self.min_value = min_value
        self.min_ratio = min_ratio

    def select(self, activation: torch.Tensor, dims: torch.Tensor | None, context: RunContext) -> torch.Tensor:
        if context.attention_mask is not None:
            real = context.attention_mask.bool()
        else:
            real = torch.ones(activation.shape[:2], dtype=torch.bool, device=activation.device)
        return massive_entries(activation, real, self.min_value, self.min_ratio, dims)

    def describe(self) -> str:
        return f"where |x| > {self.min_value:g} and >= {self.min_ratio:g} x median"


class _Combined(PositionRule):
    def __init__(self, op: str, rules: tuple[PositionRule, ...]) -> None:
        self.op = op
        self.rules = rules
        self.needs_tokens = any(r.needs_tokens for r in rules)
        self.reads_activation = any(r.reads_activation for r in rules)

    def check(self, model: TransformerLensModel) -> None:
        for rule in self.rules:
            rule.check(model)

    def select(self, activation: torch.Tensor, dims: torch.Tensor | None, context: RunContext) -> torch.Tensor:
        parts = [r.select(activation, dims, context) for r in self.rules]
        if any(p.ndim == 3 for p in parts):
            parts = [p if p.ndim == 3 else p[..., None] for p in parts]
        out = parts[0]
        for p in parts[1:]:
            out = (out | p) if self.op == "|" else (out & p)
        return out

    def describe(self) -> str:
        return "(" + f" {self.op} ".join(r.describe() for r in self.rules) + ")"


class _Not(PositionRule):
    def __init__(self, rule: PositionRule) -> None:
        self.rule = rule
        self.needs_tokens = rule.needs_tokens
        self.reads_activation = rule.reads_activation

    def check(self, model: TransformerLensModel) -> None:
        self.rule.check(model)

    def select(self, activation: torch.Tensor, dims: torch.Tensor | None, context: RunContext) -> torch.Tensor:
        return ~self.rule.select(activation, dims, context)

    def describe(self) -> str:
        return f"not {self.rule.describe()}"


def all_positions() -> PositionRule:
    """Every position.

    >>> all_positions()
    all positions
    """
    return _All()


def start_token() -> PositionRule:
    """The first token of the sequence (BOS / [CLS], or the first word without BOS).

    Selects absolute position 0: in a KV-cached decoding step it selects nothing.

    >>> start_token()
    start token
    """
    return _Start()


def at_positions(*indices: int) -> PositionRule:
    """Explicit positions; a negative index counts from the end of each input.

    A non-negative index beyond the input raises ValueError when the hook runs;
    beyond the model's context, when the hook list is built.

    >>> at_positions(0, 3, -1)
    positions [0, 3, -1]
    """
    flat: list[int] = []
    for index in indices:
        if isinstance(index, Sequence) and not isinstance(index, str):
            flat.extend(index)
        else:
            flat.append(index)
    if not flat or any(isinstance(i, bool) or not isinstance(i, int) for i in flat):
        raise ValueError(f"at_positions needs one or more integer positions, not {indices!r}.")
    return _At(tuple(int(i) for i in flat))


def delimiter_positions(
    model: TransformerLensModel | None = None,
    *,
    token_ids: Sequence[int] | None = None,
    delimiters: frozenset[str] | Sequence[str] = DELIMITERS,
    first_only: bool = False,
) -> PositionRule:
    """Positions holding a delimiter token ("." "," ";" ":" "!" "?" or a newline).

    The same classification as :func:`massact_lens.massive.token_kind` (the start
    token is never a delimiter). The delimiter ids are read once from the model's
    tokenizer, or given as ``token_ids`` (for models without a tokenizer).
    ``first_only`` keeps only the first delimiter of each input (the paper's LLaMA2
    massive activations sit on the first "." or newline).

    >>> delimiter_positions(token_ids=[5, 7], first_only=True)
    delimiters (first)
    """
    if token_ids is None:
        if model is None or getattr(model, "tokenizer", None) is None:
            raise ValueError(
                "delimiter_positions needs the model's tokenizer to find the delimiter tokens; "
                "this model has none. Pass token_ids=[...] (the ids that count as delimiters)."
            )
        ids = _delimiter_ids(model, frozenset(delimiters))
    else:
        ids = frozenset(int(i) for i in token_ids)
        if model is not None:
            d_vocab = int(model.cfg.d_vocab)
            bad = sorted(i for i in ids if not 0 <= i < d_vocab)
            if bad:
                raise ValueError(f"Token ids {bad[:5]} are outside the vocabulary (0..{d_vocab - 1}).")
    if not ids:
        raise ValueError(f"No token of the vocabulary is a delimiter in {sorted(delimiters)}.")
    return _TokenIds(ids, bool(first_only), "delimiters")


_DELIMITER_CACHE: dict[tuple[int, frozenset[str]], frozenset[int]] = {}


def _delimiter_ids(model: TransformerLensModel, delimiters: frozenset[str]) -> frozenset[int]:
    tokenizer = model.tokenizer  # type: ignore[attr-defined]
    key = (id(tokenizer), delimiters)
    if key not in _DELIMITER_CACHE:
        size = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(size)])
        ids = set()
        for i, text in enumerate(texts):
            stripped = text.strip()
            if stripped in delimiters or (stripped == "" and "\n" in text):
                ids.add(i)
        _DELIMITER_CACHE[key] = frozenset(ids)
    return _DELIMITER_CACHE[key]


def where_massive(min_value: float | int = 100.0, min_ratio: float | int = 1000.0) -> PositionRule:
    """Entries that are massive in *this* input, decided from the activation at run time.

    An entry passes when ``|x| > min_value`` and ``|x| >= min_ratio x median |x|``
    of its hidden state (one input, real positions when the padding is known, all
    dims): the criterion of :func:`massact_lens.find_massive`. Selects single
    (position, dim) entries, so one hook list serves a whole batch.

    >>> where_massive(50, 200)
    where |x| > 50 and >= 200 x median
    """
    for name, value in (("min_value", min_value), ("min_ratio", min_ratio)):
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, not {value!r}.")
    return _WhereMassive(float(min_value), float(min_ratio))


def kind_positions(
    kind: str,
    model: TransformerLensModel | None = None,
    *,
    delimiters: frozenset[str] | Sequence[str] = DELIMITERS,
    token_ids: Sequence[int] | None = None,
) -> PositionRule:
    """The positions of one token kind of :func:`massact_lens.token_kind`.

    ``"start"``: the start token; ``"delimiter"``: delimiter tokens; ``"other"``:
    everything else.

    >>> kind_positions("other", token_ids=[5])
    not (start token | delimiters)
    """
    if kind == "start":
        return start_token()
    if kind not in TOKEN_KINDS:
        raise ValueError(f"kind must be one of {TOKEN_KINDS}, not {kind!r}.")
    if (
        kind == "other"
        and token_ids is None
        and model is not None
        and getattr(model, "tokenizer", None) is not None
        and not _delimiter_ids(model, frozenset(delimiters))
    ):
        return ~start_token()  # a vocabulary without delimiters: everything but the start
    delims = delimiter_positions(model, token_ids=token_ids, delimiters=delimiters)
    return delims if kind == "delimiter" else ~(start_token() | delims)


# --------------------------------------------------------------------------- edit hooks


@dataclass(frozen=True, eq=False)
class EditHook:
    """``fn(activation, *, hook)``: rewrite chosen dims at chosen positions, nothing else.

    Built by :func:`zero_hook`, :func:`value_hook`, :func:`scale_hook`,
    :func:`mean_hook`. ``operation`` is ``"set"`` (write ``amount``) or ``"scale"``
    (multiply by ``amount``); ``amount`` holds one number for all dims or one per
    dim. ``dims=None`` edits every dim. ``tracker`` is set by the list builders.
    """

    operation: Literal["set", "scale"]
    amount: tuple[float, ...]
    dims: tuple[int, ...] | None
    positions: PositionRule
    label: str = ""
    tracker: TokenTracker | None = None
    _cache: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.operation not in ("set", "scale"):
            raise ValueError(f"operation must be 'set' or 'scale', not {self.operation!r}.")
        if not self.amount or any(not math.isfinite(a) for a in self.amount):
            raise ValueError(f"Values must be finite numbers, not {self.amount!r}.")
        if self.dims is not None and len(self.amount) not in (1, len(self.dims)):
            raise ValueError(f"Give one value or one per dim ({len(self.dims)}), not {len(self.amount)}.")
        if self.dims is None and len(self.amount) != 1:
            raise ValueError("With dims=None (every dim) give one value.")

    def bound(self, tracker: TokenTracker) -> EditHook:
        """A copy that reads tokens and positions from ``tracker``."""
        return replace(self, tracker=tracker, _cache={})

    def _tensor(self, key: str, values: Sequence[int] | Sequence[float], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        cache_key = (key, device, dtype)
        if cache_key not in self._cache:
            self._cache[cache_key] = torch.tensor(values, device=device, dtype=dtype)
        return self._cache[cache_key]

    def __call__(
        self, activation: Float[torch.Tensor, "batch pos d_model"], *, hook: Any = None
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        d_model = int(activation.shape[-1])
        if self.dims is not None and max(self.dims) >= d_model:
            where = f" at {hook.name!r}" if hook is not None and getattr(hook, "name", None) else ""
            raise ValueError(f"Dim {max(self.dims)} does not exist{where}: the hidden state has {d_model} dims.")
        if self.positions.needs_tokens and self.tracker is None:
            raise RuntimeError(
                f"This hook's position rule ({self.positions.describe()}) needs the batch's token ids. "
                "Build the hook list with intervention_hooks(model, [(name, hook)]) or edit_hooks(...), "
                "which put a TokenTracker first."
            )
        context = self.tracker.context(activation) if self.tracker is not None else _default_context(activation)
        device = activation.device
        index = None if self.dims is None else self._tensor("dims", self.dims, device, torch.long)
        selected = self.positions.select(activation, index, context)
        if selected.ndim == 2:
            selected = selected[..., None]
        target = activation.clone() if activation.requires_grad else activation
        columns = target if index is None else target[..., index]
        amount = self._tensor("amount", self.amount, device, activation.dtype)
        new = amount if self.operation == "set" else columns * amount
        edited = torch.where(selected, new.to(columns.dtype), columns)
        if index is None:
            target.copy_(edited)
        else:
            target[..., index] = edited
        return target

    def describe(self) -> str:
        what = self.label or (f"set to {list(self.amount)}" if self.operation == "set" else f"scale by {list(self.amount)}")
        dims = "all dims" if self.dims is None else f"dims {list(self.dims)}"
        return f"{what}, {dims}, at {self.positions.describe()}"

    def __repr__(self) -> str:
        return f"EditHook({self.describe()})"


def _dims(dims: int | Sequence[int] | None) -> tuple[int, ...] | None:
    if dims is None:
        return None
    values = [dims] if isinstance(dims, int) else list(dims)
    if not values:
        raise ValueError("dims is empty: pass None for every dim, or one or more dims.")
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in values):
        raise ValueError(f"dims must be non-negative integers, not {dims!r}.")
    if len(set(values)) != len(values):
        raise ValueError(f"dims {values} contain duplicates.")
    return tuple(int(d) for d in values)


def _amounts(value: float | Sequence[float] | torch.Tensor) -> tuple[float, ...]:
    if isinstance(value, torch.Tensor):
        return tuple(float(v) for v in value.flatten().tolist())
    if isinstance(value, int | float):
        return (float(value),)
    return tuple(float(v) for v in value)


def zero_hook(dims: int | Sequence[int] | None = None, positions: PositionRule | None = None) -> EditHook:
    """Set ``dims`` (default all) to zero at ``positions`` (default all).

    >>> import torch
    >>> x = torch.ones(1, 3, 4)
    >>> zero_hook(dims=[1], positions=at_positions(0))(x)[0, :, 1].tolist()
    [0.0, 1.0, 1.0]
    """
    return EditHook("set", (0.0,), _dims(dims), _rule(positions or all_positions()), "set to zero")


def value_hook(
    value: float | Sequence[float] | torch.Tensor,
    dims: int | Sequence[int] | None = None,
    positions: PositionRule | None = None,
) -> EditHook:
    """Set ``dims`` to ``value`` (one number, or one per dim) at ``positions``.

    >>> import torch
    >>> value_hook([7.0, 8.0], dims=[0, 2], positions=start_token())(torch.zeros(1, 2, 3))[0].tolist()
    [[7.0, 0.0, 8.0], [0.0, 0.0, 0.0]]
    """
    return EditHook("set", _amounts(value), _dims(dims), _rule(positions or all_positions()))


def scale_hook(
    factor: float | Sequence[float] | torch.Tensor,
    dims: int | Sequence[int] | None = None,
    positions: PositionRule | None = None,
) -> EditHook:
    """Multiply ``dims`` by ``factor`` at ``positions``.

    >>> import torch
    >>> scale_hook(0.5, dims=1)(torch.full((1, 2, 2), 4.0))[0].tolist()
    [[4.0, 2.0], [4.0, 2.0]]
    """
    return EditHook("scale", _amounts(factor), _dims(dims), _rule(positions or all_positions()))


def mean_hook(
    profile: MassiveProfile | None,
    hook_name: str,
    dims: int | Sequence[int] | None = None,
    kind: str = "start",
    positions: PositionRule | None = None,
) -> EditHook:
    """Set ``dims`` to the profile's mean value at ``hook_name`` for token ``kind``.

    ``dims`` default: the profile's massive dims. ``positions`` default: the start
    token for ``kind="start"``; give a rule for other kinds (e.g.
    ``delimiter_positions(model) & where_massive(...)``).

    >>> from massact_lens import profile
    >>> from massact_lens.examples import minilm
    >>> p = profile(minilm(), ["A short sentence."], min_value=50, min_ratio=200, progress=False)
    >>> mean_hook(p, "blocks.0.ln2.hook_in")
    EditHook(set to mean, dims [99], at start token)
    """
    if profile is None:
        raise ValueError(
            "'mean' writes the profile's mean values, and no profile was given: measure one with "
            "massact_lens.profile(model, inputs, ...) and pass it."
        )
    chosen = _dims(dims) or profile.massive_dims
    if not chosen:
        raise ValueError("The profile found no massive dims: pass dims=..., or profile with lower thresholds.")
    if positions is None:
        if kind != "start":
            raise ValueError(f"For kind={kind!r} pass positions= (e.g. kind_positions({kind!r}, model)).")
        positions = start_token()
    values = []
    for dim in chosen:
        try:
            values.append(profile.mean_value(hook_name, dim, kind))
        except KeyError:
            raise ValueError(
                f"The profile has no mean for hook {hook_name!r}, dim {dim}, token kind {kind!r}: "
                f"it scanned {list(profile.hook_names)} and found dims {list(profile.massive_dims)}."
            ) from None
    return EditHook("set", tuple(values), chosen, _rule(positions), "set to mean")


# --------------------------------------------------------------------------- hook lists


def _is_residual(name: str) -> bool:
    return name.endswith(_RESIDUAL_SUFFIXES) and not any(x in name for x in _RESIDUAL_EXCEPTIONS)


def _check_dims(model: TransformerLensModel, name: str, dims: tuple[int, ...] | None) -> None:
    d_model = int(model.cfg.d_model)
    if dims is not None and _is_residual(name) and max(dims) >= d_model:
        bad = [d for d in dims if d >= d_model]
        raise ValueError(f"Dims {bad} do not exist at {name!r}: the model has d_model={d_model} (dims 0..{d_model - 1}).")


def intervention_hooks(
    model: TransformerLensModel, edits: Sequence[tuple[str, HookFn]]
) -> HookList:
    """Validate ``(hook name, hook)`` pairs and make them a self-contained hook list.

    Hook names are checked against the model, dims of edit hooks against
    ``d_model`` and position rules against the context, all before any forward
    pass. Edit hooks are bound to one :class:`TokenTracker`, whose hooks come first.
    Other callables (your own hooks) pass through unchanged, in order.

    >>> from massact_lens.examples import tiny_model
    >>> hooks = intervention_hooks(tiny_model(), [("blocks.0.hook_resid_post", zero_hook(dims=2))])
    >>> len(hooks)   # tracker (tokens, positions) + the edit
    3
    """
    if isinstance(edits, tuple) and len(edits) == 2 and isinstance(edits[0], str):
        edits = [edits]  # type: ignore[list-item]
    pairs = list(edits)
    for item in pairs:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and callable(item[1])):
            raise TypeError(f"Each edit must be a (hook name, hook function) pair, not {item!r}.")
    tracker = TokenTracker()
    needs_tracker = any(isinstance(fn, EditHook | PatchHook) for _, fn in pairs)
    out: HookList = []
    if needs_tracker:
        try:
            out.extend(tracker.hooks(model))
        except ValueError:
            if any(isinstance(fn, EditHook | PatchHook) and fn.positions.needs_tokens for _, fn in pairs):
                raise
            tracker = None  # type: ignore[assignment]
    for name, fn in pairs:
        resolve_hook_names(model, name)
        if isinstance(fn, EditHook | PatchHook):
            _check_dims(model, name, fn.dims)
            fn.positions.check(model)
            fn = fn.bound(tracker) if tracker is not None else fn
        out.append((name, fn))
    return out


def edit_hooks(
    model: TransformerLensModel,
    edit: EditHook | Sequence[EditHook],
    *,
    hooks: str | Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
) -> HookList:
    """Apply ``edit`` (or several, in order) at every chosen hook point.

    Args:
        model: the model the hooks are for (names, dims, positions are checked).
        edit: from :func:`zero_hook`, :func:`value_hook`, :func:`scale_hook`, ...
        hooks: hook names or ``{layer}`` templates; default the residual stream
            (:func:`massact_lens.hook_names.residual_hook_names`).
        layers: restrict to these layers.

    >>> from massact_lens.examples import tiny_model
    >>> hooks = edit_hooks(tiny_model(), scale_hook(2.0, dims=[0]), hooks="blocks.{layer}.hook_resid_mid", layers=[1])
    >>> hooks[-1][0]
    'blocks.1.hook_resid_mid'
    """
    edits = [edit] if isinstance(edit, EditHook) else list(edit)
    if not edits or not all(isinstance(e, EditHook) for e in edits):
        raise TypeError("edit must be an EditHook (zero_hook(...), value_hook(...), ...) or a list of them.")
    names = resolve_hook_names(model, hooks, layers)
    return intervention_hooks(model, [(name, e) for name in names for e in edits])


def check_profile_matches(model: TransformerLensModel, profile: MassiveProfile) -> None:
    """Raise ValueError when ``profile`` was measured on a model of another shape.

    Compares layer count and d_model, and that the profile's hook points exist;
    warns when only the model name differs.

    >>> from massact_lens import profile
    >>> from massact_lens.examples import minilm, tiny_model
    >>> p = profile(minilm(), ["Hi."], min_value=50, min_ratio=200, progress=False)
    >>> check_profile_matches(tiny_model(), p)
    Traceback (most recent call last):
    ...
    ValueError: The profile was measured on a model with 6 layers and d_model 384 (...), but this model has 2 layers and d_model 32. Measure a profile on this model: massact_lens.profile(model, inputs, ...).
    """
    if not isinstance(profile, MassiveProfile):
        raise TypeError(f"profile must be a MassiveProfile (massact_lens.profile(...)), not {type(profile).__name__}.")
    mine = model_description(model)
    theirs = profile.model
    if (theirs.get("n_layers"), theirs.get("d_model")) != (mine["n_layers"], mine["d_model"]):
        raise ValueError(
            f"The profile was measured on a model with {theirs.get('n_layers')} layers and d_model "
            f"{theirs.get('d_model')} ({theirs.get('model_name')}), but this model has {mine['n_layers']} "
            f"layers and d_model {mine['d_model']}. Measure a profile on this model: "
            "massact_lens.profile(model, inputs, ...)."
        )
    missing = [n for n in profile.hook_names if n not in model.hook_dict]  # type: ignore[attr-defined]
    if missing:
        raise ValueError(f"The profile's hook points {missing[:3]} do not exist in this model: it was measured on another architecture.")
    if theirs.get("model_name") != mine["model_name"]:
        warnings.warn(
            f"The profile was measured on {theirs.get('model_name')!r}, this model is {mine['model_name']!r} "
            "(same shape). Mean values only transfer between identical weights.",
            UserWarning,
            stacklevel=3,
        )


def ablation_hooks(
    model: TransformerLensModel,
    profile: MassiveProfile | None = None,
    mode: str = "zero",
    *,
    layers: Sequence[int] | str | None = None,
    dims: int | Sequence[int] | None = None,
    hooks: str | Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    positions: PositionRule | None = None,
) -> HookList:
    """The paper's ablation as a hook list: massive entries set to zero or to their mean.

    With a profile, by default every massive dim is edited at every hook point
    where the profile found it massive, on each token kind it was found on: the
    start token at position 0; delimiters and other tokens only where the entry
    is massive in the input at hand (:func:`where_massive` with the profile's
    thresholds). ``mode="mean"`` writes the profile's mean for (hook, dim, kind).

    Args:
        model: the model to ablate; the profile must come from a model of its shape.
        profile: from :func:`massact_lens.profile`. Required for ``"mean"``.
            Without one, ``"zero"`` needs ``dims`` (positions default: where massive,
            with the paper's thresholds 100 / 1000).
        mode: ``"zero"`` or ``"mean"``.
        layers: only these layers (among the profile's hook points); ``"first"``:
            each dim only at the first hook point where it is massive (the paper's
            LLaMA2 setting).
        dims: only these dims (default: the profile's massive dims).
        hooks: explicit hook names or ``{layer}`` templates instead of the
            profile's points.
        kinds: only these token kinds (``"start"``, ``"delimiter"``, ``"other"``).
        positions: one rule for every kind instead of the kinds' rules (with
            ``"mean"``, select a single kind).

    Raises:
        ValueError: unknown mode; "mean" without a profile; a profile from a model
            of another shape; a layer, dim, kind or hook not in the model or profile.

    >>> from massact_lens import profile
    >>> from massact_lens.examples import minilm
    >>> model = minilm()
    >>> p = profile(model, ["The cat sat on the mat.", "It rained all day."], min_value=50, min_ratio=200, progress=False)
    >>> hooks = ablation_hooks(model, p, "mean")
    >>> [name for name, _ in hooks]
    ['embed.hook_in', 'pos_embed.hook_in', 'blocks.0.ln2.hook_in', 'blocks.1.ln2.hook_in', 'blocks.2.ln2.hook_in', 'blocks.3.ln2.hook_in']
    >>> hooks[2][1]
    EditHook(set to mean, dims [99], at start token)
    """
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean', not {mode!r}.")
    if isinstance(layers, str) and layers != "first":
        raise ValueError(f"layers must be a list of layers, None, or 'first', not {layers!r}.")
    if positions is not None:
        _rule(positions)
    if kinds is not None:
        bad = [k for k in kinds if k not in TOKEN_KINDS]
        if bad or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {TOKEN_KINDS}, not {kinds!r}.")
    if profile is None:
        if mode == "mean":
            raise ValueError(
                "mode='mean' writes each massive activation's mean over many inputs, so it needs a "
                "profile: p = massact_lens.profile(model, inputs, ...); ablation_hooks(model, p, 'mean')."
            )
        chosen = _dims(dims)
        if chosen is None:
            raise ValueError("Without a profile, pass dims=[...] (the massive dims to zero).")
        if layers == "first":
            raise ValueError("layers='first' needs a profile (it says where each dim first appears).")
        rule = positions or where_massive()
        return edit_hooks(model, EditHook("set", (0.0,), chosen, rule, "set to zero"), hooks=hooks, layers=layers)

    check_profile_matches(model, profile)
    plan = _ablation_plan(model, profile, layers, _dims(dims), hooks, kinds)
    if positions is not None and mode == "mean" and len({kind for _, _, kind in plan}) > 1:
        raise ValueError("With mode='mean' and one positions rule, select one token kind: kinds=['start'], for example.")
    rules: dict[str, PositionRule] = {}

    def rule_for(kind: str) -> PositionRule:
        if positions is not None:
            return positions
        if kind not in rules:
            base = kind_positions(kind, model, delimiters=frozenset(profile.delimiters))
            rules[kind] = base if kind == "start" else base & where_massive(profile.min_value, profile.min_ratio)
        return rules[kind]

    grouped: dict[tuple[str, str], list[int]] = {}
    for name, dim, kind in plan:
        grouped.setdefault((name, kind), []).append(dim)
    pairs: list[tuple[str, HookFn]] = []
    for (name, kind), group in grouped.items():
        if mode == "zero":
            edit = EditHook("set", (0.0,), tuple(group), rule_for(kind), "set to zero")
        else:
            edit = mean_hook(profile, name, group, kind, rule_for(kind))
        pairs.append((name, edit))
    return intervention_hooks(model, pairs)


def _ablation_plan(
    model: TransformerLensModel,
    profile: MassiveProfile,
    layers: Sequence[int] | str | None,
    dims: tuple[int, ...] | None,
    hooks: str | Sequence[str] | None,
    kinds: Sequence[str] | None,
) -> list[tuple[str, int, str]]:
    """(hook, dim, kind) triples to edit, in forward order of the profile's hook points."""
    if not profile.dims:
        raise ValueError(
            f"The profile found no massive activations (min_value={profile.min_value:g}, "
            f"min_ratio={profile.min_ratio:g}): nothing to ablate. Profile again with lower thresholds."
        )
    summaries = {d.dim: d for d in profile.dims}
    d_model = int(model.cfg.d_model)
    if dims is not None:
        bad = [d for d in dims if not 0 <= d < d_model]
        if bad:
            raise ValueError(f"Dims {bad} do not exist: the model has d_model={d_model}.")
        unknown = [d for d in dims if d not in summaries]
        if unknown:
            raise ValueError(f"Dims {unknown} are not massive in the profile (its massive dims: {list(summaries)}).")
    chosen = dims or tuple(summaries)
    order = {name: i for i, name in enumerate(profile.hook_names)}
    if hooks is not None:
        names = resolve_hook_names(model, hooks, None if layers in (None, "first") else layers)  # type: ignore[arg-type]
    elif layers is not None and layers != "first":
        n_layers = int(model.cfg.n_layers)
        bad = [layer for layer in layers if not 0 <= int(layer) < n_layers]
        if bad:
            raise ValueError(f"Layers {bad} do not exist: the model has {n_layers} layers (0..{n_layers - 1}).")
        scanned = sorted({layer_of(n) for n in profile.hook_names})
        missing = [layer for layer in layers if layer not in scanned]
        if missing:
            raise ValueError(f"Layers {missing} were not scanned by the profile (it covers layers {scanned}).")
        names = tuple(n for n in profile.hook_names if layer_of(n) in set(layers))
    else:
        names = None
    plan = []
    for dim in chosen:
        summary = summaries[dim]
        if names is None:
            points = summary.hook_names[:1] if layers == "first" else summary.hook_names
        else:
            points = names
        found_kinds = [k for k in TOKEN_KINDS if summary.kinds.get(k, 0) > 0]
        for kind in found_kinds if kinds is None else [k for k in kinds if k in found_kinds]:
            plan.extend((name, dim, kind) for name in points)
    if not plan:
        raise ValueError(f"Nothing to ablate: the profile's dims {list(chosen)} were never massive on kinds {list(kinds or [])}.")
    plan.sort(key=lambda t: (order.get(t[0], len(order)), t[1]))
    return plan


@contextlib.contextmanager
def ablated(
    model: TransformerLensModel,
    profile: MassiveProfile | None = None,
    mode: str = "zero",
    **kwargs: Any,
) -> Iterator[TransformerLensModel]:
    """Run the model with :func:`ablation_hooks` attached; they are gone afterwards.

    Works around any call: forward, ``run_with_cache``, ``generate``, and the
    evaluation functions. Other hook contexts nest inside or outside it.

    >>> import torch
    >>> from massact_lens import profile
    >>> from massact_lens.examples import minilm
    >>> model = minilm()
    >>> p = profile(model, ["A short sentence."], min_value=50, min_ratio=200, progress=False)
    >>> with ablated(model, p, "zero"):
    ...     _, cache = model.run_with_cache(model.to_tokens("Hello there."))
    >>> float(cache["blocks.0.ln2.hook_in"][0, 0, 99])
    0.0
    """
    hooks = ablation_hooks(model, profile, mode, **kwargs)
    with model.hooks(fwd_hooks=hooks):  # type: ignore[attr-defined]
        yield model


def announce_batch(fwd_hooks: Sequence[tuple[Any, HookFn]], attention_mask: torch.Tensor) -> None:
    """Tell every tracker in ``fwd_hooks`` the padding of the next forward pass."""
    for _, fn in fwd_hooks:
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, TokenTracker) and fn == owner.on_tokens:
            owner.expect(attention_mask)


# --------------------------------------------------------------------------- patching


@dataclass(frozen=True, eq=False)
class PatchHook:
    """Write a source run's values into the target's selected positions.

    ``source_values[row]`` is ``[n_positions, n_dims]``: the k-th selected source
    position goes to the k-th selected target position of the same row (or of
    every row when the source is one input). ``written`` collects what each call
    wrote (target row, position, dim, value before, value after).
    """

    source_values: tuple[torch.Tensor, ...]
    dims: tuple[int, ...] | None
    positions: PositionRule
    label: str = "patch"
    tracker: TokenTracker | None = None
    written: list[dict[str, Any]] = field(default_factory=list, repr=False, compare=False)

    def bound(self, tracker: TokenTracker) -> PatchHook:
        return replace(self, tracker=tracker, written=self.written)

    def __call__(
        self, activation: Float[torch.Tensor, "batch pos d_model"], *, hook: Any = None  # noqa: ARG002
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        if self.positions.needs_tokens and self.tracker is None:
            raise RuntimeError("This patch's position rule needs token ids: build it with patching_hooks(model, ...).")
        batch = int(activation.shape[0])
        if len(self.source_values) not in (1, batch):
            raise ValueError(f"The source has {len(self.source_values)} inputs; the target batch has {batch}. Use one source input, or as many as targets.")
        context = self.tracker.context(activation) if self.tracker is not None else _default_context(activation)
        index = None if self.dims is None else torch.tensor(self.dims, device=activation.device)
        selected = self.positions.select(activation, index, context)
        if selected.ndim == 3:
            selected = selected.any(dim=-1)
        selected = selected.expand(batch, -1)
        target = activation.clone() if activation.requires_grad else activation
        for row in range(batch):
            source = self.source_values[0 if len(self.source_values) == 1 else row].to(activation.device, activation.dtype)
            slots = selected[row].nonzero().flatten()[: source.shape[0]]
            if slots.numel() == 0:
                continue
            columns = index if index is not None else torch.arange(int(activation.shape[-1]), device=activation.device)
            before = target[row][slots][:, columns].detach().float().cpu()
            target[row, slots[:, None], columns[None]] = source[: slots.numel()]
            self.written.append({"row": row, "positions": slots.tolist(), "before": before, "after": source[: slots.numel()].detach().float().cpu()})
        return target


def patching_hooks(
    model: TransformerLensModel,
    source: Inputs,
    profile: MassiveProfile | None = None,
    *,
    hooks: str | Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    dims: int | Sequence[int] | None = None,
    positions: PositionRule | None = None,
    target_positions: PositionRule | None = None,
    prepend_bos: bool | None = None,
) -> HookList:
    """Run ``source`` once and return hooks that write its entries into later runs.

    At every hook point, the ``dims`` of the positions ``positions`` selects in the
    source (an entry-level rule such as :func:`where_massive` selects the positions
    where any chosen dim is massive) are recorded; in a target run they are
    written, in order, into the positions ``target_positions`` selects (default:
    the same rule, evaluated on the target).

    Args:
        source: one input (or one per target input), as strings or token ids.
        profile: gives defaults: dims = its massive dims, hooks = the points where
            they are massive, positions = where massive with its thresholds.
        positions: default (no profile): the start token.

    >>> from massact_lens.examples import minilm
    >>> model = minilm()
    >>> hooks = patching_hooks(model, "A source sentence.", dims=[99], layers=[0], hooks="blocks.{layer}.ln2.hook_in")
    >>> [name for name, _ in hooks]
    ['embed.hook_in', 'pos_embed.hook_in', 'blocks.0.ln2.hook_in']
    """
    chosen = _dims(dims)
    if profile is not None:
        check_profile_matches(model, profile)
        chosen = chosen or profile.massive_dims
        if hooks is None:
            hooks = sorted({n for d in profile.dims for n in d.hook_names}, key=profile.hook_names.index)
        if positions is None:
            positions = where_massive(profile.min_value, profile.min_ratio)
    if not chosen:
        raise ValueError("Say which dims to patch: dims=[...] or a profile with massive dims.")
    rule = _rule(positions or start_token())
    target_rule = _rule(target_positions or rule)
    names = resolve_hook_names(model, hooks, layers)
    for name in names:
        _check_dims(model, name, chosen)
    rule.check(model)
    target_rule.check(model)
    plan = plan_batches(model, source, batch_size=1 << 30, prepend_bos=prepend_bos)
    tracker = TokenTracker()
    tracker_hooks = tracker.hooks(model)
    recorded: dict[str, list[torch.Tensor]] = {}
    index_cpu = torch.tensor(chosen)

    def reader(name: str) -> HookFn:
        def read(activation: torch.Tensor, *, hook: Any = None) -> None:  # noqa: ARG001
            context = tracker.context(activation)
            index = index_cpu.to(activation.device)
            selected = rule.select(activation, index, context)
            if selected.ndim == 3:
                selected = selected.any(dim=-1)
            selected = selected.expand(int(activation.shape[0]), -1)
            if context.attention_mask is not None:
                selected = selected & context.attention_mask.bool()
            recorded[name] = [activation[row][selected[row]][:, index].detach().clone() for row in range(int(activation.shape[0]))]

        return read

    def make_hooks(batch: Batch) -> HookList:
        tracker.expect(batch.attention_mask)
        return tracker_hooks + [(name, reader(name)) for name in names]

    run_batches(model, plan, make_hooks, progress=False, desc="source")
    pairs = [
        (name, PatchHook(tuple(recorded[name]), chosen, target_rule, f"patch from source at {rule.describe()}"))
        for name in names
    ]
    return intervention_hooks(model, pairs)


@dataclass(frozen=True)
class PatchingResult:
    """How much patching a source's massive entries into targets changed them.

    ``output_cosine[i]``: cosine between target ``i``'s mean-pooled final hidden
    state with and without the patch (1.0: no change). ``entries``: one row per
    (hook, target, position, dim) written, with the value before and after.
    """

    model: dict[str, Any]
    hook_names: tuple[str, ...]
    dims: tuple[int, ...]
    positions: str
    target_positions: str
    output_cosine: tuple[float, ...]
    entries: pd.DataFrame = field(repr=False)

    @property
    def mean_output_cosine(self) -> float:
        return float(sum(self.output_cosine) / len(self.output_cosine))

    def to_dataframe(self) -> pd.DataFrame:
        """The written entries (hook, target, position, dim, before, after)."""
        return self.entries


def massive_patching(
    model: TransformerLensModel,
    source: Inputs,
    targets: Sequence[str] | str | torch.Tensor,
    profile: MassiveProfile | None = None,
    *,
    batch_size: int = 16,
    progress: bool = False,
    **kwargs: Any,
) -> PatchingResult:
    """Patch ``source``'s massive entries into each target; how much did the targets change?

    If the massive activations are input-agnostic biases (the paper's claim), a
    target barely changes when its own are replaced by another input's:
    ``output_cosine`` stays near 1. Keyword arguments go to :func:`patching_hooks`.

    >>> from massact_lens.examples import minilm
    >>> model = minilm()
    >>> r = massive_patching(model, "The source sentence.", ["A target.", "Another target here."],
    ...                      dims=[99], hooks="blocks.{layer}.ln2.hook_in", layers=[0, 1, 2, 3])
    >>> r.mean_output_cosine > 0.999
    True
    """
    from massact_lens.evaluate import sentence_embeddings

    hooks = patching_hooks(model, source, profile, **kwargs)
    patches = [(name, fn) for name, fn in hooks if isinstance(fn, PatchHook)]
    clean = sentence_embeddings(model, targets, batch_size=batch_size, progress=progress)
    patched = sentence_embeddings(model, targets, fwd_hooks=hooks, batch_size=batch_size, progress=progress)
    cosine = (clean * patched).sum(dim=-1)
    rows = []
    for name, fn in patches:
        for record in fn.written:
            for p, position in enumerate(record["positions"]):
                for c, dim in enumerate(fn.dims or range(record["before"].shape[1])):
                    rows.append(
                        {
                            "hook_name": name,
                            "target_row": record["row"],
                            "position": position,
                            "dim": dim,
                            "before": float(record["before"][p, c]),
                            "after": float(record["after"][p, c]),
                        }
                    )
    first = patches[0][1] if patches else None
    return PatchingResult(
        model=model_description(model),
        hook_names=tuple(name for name, _ in patches),
        dims=tuple(first.dims or ()) if first is not None else (),
        positions=first.label if first is not None else "",
        target_positions=first.positions.describe() if first is not None else "",
        output_cosine=tuple(float(c) for c in cosine),
        entries=pd.DataFrame(rows, columns=["hook_name", "target_row", "position", "dim", "before", "after"]),
    )


def hook_names_of(hooks: Sequence[tuple[Any, HookFn]]) -> tuple[str, ...]:
    """The hook-point names an edit list touches (trackers and filters left out)."""
    out = []
    for name, fn in hooks:
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, TokenTracker):
            continue
        out.append(name if isinstance(name, str) else getattr(name, "__name__", "filter"))
    return tuple(out)
