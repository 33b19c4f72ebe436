"""One coercer for ``positions=``: edits and attention key sets accept the same things.

:func:`as_positions` turns everything a user may pass as positions into one
:class:`~massact_lens.interventions.positions.PositionRule`: a rule name (``"start"``,
its alias ``"bos"``, ``"delimiters"``, ``"first_delimiter"``, ``"massive"``, or a list
of them: their union), indices, a bool mask ``[key_pos]`` or ``[n_inputs, key_pos]``,
a callable ``(batch) -> Bool[batch, key_pos]``, a set of massive activations (records
of one scan, or a profile checked against the model) or any position rule. The edit
hooks (``zero_hook(positions=...)``) and the attention functions both call it.

>>> from massact_lens.examples import tiny_model
>>> model = tiny_model()
>>> as_positions(model, "bos"), as_positions(model, [0, 3]), as_positions(model, ["start", "bos"])
(start, indices[0, 3], start)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from jaxtyping import Bool, Float, Int
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._fingerprint import other_weights
from massact_lens._core.batching import Batch, BatchPlan
from massact_lens._core.types import Provenance
from massact_lens.find.criterion import MassiveActivations, MassiveSet
from massact_lens.interventions.context import RunContext
from massact_lens.interventions.positions import (
    PositionRule,
    WhereMassive,
    WrappedRule,
    at_positions,
    start_token,
)
from massact_lens.interventions.token_rules import delimiter_positions

__all__ = ["TOKEN_RULES", "MassiveTokens", "Positions", "as_positions", "check_profile_matches"]

#: Named token rules accepted as ``positions`` (``"bos"`` is another name for ``"start"``).
TOKEN_RULES: tuple[str, ...] = ("start", "delimiters", "first_delimiter", "massive")
_ALIASES = {"bos": "start"}


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
    def from_profile(cls, massive: MassiveSet) -> MassiveTokens:
        """The rule a profile implies: its dims, at its hooks, with its criterion."""
        if not massive.massive_dims:
            raise ValueError(
                "This MassiveProfile found no massive dims, so it defines an empty set of key "
                "positions. Profile with lower min_value / min_ratio, or pass positions='start'."
            )
        return cls.of(massive.criterion, tuple(massive.hook_names), tuple(massive.massive_dims))  # type: ignore[return-value]

    def describe(self) -> str:
        hooks = "residual" if self.hooks is None else ",".join(self.hooks)
        dims = "any" if self.dims is None else ",".join(str(d) for d in self.dims)
        return f"massive(min_value={float(self.min_value)}, min_ratio={float(self.min_ratio)}, hooks={hooks}, dims={dims})"


#: What ``positions=`` accepts (:func:`as_positions`).
Positions = (
    str
    | int
    | Sequence[int]
    | Sequence[str]
    | torch.Tensor
    | PositionRule
    | MassiveSet
    | Callable[[Batch], torch.Tensor]
)


def check_profile_matches(model: TransformerLensModel, massive: MassiveSet) -> None:
    """Raise ValueError when ``massive`` (a profile, or records of a scan) was measured on a
    model of another shape.

    Compares layer count and d_model, raw vs processed weights, and that its hook
    points exist; warns when only the model name differs.

    >>> from massact_lens import profile
    >>> from massact_lens.examples import minilm, tiny_model
    >>> p = profile(minilm(), ["Hi."], min_value=50, min_ratio=200, progress=False)
    >>> check_profile_matches(tiny_model(), p)
    Traceback (most recent call last):
    ...
    ValueError: The profile was measured on a model with 6 layers and d_model 384 (...), but this model has 2 layers and d_model 32. Measure a profile on this model: massact_lens.profile(model, inputs, ...).
    """
    if not isinstance(massive, MassiveSet):
        raise TypeError(
            "Expected a MassiveProfile (massact_lens.profile(...)) or MassiveActivations (find_massive(...)), "
            f"not {type(massive).__name__}."
        )
    what = "scan" if massive.per_input else "profile"
    mine, theirs = Provenance.of(model), massive.provenance
    if (theirs.n_layers, theirs.d_model) != (mine.n_layers, mine.d_model):
        raise ValueError(
            f"The {what} was measured on a model with {theirs.n_layers} layers and d_model {theirs.d_model} "
            f"({theirs.model_name}), but this model has {mine.n_layers} layers and d_model "
            f"{mine.d_model}. Measure a profile on this model: massact_lens.profile(model, inputs, ...)."
        )
    if bool(theirs.weights_processed) != mine.weights_processed:
        state = {True: "processed (folded / centred)", False: "raw"}
        raise ValueError(
            f"The {what} was measured with {state[bool(theirs.weights_processed)]} weights, but this model's "
            f"weights are {state[mine.weights_processed]}: weight processing shifts every massive value and "
            "median, so its means do not apply. Profile this model as it is (massact_lens.profile(model, inputs, ...))."
        )
    missing = [n for n in massive.hook_names if n not in model.hook_dict]  # type: ignore[attr-defined]
    if missing:
        raise ValueError(f"The {what}'s hook points {missing[:3]} do not exist in this model: it was measured on another architecture.")
    if theirs.model_name != mine.model_name:
        warnings.warn(
            f"The {what} was measured on {theirs.model_name!r}, this model is {mine.model_name!r} "
            "(same shape). Mean values only transfer between identical weights.",
            UserWarning,
            stacklevel=3,
        )
    elif differ := other_weights(model, theirs.dtype, getattr(massive, "weights", "")):
        warnings.warn(
            f"The {what} was measured on other weights than this model's ({differ}), though name and shape "
            "agree: its dims and mean values may not apply. Measure it on this model "
            "(massact_lens.profile(model, inputs, ...) or find_massive(scan(model, inputs))).",
            UserWarning,
            stacklevel=3,
        )


def fit_width(mask: torch.Tensor, width: int) -> torch.Tensor:
    """A ``[rows, key_pos]`` mask cut or padded (with False) to ``width`` key positions.

    >>> fit_width(torch.tensor([[True, False, True]]), 2).tolist(), fit_width(torch.tensor([[True]]), 2).tolist()
    ([[True, False]], [[True, False]])
    """
    if mask.shape[1] >= width:
        return mask[:, :width]
    return torch.nn.functional.pad(mask, (0, width - mask.shape[1]), value=False)


def _batch_of(ctx: RunContext, rule: PositionRule) -> Batch:
    if ctx.batch is None:
        raise RuntimeError(
            f"The positions {rule.describe()} are per input: they need to know which input each row of "
            "the batch is. The library's passes tell them (every function that takes fwd_hooks, and "
            "massact_lens._core.loop.measure with the hooks in UserHooks); a plain forward call does not."
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


class _ForModel(PositionRule):
    """Positions given before the model was known (``zero_hook(positions="delimiters")``):
    :meth:`for_model` makes them the model's rule. ``rule``: what already works without
    the model (a profile's :class:`MassiveTokens`), None when nothing does."""

    reads_input_index = True  # replaced by the model's rule before any pass

    def __init__(self, value: Any, rule: PositionRule | None, label: str) -> None:
        self.value = value
        self.rule = rule
        self.label = label
        self.needs_tokens = rule is None or rule.needs_tokens
        self.reads_activation = rule is not None and rule.reads_activation

    def for_model(self, model: TransformerLensModel) -> PositionRule:
        return as_positions(model, self.value)

    def check(self, model: TransformerLensModel) -> None:
        self.for_model(model)

    def leaves(self) -> tuple[PositionRule, ...]:
        return (self,) if self.rule is None else self.rule.leaves()

    def select(self, activation: Float[torch.Tensor, "batch pos ..."], dims: torch.Tensor | None, ctx: RunContext) -> Bool[torch.Tensor, "_ pos *cols"]:
        if self.rule is None:
            raise RuntimeError(
                f"The positions {self.label!r} need the model (its tokenizer): build the hook list with "
                "edit_hooks / intervention_hooks / ablation_hooks, which read it."
            )
        return self.rule.select(activation, dims, ctx)

    def describe(self) -> str:
        return self.label if self.rule is None else self.rule.describe()


def _absolute(rows: Bool[torch.Tensor, "rows key_pos"], positions: Int[torch.Tensor, "_ pos"]) -> Bool[torch.Tensor, "batch pos"]:
    """``rows`` read at absolute ``positions`` (False past their end)."""
    n = max(int(rows.shape[0]), int(positions.shape[0]))
    width = int(positions.max()) + 1 if positions.numel() else 1
    padded = fit_width(rows.to(positions.device), width).expand(n, -1)
    return padded.gather(1, positions.expand(n, -1))


class _Mask(PositionRule):
    """A bool mask ``[key_pos]`` for every input, or ``[n_inputs, key_pos]``."""

    reads_input_index = True

    def __init__(self, mask: torch.Tensor) -> None:
        self.tensor = mask.detach().cpu().bool()

    def select(self, activation: Float[torch.Tensor, "batch pos ..."], dims: torch.Tensor | None, ctx: RunContext) -> Bool[torch.Tensor, "_ pos *cols"]:  # noqa: ARG002
        positions = ctx.positions.to(activation.device)
        if self.tensor.ndim == 1:
            return _absolute(self.tensor[None], positions)
        inputs = _batch_of(ctx, self).input_indices
        if max(inputs) >= self.tensor.shape[0]:
            raise ValueError(
                f"The positions mask has {self.tensor.shape[0]} rows but there are at least "
                f"{max(inputs) + 1} inputs: give one row per input."
            )
        return _absolute(self.tensor[inputs], positions)

    def describe(self) -> str:
        return f"mask{list(self.tensor.shape)}"


class _Callable(PositionRule):
    """``fn(batch) -> Bool[batch, key_pos]``."""

    def __init__(self, fn: Callable[[Batch], torch.Tensor]) -> None:
        self.fn = fn
        #: The first batch's answer, from the check before the pass: the pass uses it, so that
        #: the callable sees each batch once, in order, as without the check.
        self._checked_first: tuple[Batch, torch.Tensor] | None = None

    def select(self, activation: Float[torch.Tensor, "batch pos ..."], dims: torch.Tensor | None, ctx: RunContext) -> Bool[torch.Tensor, "_ pos *cols"]:  # noqa: ARG002
        batch, first = _batch_of(ctx, self), self._checked_first
        self._checked_first = None
        same = first is not None and list(first[0].input_indices) == list(batch.input_indices) and torch.equal(
            first[0].tokens.cpu(), batch.tokens.cpu())
        answer = first[1] if same else self.fn(batch)  # type: ignore[index]
        out = self._checked(answer, int(activation.shape[0]))
        return fit_width(out.detach(), int(activation.shape[1])).to(activation.device)

    def check_batch(self, batch: Batch) -> None:
        """The callable's answer for one batch, checked before any pass (its shape and dtype)."""
        self._checked_first = (batch, self._checked(self.fn(batch), int(batch.tokens.shape[0])))

    @staticmethod
    def _checked(out: Any, n: int) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != n:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"The positions callable must return a bool tensor [batch, key_pos] = [{n}, ...] "
                f"for a batch of {n} inputs; it returned {shape}: make it return one row per input of the batch."
            )
        if out.dtype != torch.bool:
            raise ValueError(f"The positions callable returned a {out.dtype} tensor: make it return a bool mask (True = in "
                             "C), e.g. (batch.tokens == token_id).")
        return out

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
        criterion = self.found.criterion
        return f"find_massive(min_value={criterion.min_value}, min_ratio={criterion.min_ratio}, {len(self.found)} records)"


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
        elif isinstance(leaf, _Callable) and isinstance(plan.batches, list) and plan.batches:
            leaf.check_batch(plan.batches[0])
        elif isinstance(leaf, _Mask) and leaf.tensor.ndim == 2 and plan.n_inputs not in (None, leaf.tensor.shape[0]):
            raise ValueError(
                f"The positions mask has {leaf.tensor.shape[0]} rows for {plan.n_inputs} inputs: give one row per input."
            )


