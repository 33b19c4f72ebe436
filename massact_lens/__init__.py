"""massact_lens: massive activations (Sun et al. 2024) in TransformerLens models.

Find them (:func:`scan`, :func:`find_massive`, :func:`profile`) in any
``TransformerBridge`` loaded with raw weights (:func:`load_model`), offline on the
bundled real encoder (:func:`massact_lens.examples.minilm`).

>>> import massact_lens
>>> "scan" in massact_lens.__all__
True
"""

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
from massact_lens.hook_names import residual_hook_names, resolve_hook_names
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

__all__ = [
    "AttentionConcentration",
    "AttentionLogits",
    "ImplicitBias",
    "MassiveTokens",
    "TokenFeatures",
    "attention_concentration",
    "attention_logits",
    "implicit_bias",
    "token_features",
    "Batch",
    "DimSummary",
    "MassiveActivation",
    "MassiveActivations",
    "MassiveProfile",
    "ScanResult",
    "ValueStat",
    "find_massive",
    "load_model",
    "model_description",
    "plan_batches",
    "profile",
    "residual_hook_names",
    "resolve_hook_names",
    "scan",
    "token_kind",
    "warn_if_processed",
    "weights_processed",
]
