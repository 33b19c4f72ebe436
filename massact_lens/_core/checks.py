"""Argument checks that need no torch (the CLI runs them before importing the model stack).

>>> check_threshold("min_value", 100)
100.0
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_threshold"]


def check_threshold(name: str, value: Any) -> float:
    """A criterion threshold as a float; ``ValueError`` unless it is a positive finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{name} must be a positive finite number, not {value!r}. The paper uses "
            "min_value=100, min_ratio=1000; small models need lower ones (e.g. 50 and 200)."
        )
    return float(value)
