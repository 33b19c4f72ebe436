"""Which positions: the one family of position rules, and the rules that need no tokens.

A :class:`PositionRule` says where an edit applies and which keys form an attention
key set; rules combine with ``|``, ``&`` and ``~``. What a rule knows about the pass
in progress is a :class:`~massact_lens.interventions.context.RunContext`; rules that
read token ids (delimiters, token kinds) live in :mod:`.token_rules`, and everything
``positions=`` accepts becomes a rule through :func:`~massact_lens.interventions.coerce.as_positions`.

>>> import torch
>>> context = RunContext(torch.arange(4)[None])
>>> (start_token() | at_positions(2)).select(torch.zeros(1, 4, 2), None, context)
tensor([[ True, False,  True, False]])
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.hook_names import resolve_hook_names
from massact_lens.find.criterion import Criterion
from massact_lens.interventions.context import RunContext, TokenTracker, default_context

# The rules; WrappedRule (a base for rules of your own around another) and the helpers
# of the library's passes (as_position_rule, in_any_order, run_context) import from here.
__all__ = ["PositionRule", "WhereMassive", "all_positions", "at_positions", "start_token", "where_massive"]


# --------------------------------------------------------------------------- rules


class PositionRule:
    """Where an edit applies, or which keys form an attention key set.

    :meth:`select` returns a boolean mask of positions, ``[1 or batch, pos]``, or of
    single entries, ``[1 or batch, pos, n_dims]`` (one column per edited dim).
    :meth:`check` validates against a model before any forward pass. Rules
    combine: ``a | b``, ``a & b``, ``~a``.
    """

    #: The rule reads token ids (needs a :class:`TokenTracker`).
    needs_tokens: bool = False
    #: The rule reads the activation itself (:func:`where_massive`).
    reads_activation: bool = False
    #: The rule gives an input the same positions whatever batch it runs in (it names a
    #: row's input by ``ctx.batch.input_index(row)``, or needs no input at all): the
    #: attention functions may then batch longest first (:func:`in_any_order`). Read
    #: from the rule's own class (or instance), never inherited: False for rules of your
    #: own, subclasses of the library's included, unless they set it.
    reads_input_index: bool = False

    def select(
        self, activation: Float[torch.Tensor, "batch pos ..."], dims: torch.Tensor | None, ctx: RunContext
    ) -> Bool[torch.Tensor, "_ pos *cols"]:
        raise NotImplementedError

    def check(self, model: TransformerLensModel) -> None:  # noqa: ARG002
        """Validate against ``model`` before any forward pass (raise ValueError)."""
        return

    def leaves(self) -> tuple[PositionRule, ...]:
        """The rules this one is built from (itself for a simple rule)."""
        return (self,)

    def for_model(self, model: TransformerLensModel) -> PositionRule:
        """This rule checked against ``model`` (:meth:`check`), with what it reads from the
        model filled in: itself, unless a part was given before the model was known (the
        rule name ``"delimiters"`` in ``zero_hook(positions="delimiters")``, say)."""
        self.check(model)
        return self

    def describe(self) -> str:
        return type(self).__name__

    def __or__(self, other: PositionRule) -> PositionRule:
        return _Combined("|", (self, as_position_rule(other)))

    def __and__(self, other: PositionRule) -> PositionRule:
        return _Combined("&", (self, as_position_rule(other)))

    def __invert__(self) -> PositionRule:
        return _Not(self)

    def __repr__(self) -> str:
        return self.describe()


def as_position_rule(value: Any) -> PositionRule:
    """``value`` if it is a :class:`PositionRule`; TypeError naming the constructors otherwise.

    >>> as_position_rule(start_token())
    start token
    """
    if not isinstance(value, PositionRule):
        raise TypeError(
            f"Expected a position rule (start_token(), at_positions(...), delimiter_positions(...), "
            f"where_massive(...), all_positions()), not {type(value).__name__}."
        )
    return value


class _All(PositionRule):
    reads_input_index = True

    def select(self, activation: Float[torch.Tensor, "batch pos ..."], dims: torch.Tensor | None, ctx: RunContext) -> Bool[torch.Tensor, "_ pos *cols"]:  # noqa: ARG002
        return torch.ones(1, int(activation.shape[1]), dtype=torch.bool, device=activation.device)

    def describe(self) -> str:
        return "all positions"


class _Start(PositionRule):
    reads_input_index = True

    def select(self, activation: Float[torch.Tensor, "batch pos ..."], dims: torch.Tensor | None, ctx: RunContext) -> Bool[torch.Tensor, "_ pos *cols"]:  # noqa: ARG002
        return ctx.positions.to(activation.device) == 0

    def describe(self) -> str:
        return "start token"


class _At(PositionRule):
    """Explicit positions. ``strict``: an index beyond the input raises (else it is absent)."""

    reads_input_index = True

    def __init__(self, indices: tuple[int, ...], strict: bool = True) -> None:
        self.indices = indices
        self.strict = strict
        # Strict raises for an index past the batch's padded width: that depends on the batch.
        self.reads_input_index = not strict

    def check(self, model: TransformerLensModel) -> None:
        n_ctx = int(model.cfg.n_ctx)
        bad = [i for i in self.indices if not -n_ctx <= i < n_ctx]
        if bad:
            raise ValueError(f"Positions {bad} do not exist: the model's context has {n_ctx} positions (0..{n_ctx - 1}, or -1..-{n_ctx}).")

    def select(self, activation: Float[torch.Tensor, "batch pos ..."], dims: torch.Tensor | None, ctx: RunContext) -> Bool[torch.Tensor, "_ pos *cols"]:  # noqa: ARG002
        n = int(activation.shape[1])
        positions = ctx.positions.to(activation.device)
        out = torch.zeros_like(positions, dtype=torch.bool)
        fresh = ctx.starts_sequence
        lengths = ctx.real(activation).sum(dim=1, keepdim=True)
        local = torch.arange(n, device=activation.device)[None]
        for index in self.indices:
            if index >= 0:
                if self.strict and fresh and index >= int(positions.max()) + 1:
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
        return f"positions {list(self.indices)}" if self.strict else f"indices{list(self.indices)}"


@dataclass(frozen=True, repr=False)
class WhereMassive(PositionRule):
    """Entries massive in *this* input (:class:`massact_lens.find.criterion.Criterion`), decided at run time.

    In an edit it reads the edited activation. As an attention key set the
    attention functions read the residual stream at ``hooks`` (default the
    residual points of :func:`massact_lens.residual_hook_names`) in the same pass,
    and a position is in the set when one of its entries (in ``dims``, default any)
    is massive at any of those hooks. Build it with :func:`where_massive`.

    Like :func:`~massact_lens.find_massive`, it keeps the token-sparse entries: an entry
    whose dim passes on more than half of the real tokens of its hidden state belongs to
    an outlier channel and is left out
    (:meth:`~massact_lens.find.criterion.Criterion.token_sparse`), unless ``channel_wide``.
    """

    reads_input_index = True  # decided from the activation of each row itself

    min_value: float | int = 100.0
    min_ratio: float | int = 1000.0
    hooks: Sequence[str] | None = None
    dims: Sequence[int] | None = None
    channel_wide: bool = False

    reads_activation = True

    def __post_init__(self) -> None:
        # Frozen and hashable whatever sequences were passed.
        if self.hooks is not None:
            object.__setattr__(self, "hooks", (self.hooks,) if isinstance(self.hooks, str) else tuple(self.hooks))
        if self.dims is not None:
            object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))

    @classmethod
    def of(cls, criterion: Criterion, hooks: str | Sequence[str] | None = None, dims: Sequence[int] | None = None,
           channel_wide: bool = False) -> WhereMassive:
        """The rule of ``criterion`` (at ``hooks``, in ``dims``; outlier channels too if ``channel_wide``)."""
        return cls(criterion.min_value, criterion.min_ratio, hooks, dims, channel_wide)

    @functools.cached_property
    def criterion(self) -> Criterion:
        """The thresholds as one :class:`~massact_lens.find.criterion.Criterion`, built once
        (ValueError if not positive: checked when the rule is used, not when it is made)."""
        return Criterion(self.min_value, self.min_ratio)

    def check(self, model: TransformerLensModel) -> None:
        self.criterion  # noqa: B018 (validates the thresholds)
        if not isinstance(self.channel_wide, bool):
            raise TypeError(f"{type(self).__name__}.channel_wide must be True or False, not {self.channel_wide!r}.")
        if self.dims is not None:
            d_model = int(model.cfg.d_model)
            if not self.dims:
                raise ValueError(f"{type(self).__name__}.dims is empty: pass None for any dim, or some dims.")
            bad = [d for d in self.dims if not 0 <= d < d_model]
            if bad:
                raise ValueError(f"{type(self).__name__} dims {bad} do not exist: d_model is {d_model}; pass dims "
                                 f"among 0..{d_model - 1}, or None for any dim.")
        self.key_hooks(model)

    def key_hooks(self, model: TransformerLensModel) -> tuple[str, ...]:
        """The hook points read when this rule is a key set."""
        return resolve_hook_names(model, None if self.hooks is None else list(self.hooks))

    def select(self, activation: Float[torch.Tensor, "batch pos ..."], dims: torch.Tensor | None, ctx: RunContext) -> Bool[torch.Tensor, "_ pos *cols"]:
        if ctx.found is not None and self in ctx.found:
            return ctx.found[self].to(activation.device)
        real = ctx.real(activation)
        entries = self.criterion.entries(activation, real, dims)
        if not self.channel_wide:
            entries = self.criterion.token_sparse(entries, real)
        if self.dims is not None:
            columns = dims if dims is not None else torch.arange(int(activation.shape[-1]), device=activation.device)
            entries = entries & torch.isin(columns, torch.tensor(self.dims, device=columns.device))
        return entries

    def describe(self) -> str:
        out = f"where |x| > {float(self.min_value):g} and >= {float(self.min_ratio):g} x median"
        if self.hooks is not None:
            out += f" at {','.join(self.hooks)}"
        if self.dims is not None:
            out += f" in dims {list(self.dims)}"
        if self.channel_wide:
            out += ", outlier channels included"
        return out


class _Combined(PositionRule):
    reads_input_index = True  # when every part does (in_any_order)

    def __init__(self, op: str, rules: tuple[PositionRule, ...]) -> None:
        self.op = op
        self.rules = rules
        self.needs_tokens = any(r.needs_tokens for r in rules)
        self.reads_activation = any(r.reads_activation for r in rules)

    def check(self, model: TransformerLensModel) -> None:
        for rule in self.rules:
            rule.check(model)

    def for_model(self, model: TransformerLensModel) -> PositionRule:
        rules = tuple(rule.for_model(model) for rule in self.rules)
        return self if all(a is b for a, b in zip(rules, self.rules, strict=True)) else _Combined(self.op, rules)

    def leaves(self) -> tuple[PositionRule, ...]:
        return tuple(leaf for rule in self.rules for leaf in rule.leaves())

    def select(self, activation: Float[torch.Tensor, "batch pos ..."], dims: torch.Tensor | None, ctx: RunContext) -> Bool[torch.Tensor, "_ pos *cols"]:
        parts = [r.select(activation, dims, ctx) for r in self.rules]
        if any(p.ndim == 3 for p in parts):
            parts = [p if p.ndim == 3 else p[..., None] for p in parts]
        out = parts[0]
        for p in parts[1:]:
            out = (out | p) if self.op == "|" else (out & p)
        return out

    def describe(self) -> str:
        return "(" + f" {self.op} ".join(r.describe() for r in self.rules) + ")"


class WrappedRule(PositionRule):
    """A rule around one other rule: its needs, checks and leaves are the inner rule's."""

    def __init__(self, rule: PositionRule) -> None:
        self.rule = rule
        self.needs_tokens = rule.needs_tokens
        self.reads_activation = rule.reads_activation

    def check(self, model: TransformerLensModel) -> None:
        self.rule.check(model)

    def for_model(self, model: TransformerLensModel) -> PositionRule:
        inner = self.rule.for_model(model)
        if inner is self.rule:
            return super().for_model(model)
        out = copy.copy(self)
        WrappedRule.__init__(out, inner)
        return out

    def leaves(self) -> tuple[PositionRule, ...]:
        return self.rule.leaves()

    def select(self, activation: Float[torch.Tensor, "batch pos ..."], dims: torch.Tensor | None, ctx: RunContext) -> Bool[torch.Tensor, "_ pos *cols"]:
        return self.rule.select(activation, dims, ctx)


