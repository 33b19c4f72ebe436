"""Interventions on massive activations: position rules, edit hooks, hook lists, ablation.

Every edit is a TransformerLens forward hook built from what the library measured
(the science: ``docs/concepts.md``). :mod:`.positions` and :mod:`.token_rules` say
where, :mod:`.coerce` turns whatever ``positions=`` was given into one rule (the same
for edits and attention key sets), :mod:`.edits` says what is written, :mod:`.lists`
makes validated hook lists (and the paper's zero / mean ablation). Patching measures
outputs, so it lives in :mod:`massact_lens.evaluate.patching`.

>>> import torch
>>> from massact_lens.examples import tiny_model
>>> model = tiny_model()
>>> hooks = edit_hooks(model, zero_hook(dims=[3], positions="start"), layers=[0, 1])
>>> with model.hooks(fwd_hooks=hooks):
...     _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
>>> float(cache["blocks.1.hook_resid_post"][0, 0, 3])
0.0
"""

from __future__ import annotations

from massact_lens.interventions.coerce import as_positions, check_profile_matches
from massact_lens.interventions.context import RunContext, TokenTracker
from massact_lens.interventions.edits import (
    EditHook,
    edit_entries,
    mean_hook,
    scale_hook,
    value_hook,
    zero_hook,
)
from massact_lens.interventions.lists import (  # noqa: F401 (hook_names_of: for massact_lens.evaluate)
    ablated,
    ablation_hooks,
    edit_hooks,
    hook_names_of,
    intervention_hooks,
)
from massact_lens.interventions.positions import (
    PositionRule,
    WhereMassive,
    all_positions,
    at_positions,
    start_token,
    where_massive,
)
from massact_lens.interventions.token_rules import delimiter_positions, kind_positions
from massact_lens.interventions.weights import edited_weights

__all__ = [
    "EditHook",
    "PositionRule",
    "RunContext",
    "TokenTracker",
    "WhereMassive",
    "ablated",
    "ablation_hooks",
    "all_positions",
    "as_positions",
    "at_positions",
    "check_profile_matches",
    "delimiter_positions",
    "edit_entries",
    "edit_hooks",
    "edited_weights",
    "intervention_hooks",
    "kind_positions",
    "mean_hook",
    "scale_hook",
    "start_token",
    "value_hook",
    "where_massive",
    "zero_hook",
]
