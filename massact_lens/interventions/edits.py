"""Edit hooks: a pure tensor function, and stateless hook objects that decide where.

:func:`edit_entries` rewrites chosen entries of a hidden state and nothing else;
an :class:`EditHook` (built by :func:`zero_hook`, :func:`value_hook`,
:func:`scale_hook`, :func:`mean_hook`) asks its position rule where, then
delegates to it. Edits write in place unless the activation requires grad, in
which case it is cloned first (as TransformerLens' ``direct_path_patching``).

>>> import torch
>>> from massact_lens.interventions import at_positions
>>> zero_hook(dims=[1], positions=at_positions(0))(torch.ones(1, 2, 3))[0].tolist()
[[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from jaxtyping import Bool, Float, Int

from massact_lens._core.hook_names import check_edit_point, point_layout
from massact_lens.find.profiles import MassiveProfile
from massact_lens.interventions._checks import (
    OPERATIONS,
    TOKEN_KINDS,
    Operation,
    TokenKind,
    check_choice,
)
from massact_lens.interventions.coerce import Positions, as_positions
from massact_lens.interventions.context import TokenTracker, warn_selected_nothing
from massact_lens.interventions.positions import (
    PositionRule,
    all_positions,
    run_context,
    start_token,
)

__all__ = ["EditHook", "edit_entries", "mean_hook", "scale_hook", "value_hook", "zero_hook"]


@runtime_checkable
class RuleHook(Protocol):
    """A hook whose position rule may read the tracker: edits here, patches in :mod:`massact_lens.evaluate`.

    :func:`~massact_lens.interventions.intervention_hooks` checks ``dims`` and
    ``positions`` against the model and binds it to the list's tracker (``bound``).
    """

    dims: tuple[int, ...] | None
    positions: PositionRule

    def bound(self, tracker: TokenTracker) -> Any: ...

    def check_point(self, name: str | None, pos_dim: int | None = None) -> None:
        """ValueError when the hook cannot edit the point ``name`` (by its layout; ``pos_dim``:
        the point's position axis, as TransformerLens marks it)."""
        ...


def edit_entries(
    activation: Float[torch.Tensor, "batch pos *entry"],
    selected: Bool[torch.Tensor, "_ pos *cols"],
    dims: Int[torch.Tensor, " n_dims"] | None,
    operation: Operation,
    amount: Sequence[float],
) -> Float[torch.Tensor, "batch pos *entry"]:
    """Set (or scale) the ``selected`` entries of columns ``dims`` to (by) ``amount``.

    ``selected`` is a position mask ``[1 or batch, pos]`` or an entry mask
    ``[1 or batch, pos, n_dims]`` over ``dims`` (all columns when None); ``amount``
    holds one number or one per dim. On a per-head activation ``[batch, pos, head,
    d_head]`` (hook_q/k/v/z) a position mask takes every head there, and ``dims`` are
    d_head entries. Writes in place and returns ``activation``,
    unless it requires grad: then a clone is edited and returned.

    >>> x = torch.zeros(1, 2, 3)
    >>> edit_entries(x, torch.tensor([[True, False]]), torch.tensor([0, 2]), "set", [7.0, 8.0])[0].tolist()
    [[7.0, 0.0, 8.0], [0.0, 0.0, 0.0]]
    """
    if selected.ndim == 2:  # positions: every entry there ([batch, pos, head, d_head] too, not one axis off)
        selected = selected.reshape(*selected.shape, *([1] * (activation.ndim - 2)))
    target = activation.clone() if activation.requires_grad else activation
    columns = target if dims is None else target[..., dims]
    values = torch.tensor(amount, device=activation.device, dtype=activation.dtype)
    new = values if operation == "set" else columns * values
    edited = torch.where(selected.to(activation.device), new.to(columns.dtype), columns)
    if dims is None:
        target.copy_(edited)
    else:
        target[..., dims] = edited
    return target


@dataclass(frozen=True, eq=False)
class EditHook:
    """``fn(activation, hook)``: rewrite chosen dims at chosen positions, nothing else.

    Called as TransformerLens calls hooks: ``fn(activation, hook=hook)``, or
    ``fn(activation, hook)`` with ``[pos, d_model]`` (``[pos, head, d_head]`` at a
    per-head point such as ``hook_k``: the layout comes from ``hook.name``) under
    ``run_with_hooks(..., remove_batch_dim=True)``. Attention patterns and scores are
    refused (their positions would pick heads).

    Built by :func:`zero_hook`, :func:`value_hook`, :func:`scale_hook`,
    :func:`mean_hook`. It keeps no state: each call asks ``positions`` where, then
    calls :func:`edit_entries`. ``tracker`` is set by the list builders
    (:func:`~massact_lens.interventions.intervention_hooks`).
    """

    #: ``"set"`` (write ``amount``) or ``"scale"`` (multiply by ``amount``).
    operation: Operation
    #: One number for all dims, or one per dim.
    amount: tuple[float, ...]
    #: The columns edited; None: every dim.
    dims: tuple[int, ...] | None
    #: Where the edit applies.
    positions: PositionRule
    #: What the edit writes, for :meth:`describe` ("set to mean").
    label: str = ""
    #: Where the rule reads the tokens of the pass; None outside a hook list.
    tracker: TokenTracker | None = None

    def __post_init__(self) -> None:
        check_choice("operation", self.operation, OPERATIONS)
        if not self.amount or any(not math.isfinite(a) for a in self.amount):
            raise ValueError(f"Values must be finite numbers, not {self.amount!r}.")
        if self.dims is not None and len(self.amount) not in (1, len(self.dims)):
            raise ValueError(f"Give one value or one per dim ({len(self.dims)}), not {len(self.amount)}.")
        if self.dims is None and len(self.amount) != 1:
            raise ValueError("With dims=None (every dim) give one value.")

    def bound(self, tracker: TokenTracker) -> EditHook:
        """A copy that reads tokens and positions from ``tracker``."""
        return replace(self, tracker=tracker)

    def check_point(self, name: str | None, pos_dim: int | None = None) -> None:
        """ValueError on an attention pattern or score point (its axes are [batch, head, query,
        key], so an edit's positions would pick heads) or one whose positions are not axis 1."""
        check_edit_point(name, "An edit", pos_dim=pos_dim)

    def __call__(
        self, activation: Float[torch.Tensor, "*batch pos d_model"], *given: Any, hook: Any = None
    ) -> Float[torch.Tensor, "*batch pos d_model"]:
        # TransformerLens passes hook= by keyword; only run_with_hooks(remove_batch_dim=True)
        # passes it positionally, and only then can a per-head point arrive as [pos, head, d_head]
        # (a head point that fires flat, [batch, pos, heads x d_head], is 3-D by keyword).
        hook = given[0] if given else hook
        name = getattr(hook, "name", None)
        self.check_point(name, getattr(hook, "pos_dim", None))
        dropped = 2 if not given or point_layout(name) != "head" else 3  # ndim of a batch-dropped activation
        if activation.ndim == dropped:
            return self(activation[None], hook=hook)[0]
        d_model = int(activation.shape[-1])
        where = f" at {name!r}" if name else ""
        if self.dims is not None and max(self.dims) >= d_model:
            raise ValueError(f"Dim {max(self.dims)} does not exist{where}: the hidden state has {d_model} dims.")
        if activation.ndim > 3 and self.positions.reads_activation:
            raise ValueError(
                f"{self.positions.describe()} reads a hidden state [batch, pos, d_model], but the activation{where} "
                f"is {list(activation.shape)} (per head: hook_q/k/v/z). Edit it at positions (start_token(), "
                "at_positions(...), a mask), or apply this rule to the residual stream.")
        ctx = run_context(self.tracker, self.positions, activation, "hook")
        index = None if self.dims is None else torch.tensor(self.dims, device=activation.device)
        selected = self.positions.select(activation, index, ctx)
        if self.tracker is not None:
            self.tracker.note_edit(self.describe(), selected, ctx)
        elif not bool(selected.any()):  # a bare hook: every call is a run of its own
            warn_selected_nothing([self.describe()], "this pass")
        return edit_entries(activation, selected, index, self.operation, self.amount)

    def describe(self) -> str:
        what = self.label or (f"set to {list(self.amount)}" if self.operation == "set" else f"scale by {list(self.amount)}")
        dims = "all dims" if self.dims is None else f"dims {list(self.dims)}"
        return f"{what}, {dims}, at {self.positions.describe()}"

    def __repr__(self) -> str:
        return f"EditHook({self.describe()})"


def as_dims(dims: int | Sequence[int] | None) -> tuple[int, ...] | None:
    """``dims`` as a tuple of distinct non-negative ints (None stays None); ValueError otherwise.

    >>> as_dims(3), as_dims([1, 2]), as_dims(None)
    ((3,), (1, 2), None)
    """
    if dims is None:
        return None
    if isinstance(dims, str) or not isinstance(dims, int | Sequence | torch.Tensor):
        raise TypeError(f"dims must be a dim index or a list of them (dims=[5, 7]), not {dims!r}.")
    values = [dims] if isinstance(dims, int) else (dims.flatten().tolist() if isinstance(dims, torch.Tensor) else list(dims))
    if not values:
        raise ValueError("dims is empty: pass None for every dim, or one or more dims.")
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in values):
        raise ValueError(f"dims must be non-negative integers, not {dims!r}.")
    if len(set(values)) != len(values):
        raise ValueError(f"dims {values} contain duplicates: name each dim once (dims={sorted(set(values))}).")
    return tuple(int(d) for d in values)


