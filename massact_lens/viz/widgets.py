"""circuitsvis views that draw offline: attention heads with the massive tokens marked, tokens by magnitude.

The views render results (:class:`~massact_lens.attention.AttentionLogits`,
:class:`~massact_lens.viz.HiddenStates`): :func:`attention_heads_widget`,
:func:`tokens_by_activation_widget`. :func:`attention_heads` and
:func:`tokens_by_activation` are the one-liners that measure a model first. A
:class:`Widget` inlines circuitsvis's bundle (no CDN, no request), and its props
are escaped so that no token text can close the ``<script>`` they sit in.

>>> from massact_lens.examples import minilm
>>> view = attention_heads(minilm(), "The cat sat on the mat.", layer=2, min_value=50, min_ratio=200)
>>> view.props["tokens"][:2], view.props["maskUpperTri"]
(['[CLS] ★d99', 'the'], False)
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import circuitsvis
import numpy as np
import torch
from circuitsvis.utils.render import RenderedHTML
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._types import is_causal
from massact_lens.attention import AttentionLogits, attention_logits
from massact_lens.profiles import MassiveProfile
from massact_lens.viz.hidden import HiddenStates, hidden_states

__all__ = [
    "MASSIVE_MARK",
    "Widget",
    "attention_heads",
    "attention_heads_widget",
    "script_json",
    "tokens_by_activation",
    "tokens_by_activation_widget",
]

#: Appended to the label of a massive token, with its dims: ``"[CLS] ★d99"``.
MASSIVE_MARK = "★"

_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def script_json(value: Any) -> str:
    """JSON that is safe inside an HTML ``<script>`` element.

    ``<``, ``>`` and ``&`` (and the two JavaScript line separators) are written as
    ``\\uXXXX`` escapes: the parsed value is unchanged, but no string in it can
    close the element or open a comment. Tensors and arrays become lists.

    >>> script_json({"tokens": ["</script>", "a&b"]})
    '{"tokens": ["\\\\u003c/script\\\\u003e", "a\\\\u0026b"]}'
    """
    text = json.dumps(_plain(value))
    return re.sub("[<>&\u2028\u2029]", lambda m: _SCRIPT_ESCAPES[m.group(0)], text)


def script_safe_js(source: str) -> str:
    """JavaScript source made safe to inline in a ``<script>`` element.

    ``</script`` becomes ``<\\/script`` (the same string in JavaScript) and
    ``<!--`` becomes ``<\\!--``; a trailing ``sourceMappingURL`` comment is dropped.
    """
    source = re.sub(r"</(script)", r"<\\/\1", source, flags=re.IGNORECASE)
    source = source.replace("<!--", "<\\!--")
    return re.sub(r"\n//# sourceMappingURL=\S*\s*$", "\n", source)


@lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """circuitsvis's browser bundle (the ``iife`` build that defines ``CircuitsVis``), script-safe."""
    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    return script_safe_js(path.read_text(encoding="utf-8"))


