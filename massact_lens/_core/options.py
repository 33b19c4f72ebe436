"""Library-wide settings (``massact_lens.options``), the progress bar every pass shows, and user warnings.

``massact_lens.options.progress = False`` turns every progress bar of the library off
(a call's own ``progress=False`` still turns its bar off when the switch is on). The
environment variable ``MASSACT_LENS_PROGRESS=0`` sets it off at import. A pass of a
single batch never shows a bar.

The bar is tqdm's notebook widget only where a notebook can draw it (ipywidgets
installed), else tqdm's text bar: importing the library never prints tqdm's
"IProgress not found" warning.

>>> saved, options.progress = options.progress, False
>>> options
massact_lens.options(progress=False)
>>> options.progress = saved
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import sys
import warnings
from collections.abc import Iterable
from typing import Any

__all__ = ["options", "progress_bar", "tqdm", "warn_user"]

with warnings.catch_warnings():  # tqdm.auto warns at import in a kernel without ipywidgets (and
    # huggingface_hub imports it): imported here, quietly, before anything else can
    warnings.filterwarnings("ignore", message="IProgress not found")
    warnings.filterwarnings("ignore", message=".*tqdm.autonotebook.tqdm.*")
    importlib.import_module("tqdm.autonotebook")
    from tqdm.std import tqdm as _std_tqdm

_OFF = ("0", "false", "no", "off")
#: Modules whose frames lie between the user and the library (wrappers, the library itself).
_WRAPPERS = ("massact_lens", "contextlib", "jaxtyping", "beartype")


def _notebook_widgets() -> bool:
    """True in a Jupyter kernel that can draw tqdm's widget bar (ipywidgets is installed)."""
    return "ipykernel" in sys.modules and importlib.util.find_spec("ipywidgets") is not None


def tqdm(*args: Any, **kwargs: Any) -> Any:
    """tqdm's notebook bar where it can draw, else its text bar (never the "IProgress not found" warning)."""
    if _notebook_widgets():
        from tqdm.notebook import tqdm as notebook_tqdm  # noqa: PLC0415

        return notebook_tqdm(*args, **kwargs)
    return _std_tqdm(*args, **kwargs)


class _Options:
    """The library's settings; set an attribute to change it for the session."""

    __slots__ = ("_progress",)

    def __init__(self) -> None:
        self._progress = os.environ.get("MASSACT_LENS_PROGRESS", "1").strip().lower() not in _OFF

    @property
    def progress(self) -> bool:
        """Show progress bars (default True; ``MASSACT_LENS_PROGRESS=0`` in the environment: False)."""
        return self._progress

    @progress.setter
    def progress(self, value: Any) -> None:  # checked here, with a message
        if not isinstance(value, bool):
            raise TypeError(f"options.progress must be True or False, not {value!r}.")
        self._progress = value

    def __repr__(self) -> str:
        return f"massact_lens.options(progress={self._progress})"


#: The settings (``massact_lens.options``).
options = _Options()


def progress_bar(iterable: Iterable[Any], *, total: int | None, desc: str, enabled: bool, leave: bool = False) -> Any:
    """``iterable`` with a bar when ``enabled``, the global switch is on, and there is more than one step.

    A stream of unknown length is looked ahead by one item to tell.

    >>> progress_bar(iter([1]), total=None, desc="x", enabled=True).__class__.__name__
    'chain'
    """
    if not (enabled and options.progress) or (total is not None and total <= 1):
        return iterable
    if total is None:
        items = iter(iterable)
        head = list(itertools.islice(items, 2))
        iterable = itertools.chain(head, items)
        if len(head) < 2:
            return iterable
    return tqdm(iterable, total=total, desc=desc, leave=leave)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn, pointing at the first caller outside the library (the user's line)."""
    frame, level = sys._getframe(1), 2  # level 2: warn_user's caller
    while frame.f_back is not None and str(frame.f_globals.get("__name__", "")).startswith(_WRAPPERS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