def _amounts(value: Any) -> tuple[float, ...]:  # Any: a wrong value gets its own message
    """``value`` as floats: a number (numpy and 0-d tensor scalars too), a list of numbers or a tensor.

    >>> import numpy as np
    >>> _amounts(np.float32(0.5)), _amounts(torch.tensor([1.0, 2.0])), _amounts([3, 4])
    ((0.5,), (1.0, 2.0), (3.0, 4.0))
    """
    if isinstance(value, torch.Tensor):
        return tuple(float(v) for v in value.flatten().tolist())
    items = [value] if isinstance(value, numbers.Real) else value
    if isinstance(value, str | bytes) or not isinstance(items, Sequence | np.ndarray) or \
            not all(isinstance(v, numbers.Real) for v in items):
        raise TypeError(f"Values must be numbers (one, or one per dim), not {value!r}: pass e.g. 0.5 or [0.5, 2.0].")
    return tuple(float(v) for v in items)


def _rule(positions: Positions | None) -> PositionRule:
    """``positions=`` of an edit as a rule (default every position); what needs the model
    (``"delimiters"``, a profile) is completed when the hook list is built."""
    return all_positions() if positions is None else as_positions(None, positions)


def zero_hook(dims: int | Sequence[int] | None = None, positions: Positions | None = None) -> EditHook:
    """Set ``dims`` (default all) to zero at ``positions`` (default all).

    ``positions``: anything :func:`~massact_lens.interventions.as_positions` accepts: a
    rule, ``"start"`` (or ``"bos"``), ``"delimiters"``, indices, a bool mask, a profile, ...

    >>> import torch
    >>> from massact_lens.interventions import at_positions
    >>> x = torch.ones(1, 3, 4)
    >>> zero_hook(dims=[1], positions=at_positions(0))(x)[0, :, 1].tolist()
    [0.0, 1.0, 1.0]
    >>> zero_hook(dims=[1], positions="bos")
    EditHook(set to zero, dims [1], at start)
    """
    return EditHook("set", (0.0,), as_dims(dims), _rule(positions), "set to zero")


