"""The check a verb runs on its model: a plain HuggingFace model is refused with what to do.

>>> import torch
>>> refuse_plain_hf(torch.nn.Linear(2, 2), "scan")  # not a HuggingFace model: nothing to say
>>> class Hf(torch.nn.Module):
...     config, base_model_prefix = object(), "model"
>>> refuse_plain_hf(Hf(), "scan")
Traceback (most recent call last):
...
TypeError: scan takes a TransformerBridge, and this is a plain HuggingFace model (Hf): wrap it first with model = massact_lens.load_model(hf_model) (it keeps its weights, dtype and placement, and finds its tokenizer).
"""

from __future__ import annotations

from typing import Any

__all__ = ["refuse_plain_hf"]


def refuse_plain_hf(model: Any, verb: str) -> None:
    """TypeError naming ``verb`` and :func:`massact_lens.load_model` when ``model`` is a HuggingFace
    model object (it has a ``config`` and a ``base_model_prefix`` but no TransformerLens ``cfg``)."""
    if hasattr(model, "cfg") or not (hasattr(model, "config") and hasattr(model, "base_model_prefix")):
        return
    raise TypeError(
        f"{verb} takes a TransformerBridge, and this is a plain HuggingFace model ({type(model).__name__}): wrap "
        "it first with model = massact_lens.load_model(hf_model) (it keeps its weights, dtype and placement, "
        "and finds its tokenizer)."
    )
