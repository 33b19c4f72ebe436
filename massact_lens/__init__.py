"""massact_lens: massive activations (Sun et al. 2024) in TransformerLens models.

The verbs a notebook starts with are here; everything else lives one level down, in
subpackages named for their concern (:mod:`~massact_lens.interventions`,
:mod:`~massact_lens.attention`, :mod:`~massact_lens.evaluate`, :mod:`~massact_lens.viz`,
:mod:`~massact_lens.examples`, :mod:`~massact_lens.training`).

>>> import massact_lens as ml
>>> from massact_lens.examples import minilm
>>> found = ml.find_massive(ml.scan(minilm(), ["The cat sat on the mat."], progress=False), 50, 200)
>>> sorted({(r.token, r.dim) for r in found})
[('[CLS]', 99)]
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

# Eager on purpose: ``scan`` and ``lineage`` are also submodule names, and only a binding
# made here, after those submodules are imported, keeps ``massact_lens.scan`` the function.
from massact_lens import attention, evaluate, examples, interventions
from massact_lens._types import Provenance
from massact_lens.attention import attention_concentration, implicit_bias
from massact_lens.evaluate import ablation_table, perplexity
from massact_lens.interventions import ablated, ablation_hooks
from massact_lens.lineage import lineage
from massact_lens.massive import MassiveActivations, find_massive
from massact_lens.models import load_model
from massact_lens.profiles import MassiveProfile, profile
from massact_lens.scan import ScanResult, scan
from massact_lens.weights import edited_weights

__version__ = "0.2.0"

__all__ = [
    "MassiveActivations",
    "MassiveProfile",
    "Provenance",
    "ScanResult",
    "ablated",
    "ablation_hooks",
    "ablation_table",
    "attention",
    "attention_concentration",
    "edited_weights",
    "evaluate",
    "examples",
    "find_massive",
    "implicit_bias",
    "interventions",
    "lineage",
    "load_model",
    "perplexity",
    "profile",
    "scan",
    "viz",  # noqa: F822 (imported on first use: plotly and circuitsvis are heavy)
]

#: Subpackages imported on first use.
_LAZY_MODULES = {"viz": "massact_lens.viz", "training": "massact_lens.training", "report": "massact_lens.report"}

#: Names that were top-level in 0.1, and where they live now. They still work, with a
#: DeprecationWarning, for one release.
_MOVED = {
    **dict.fromkeys(
        ("AttentionConcentration", "AttentionLogits", "ImplicitBias", "MassiveTokens", "TokenFeatures",
         "attention_logits", "token_features"),
        "massact_lens.attention",
    ),
    **dict.fromkeys(("Batch", "plan_batches"), "massact_lens.batching"),
    **dict.fromkeys(
        ("AblationTable", "PatchHook", "PatchingResult", "PerplexityResult", "SimilarityResult",
         "embedding_similarity", "massive_patching", "patching_hooks", "sentence_embeddings"),
        "massact_lens.evaluate",
    ),
    **dict.fromkeys(
        ("ExplicitAttentionBias", "SinkToken", "attach_explicit_bias", "attach_sink_token", "detach_prefix",
         "first_token_position", "prefix_component"),
        "massact_lens.explicit_bias",
    ),
    **dict.fromkeys(("residual_hook_names", "resolve_hook_names"), "massact_lens.hook_names"),
    **dict.fromkeys(
        ("EditHook", "PositionRule", "TokenTracker", "all_positions", "at_positions", "check_profile_matches",
         "delimiter_positions", "edit_hooks", "intervention_hooks", "kind_positions", "mean_hook", "scale_hook",
         "start_token", "value_hook", "where_massive", "zero_hook"),
        "massact_lens.interventions",
    ),
    **dict.fromkeys(("DimSummary", "MassiveActivation", "token_kind"), "massact_lens.massive"),
    "ValueStat": "massact_lens.profiles",
    **dict.fromkeys(("model_description", "warn_if_processed", "weights_processed"), "massact_lens.models"),
    **dict.fromkeys(
        ("BigramBackcopy", "Evaluation", "ModelConfig", "SnapshotScan", "TextFile", "TrainConfig", "TrainResult",
         "results_table", "scan_snapshots"),
        "massact_lens.training",
    ),
    "load_checkpoint": "massact_lens.checkpoints",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        return importlib.import_module(_LAZY_MODULES[name])
    if name in _MOVED:
        module = _MOVED[name]
        warnings.warn(
            f"massact_lens.{name} moved to {module}.{name} in 0.2; the top-level name goes in 0.3.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'massact_lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_LAZY_MODULES))