def _named(model: TransformerLensModel | None, names: tuple[str, ...]) -> PositionRule:
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


def _from_names(model: TransformerLensModel | None, items: list[str]) -> PositionRule:
    names = [_ALIASES.get(name, name) for name in items]
    unknown = [item for item, name in zip(items, names, strict=True) if name not in TOKEN_RULES]
    if unknown:
        raise ValueError(
            f"Unknown position rule(s) {unknown}: use {list(TOKEN_RULES)} ('bos' is 'start'), indices, a mask "
            "or a callable."
        )
    if "massive" in names:
        if len(names) > 1:
            raise ValueError("'massive' cannot be combined with other rules; combine rules with | instead.")
        return MassiveTokens()
    unique = tuple(dict.fromkeys(names))
    if model is None and unique != ("start",):
        return _ForModel(list(unique), None, "+".join(unique))
    return _named(model, unique)


def _from_indices(model: TransformerLensModel | None, items: list[int]) -> PositionRule:
    n_ctx = None if model is None else int(model.cfg.n_ctx)
    bad = [p for p in items if p < 0 or (n_ctx is not None and p >= n_ctx)]
    if bad:
        where = "" if n_ctx is None else f" indices must lie in [0, {n_ctx}) (n_ctx);"
        raise ValueError(
            f"Positions {bad} do not exist:{where} negative indices are not supported (padding makes them "
            "ambiguous): pass indices >= 0, or count from the end in an edit with at_positions(-1)."
        )
    return at_positions(sorted(set(items)), strict=False)


