"""Deprecated: the report is :mod:`massact_lens.report`, the offline page :mod:`massact_lens.viz.page`.

Old imports keep working for one release, with a ``DeprecationWarning``.

>>> import warnings
>>> with warnings.catch_warnings():
...     warnings.simplefilter("ignore", DeprecationWarning)
...     from massact_lens.viz.report import write_atomic
>>> write_atomic.__module__
'massact_lens.viz.page'
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_MOVED = {
    "Report": "massact_lens.report",
    "Section": "massact_lens.report",
    "build_report": "massact_lens.report",
    "save_html": "massact_lens.viz.page",
    "write_atomic": "massact_lens.viz.page",
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module 'massact_lens.viz.report' has no attribute {name!r}")
    warnings.warn(
        f"massact_lens.viz.report.{name} moved to {_MOVED[name]}.{name}; massact_lens.viz.report goes in the "
        "next release.",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(_MOVED[name]), name)
