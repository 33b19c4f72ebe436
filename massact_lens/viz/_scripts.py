"""JavaScript that may sit inline in a page: escaped JSON, and the two libraries the views draw with.

Pages (:mod:`massact_lens.viz._page`) and notebook outputs (:mod:`massact_lens.viz._notebook`)
inline plotly.js and circuitsvis's bundle instead of loading them from a CDN; these
helpers make that text safe inside a ``<script>`` element.

>>> script_json(["</script>"])
'["\\\\u003c/script\\\\u003e"]'
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["circuitsvis_bundle", "inert_markup", "plain", "plotly_bundle", "script_json", "script_safe_js"]

#: Zero-width and unbreakable: after ``<`` or ``&`` it keeps an HTML parser from reading a tag or an entity.
WORD_JOINER = "\u2060"

_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def plain(value: Any) -> Any:
    """Tensors and arrays as lists, mappings with string keys: JSON-ready values.

    >>> plain({1: torch.tensor([1.5])})
    {'1': [1.5]}
    """
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def inert_markup(text: str) -> str:
    """Text that reads the same but parses as text when a view sets it as ``innerHTML``.

    circuitsvis's coloured-token views put each token into the page with
    ``innerHTML``, so a token ``<img src=x onerror=...>`` would become an element
    and run. A word joiner (U+2060, zero width) after every ``<`` and ``&`` makes
    the HTML parser emit them as text: the token looks unchanged, in the view and
    in its tooltip (which shows it as plain text).

    >>> inert_markup("<img src=x>&amp;") == "<\u2060img src=x>&\u2060amp;"
    True
    """
    return text.replace("<", "<" + WORD_JOINER).replace("&", "&" + WORD_JOINER)


def script_json(value: Any) -> str:
    """JSON that is safe inside an HTML ``<script>`` element.

    ``<``, ``>`` and ``&`` (and the two JavaScript line separators) are written as
    ``\\uXXXX`` escapes: the parsed value is unchanged, but no string in it can
    close the element or open a comment. Tensors and arrays become lists.

    >>> script_json({"tokens": ["</script>", "a&b"]})
    '{"tokens": ["\\\\u003c/script\\\\u003e", "a\\\\u0026b"]}'
    """
    text = json.dumps(plain(value))
    return re.sub("[<>&\u2028\u2029]", lambda m: _SCRIPT_ESCAPES[m.group(0)], text)


def script_safe_js(source: str) -> str:
    """JavaScript source made safe to inline in a ``<script>`` element.

    ``</script`` becomes ``<\\/script`` (the same string in JavaScript) and
    ``<!--`` becomes ``<\\!--``; a trailing ``sourceMappingURL`` comment is dropped.

    >>> script_safe_js('x = "</script>";')
    'x = "<\\\\/script>";'
    """
    source = re.sub(r"</(script)", r"<\\/\1", source, flags=re.IGNORECASE)
    source = source.replace("<!--", "<\\!--")
    return re.sub(r"\n//# sourceMappingURL=\S*\s*$", "\n", source)


@lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """circuitsvis's browser bundle (the ``iife`` build that defines ``CircuitsVis``), script-safe.

    Run as a classic script it defines the global ``CircuitsVis`` (about 1.3 MB).
    """
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    return script_safe_js(path.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def plotly_bundle() -> str:
    """plotly.js as installed with plotly (defines the global ``Plotly``, about 4.6 MB), script-safe."""
    from plotly.offline import get_plotlyjs

    return script_safe_js(get_plotlyjs())