class _Not(WrappedRule):
    reads_input_index = True  # when the inner rule does (in_any_order)

    def select(self, activation: Float[torch.Tensor, "batch pos ..."], dims: torch.Tensor | None, ctx: RunContext) -> Bool[torch.Tensor, "_ pos *cols"]:
        return ~self.rule.select(activation, dims, ctx)

    def describe(self) -> str:
        return f"not {self.rule.describe()}"


def in_any_order(rule: PositionRule) -> bool:
    """Whether ``rule`` gives each input the same positions in batches of any order: it and
    every rule it is built from declare ``reads_input_index`` in their own class (or
    instance). A pass may then batch its inputs longest first.

    >>> in_any_order(start_token() | at_positions([2], strict=False)), in_any_order(at_positions([2]))
    (True, False)
    """
    declared = vars(rule).get("reads_input_index", type(rule).__dict__.get("reads_input_index", False))
    if not declared:
        return False
    if isinstance(rule, _Combined):
        return all(in_any_order(part) for part in rule.rules)
    if isinstance(rule, WrappedRule):
        return in_any_order(rule.rule)
    return True


def run_context(tracker: TokenTracker | None, rule: PositionRule, activation: torch.Tensor, owner: str) -> RunContext:
    """The context a hook's rule sees: from ``tracker``, else positions ``0..pos-1``.

    RuntimeError (naming ``owner``) when the rule needs token ids and there is no tracker.

    >>> run_context(None, start_token(), torch.zeros(1, 3, 2), "hook").positions.tolist()
    [[0, 1, 2]]
    """
    if tracker is not None:
        return tracker.context(activation)
    if rule.needs_tokens:
        raise RuntimeError(
            f"This {owner}'s position rule ({rule.describe()}) needs the batch's token ids. "
            "Build the hook list with intervention_hooks(model, [(name, hook)]) or edit_hooks(...), "
            "which put a TokenTracker first."
        )
    return default_context(activation)


