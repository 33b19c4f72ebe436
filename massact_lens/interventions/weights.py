"""Read and temporarily edit single weight entries of a model (e.g. a super weight).

Every matrix is indexed as ``[row, column]`` = ``[output dim, input channel]``, the
layout of ``torch.nn.Linear.weight``, whatever the module stores: GPT-2's
``Conv1D`` keeps ``[in, out]`` and is read through its transpose. For the MLP down
projection (``"mlp.out"``) ``row`` is the residual dim written and ``column`` the
MLP hidden channel read; this is TransformerLens' ``W_out[column, row]``.

>>> from massact_lens.examples import tiny_model
>>> model = tiny_model("llama")
>>> with edited_weights(model, {(1, "mlp.out", 5, 0): 0.0}):
...     float(projection_weight(model, 1)[5, 0])
0.0
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._plain_hf import refuse_plain_hf

__all__ = ["edited_weights", "projection_weight"]  # edits_from_rows: what lineage's records build edits with

#: One weight entry: (layer, component inside the block, row = output dim, column = input channel).
WeightEntry = tuple[int, str, int, int]
#: One entry of a 1-D weight (a norm's gain, a bias): (layer, component, index).
VectorEntry = tuple[int, str, int]

#: Other names accepted for a component (``W_down`` is the MLP down projection).
_ALIASES = {"W_down": "mlp.out"}


def _module(model: TransformerLensModel, layer: Any, component: Any) -> Any:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, not {layer!r}.")
    n_layers = int(model.cfg.n_layers)
    if not 0 <= layer < n_layers:
        raise ValueError(f"Layer {layer} does not exist: the model has {n_layers} layers (0..{n_layers - 1}).")
    if component == "W_out":
        raise ValueError(
            "'W_out' is ambiguous here: TransformerLens' W_out is [d_mlp, d_model], while edits "
            "index (row = output dim, column = input channel). Use 'mlp.out' (or 'W_down') with "
            "row = the residual dim and column = the MLP channel."
        )
    if not isinstance(component, str):
        raise TypeError(f"component must be a string such as 'mlp.out', not {component!r}.")
    name = _ALIASES.get(component, component)
    module: Any = model.blocks[layer]  # type: ignore[attr-defined]
    for part in name.split("."):
        module = getattr(module, part, None)
        if module is None:
            raise ValueError(
                f"Block {layer} has no component {component!r}. Use a projection such as "
                "'mlp.out' (the down projection), 'mlp.in', 'mlp.gate', 'attn.o'."
            )
    original = getattr(module, "original_component", None)
    return module if original is None else original


def projection_weight(
    model: TransformerLensModel, layer: int, component: str = "mlp.out"
) -> Float[torch.Tensor, "d_out d_in"]:
    """The weight of one projection of block ``layer`` as ``[output dim, input channel]``.

    A detached view of the model's own parameter (transposed for GPT-2's
    ``Conv1D``): it shares the storage, so writing into it edits the model; use
    :func:`edited_weights` for that, which puts the values back.

    Raises:
        ValueError: no such layer or component, or a component whose weight is not a
            parameter of the model (a joint projection split into views, for instance).

    >>> from massact_lens.examples import tiny_model
    >>> projection_weight(tiny_model("gpt2"), 0).shape   # d_model x d_mlp
    torch.Size([32, 128])
    """
    module = _module(model, layer, component)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        hint = " (a 1-D weight: edit it with the key (layer, component, index))" if isinstance(weight, torch.Tensor) and weight.ndim == 1 else ""
        raise ValueError(f"Component {component!r} of block {layer} has no 2-D weight ({type(module).__name__}){hint}.")
    if not any(weight is p for p in model.parameters()):  # type: ignore[attr-defined]
        raise ValueError(
            f"The weight of {component!r} in block {layer} is not a parameter of the model "
            "(a split view of a joint projection?): editing it would not change the forward pass."
        )
    if isinstance(module, torch.nn.Linear):
        return weight.detach()
    if hasattr(module, "nf") and hasattr(module, "nx"):  # transformers' Conv1D: [in, out]
        return weight.detach().T
    raise ValueError(
        f"Cannot tell the layout of {type(module).__name__}'s weight in {component!r} of block "
        f"{layer}: only torch.nn.Linear ([out, in]) and transformers' Conv1D ([in, out]) are known."
    )


def _check_value(value: Any, entry: Any, dtype: torch.dtype) -> float:
    """A finite number (Python, numpy or 0-d tensor) that fits ``dtype``."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.dtype.is_complex and value.dtype != torch.bool:
        value = value.item()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool) and hasattr(value, "item"):
        value = value.item()  # numpy scalars
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(
            f"The value for {entry} must be a finite number (a Python, numpy or 0-d torch scalar), not {value!r}."
        )
    if dtype.is_floating_point and abs(value) > torch.finfo(dtype).max:
        largest = torch.finfo(dtype).max
        raise ValueError(
            f"The value {value:g} for {entry} does not fit the weight's dtype {str(dtype).replace('torch.', '')} "
            f"(largest {largest:g}): the model would run with inf. Choose a value within +-{largest:g}, or "
            "load the model in float32 (load_model(..., dtype=torch.float32))."
        )
    return float(value)


