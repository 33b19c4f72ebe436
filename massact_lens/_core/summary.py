"""How a result shows itself: a short text (``repr``) and a small HTML card (notebooks).

Every result says what it is, which model, how many inputs and layers, what its
fields hold (shapes, never values of a tensor), and which methods to call next;
the HTML card adds the head of ``to_dataframe()`` where the result has one. Both stay
under about 1 KB of text however large the result (a result of a big corpus holds
megabytes of tensors).

A result class gets this by deriving from :class:`Summarised` (every
:class:`~massact_lens._core.results.Result` does) and, when it is a dataclass, by
``@dataclass(..., repr=False)``: a dataclass otherwise writes its own ``__repr__``
over the inherited one. It may add headline lines with ``_summary_lines()``.

>>> from dataclasses import dataclass
>>> import torch
>>> @dataclass(frozen=True, repr=False)
... class Demo(Summarised):
...     values: torch.Tensor
...     name: str
...     def to_dataframe(self): ...
>>> print(repr(Demo(torch.zeros(3, 4), "x")))
Demo
  values: [3, 4] float32
  name: 'x'
  next: .to_dataframe()
"""

from __future__ import annotations

import dataclasses
import html
import inspect
from typing import Any

import torch

__all__ = ["MAX_REPR", "Summarised", "describe"]

#: The longest text repr (characters).
MAX_REPR = 1000
#: Fields the headline already says.
_HEADLINE_FIELDS = ("provenance", "layers", "n_inputs", "keep")
#: Methods that are not a next step from a result in hand.
_NOT_NEXT = frozenset({"merge", "from_dict", "load", "of", "empty", "count", "index"})
_ROWS = 8


def _model_name(name: str) -> str:
    """A hub name as it is; a folder by its last two parts (not the whole path)."""
    return "/".join(name.rstrip("/").split("/")[-2:]) if name.startswith(("/", "~", ".")) else name


def _layers(layers: tuple[int, ...]) -> str:
    layers = tuple(sorted(set(layers)))
    if not layers:
        return "no layer"
    if list(layers) == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"layers {layers[0]}..{layers[-1]}"
    return "layers " + ", ".join(map(str, layers))


def describe(value: Any, width: int = 70) -> str:
    """One short phrase for a field's value: a tensor's shape and dtype, a collection's size, a short repr.

    >>> describe(torch.ones(2, 5, dtype=torch.bool)), describe(list(range(50))), describe({"a": 1})
    ('[2, 5] bool', '50 items', "{'a': 1}")
    """
    if isinstance(value, torch.Tensor):
        return f"{list(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if hasattr(value, "shape") and hasattr(value, "columns"):  # a DataFrame
        return f"table of {value.shape[0]} rows x {value.shape[1]} columns"
    text = repr(value) if not isinstance(value, Summarised) else type(value).__name__
    if len(text) <= width and "tensor(" not in text:
        return text
    if isinstance(value, dict):
        return f"{len(value)} entries"
    if isinstance(value, list | tuple | set | frozenset):
        return f"{len(value)} items"
    return type(value).__name__


class Summarised:
    """A short ``repr`` and an HTML card, for a result (see the module's text)."""

    def _summary_lines(self) -> list[str]:
        """Headline lines a result class adds (counts, what was found); none by default."""
        return []

    def _headline(self) -> str:
        name = type(self).__name__
        provenance = getattr(self, "provenance", None)
        parts = [f"{name} of {_model_name(provenance.model_name)}" if provenance is not None else name]
        if isinstance(getattr(self, "n_inputs", None), int):
            parts.append(f"{self.n_inputs} inputs")  # type: ignore[attr-defined]
        if isinstance(getattr(self, "layers", None), tuple):
            parts.append(_layers(self.layers))  # type: ignore[attr-defined]
        keep = getattr(self, "keep", None)
        if keep is not None:
            parts.append(f"kept in full: {keep if keep == 'all' else min(int(keep), int(getattr(self, 'n_inputs', keep)))}")
        return ", ".join(parts)

    def _field_lines(self) -> list[str]:
        if not dataclasses.is_dataclass(self):
            return []
        return [f"{f.name}: {describe(getattr(self, f.name))}" for f in dataclasses.fields(self)
                if f.name not in _HEADLINE_FIELDS and not f.name.startswith("_")]

    def _next_steps(self) -> str:
        names = []
        for name in dir(type(self)):
            attr = inspect.getattr_static(type(self), name, None)
            if name.startswith("_") or name in _NOT_NEXT or not callable(attr) or isinstance(attr, type):
                continue
            names.append(f".{name}()")
        return " ".join(names[:8])

    def _summary(self) -> tuple[str, list[str]]:
        lines = [*self._summary_lines(), *self._field_lines()]
        steps = self._next_steps()
        if steps:
            lines.append(f"next: {steps}")
        return self._headline(), lines

    def __repr__(self) -> str:
        headline, lines = self._summary()
        out = headline
        for i, line in enumerate(lines):
            line = line if len(line) <= 120 else line[:117] + "..."
            if len(out) + len(line) + 40 > MAX_REPR:
                out += f"\n  ... {len(lines) - i} more lines"
                break
            out += "\n  " + line
        return out

    def _dataframe_head(self) -> str:
        to_dataframe = getattr(self, "to_dataframe", None)
        if not callable(to_dataframe):
            return ""
        try:
            frame = to_dataframe()
        except Exception:  # noqa: BLE001 (a display never raises: a method that needs arguments, or data it lacks)
            return ""
        more = f"<p>{len(frame) - _ROWS} more rows: <code>.to_dataframe()</code></p>" if len(frame) > _ROWS else ""
        return frame.head(_ROWS).to_html(max_cols=12, float_format=lambda v: f"{v:.4g}") + more

    def _repr_html_(self) -> str:
        headline, lines = self._summary()
        items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
        return (f'<div class="massact-result"><b>{html.escape(headline)}</b>'
                f'<ul style="margin: 2px 0;">{items}</ul>{self._dataframe_head()}</div>')
