"""massact_lens: massive activations (Sun et al. 2024) in TransformerLens models.

The verbs a notebook starts with are here; everything else lives one level down, in
subpackages named for their concern (:mod:`~massact_lens.interventions`,
:mod:`~massact_lens.attention`, :mod:`~massact_lens.evaluate`, :mod:`~massact_lens.viz`,
:mod:`~massact_lens.examples`, :mod:`~massact_lens.training`).
``massact_lens.options.progress = False`` (or ``MASSACT_LENS_PROGRESS=0``) turns every progress bar off.

>>> import massact_lens as ml
>>> from massact_lens.examples import minilm
>>> found = ml.find_massive(ml.scan(minilm(), ["The cat sat on the mat."], progress=False), 50, 200)
>>> sorted({(r.token, r.dim) for r in found})
[('[CLS]', 99)]
"""

from __future__ import annotations

import importlib
from typing import Any

import massact_lens._core.options  # noqa: F401 (first: it imports tqdm quietly, no "IProgress not found")
from massact_lens import attention, evaluate, examples, find, interventions
from massact_lens._core.options import (
    options as options,  # massact_lens.options.progress (not in __all__: full)
)
from massact_lens._core.types import Provenance
from massact_lens.attention import attention_concentration, implicit_bias
from massact_lens.evaluate import ablation_table, perplexity
from massact_lens.find import (
    MassiveActivations,
    MassiveProfile,
    ScanResult,
    find_massive,
    profile,
    scan,
)
from massact_lens.interventions import ablated, ablation_hooks, edited_weights
from massact_lens.models import load_model
from massact_lens.trace import lineage

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
    "find",
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

#: Subpackages imported on first use (plotly, circuitsvis and the trainer are heavy).
_LAZY_MODULES = {"viz": "massact_lens.viz", "training": "massact_lens.training"}


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        return importlib.import_module(_LAZY_MODULES[name])
    raise AttributeError(f"module 'massact_lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(_LAZY_MODULES))
