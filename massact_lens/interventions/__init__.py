"""Interventions on massive activations: position rules, edit hooks, hook lists, ablation.

Every edit is a TransformerLens forward hook built from what the library measured
(the science: ``docs/concepts.md``). :mod:`.positions` says where,
:mod:`.edits` what is written, :mod:`.lists` makes validated hook lists (and the
paper's zero / mean ablation). Patching measures outputs, so it lives in
:mod:`massact_lens.evaluate.patching`.

>>> import torch
>>> from massact_lens.examples import tiny_model
>>> model = tiny_model()
>>> hooks = edit_hooks(model, zero_hook(dims=[3], positions=start_token()), layers=[0, 1])
>>> with model.hooks(fwd_hooks=hooks):
...     _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
>>> float(cache["blocks.1.hook_resid_post"][0, 0, 3])
0.0
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from massact_lens._types import HookFn, HookList
from massact_lens.interventions.edits import (
    EditHook,
    RuleHook,
    edit_entries,
    mean_hook,
    scale_hook,
    value_hook,
    zero_hook,
)
from massact_lens.interventions.lists import (
    ablated,
    ablation_hooks,
    check_profile_matches,
    edit_hooks,
    hook_names_of,
    intervention_hooks,
)
from massact_lens.interventions.positions import (
    PositionRule,
    RunContext,
    TokenTracker,
    TrackerHook,
    WhereMassive,
    all_positions,
    at_positions,
    delimiter_positions,
    kind_positions,
    start_token,
    where_massive,
)

__all__ = [
    "EditHook",
    "HookFn",
    "HookList",
    "PositionRule",
    "RunContext",
    "TokenTracker",
    "RuleHook",
    "TrackerHook",
    "WhereMassive",
    "ablated",
    "ablation_hooks",
    "all_positions",
    "at_positions",
    "check_profile_matches",
    "delimiter_positions",
    "edit_entries",
    "edit_hooks",
    "hook_names_of",
    "intervention_hooks",
    "kind_positions",
    "mean_hook",
    "scale_hook",
    "start_token",
    "value_hook",
    "where_massive",
    "zero_hook",
]

#: Names that moved: patching measures outputs, so it lives in massact_lens.evaluate.
_MOVED = dict.fromkeys(("PatchHook", "PatchingResult", "massive_patching", "patching_hooks"), "massact_lens.evaluate.patching")


def announce_batch(fwd_hooks: Any, attention_mask: Any) -> None:
    """Deprecated: use :func:`massact_lens.batching.announce` ``(fwd_hooks, batch)``."""
    from massact_lens.batching import Batch, announce

    warnings.warn(
        "massact_lens.interventions.announce_batch is deprecated: call "
        "massact_lens.batching.announce(fwd_hooks, batch) with the Batch of the next pass.",
        DeprecationWarning,
        stacklevel=2,
    )
    announce(fwd_hooks, Batch(attention_mask.long() * 0, attention_mask.long(), 0))


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"massact_lens.interventions.{name} moved to {_MOVED[name]}.{name} (also "
            f"massact_lens.evaluate.{name}); the old name will be removed in a future release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'massact_lens.interventions' has no attribute {name!r}")