class Widget(RenderedHTML):
    """A circuitsvis view that draws offline.

    A ``circuitsvis.utils.render.RenderedHTML`` (so it displays inline in
    Jupyter and VS Code), except that its notebook display and ``str()`` are
    ``local_src``, the inlined bundle; ``cdn_src`` (and ``show_code()``) keep
    circuitsvis's CDN form.

    Attributes:
        element: the circuitsvis React component (``"AttentionHeads"``, ...).
        props: its props, as plain JSON-ready values.
        meta: what the view shows, for tests and reports (layer, massive
            positions, colour scale, ...).
    """

    def __init__(self, element: str, props: dict[str, Any], meta: dict[str, Any] | None = None) -> None:
        self.element = element
        self.props = {k: _plain(v) for k, v in props.items() if v is not None}
        self.meta = dict(meta or {})
        self.div_id = "circuits-vis-" + uuid.uuid4().hex[:13]

    def _call(self, namespace: str = "CircuitsVis") -> str:
        return f'{namespace}.render("{self.div_id}", {namespace}.{self.element}, {script_json(self.props)});'

    @property
    def local_src(self) -> str:  # type: ignore[override]
        """The widget with circuitsvis's bundle inlined: draws offline, about 1.3 MB."""
        return (
            f'<div id="{self.div_id}" style="margin: 15px 0;"></div>\n'
            f'<script crossorigin type="module">\n{circuitsvis_bundle()}\n{self._call()}\n</script>'
        )

    @property
    def cdn_src(self) -> str:  # type: ignore[override]
        """circuitsvis's CDN form (needs internet to draw)."""
        url = f"https://unpkg.com/circuitsvis@{circuitsvis.__version__}/dist/cdn/esm.js"
        return (
            f'<div id="{self.div_id}" style="margin: 15px 0;"></div>\n<script crossorigin type="module">\n'
            f'import {{ render, {self.element} }} from "{url}";\n'
            f'render("{self.div_id}", {self.element}, {script_json(self.props)});\n</script>'
        )

    def mount_html(self) -> str:
        """The div and a classic script that draws into it, for a page that already ran
        :func:`circuitsvis_bundle` (what :func:`massact_lens.viz.save_html` writes)."""
        return f'<div id="{self.div_id}" class="circuitsvis"></div>\n<script>{self._call()}</script>'

    def _repr_html_(self) -> str:
        return self.local_src

    def __str__(self) -> str:
        return self.local_src

    def __repr__(self) -> str:
        return f"Widget({self.element}, {sorted(self.props)})"


#: Which tokens to mark: ``{position: dims}``, or a list of positions.
Marks = Mapping[int, Sequence[int]] | Sequence[int]


def _marks(massive: Marks | None) -> dict[int, tuple[int, ...]]:
    if massive is None:
        return {}
    if isinstance(massive, Mapping):
        return {int(p): tuple(int(d) for d in dims) for p, dims in massive.items()}
    bad = [p for p in massive if isinstance(p, bool) or not isinstance(p, int)]
    if bad:
        raise TypeError(f"massive positions must be integers, not {bad}.")
    return {int(p): () for p in massive}


def _marked(tokens: Sequence[str], massive: Mapping[int, Sequence[int]]) -> list[str]:
    out = []
    for position, token in enumerate(tokens):
        dims = massive.get(position)
        if dims is None:
            out.append(token)
            continue
        shown = ",".join(f"d{d}" for d in list(dims)[:3]) + ("…" if len(dims) > 3 else "")
        out.append(f"{token} {MASSIVE_MARK}{shown}" if shown else f"{token} {MASSIVE_MARK}")
    return out


def _chosen_heads(heads: Sequence[int] | None, n_heads: int, max_value: float | int | None) -> list[int]:
    chosen = list(range(n_heads)) if heads is None else [int(h) for h in heads]
    bad = [h for h in chosen if not 0 <= h < n_heads]
    if bad or not chosen:
        raise ValueError(f"Heads {bad or chosen} do not exist: the model has {n_heads} heads (0..{n_heads - 1}).")
    if max_value is not None and not max_value > 0:
        raise ValueError(f"max_value must be positive, not {max_value!r}.")
    return chosen