def value_hook(
    value: numbers.Real | Sequence[float] | torch.Tensor,  # numbers.Real: numpy scalars too
    dims: int | Sequence[int] | None = None,
    positions: Positions | None = None,
) -> EditHook:
    """Set ``dims`` to ``value`` (one number, or one per dim) at ``positions`` (as :func:`zero_hook`).

    >>> import torch
    >>> from massact_lens.interventions import start_token
    >>> value_hook([7.0, 8.0], dims=[0, 2], positions=start_token())(torch.zeros(1, 2, 3))[0].tolist()
    [[7.0, 0.0, 8.0], [0.0, 0.0, 0.0]]
    """
    return EditHook("set", _amounts(value), as_dims(dims), _rule(positions))


def scale_hook(
    factor: numbers.Real | Sequence[float] | torch.Tensor,
    dims: int | Sequence[int] | None = None,
    positions: Positions | None = None,
) -> EditHook:
    """Multiply ``dims`` by ``factor`` at ``positions`` (as :func:`zero_hook`).

    >>> import torch
    >>> scale_hook(0.5, dims=1)(torch.full((1, 2, 2), 4.0))[0].tolist()
    [[4.0, 2.0], [4.0, 2.0]]
    """
    return EditHook("scale", _amounts(factor), as_dims(dims), _rule(positions))


def mean_hook(
    profile: MassiveProfile | None,
    hook_name: str,
    dims: int | Sequence[int] | None = None,
    kind: TokenKind = "start",
    positions: Positions | None = None,
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
    chosen = as_dims(dims) or profile.massive_dims
    if not chosen:
        raise ValueError("The profile found no massive dims: pass dims=..., or profile with lower thresholds.")
    check_choice("kind", kind, TOKEN_KINDS)
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

