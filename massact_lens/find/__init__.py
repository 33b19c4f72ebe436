"""Find massive activations: stream statistics (:func:`scan`), apply the criterion
(:func:`find_massive`), profile them across inputs (:func:`profile`), check precision.

>>> import massact_lens as ml
>>> from massact_lens.examples import minilm
>>> found = ml.find_massive(ml.scan(minilm(), ["The cat sat on the mat."], progress=False), 50, 200)
>>> sorted({(r.token, r.dim) for r in found})
[('[CLS]', 99)]
"""

from massact_lens.find.criterion import (
    DELIMITERS,
    Criterion,
    DimSummary,
    MassiveActivation,
    MassiveActivations,
    find_massive,
    token_kind,
)
from massact_lens.find.precision import compare_precision
from massact_lens.find.profiles import MassiveProfile, ValueStat, profile
from massact_lens.find.scanner import ScanResult, scan

__all__ = [
    "DELIMITERS",
    "Criterion",
    "DimSummary",
    "MassiveActivation",
    "MassiveActivations",
    "MassiveProfile",
    "ScanResult",
    "ValueStat",
    "compare_precision",
    "find_massive",
    "profile",
    "scan",
    "token_kind",
]
