"""Key sets: which key positions form C. They are position rules.

Everything the ``positions=`` argument of the attention functions accepts (rule
names, key indices, bool masks, callables, a profile, ``find_massive`` records, any
:class:`~massact_lens.interventions.PositionRule`) becomes one rule through
:func:`as_rule`, the same coercer the edit hooks use
(:func:`~massact_lens.interventions.as_positions`), checked before any forward pass;
:func:`key_mask` evaluates it on a batch. Padding keys are never in C.

>>> import torch
>>> from massact_lens._core.batching import Batch
>>> from massact_lens.examples import tiny_model
>>> batch = Batch(torch.tensor([[3, 4, 5], [6, 7, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]), 0)
>>> key_mask(as_rule(tiny_model(), [0, 2], None), batch).tolist()
[[True, False, True], [True, False, False]]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from jaxtyping import Bool
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.batching import Batch, BatchPlan, plan_batches
from massact_lens.interventions.coerce import (  # noqa: F401 (fit_width: re-exported for the attention passes)
    TOKEN_RULES,
    MassiveTokens,
    Positions,
    as_positions,
    check_plan,
    fit_width,
)
from massact_lens.interventions.positions import PositionRule, RunContext, in_any_order

__all__ = ["TOKEN_RULES", "MassiveTokens", "Positions", "as_rule", "key_mask"]


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
    if by_length is not None and not isinstance(by_length, bool):
        raise TypeError(f"by_length must be True, False or None (whenever the key set allows it), not {by_length!r}.")
    rule = as_rule(model, positions, None)
    if by_length is None:
        by_length = in_any_order(rule)
    plan = plan_batches(model, inputs, batch_size=batch_size, attention_mask=attention_mask, prepend_bos=prepend_bos,
                        by_length=by_length)
    check_plan(rule, plan)
    return plan, rule


def as_rule(model: TransformerLensModel, positions: Positions, plan: BatchPlan | None) -> PositionRule:
    """``positions`` as one checked :class:`~massact_lens.interventions.PositionRule`, before any pass:
    :func:`~massact_lens.interventions.as_positions` (the one coercer of edits and key sets).

    Accepts a rule name of :data:`TOKEN_RULES` or ``"bos"`` (or a list of them: their
    union), key indices (an int or a list; an index past an input's length is absent
    from it), a bool mask ``[key_pos]`` or ``[n_inputs, key_pos]``, a callable
    ``(batch) -> Bool[batch, key_pos]``, a :class:`~massact_lens.find.profiles.MassiveProfile`
    (its dims, hooks and thresholds), :class:`~massact_lens.find.criterion.MassiveActivations`
    from a scan of the same inputs, or any position rule. ``plan`` (the batches
    to come, when known) lets per-input key sets be checked against the inputs.

    >>> from massact_lens.examples import tiny_model
    >>> as_rule(tiny_model(), "start", None), as_rule(tiny_model(), [0, 3], None)
    (start, indices[0, 3])
    """
    return as_positions(model, positions, plan)
