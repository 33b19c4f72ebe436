"""The one check of a view's result argument, before the view reads any of it."""

from __future__ import annotations


def _a(name: str) -> str:
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def expect_result(value: object, needs: type, view: str, argument: str, made_by: str) -> None:
    """Raise ``TypeError`` naming what ``value`` is, what ``view`` needs and which function
    makes it, unless ``value`` is a ``needs``.

    >>> expect_result(None, int, "a_figure", "count", "len(...)")
    Traceback (most recent call last):
    TypeError: a_figure draws an int (its count argument), not None: make one with len(...) and pass it.
    """
    if isinstance(value, needs):
        return
    got = "None" if value is None else _a(type(value).__name__)
    raise TypeError(
        f"{view} draws {_a(needs.__name__)} (its {argument} argument), not {got}: make one with {made_by} and pass it."
    )
