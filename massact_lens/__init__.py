"""massact_lens: massive activations (Sun et al. 2024) in TransformerLens models.

Find them (:func:`scan`, :func:`find_massive`, :func:`profile`) in any
``TransformerBridge`` loaded with raw weights (:func:`load_model`), offline on the
bundled real encoder (:func:`massact_lens.examples.minilm`).

>>> import massact_lens
>>> "scan" in massact_lens.__all__
True
"""

from massact_lens._types import Provenance
from massact_lens.attention import (
    AttentionConcentration,
    AttentionLogits,
    ImplicitBias,
    MassiveTokens,
    TokenFeatures,
    attention_concentration,
    attention_logits,
    implicit_bias,
    token_features,
)
from massact_lens.batching import Batch, plan_batches
from massact_lens.evaluate import (
    AblationTable,
    PatchHook,
    PatchingResult,
    PerplexityResult,
    SimilarityResult,
    ablation_table,
    embedding_similarity,
    massive_patching,
    patching_hooks,
    perplexity,
    sentence_embeddings,
)
from massact_lens.explicit_bias import (
    ExplicitAttentionBias,
    SinkToken,
    attach_explicit_bias,
    attach_sink_token,
    detach_prefix,
    first_token_position,
    prefix_component,
)
from massact_lens.hook_names import residual_hook_names, resolve_hook_names
from massact_lens.interventions import (
    EditHook,
    PositionRule,
    TokenTracker,
    ablated,
    ablation_hooks,
    all_positions,
    at_positions,
    check_profile_matches,
    delimiter_positions,
    edit_hooks,
    intervention_hooks,
    kind_positions,
    mean_hook,
    scale_hook,
    start_token,
    value_hook,
    where_massive,
    zero_hook,
)
from massact_lens.massive import (
    DimSummary,
    MassiveActivation,
    MassiveActivations,
    MassiveProfile,
    ValueStat,
    find_massive,
    profile,
    token_kind,
)
from massact_lens.models import load_model, model_description, warn_if_processed, weights_processed
from massact_lens.scan import ScanResult, scan

__version__ = "0.1.0"


#: Loaded on first use: the viz subpackage (plotly, circuitsvis), and the training
#: names, so that ``python -m massact_lens.train`` does not import its own module twice.
_LAZY = {
    "viz": None,
    **dict.fromkeys(
        (
            "BigramBackcopy", "Evaluation", "ModelConfig", "SnapshotScan", "TextFile", "TrainConfig",
            "TrainResult", "load_checkpoint", "results_table", "scan_snapshots",
        ),
        "massact_lens.train",
    ),
}


def __getattr__(name: str):  # noqa: ANN202
    import importlib

    if name not in _LAZY:
        raise AttributeError(f"module 'massact_lens' has no attribute {name!r}")
    if name == "viz":
        return importlib.import_module("massact_lens.viz")
    return getattr(importlib.import_module(_LAZY[name]), name)

__all__ = [
    "Provenance",
    "AblationTable",
    "AttentionConcentration",
    "AttentionLogits",
    "Batch",
    "BigramBackcopy",  # noqa: F822 (lazy, see __getattr__)
    "DimSummary",
    "EditHook",
    "Evaluation",  # noqa: F822 (lazy, see __getattr__)
    "ExplicitAttentionBias",
    "ImplicitBias",
    "MassiveActivation",
    "MassiveActivations",
    "MassiveProfile",
    "MassiveTokens",
    "ModelConfig",  # noqa: F822 (lazy, see __getattr__)
    "PatchHook",
    "PatchingResult",
    "PerplexityResult",
    "PositionRule",
    "ScanResult",
    "SimilarityResult",
    "SinkToken",
    "SnapshotScan",  # noqa: F822 (lazy, see __getattr__)
    "TextFile",  # noqa: F822 (lazy, see __getattr__)
    "TokenFeatures",
    "TokenTracker",
    "TrainConfig",  # noqa: F822 (lazy, see __getattr__)
    "TrainResult",  # noqa: F822 (lazy, see __getattr__)
    "ValueStat",
    "ablated",
    "ablation_hooks",
    "ablation_table",
    "all_positions",
    "at_positions",
    "attach_explicit_bias",
    "attach_sink_token",
    "attention_concentration",
    "attention_logits",
    "check_profile_matches",
    "delimiter_positions",
    "detach_prefix",
    "edit_hooks",
    "embedding_similarity",
    "find_massive",
    "first_token_position",
    "implicit_bias",
    "intervention_hooks",
    "kind_positions",
    "load_checkpoint",  # noqa: F822 (lazy, see __getattr__)
    "load_model",
    "massive_patching",
    "mean_hook",
    "model_description",
    "patching_hooks",
    "perplexity",
    "plan_batches",
    "prefix_component",
    "profile",
    "residual_hook_names",
    "resolve_hook_names",
    "results_table",  # noqa: F822 (lazy, see __getattr__)
    "scale_hook",
    "scan",
    "scan_snapshots",  # noqa: F822 (lazy, see __getattr__)
    "sentence_embeddings",
    "start_token",
    "token_features",
    "token_kind",
    "value_hook",
    "viz",  # noqa: F822 (a lazily imported subpackage, see __getattr__)
    "warn_if_processed",
    "weights_processed",
    "where_massive",
    "zero_hook",
]
