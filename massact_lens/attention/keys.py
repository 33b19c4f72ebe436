"""Key sets: which key positions form C. They are position rules.

Everything the ``positions=`` argument of the attention functions accepts (rule
names, key indices, bool masks, callables, a profile, ``find_massive`` records, any
:class:`~massact_lens.interventions.PositionRule`) becomes one rule through
:func:`as_rule`, checked before any forward pass; :func:`key_mask` evaluates it on
a batch. Padding keys are never in C.

>>> import torch
>>> from massact_lens._core.batching import Batch
>>> from massact_lens.examples import tiny_model
>>> batch = Batch(torch.tensor([[3, 4, 5], [6, 7, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]), 0)
>>> key_mask(as_rule(tiny_model(), [0, 2], None), batch).tolist()
[[True, False, True], [True, False, False]]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from jaxtyping import Bool, Float
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.batching import Batch, BatchPlan, plan_batches
from massact_lens.find.criterion import MassiveActivations
from massact_lens.find.profiles import MassiveProfile
from massact_lens.interventions.lists import check_profile_matches
from massact_lens.interventions.positions import (
    PositionRule,
    RunContext,
    WhereMassive,
    WrappedRule,
    at_positions,
    delimiter_positions,
    in_any_order,
    start_token,
)

__all__ = ["TOKEN_RULES", "MassiveTokens", "Positions", "as_rule", "key_mask"]

#: Named token rules accepted as ``positions``.
TOKEN_RULES: tuple[str, ...] = ("start", "delimiters", "first_delimiter", "massive")


@dataclass(frozen=True, repr=False)
class MassiveTokens(WhereMassive):
    """:func:`~massact_lens.interventions.where_massive` as a key set, checked when used.

    A position is in C for an input when, at any of ``hooks`` (default: the
    residual points of :func:`massact_lens.residual_hook_names`), one of its entries
    (in ``dims``, default any) passes :class:`massact_lens.find.criterion.Criterion`, read
    in the same forward pass. The same C is used at every layer.

    >>> MassiveTokens(min_value=50, min_ratio=200).describe()
    'massive(min_value=50.0, min_ratio=200.0, hooks=residual, dims=any)'
    """

    reads_input_index = True  # decided from the activation of each row itself

    @classmethod
    def from_profile(cls, massive_profile: MassiveProfile) -> MassiveTokens:
        """The rule a profile implies: its dims, at its hooks, with its thresholds."""
        if not massive_profile.massive_dims:
            raise ValueError(
                "This MassiveProfile found no massive dims, so it defines an empty set of key "
                "positions. Profile with lower min_value / min_ratio, or pass positions='start'."
            )
        return cls(massive_profile.min_value, massive_profile.min_ratio, tuple(massive_profile.hook_names), tuple(massive_profile.massive_dims))

    def describe(self) -> str:
        hooks = "residual" if self.hooks is None else ",".join(self.hooks)
        dims = "any" if self.dims is None else ",".join(str(d) for d in self.dims)
        return f"massive(min_value={float(self.min_value)}, min_ratio={float(self.min_ratio)}, hooks={hooks}, dims={dims})"


#: What ``positions=`` accepts.
Positions = (
    str
    | int
    | Sequence[int]
    | Sequence[str]
    | torch.Tensor
    | PositionRule
    | MassiveProfile
    | MassiveActivations
    | Callable[[Batch], torch.Tensor]
)


def fit_width(mask: torch.Tensor, width: int) -> torch.Tensor:
    """A ``[rows, key_pos]`` mask cut or padded (with False) to ``width`` key positions."""
    if mask.shape[1] >= width:
        return mask[:, :width]
    return torch.nn.functional.pad(mask, (0, width - mask.shape[1]), value=False)


def _batch_of(ctx: RunContext, rule: PositionRule) -> Batch:
    if ctx.batch is None:
        raise RuntimeError(
            f"The key set {rule.describe()} is per input: it needs the batch of this pass. Run it "
            "through massact_lens._core.batching.run_batches, or call batching.announce(hooks, batch) first."
        )
    return ctx.batch


class _Labelled(WrappedRule):
    """A rule under another name (the named key sets: "start", "delimiters", ...)."""

    reads_input_index = True  # when the inner rule does (in_any_order)

    def __init__(self, rule: PositionRule, label: str) -> None:
        super().__init__(rule)
        self.label = label

    def describe(self) -> str:
        return self.label


class _Mask(PositionRule):
    """A bool mask ``[key_pos]`` for every input, or ``[n_inputs, key_pos]``."""

    reads_input_index = True

    def __init__(self, mask: torch.Tensor) -> None:
        self.tensor = mask.detach().cpu().bool()

    def select(self, activation: Float[torch.Tensor, "batch pos ..."], dims: torch.Tensor | None, ctx: RunContext) -> Bool[torch.Tensor, "_ pos *cols"]:  # noqa: ARG002
        width = int(activation.shape[1])
        if self.tensor.ndim == 1:
            return fit_width(self.tensor[None], width).to(activation.device)
        inputs = _batch_of(ctx, self).input_indices
        if max(inputs) >= self.tensor.shape[0]:
            raise ValueError(
                f"The positions mask has {self.tensor.shape[0]} rows but there are at least "
                f"{max(inputs) + 1} inputs: give one row per input."
            )
        return fit_width(self.tensor[inputs], width).to(activation.device)

    def describe(self) -> str:
        return f"mask{list(self.tensor.shape)}"


class _Callable(PositionRule):
    """``fn(batch) -> Bool[batch, key_pos]``."""

    def __init__(self, fn: Callable[[Batch], torch.Tensor]) -> None:
        self.fn = fn

    def select(self, activation: Float[torch.Tensor, "batch pos ..."], dims: torch.Tensor | None, ctx: RunContext) -> Bool[torch.Tensor, "_ pos *cols"]:  # noqa: ARG002
        out = self.fn(_batch_of(ctx, self))
        n = int(activation.shape[0])
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != n:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"The positions callable must return a bool tensor [batch, key_pos] = [{n}, ...] "
                f"for a batch of {n} inputs; it returned {shape}."
            )
        if out.is_floating_point():
            raise ValueError("The positions callable returned a float tensor: return a bool mask (True = in C).")
        return fit_width(out.detach().bool(), int(activation.shape[1])).to(activation.device)

    def describe(self) -> str:
        return f"callable:{getattr(self.fn, '__qualname__', type(self.fn).__name__)}"


class _Records(PositionRule):
    """The positions of :func:`~massact_lens.find_massive` records, per scanned input."""

    reads_input_index = True

    def __init__(self, found: MassiveActivations) -> None:
        self.found = found
        self.by_input: dict[int, set[int]] = {}
        for record in found:
            self.by_input.setdefault(record.input_index, set()).add(record.position)

    def check_batch(self, batch: Batch) -> None:
        lengths = self.found.scan.lengths
        inputs = batch.input_indices
        if max(inputs) >= lengths.shape[0]:
            raise ValueError(
                f"positions came from a scan of {lengths.shape[0]} inputs, but there are at least "
                f"{max(inputs) + 1}: pass the inputs that were scanned."
            )
        if not torch.equal(batch.lengths.cpu(), lengths[inputs].cpu()):
            raise ValueError(
                "positions came from a scan of other inputs (token counts differ): pass the same "
                "inputs, with the same prepend_bos, as the scan that find_massive read."
            )

    def select(self, activation: Float[torch.Tensor, "batch pos ..."], dims: torch.Tensor | None, ctx: RunContext) -> Bool[torch.Tensor, "_ pos *cols"]:  # noqa: ARG002
        batch = _batch_of(ctx, self)
        self.check_batch(batch)
        out = torch.zeros(activation.shape[:2], dtype=torch.bool)
        for row in range(out.shape[0]):
            for position in self.by_input.get(batch.input_index(row), ()):
                out[row, position] = True
        return out.to(activation.device)

    def describe(self) -> str:
        found = self.found
        return f"find_massive(min_value={found.min_value}, min_ratio={found.min_ratio}, {len(found)} records)"


def key_mask(
    rule: PositionRule, batch: Batch, found: Mapping[PositionRule, torch.Tensor] | None = None
) -> Bool[torch.Tensor, "batch pos"]:
    """C for each input of ``batch``: the real positions ``rule`` selects.

    ``found``: for each :class:`~massact_lens.interventions.WhereMassive` leaf of
    the rule, what it found in the residual stream of this pass (the attention
    functions read it; see :mod:`massact_lens.attention._passes`).

    >>> from massact_lens.interventions import start_token
    >>> batch = Batch(torch.tensor([[3, 4], [5, 6]]), torch.ones(2, 2, dtype=torch.long), 0)
    >>> key_mask(start_token(), batch).tolist()
    [[True, False], [True, False]]
    """
    tokens = batch.tokens
    n, width = int(tokens.shape[0]), int(tokens.shape[1])
    ctx = RunContext(torch.arange(width, device=tokens.device)[None], tokens, batch.attention_mask, batch, found)
    selected = rule.select(torch.zeros(n, width, 0, device=tokens.device), None, ctx)
    if selected.ndim == 3:
        selected = selected.any(dim=-1)
    return selected.expand(n, width) & batch.attention_mask.bool().to(selected.device)


def _named(model: TransformerLensModel, names: tuple[str, ...]) -> PositionRule:
    if ("delimiters" in names or "first_delimiter" in names) and getattr(model, "tokenizer", None) is None:
        raise ValueError(
            "The 'delimiters' rules need the model's tokenizer to read tokens; this model has none. "
            "Pass key indices or a mask instead."
        )
    rules: list[PositionRule] = [start_token()] if "start" in names else []
    if "delimiters" in names:
        rules.append(delimiter_positions(model))
    elif "first_delimiter" in names:
        rules.append(delimiter_positions(model, first_only=True))
    combined = rules[0]
    for rule in rules[1:]:
        combined = combined | rule
    return _Labelled(combined, "+".join(names))


def _from_records(found: MassiveActivations) -> PositionRule:
    if len(found) == 0:
        raise ValueError(
            "positions is an empty MassiveActivations: find_massive found nothing, so C would be "
            "empty. Lower min_value / min_ratio, or pass positions='start'."
        )
    return _Records(found)


def _from_mask(mask: torch.Tensor) -> PositionRule:
    if mask.is_floating_point() or mask.ndim not in (1, 2):
        raise ValueError(
            f"A positions tensor must be a bool mask [key_pos] or [n_inputs, key_pos]; got "
            f"{mask.dtype} {tuple(mask.shape)}."
        )
    if not bool(mask.bool().any()):
        raise ValueError("The positions mask is all False: C is empty. Mark at least one key position.")
    return _Mask(mask)


def check_plan(rule: PositionRule, plan: BatchPlan) -> None:
    """The per-input parts of ``rule`` (scan records, a mask with a row per input) against
    the inputs ``plan`` batches, before any pass (ValueError)."""
    for leaf in rule.leaves():
        if isinstance(leaf, _Records):
            n_scanned = leaf.found.scan.n_inputs
            if plan.n_inputs is not None and plan.n_inputs != n_scanned:
                raise ValueError(
                    f"positions came from a scan of {n_scanned} inputs, but {plan.n_inputs} inputs were "
                    "given: pass the inputs that were scanned."
                )
            if isinstance(plan.batches, list):
                for batch in plan.batches:
                    leaf.check_batch(batch)
        elif isinstance(leaf, _Mask) and leaf.tensor.ndim == 2 and plan.n_inputs not in (None, leaf.tensor.shape[0]):
            raise ValueError(
                f"The positions mask has {leaf.tensor.shape[0]} rows for {plan.n_inputs} inputs: give one row per input."
            )


def _from_list(model: TransformerLensModel, items: list[Any]) -> PositionRule | None:
    if not items:
        raise ValueError("positions is empty: C needs at least one key position (e.g. 'start', [0], or a mask).")
    if all(isinstance(p, str) for p in items):
        unknown = [p for p in items if p not in TOKEN_RULES]
        if unknown:
            raise ValueError(f"Unknown position rule(s) {unknown}: use {list(TOKEN_RULES)}, indices, a mask or a callable.")
        if "massive" in items:
            if len(items) > 1:
                raise ValueError("'massive' cannot be combined with other rules; combine rules with | instead.")
            return MassiveTokens()
        return _named(model, tuple(dict.fromkeys(items)))
    if all(isinstance(p, int) and not isinstance(p, bool) for p in items):
        n_ctx = int(model.cfg.n_ctx)
        bad = [p for p in items if not 0 <= p < n_ctx]
        if bad:
            raise ValueError(
                f"Key positions {bad} do not exist: indices must lie in [0, {n_ctx}) (n_ctx); "
                "negative indices are not supported (padding makes them ambiguous)."
            )
        return at_positions(sorted(set(items)), strict=False)
    return None


def keyed_plan(
    model: TransformerLensModel,
    inputs: Any,
    positions: Any,
    *,
    batch_size: int,
    attention_mask: torch.Tensor | None,
    prepend_bos: bool | None,
    by_length: bool | None = None,
) -> tuple[BatchPlan, PositionRule]:
    """The batches of an attention pass and its checked key set. ``by_length``: longest
    first (True), in input order (False), or longest first when the key set allows it
    (None: :func:`~massact_lens.interventions.positions.in_any_order`; a callable or a
    rule of your own then gets the batches in input order).

    >>> from massact_lens.examples import tiny_model
    >>> tokens, mask = torch.ones(3, 4, dtype=torch.long), torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    >>> plan, rule = keyed_plan(tiny_model(), tokens, "start", batch_size=2, attention_mask=mask, prepend_bos=None)
    >>> [b.input_indices for b in plan.batches]
    [[1, 2], [0]]
    >>> plan, rule = keyed_plan(tiny_model(), tokens, lambda b: b.tokens > 0, batch_size=2, attention_mask=mask,
    ...                         prepend_bos=None)
    >>> [b.input_indices for b in plan.batches]
    [[0, 1], [2]]
    """
    rule = as_rule(model, positions, None)
    if by_length is None:
        by_length = in_any_order(rule)
    plan = plan_batches(model, inputs, batch_size=batch_size, attention_mask=attention_mask, prepend_bos=prepend_bos,
                        by_length=by_length)
    check_plan(rule, plan)
    return plan, rule


def as_rule(model: TransformerLensModel, positions: Any, plan: BatchPlan | None) -> PositionRule:
    """``positions`` as one checked :class:`~massact_lens.interventions.PositionRule`, before any pass.

    Accepts a rule name of :data:`TOKEN_RULES` (or a list of them: their union),
    key indices (an int or a list; an index past an input's length is absent from
    it), a bool mask ``[key_pos]`` or ``[n_inputs, key_pos]``, a callable
    ``(batch) -> Bool[batch, key_pos]``, a :class:`~massact_lens.find.criterion.MassiveProfile`
    (its dims, hooks and thresholds), :class:`~massact_lens.find.criterion.MassiveActivations`
    from a scan of the same inputs, or any position rule. ``plan`` (the batches
    to come, when known) lets per-input key sets be checked against the inputs.

    >>> from massact_lens.examples import tiny_model
    >>> as_rule(tiny_model(), "start", None), as_rule(tiny_model(), [0, 3], None)
    (start, indices[0, 3])
    """
    if isinstance(positions, MassiveProfile):
        check_profile_matches(model, positions)  # its dims and thresholds are this model's
        positions = MassiveTokens.from_profile(positions)
    if isinstance(positions, str):
        positions = [positions]
    if isinstance(positions, int) and not isinstance(positions, bool):
        positions = [positions]
    rule: PositionRule | None = None
    if isinstance(positions, PositionRule):
        rule = positions
    elif isinstance(positions, MassiveActivations):
        rule = _from_records(positions)
    elif isinstance(positions, torch.Tensor):
        rule = _from_mask(positions)
    elif callable(positions):
        rule = _Callable(cast(Callable[[Batch], torch.Tensor], positions))
    elif isinstance(positions, Sequence):
        rule = _from_list(model, list(positions))
    if rule is None:
        raise TypeError(
            f"Cannot use positions of type {type(positions).__name__}: pass a rule name {list(TOKEN_RULES)}, "
            "key indices, a bool mask, a position rule (MassiveTokens, where_massive, start_token(), ...), "
            "a MassiveProfile / MassiveActivations, or a callable (batch) -> bool mask [batch, key_pos]."
        )
    rule.check(model)
    if plan is not None:
        check_plan(rule, plan)
    return rule
