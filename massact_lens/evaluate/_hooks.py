"""The checks every evaluation applies before running: a user's ``fwd_hooks``, paraphrase pairs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.types import HookList


def check_hook_list(model: TransformerLensModel, fwd_hooks: Sequence[Any]) -> HookList:
    """``fwd_hooks`` as a list, after checking every pair names a hook point of ``model``.

    >>> from massact_lens.examples import tiny_model
    >>> check_hook_list(tiny_model(), [("blocks.9.hook_resid_post", print)])
    Traceback (most recent call last):
    ...
    ValueError: The model has no hook point 'blocks.9.hook_resid_post'; list them with sorted(model.hook_dict).
    """
    hooks = list(fwd_hooks)
    known = model.hook_dict  # type: ignore[attr-defined]
    for item in hooks:
        if not (isinstance(item, tuple) and len(item) == 2 and callable(item[1])):
            raise TypeError(f"fwd_hooks must hold (hook name, function) pairs, not {item!r}.")
        name = item[0]
        if isinstance(name, str) and name not in known:
            raise ValueError(f"The model has no hook point {name!r}; list them with sorted(model.hook_dict).")
        if not isinstance(name, str) and not callable(name):
            raise TypeError(f"A hook name must be a string or a filter function, not {name!r}.")
    return hooks


def check_pairs(pairs: Sequence[tuple[str, str]] | None) -> list[str]:
    """The sentences of paraphrase ``pairs``, flattened (``[a0, b0, a1, b1, ...]``); empty for None.

    >>> check_pairs([("Hi.", "Hello.")]), check_pairs(None)
    (['Hi.', 'Hello.'], [])
    """
    if pairs is None:
        return []
    flat = []
    for pair in pairs:
        if not (isinstance(pair, tuple | list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise TypeError(f"pairs must hold (sentence, paraphrase) string pairs, not {pair!r}.")
        flat.extend(pair)
    if not flat:
        raise ValueError("pairs is empty: pass None or at least one pair.")
    return flat
