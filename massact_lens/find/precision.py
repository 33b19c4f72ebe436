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
>>> def planted():
...     return plant_massive_activation(tiny_model("llama", n_layers=3), layer=1, dim=5, value=3000.0)
>>> half = planted().to(torch.bfloat16)  # TransformerLens prints the change
Changing model dtype to torch.bfloat16
>>> table = compare_precision(planted(), half, torch.tensor([[0, 7, 9, 11]]))  # token 0 carries it
>>> sorted(set(table["dim"])), list(table.columns)[-3:]
([5], ['float32', 'bfloat16', 'relative_difference'])
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._fingerprint import other_weights
from massact_lens._core._plain_hf import refuse_plain_hf
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

    Checked before any pass: ``reference`` runs in float32, ``half`` in float16 or
    bfloat16 with the same shape; ``massive`` (when given) are find_massive's records of
    a scan of ``reference`` on these ``inputs`` (same model, same inputs and BOS; their
    values are checked against the reference's scan before the half model runs).
    """
    refuse_plain_hf(reference, "compare_precision")
    refuse_plain_hf(half, "compare_precision")
    ref_p, half_p = (Provenance.of(m) for m in (reference, half))
    if ref_p.dtype != "float32":
        raise ValueError(
            f"reference must run in float32, not {ref_p.dtype}: load it in full precision "
            "(load_model(folder), float32 by default) and pass the half-precision copy as half."
        )
    if half_p.dtype not in _HALF:
        raise ValueError(
            f"half must run in float16 or bfloat16, not {half_p.dtype}: load the same weights with "
            "load_model(folder, dtype=torch.bfloat16) (or torch.float16)."
        )
    ref_p.check_same(half_p, "reference and half", ignore=("dtype",))
    if not isinstance(inputs, str | Sequence | torch.Tensor):
        raise TypeError(
            "compare_precision reads the inputs three times (a scan, each model's values): pass a list of "
            f"strings or a token tensor, not {type(inputs).__name__}."
        )
    if massive is not None:
        _check_records(reference, inputs, massive, hooks, batch_size, prepend_bos)
        hooks = hooks if hooks is not None else massive.hook_names
    ref = scan(reference, inputs, hooks=hooks, batch_size=batch_size, prepend_bos=prepend_bos, progress=False)
    found = massive if massive is not None else find_massive(ref)
    if len(found) == 0:
        raise ValueError(
            "The reference has no massive activation on these inputs: nothing to compare. Pass longer or "
            "more inputs, or records of find_massive with lower thresholds (massive=...)."
        )
    if massive is not None:
        _check_values(ref, massive)
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


def _check_records(
    reference: TransformerLensModel,
    inputs: Inputs,
    massive: Any,
    hooks: str | Sequence[str] | None,
    batch_size: int,
    prepend_bos: bool | None,
) -> None:
    """Refuse, before any pass, records that are not find_massive's on ``reference`` and ``inputs``."""
    if not isinstance(massive, MassiveActivations):
        raise TypeError(
            f"massive must be find_massive's records of a scan of these inputs, not {type(massive).__name__}: "
            "records name (input, position) entries, which a profile does not."
        )
    what = "massive (records) and reference"
    Provenance.check_same(massive.provenance, Provenance.of(reference), what)
    differ = other_weights(reference, massive.provenance.dtype, massive.weights)
    if differ:
        raise ValueError(
            f"The records were found on other weights than the reference's ({differ}), though name and shape "
            "agree: scan the reference itself (leave massive=None, or pass find_massive(scan(reference, inputs)))."
        )
    if hooks is not None:
        wanted = {hooks} if isinstance(hooks, str) else set(hooks)
        missing = sorted({r.hook_name for r in massive} - wanted)
        if missing:
            raise ValueError(f"The records are at hooks {missing[:3]} that hooks= leaves out: add them, or leave hooks=None.")
    plan = plan_batches(reference, inputs, batch_size=batch_size, prepend_bos=prepend_bos)
    tokens: dict[int, torch.Tensor] = {}
    for batch in plan.batches:
        for row in range(int(batch.tokens.shape[0])):
            tokens[batch.input_index(row)] = batch.tokens[row, : int(batch.lengths[row])]
    scanned = massive.scan
    same = scanned.n_inputs == len(tokens) and all(
        int(scanned.lengths[i]) == len(t) for i, t in tokens.items()) and plan.prepend_bos == scanned.prepend_bos
    for i, row in tokens.items() if same else ():  # every scanned entry's token is the input's token there
        positions = scanned.positions[i].long()
        valid = (positions >= 0) & (positions < len(row))
        if not torch.equal(scanned.token_ids[i][valid].long(), row[positions[valid]].long()):
            same = False
            break
    if not same:
        raise ValueError(
            f"The records come from a scan of other inputs ({scanned.n_inputs} inputs, BOS {scanned.prepend_bos}) "
            f"than these ({len(tokens)} inputs, BOS {plan.prepend_bos}): pass the inputs (and prepend_bos) that "
            "were scanned, or leave massive=None to find the massive activations on these inputs."
        )


def _check_values(ref: Any, massive: Any) -> None:
    """Refuse records whose values the reference does not reproduce (other weights of the same shape)."""
    for r in massive:
        h = ref.hook_names.index(r.hook_name)
        at = (ref.positions[r.input_index, h] == r.position) & (ref.dims[r.input_index, h] == r.dim)
        values = ref.values[r.input_index, h][at]
        if values.numel() and abs(float(values[0]) - r.value) > 1e-3 * max(1.0, abs(r.value)):
            raise ValueError(
                f"The records do not match the reference: {r.hook_name}, input {r.input_index}, position "
                f"{r.position}, dim {r.dim} is {float(values[0]):,.2f} in the reference but {r.value:,.2f} in "
                "the records. They were found on other weights: scan the reference itself (massive=None)."
            )


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