def _vector(model: TransformerLensModel, layer: int, component: Any) -> torch.Tensor:
    """The 1-D parameter a 3-part key names: ``component``'s weight, or ``"<module>.bias"`` / ``".weight"``."""
    name, part = component, "weight"
    if isinstance(component, str) and component.rsplit(".", 1)[-1] in ("weight", "bias") and "." in component:
        name, part = component.rsplit(".", 1)
    module = _module(model, layer, name)
    tensor = getattr(module, part, None)
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 1:
        raise ValueError(
            f"Component {component!r} of block {layer} has no 1-D {part}: a key (layer, component, index) "
            "edits a 1-D weight, such as a norm's gain ('ln2_post') or a bias ('mlp.out.bias'); a matrix "
            "takes (layer, component, row, column)."
        )
    if not any(tensor is p for p in model.parameters()):  # type: ignore[attr-defined]
        raise ValueError(f"The {part} of {component!r} in block {layer} is not a parameter of the model: editing it would not change the forward pass.")
    return tensor.detach()


def _plan(model: TransformerLensModel, entry: Any) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The tensor a key edits and the index in it, checked."""
    if not isinstance(entry, tuple) or len(entry) not in (3, 4):
        raise ValueError(
            f"Each edit key must be (layer, component, row, column) for a matrix or (layer, component, index) "
            f"for a 1-D weight (a norm's gain, a bias), not {entry!r}."
        )
    layer, component, *index = entry
    tensor = projection_weight(model, layer, component) if len(index) == 2 else _vector(model, layer, component)
    axes = ("row", "column") if len(index) == 2 else ("index",)
    for axis, (name, i) in enumerate(zip(axes, index, strict=True)):
        size = int(tensor.shape[axis])
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < size:
            raise ValueError(f"{name} {i!r} of {entry} is out of range: {component!r} has {size} {name}s: pass a {name} in 0..{size - 1}.")
    return tensor, tuple(index)


@contextlib.contextmanager
def edited_weights(
    model: TransformerLensModel, edits: Mapping[WeightEntry | VectorEntry, Any]
) -> Iterator[None]:
    """Set single weight entries for the length of a ``with`` block, then restore them.

    Two key forms:

    * ``(layer, component, row, column)`` for a matrix, with ``row`` = output dim and
      ``column`` = input channel (see :func:`projection_weight`), e.g.
      ``(11, "mlp.out", 507, 1229)``, a super weight;
    * ``(layer, component, index)`` for a 1-D weight: a norm's gain, e.g.
      ``(3, "ln2_post", 163)`` (Gemma's post-feed-forward norm; the stored weight,
      whose gain is ``1 + weight`` there: see ``Lineage.amplifiers()``'s ``weight``), or
      a bias, ``(3, "mlp.out.bias", 163)`` (``"<module>.weight"`` / ``".bias"`` name the
      parameter; a bare component means its ``weight``).

    A value is a finite Python, numpy or 0-d torch number that fits the weight's
    dtype. Every entry is checked before anything changes; the original values are
    put back when the block ends, also when it raises. Works with or without grad mode.

    Raises:
        ValueError: no edits, a layer / component / index out of range, a non-finite
            value or one beyond the dtype's range, or the same entry twice (under two names).

    >>> from massact_lens.examples import tiny_model
    >>> model = tiny_model()
    >>> before = float(projection_weight(model, 0)[3, 7])
    >>> with edited_weights(model, {(0, "W_down", 3, 7): 0.0, (1, "ln2", 5): 2.0}):
    ...     float(projection_weight(model, 0)[3, 7]), float(model.blocks[1].ln2.original_component.weight.detach()[5])
    (0.0, 2.0)
    >>> float(projection_weight(model, 0)[3, 7]) == before
    True
    """
    refuse_plain_hf(model, "edited_weights")
    if not isinstance(edits, Mapping) or len(edits) == 0:
        raise ValueError("No edits: pass a mapping {(layer, 'mlp.out', row, column): value, ...}.")
    planned: list[tuple[torch.Tensor, tuple[int, ...], float]] = []
    seen: dict[tuple[int, int], Any] = {}
    for entry, value in edits.items():
        tensor, index = _plan(model, entry)
        offset = int(tensor.storage_offset() + sum(i * s for i, s in zip(index, tensor.stride(), strict=False)))
        key = (tensor.untyped_storage().data_ptr(), offset)
        if key in seen:
            raise ValueError(f"The edits {seen[key]} and {entry} set the same weight entry.")
        seen[key] = entry
        planned.append((tensor, index, _check_value(value, entry, tensor.dtype)))
    originals: list[tuple[torch.Tensor, tuple[int, ...], torch.Tensor]] = []
    try:
        with torch.no_grad():
            for tensor, index, value in planned:
                originals.append((tensor, index, tensor[index].clone()))
                tensor[index] = value
        yield
    finally:
        with torch.no_grad():
            for tensor, index, old in reversed(originals):
                tensor[index] = old


def edits_from_rows(rows: pd.DataFrame, value: float | int = 0.0) -> dict[WeightEntry, float | int]:
    """Edits setting the down-projection entries of ``rows`` to ``value``.

    ``rows`` has the columns ``layer, row, column`` (e.g. some rows of
    :meth:`massact_lens.trace.writers.Lineage.super_weights`); an entry that appears twice
    is edited once.

    >>> import pandas as pd
    >>> edits_from_rows(pd.DataFrame({"layer": [11], "row": [507], "column": [1229]}))
    {(11, 'mlp.out', 507, 1229): 0.0}
    """
    missing = {"layer", "row", "column"} - set(rows.columns)
    if missing:
        raise ValueError(f"rows lacks the columns {sorted(missing)}: pass rows of Lineage.super_weights().")
    if len(rows) == 0:
        raise ValueError("rows is empty: there is no weight to edit.")
    entries = zip(rows["layer"].tolist(), rows["row"].tolist(), rows["column"].tolist(), strict=True)
    return {(int(layer), "mlp.out", int(row), int(column)): value for layer, row, column in entries}