# --------------------------------------------------------------------------- constructors


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


def at_positions(*indices: int | Sequence[int], strict: bool = True) -> PositionRule:
    """Explicit positions; a negative index counts from the end of each input.

    A non-negative index beyond the input raises ValueError when the hook runs
    (``strict=False``: it is absent from that input, as attention key indices);
    beyond the model's context, when the hook list is built.

    >>> at_positions(0, 3, -1), at_positions(0, 5, strict=False)
    (positions [0, 3, -1], indices[0, 5])
    """
    flat: list[Any] = []
    for index in indices:
        if isinstance(index, Sequence) and not isinstance(index, str):
            flat.extend(index)
        else:
            flat.append(index)
    if not flat or any(isinstance(i, bool) or not isinstance(i, int) for i in flat):
        raise ValueError(f"at_positions needs one or more integer positions, not {indices!r}.")
    return _At(tuple(int(i) for i in flat), bool(strict))


def where_massive(
    min_value: float | int = 100.0,
    min_ratio: float | int = 1000.0,
    hooks: str | Sequence[str] | None = None,
    dims: Sequence[int] | None = None,
    *,
    criterion: Criterion | None = None,
    channel_wide: bool = False,
) -> WhereMassive:
    """Entries that are massive in *this* input, decided from the activation at run time.

    An entry passes when ``|x| > min_value`` and ``|x| >= min_ratio x median |x|``
    of its hidden state (one input, real positions when the padding is known, all
    dims): :class:`massact_lens.find.criterion.Criterion`. In an edit it selects single
    (position, dim) entries of the edited activation, so one hook list serves a
    whole batch; as an attention key set it reads the residual stream at ``hooks``
    (see :class:`WhereMassive`). ``dims`` restricts the entries tested.
    ``criterion``: the thresholds as one :class:`~massact_lens.find.criterion.Criterion`
    (a profile's ``.criterion``, say) instead of ``min_value`` / ``min_ratio``.

    As :func:`~massact_lens.find_massive`, it selects the token-sparse entries (the
    paper's massive activations): an entry whose dim passes on more than half of the real
    tokens of its hidden state is an outlier channel and is left out (decided per input
    and hook point). ``channel_wide=True`` selects those too.

    >>> where_massive(50, 200), where_massive(criterion=Criterion(50, 200)) == where_massive(50, 200)
    (where |x| > 50 and >= 200 x median, True)
    >>> where_massive(50, 200, channel_wide=True)
    where |x| > 50 and >= 200 x median, outlier channels included
    """
    if not isinstance(channel_wide, bool):
        raise TypeError(f"channel_wide must be True or False, not {channel_wide!r}.")
    listed = [dims] if isinstance(dims, int) else dims
    if listed is not None and (isinstance(listed, str) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0
                                                              for d in listed)):
        raise ValueError(f"dims must be a list of dims >= 0 (or None for any dim), not {dims!r}.")
    return WhereMassive.of(criterion or Criterion(min_value, min_ratio), hooks, dims, channel_wide)
