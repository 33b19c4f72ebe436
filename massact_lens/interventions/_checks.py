"""Argument checks and mode types shared by the intervention modules (private: not API).

Modes are ``Literal`` types for the type checker and the reader. At run time the
aliases are plain ``str``: the test suite's beartype hook would otherwise reject a
wrong mode with its own TypeError before :func:`check_choice` can say which modes
exist, and that clear ValueError is what a user without the hook gets.

>>> check_choice("mode", "zero", ABLATION_MODES)
'zero'
>>> check_choice("mode", "half", ABLATION_MODES)
Traceback (most recent call last):
...
ValueError: mode must be 'zero' or 'mean', not 'half'.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from massact_lens.find.criterion import TOKEN_KINDS

__all__ = ["ABLATION_MODES", "OPERATIONS", "TOKEN_KINDS", "AblationMode", "Operation", "TokenKind", "check_choice"]

if TYPE_CHECKING:
    from massact_lens.find.criterion import TokenKind

    AblationMode = Literal["zero", "mean"]
    Operation = Literal["set", "scale"]
else:  # checked by check_choice (see the module docstring)
    TokenKind = AblationMode = Operation = str

#: The values of :data:`AblationMode` and :data:`Operation`, for the run-time checks.
ABLATION_MODES: tuple[str, ...] = ("zero", "mean")
OPERATIONS: tuple[str, ...] = ("set", "scale")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> Any:
    """``value`` when it is one of ``choices``; ValueError naming them otherwise."""
    if isinstance(value, str) and value in choices:
        return value
    names = [repr(c) for c in choices]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    raise ValueError(f"{name} must be {listed}, not {value!r}.")