def _from_list(model: TransformerLensModel | None, items: list[Any]) -> PositionRule | None:
    if not items:
        raise ValueError("positions is empty: C needs at least one key position (e.g. 'start', [0], or a mask).")
    if all(isinstance(p, str) for p in items):
        return _from_names(model, items)
    if all(isinstance(p, int) and not isinstance(p, bool) for p in items):
        return _from_indices(model, items)
    return None


def _from_mask(mask: torch.Tensor) -> PositionRule:
    if mask.dtype != torch.bool or mask.ndim not in (1, 2):
        raise ValueError(
            f"A positions tensor must be a bool mask [key_pos] or [n_inputs, key_pos]; got "
            f"{mask.dtype} {tuple(mask.shape)}. For key indices pass a list (tensor.tolist()); for a 0/1 "
            "mask pass tensor.bool()."
        )
    if not bool(mask.bool().any()):
        raise ValueError("The positions mask is all False: C is empty. Mark at least one key position.")
    return _Mask(mask)


def _from_massive(model: TransformerLensModel | None, massive: MassiveSet) -> PositionRule:
    if massive.per_input:  # records of one scan: their own positions, input by input
        found = cast(MassiveActivations, massive)
        if len(found) == 0:
            raise ValueError(
                "positions is an empty MassiveActivations: find_massive found nothing, so C would be "
                "empty. Lower min_value / min_ratio, or pass positions='start'."
            )
        return _Records(found)
    rule = MassiveTokens.from_profile(massive)  # a profile: its dims, hooks and criterion
    if model is None:
        return _ForModel(massive, rule, rule.describe())
    check_profile_matches(model, massive)  # its dims and thresholds are this model's
    return rule


