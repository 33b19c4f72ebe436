"""Massive activations against the range and precision of half-precision dtypes.

A massive activation can be larger than float16 holds (65,504: Gemma-3-270m's reaches
~104,000), and half precision rounds a 20,000-valued entry to steps of 16 (float16) or
128 (bfloat16). :func:`check_range` (every scan runs it; it lives beside
:class:`~massact_lens.find.scan_result.ScanResult`) warns when a scan's values leave (or
come near the edge of) the model's dtype, or would overflow float16;
:func:`compare_precision` measures how far a half-precision copy of a model moves each
massive value against float32, and warns above 1%.

>>> import torch
>>> from massact_lens.examples import tiny_model
>>> from massact_lens.models.planting import plant_massive_activation
>>> from massact_lens.find import scan
>>> model = plant_massive_activation(tiny_model("llama", n_layers=3), layer=1, dim=5, value=70000.0)
>>> import warnings
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     result = scan(model, torch.zeros(1, 4, dtype=torch.long), progress=False)  # warns
>>> round(check_range(result, stacklevel=1)), "exceeds float16" in str(caught[0].message)
(70000, True)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.batching import Batch, plan_batches
from massact_lens._core.hook_names import HookSelection
from massact_lens._core.loop import measure
from massact_lens._core.types import HookList, Inputs, Provenance
from massact_lens.find.criterion import MassiveActivations, find_massive
from massact_lens.find.scanner import scan

__all__ = ["compare_precision"]

_HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def compare_precision(
    reference: TransformerLensModel,
    half: TransformerLensModel,
    inputs: Inputs,
    *,
    massive: MassiveActivations | None = None,
    tolerance: float = 0.01,
    hooks: HookSelection | None = None,
    batch_size: int = 16,
    prepend_bos: bool | None = None,
) -> pd.DataFrame:
    """How much a half-precision copy moves each massive value, against ``reference``.

    ``reference`` is the model in float32, ``half`` the same weights in float16 or
    bfloat16 (load it twice: ``load_model(folder)`` and ``load_model(folder,
    dtype=torch.bfloat16)``). Both are scanned on ``inputs``; each massive entry of
    the reference (``massive``, default the paper's criterion on its scan) is looked
    up at the same (input, hook, position, dim) in the half model's hidden state.
    Returns one row per entry with both values and the relative difference, and warns
    (``RuntimeWarning``) when any moves by more than ``tolerance`` (1%).
    """
    ref_p, half_p = (Provenance.of(m) for m in (reference, half))
    if half_p.dtype not in _HALF:
        raise ValueError(f"half must run in float16 or bfloat16, not {half_p.dtype}.")
    ref_p.check_same(half_p, "reference and half", ignore=("dtype",))
    ref = scan(reference, inputs, hooks=hooks, batch_size=batch_size, prepend_bos=prepend_bos, progress=False)
    found = massive if massive is not None else find_massive(ref)
    if len(found) == 0:
        raise ValueError("The reference has no massive activation on these inputs: nothing to compare.")
    values = _values_at(half, inputs, found, ref.hook_names, batch_size, prepend_bos)
    frame = pd.DataFrame(
        [
            {"input_index": r.input_index, "hook_name": r.hook_name, "position": r.position, "dim": r.dim,
             "float32": r.value, half_p.dtype: v}
            for r, v in zip(found, values, strict=True)
        ]
    )
    frame["relative_difference"] = (frame[half_p.dtype] - frame["float32"]).abs() / frame["float32"].abs()
    worst = frame.loc[frame["relative_difference"].idxmax()]
    if float(worst["relative_difference"]) > tolerance or not frame["relative_difference"].notna().all():
        warnings.warn(
            f"In {half_p.dtype} a massive value moves by {float(worst['relative_difference']):.2%} against "
            f"float32 ({worst['float32']:,.1f} -> {worst[half_p.dtype]:,.1f} at input {int(worst['input_index'])}, "
            f"{worst['hook_name']}, dim {int(worst['dim'])}): more than {tolerance:.0%}.",
            RuntimeWarning,
            stacklevel=2,
        )
    return frame


class _ValuesAt:
    """A measurement: the values of a model's hidden states at the entries of ``found``."""

    reads_input_index = True
    needs_output = False

    def __init__(self, found: MassiveActivations, hook_names: Sequence[str]) -> None:
        self.hook_names = list(hook_names)
        self.wanted: dict[int, list[tuple[int, str, int, int]]] = {}
        for k, r in enumerate(found):
            self.wanted.setdefault(r.input_index, []).append((k, r.hook_name, r.position, r.dim))
        self.out = [float("nan")] * len(found)

    def hooks(self, batch: Batch) -> HookList:
        rows = {row: self.wanted.get(batch.input_index(row), []) for row in range(int(batch.tokens.shape[0]))}

        def reader(name: str):  # noqa: ANN202
            def read(activation: torch.Tensor, hook: Any = None) -> None:  # noqa: ARG001
                for row, entries in rows.items():
                    for k, hook_name, position, dim in entries:
                        if hook_name == name:
                            self.out[k] = float(activation[row, position, dim].float())

            return read

        return [(name, reader(name)) for name in self.hook_names]

    def update(self, batch: Batch, output: torch.Tensor | None) -> None:
        pass

    def result(self) -> list[float]:
        return self.out


def _values_at(
    model: TransformerLensModel,
    inputs: Inputs,
    found: MassiveActivations,
    hook_names: Sequence[str],
    batch_size: int,
    prepend_bos: bool | None,
) -> list[float]:
    """The values of ``model``'s hidden states at the entries of ``found`` (one pass per batch)."""
    values = _ValuesAt(found, hook_names)
    plan = plan_batches(model, inputs, batch_size=batch_size, prepend_bos=prepend_bos)
    measure(model, plan, values, progress=False, desc="precision")
    return values.result()