def attention_heads_widget(
    logits: AttentionLogits,
    layer: int,
    *,
    heads: Sequence[int] | None = None,
    massive: Marks | None = None,
    exclude_bos: bool = False,
    max_value: float | int | None = None,
    causal: bool | None = None,
) -> Widget:
    """The attention patterns of one layer's heads on one input, massive tokens marked.

    Draws circuitsvis's ``AttentionHeads`` with ``attention`` of shape
    ``[head_index, query_pos, key_pos]`` (``logits.pattern`` of the layer). Each
    massive token's label gets ``★`` and its dims (``"[CLS] ★d99"``).

    Args:
        logits: from :func:`massact_lens.attention.attention_logits` (one input).
        layer: the layer whose heads are drawn (one of ``logits.layers``).
        heads: only these heads (default all).
        massive: which tokens to mark: a ``{position: dims}`` map (as
            :meth:`~massact_lens.viz.HiddenStates.massive` gives) or a list of positions.
        exclude_bos: leave the sink keys (position 0 and the massive tokens) out of
            the colour scale: the scale's maximum is the largest attention on any
            other key; the sink columns saturate.
        max_value: the colour scale's maximum, by hand (overrides ``exclude_bos``).
        causal: mask the upper triangle. None: as the logits say (a causal model's
            logits are NaN above the diagonal); an encoder's upper triangle is real
            attention and stays visible.

    Returns:
        A :class:`Widget`; ``meta`` holds the layer, heads, massive positions,
        the colour maximum and whether the upper triangle is masked.

    >>> from massact_lens.attention import attention_logits
    >>> from massact_lens.examples import minilm
    >>> logits = attention_logits(minilm(), "Rain fell.", layers=[3])
    >>> view = attention_heads_widget(logits, 3, heads=[0, 1], massive=[0], exclude_bos=True)
    >>> view.props["attentionHeadNames"], view.meta["massive"], view.meta["mask_upper_tri"]
    (['L3H0', 'L3H1'], {0: ()}, False)
    """
    if layer not in logits.layers:
        raise ValueError(f"Layer {layer} is not in these logits (layers {list(logits.layers)}).")
    index = logits.layers.index(layer)
    chosen = _chosen_heads(heads, int(logits.pattern.shape[1]), max_value)
    marks = _marks(massive)
    pattern = logits.pattern[index][chosen]  # [head, query, key]
    tokens = list(logits.tokens)
    if pattern.shape[-1] != len(tokens) or pattern.shape[-2] != len(tokens):
        raise ValueError(
            f"Layer {layer}'s pattern is {tuple(pattern.shape[-2:])} for {len(tokens)} tokens: "
            "circuitsvis draws square query x key patterns over the tokens only."
        )
    if causal is None:
        above = torch.ones(pattern.shape[-2:], dtype=torch.bool).triu(diagonal=1)
        causal = bool(torch.isnan(logits.logits[index][:, above]).all())
    scale = None if max_value is None else float(max_value)
    if scale is None and exclude_bos:
        sinks = sorted({0, *marks})
        keep = torch.ones(pattern.shape[-1], dtype=torch.bool)
        keep[[s for s in sinks if s < len(keep)]] = False
        if bool(keep.any()):
            scale = float(pattern[..., keep].max())
            scale = scale if scale > 0 else None
    return Widget(
        "AttentionHeads",
        {
            "attention": pattern,
            "tokens": _marked(tokens, marks),
            "attentionHeadNames": [f"L{layer}H{h}" for h in chosen],
            "maxValue": scale,
            "minValue": 0.0 if scale is not None else None,
            "maskUpperTri": causal,
        },
        meta={
            "layer": layer,
            "heads": tuple(chosen),
            "massive": marks,
            "max_value": scale,
            "mask_upper_tri": causal,
            "tokens": tuple(tokens),
            "provenance": logits.model,
        },
    )