def _rule_of(model: TransformerLensModel | None, positions: Any) -> PositionRule:
    if isinstance(positions, PositionRule):
        return positions
    if isinstance(positions, MassiveSet):
        return _from_massive(model, positions)
    if isinstance(positions, str) or (isinstance(positions, int) and not isinstance(positions, bool)):
        positions = [positions]
    if isinstance(positions, torch.Tensor):
        return _from_mask(positions)
    if callable(positions):
        return _Callable(cast(Callable[[Batch], torch.Tensor], positions))
    rule = _from_list(model, list(positions)) if isinstance(positions, Sequence) else None
    if rule is None:
        raise TypeError(
            f"Cannot use positions of type {type(positions).__name__}: pass a rule name {list(TOKEN_RULES)}, "
            "indices, a bool mask, a position rule (start_token(), where_massive(...), MassiveTokens, ...), "
            "a MassiveProfile / MassiveActivations, or a callable (batch) -> bool mask [batch, key_pos]."
        )
    return rule


def as_positions(model: TransformerLensModel | None, positions: Positions, plan: BatchPlan | None = None) -> PositionRule:
    """``positions`` as one :class:`~massact_lens.interventions.positions.PositionRule`, checked
    against ``model`` before any pass.

    Accepts a rule name of :data:`TOKEN_RULES` or ``"bos"`` (the start token, like
    ``"start"``), or a list of them (their union); indices (an int or a list; an index
    past an input's length is absent from it); a bool mask ``[key_pos]`` or
    ``[n_inputs, key_pos]``; a callable ``(batch) -> Bool[batch, key_pos]``; a set of
    massive activations (:class:`~massact_lens.find.criterion.MassiveSet`): records of one
    scan (``per_input``: their positions, input by input; pass the scanned inputs) or a
    profile (its dims, hooks and criterion, read in the same pass; it must come from a
    model of this shape); or any position rule. ``model`` None (an edit built before its
    hook list): what needs the model (its tokenizer, a profile's check) waits until the
    hook list is built. ``plan`` (the batches to come, when known) lets per-input
    positions be checked against the inputs.

    >>> from massact_lens.examples import tiny_model
    >>> as_positions(tiny_model(), torch.tensor([True, False, True])), as_positions(None, "delimiters")
    (mask[3], delimiters)
    """
    rule = _rule_of(model, positions)
    if model is not None:
        rule = rule.for_model(model)
    if plan is not None:
        check_plan(rule, plan)
    return rule