def attention_heads(
    model: TransformerLensModel,
    text: str | torch.Tensor,
    layer: int,
    *,
    heads: Sequence[int] | None = None,
    massive: Marks | MassiveProfile | None = None,
    min_value: float | int = 100.0,
    min_ratio: float | int = 1000.0,
    exclude_bos: bool = False,
    max_value: float | int | None = None,
    prepend_bos: bool | None = None,
) -> Widget:
    """Measure one input's attention and draw one layer's heads (:func:`attention_heads_widget`).

    Args:
        model: a TransformerBridge with eager attention (:func:`massact_lens.load_model`).
        text: one string, or one input's token ids.
        massive: which tokens to mark: as :func:`attention_heads_widget` takes, a
            :class:`~massact_lens.MassiveProfile` (its dims at its hooks, with its
            thresholds), or None to apply the criterion (``min_value``,
            ``min_ratio``) to this input's residual stream.
        prepend_bos: for a string, put BOS / [CLS] first (None: the model's default).
        layer, heads, exclude_bos, max_value: as :func:`attention_heads_widget` takes.

    Raises:
        ValueError: a layer or head that does not exist, a bad threshold.

    >>> from massact_lens.examples import minilm
    >>> view = attention_heads(minilm(), "Rain fell.", layer=3, heads=[0, 1],
    ...                        massive=[0], exclude_bos=True)
    >>> view.props["attentionHeadNames"], view.meta["massive"]
    (['L3H0', 'L3H1'], {0: ()})
    >>> 0 < view.props["maxValue"] < 1
    True
    """
    _chosen_heads(heads, int(model.cfg.n_heads), max_value)  # before any forward pass
    if isinstance(massive, MassiveProfile):
        states = hidden_states(model, text, hooks=list(massive.hook_names), prepend_bos=prepend_bos)
        found = states.massive(massive.min_value, massive.min_ratio)
        dims = set(massive.massive_dims)
        massive = {p: tuple(d for d in ds if d in dims) for p, ds in found.items() if dims.intersection(ds)}
    elif massive is None:
        massive = hidden_states(model, text, prepend_bos=prepend_bos).massive(min_value, min_ratio)
    logits = attention_logits(model, text, layers=[layer], prepend_bos=prepend_bos)
    return attention_heads_widget(
        logits, layer, heads=heads, massive=massive, exclude_bos=exclude_bos, max_value=max_value,
        causal=is_causal(model),
    )


def tokens_by_activation_widget(states: HiddenStates, *, dim: int | None = None) -> Widget:
    """One input's tokens coloured by their largest ``|activation|``, one colouring per hidden state.

    Draws circuitsvis's ``ColoredTokensMulti`` with ``values`` of shape
    ``[pos, n_hooks]``: per token and hook point, ``max_d |x[pos, d]|``, or with
    ``dim`` the signed ``x[pos, dim]``. Hover a token for all its values; pick a
    hook point to colour by it. Massive tokens stand out at once.

    >>> from massact_lens.examples import minilm
    >>> from massact_lens.viz import hidden_states
    >>> view = tokens_by_activation_widget(hidden_states(minilm(), "Rain fell.", layers=[0]), dim=99)
    >>> view.props["labels"], round(view.props["values"][0][1])     # [CLS], blocks.0.ln2.hook_in
    (['blocks.0.ln1.hook_in', 'blocks.0.ln2.hook_in'], 220)
    """
    d_model = int(states.values.shape[-1])
    if dim is not None and (isinstance(dim, bool) or not 0 <= dim < d_model):
        raise ValueError(f"dim {dim!r} does not exist: d_model is {d_model}.")
    # [hooks, pos]: the largest |x| of each token, or one dim's signed value
    values = states.values.abs().amax(dim=-1) if dim is None else states.values[:, :, dim]
    return Widget(
        "ColoredTokensMulti",
        {"tokens": list(states.tokens), "values": values.T.contiguous(), "labels": list(states.hook_names)},
        meta={"dim": dim, "hook_names": states.hook_names, "tokens": states.tokens, "provenance": states.provenance},
    )


def tokens_by_activation(
    model: TransformerLensModel,
    text: str | torch.Tensor,
    *,
    dim: int | None = None,
    hooks: str | Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    prepend_bos: bool | None = None,
) -> Widget:
    """Read one input's hidden states and colour its tokens (:func:`tokens_by_activation_widget`).

    Args:
        model: a TransformerBridge.
        text: one string, or one input's token ids.
        dim: colour by this feature dim (signed) instead of the largest ``|x|``.
        hooks, layers: the hidden states (default: the residual stream, all layers;
            see :func:`massact_lens.viz.hidden_states`).
        prepend_bos: for a string, put BOS / [CLS] first (None: the model's default).

    >>> from massact_lens.examples import minilm
    >>> view = tokens_by_activation(minilm(), "Rain fell.", dim=99, layers=[0])
    >>> round(view.props["values"][0][1])     # [CLS] at blocks.0.ln2.hook_in
    220
    """
    states = hidden_states(model, text, hooks=hooks, layers=layers, prepend_bos=prepend_bos)
    return tokens_by_activation_widget(states, dim=dim)
