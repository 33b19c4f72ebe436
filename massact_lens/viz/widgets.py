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

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Float
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.hook_names import HookSelection
from massact_lens._core.types import is_causal
from massact_lens.attention import AttentionLogits, attention_logits
from massact_lens.find.profiles import MassiveProfile
from massact_lens.viz._expect import expect_result
from massact_lens.viz._labels import layer_labels
from massact_lens.viz._rendered import Widget
from massact_lens.viz.hidden import HiddenStates, given_criterion, hidden_states

__all__ = [
    "Widget",
    "attention_heads",
    "attention_heads_widget",
    "tokens_by_activation",
    "tokens_by_activation_widget",
]

#: Appended to the label of a massive token, with its dims: ``"[CLS] ★d99"``.
MASSIVE_MARK = "★"
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


def _check_marks(marks: Mapping[int, Sequence[int]], n_tokens: int) -> None:
    bad = sorted(p for p in marks if not 0 <= p < n_tokens)
    if bad:
        raise ValueError(f"massive positions {bad} are not in this input: it has {n_tokens} tokens; pass positions "
                         f"among 0..{n_tokens - 1}.")


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


def _check_layer(model: TransformerLensModel, layer: int) -> None:
    n_layers = int(model.cfg.n_layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer!r} does not exist: the model has {n_layers} layers; pass layer=0..{n_layers - 1}.")


def _check_dim(dim: int | None, width: int | None) -> None:
    """A feature dim: an integer in 0..width-1 (any integer >= 0 while the width is not known yet)."""
    if dim is None:
        return
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0 or (width is not None and dim >= width):
        valid = f"the hidden states have {width} dims; pass dim=0..{width - 1}" if width else "pass an integer dim >= 0"
        raise ValueError(f"dim {dim!r} does not exist: {valid} (or dim=None for the largest |x|).")


def _chosen_heads(heads: Sequence[int] | None, n_heads: int, max_value: float | int | None) -> list[int]:
    chosen = list(range(n_heads)) if heads is None else [int(h) for h in heads]
    bad = [h for h in chosen if not 0 <= h < n_heads]
    if bad or not chosen:
        raise ValueError(f"Heads {bad or chosen} do not exist: the model has {n_heads} heads; pass heads among "
                         f"0..{n_heads - 1}, or None for all.")
    if max_value is not None and not max_value > 0:
        raise ValueError(f"max_value must be positive, not {max_value!r}.")
    return chosen


#: The quantile of the non-sink attention that sets the colour scale's maximum (``exclude_bos``).
SCALE_QUANTILE = 0.95


def robust_scale(
    pattern: Float[torch.Tensor, "head_index query_pos key_pos"],
    *,
    sinks: Sequence[int] = (0,),
    causal: bool = False,
    quantile: float = SCALE_QUANTILE,
) -> float | None:
    """A colour maximum for attention patterns: the ``quantile`` of the attention on non-sink keys.

    Keys in ``sinks`` and (``causal``) the masked upper triangle are left out; the
    quantile is taken over the rest of every head. None when nothing is left or it is 0.

    >>> p = torch.full((2, 4, 4), 0.05)
    >>> p[:, :, 0] = 0.9                  # the sink column
    >>> p[1, 3, 2] = 0.99                 # one stray cell in one head
    >>> round(robust_scale(p), 4)
    0.05
    """
    n_keys = int(pattern.shape[-1])
    visible = torch.ones(pattern.shape[-2:], dtype=torch.bool)
    if causal:
        visible = visible.tril()
    visible[:, [s for s in sinks if 0 <= s < n_keys]] = False
    values = pattern[:, visible].flatten().float()
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return None
    scale = float(torch.quantile(values, quantile, interpolation="lower"))
    return scale if scale > 0 else None


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
            the colour scale, robustly: the scale's maximum is the 95th percentile
            (:data:`SCALE_QUANTILE`) of the attention on every other visible key,
            over all drawn heads, so neither the sink columns nor a few strong
            cells set it; they saturate.
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
    expect_result(logits, AttentionLogits, "attention_heads_widget", "logits",
                  "massact_lens.attention.attention_logits(model, text, layers=[...])")
    if layer not in logits.layers:
        raise ValueError(f"Layer {layer} is not in these logits (layers {list(logits.layers)}): pass one of them, or "
                         f"measure it first: attention_logits(model, text, layers=[{layer}]).")
    index = logits.layers.index(layer)
    chosen = _chosen_heads(heads, int(logits.pattern.shape[1]), max_value)
    marks = _marks(massive)
    pattern = logits.pattern[index][chosen]  # [head, query, key]
    tokens = list(logits.tokens)
    _check_marks(marks, len(tokens))
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
        scale = robust_scale(pattern, sinks=[0, *marks], causal=causal)
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
            "provenance": logits.provenance,
        },
    )


def attention_heads(
    model: TransformerLensModel,
    text: str | torch.Tensor,
    layer: int,
    *,
    heads: Sequence[int] | None = None,
    massive: Marks | MassiveProfile | None = None,
    min_value: float | int | None = None,
    min_ratio: float | int | None = None,
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
            thresholds), or None to apply a criterion to this input's residual stream.
        min_value, min_ratio: that criterion. None: the paper's 100 / 1000 when an
            entry passes them, else 50 / 200 (:meth:`~massact_lens.viz.HiddenStates.criterion`),
            so that a small model's massive tokens are marked too. ``meta["criterion"]``
            says which marked.
        prepend_bos: for a string, put BOS / [CLS] first (None: the model's default).
        layer, heads, exclude_bos, max_value: as :func:`attention_heads_widget` takes.

    Raises:
        ValueError: a layer or head that does not exist, a bad threshold.

    >>> from massact_lens.examples import minilm
    >>> view = attention_heads(minilm(), "Rain fell.", layer=3)      # the defaults mark [CLS]
    >>> view.props["tokens"][0], view.meta["criterion"]
    ('[CLS] ★d99', (50.0, 200.0))
    >>> view = attention_heads(minilm(), "Rain fell.", layer=3, heads=[0, 1], massive=[0], exclude_bos=True)
    >>> view.props["attentionHeadNames"], view.meta["massive"], 0 < view.props["maxValue"] < 1
    (['L3H0', 'L3H1'], {0: ()}, True)
    """
    _check_layer(model, layer)  # before any forward pass
    _chosen_heads(heads, int(model.cfg.n_heads), max_value)
    given_criterion(min_value, min_ratio)  # checked before any forward pass
    if massive is not None and not isinstance(massive, MassiveProfile) and getattr(model, "tokenizer", None) is not None:
        n_tokens = int(model.to_tokens(text, prepend_bos=prepend_bos).shape[-1])  # type: ignore[operator]
        _check_marks(_marks(massive), n_tokens)  # before any forward pass
    criterion: tuple[float, float] | None = None
    if isinstance(massive, MassiveProfile):
        states = hidden_states(model, text, hooks=list(massive.hook_names), prepend_bos=prepend_bos)
        criterion = (massive.min_value, massive.min_ratio)
        found = states.massive(*criterion)
        dims = set(massive.massive_dims)
        massive = {p: tuple(d for d in ds if d in dims) for p, ds in found.items() if dims.intersection(ds)}
    elif massive is None:
        states = hidden_states(model, text, prepend_bos=prepend_bos)
        criterion = states.criterion(min_value, min_ratio)
        massive = states.massive(*criterion)
    logits = attention_logits(model, text, layers=[layer], prepend_bos=prepend_bos)
    view = attention_heads_widget(
        logits, layer, heads=heads, massive=massive, exclude_bos=exclude_bos, max_value=max_value,
        causal=is_causal(model),
    )
    view.meta["criterion"] = criterion
    return view


def readable_tokens(tokens: Sequence[str], subword_prefix: str | None = None) -> list[str]:
    """Tokens as running text: WordPiece pieces joined to their word, the other words spaced.

    With a ``subword_prefix`` (``"##"``) every token but the first that does not
    start with it gets a leading space and the prefix is dropped; without one the
    tokens are kept (BPE tokens carry their own spaces).

    >>> readable_tokens(["[CLS]", "windows", "##ill", "all", "[SEP]"], "##")
    ['[CLS]', ' windows', 'ill', ' all', ' [SEP]']
    >>> readable_tokens(["<s>", " windows", "ill"])
    ['<s>', ' windows', 'ill']
    """
    if not subword_prefix:
        return list(tokens)
    out = []
    for i, token in enumerate(tokens):
        if token.startswith(subword_prefix) and len(token) > len(subword_prefix):
            out.append(token[len(subword_prefix):])
        else:
            out.append(token if i == 0 else " " + token)
    return out


def tokens_by_activation_widget(
    states: HiddenStates,
    *,
    dim: int | None = None,
    open_on: str | int | None = None,
    min_value: float | int | None = None,
    min_ratio: float | int | None = None,
) -> Widget:
    """One input's tokens coloured by their largest ``|activation|``, one colouring per hidden state.

    Draws circuitsvis's ``ColoredTokensMulti`` with ``values`` of shape
    ``[pos, n_hooks]``: per token and hook point, ``max_d |x[pos, d]|``, or with
    ``dim`` the signed ``x[pos, dim]``. One colour scale for every hidden state (the
    largest value of all), so a massive token is dark and the rest pale wherever it
    appears. Hover a token for all its values; click a hidden state to colour by it.
    Labels are short (``"L3"``, or ``"L3 ln2.hook_in"`` with several hook points per
    layer; ``meta["hook_names"]`` has the full names); WordPiece pieces are joined
    to their word.

    Args:
        states: from :func:`massact_lens.viz.hidden_states`.
        dim: colour by this feature dim (signed) instead of the largest ``|x|``.
        open_on: the hidden state shown first (a hook name, or an index into
            ``states.hook_names``). None: the first where an entry passes the
            criterion (``min_value``, ``min_ratio``; None: as
            :meth:`~massact_lens.viz.HiddenStates.criterion` chooses), else the one
            with the largest top-1 / median ratio.

    >>> from massact_lens.examples import minilm
    >>> from massact_lens.viz import hidden_states
    >>> view = tokens_by_activation_widget(hidden_states(minilm(), "Rain fell.", layers=[0]), dim=99)
    >>> view.props["labels"], round(view.props["values"][0][1])     # [CLS], blocks.0.ln2.hook_in
    (['L0 ln1.hook_in', 'L0 ln2.hook_in'], 220)
    >>> view.meta["opens_on"]                                       # where [CLS] is massive
    'blocks.0.ln2.hook_in'
    """
    expect_result(states, HiddenStates, "tokens_by_activation_widget", "states",
                  "massact_lens.viz.hidden_states(model, text)")
    _check_dim(dim, int(states.values.shape[-1]))
    criterion = states.criterion(min_value, min_ratio)
    if open_on is None:
        passing = states.massive_hooks(*criterion)
        if passing:
            index = states.hook_names.index(passing[0])
        else:
            ratio = states.values.abs().flatten(1).amax(1) / states.medians().clamp_min(1e-12)
            index = int(ratio.argmax())
    elif isinstance(open_on, int) and not isinstance(open_on, bool):
        if not 0 <= open_on < len(states.hook_names):
            raise ValueError(f"open_on {open_on} is not an index into the {len(states.hook_names)} hidden states: pass "
                             f"0..{len(states.hook_names) - 1}, a hook name, or None.")
        index = open_on
    else:
        index = states.hook_index(str(open_on))
    # [hooks, pos]: the largest |x| of each token, or one dim's signed value
    values = states.values.abs().amax(dim=-1) if dim is None else states.values[:, :, dim]
    n_hooks = len(states.hook_names)
    top = max(float(values.abs().max()), 1e-7)
    return Widget(
        "ColoredTokensMulti",
        {
            "tokens": readable_tokens(states.tokens, states.subword_prefix),
            "values": values.T.contiguous(),
            "labels": layer_labels(states.hook_names)[0],
            # one scale for all: circuitsvis keeps the first label's bound when another is clicked
            "positiveBounds": [top] * n_hooks,
            "negativeBounds": [0.0 if dim is None else -top] * n_hooks,
        },
        meta={"dim": dim, "hook_names": states.hook_names, "tokens": states.tokens, "provenance": states.provenance,
              "opens_on": states.hook_names[index], "criterion": criterion, "max_value": top},
        select=index,
    )


def tokens_by_activation(
    model: TransformerLensModel,
    text: str | torch.Tensor,
    *,
    dim: int | None = None,
    hooks: HookSelection | None = None,
    layers: Sequence[int] | None = None,
    prepend_bos: bool | None = None,
    open_on: str | int | None = None,
    min_value: float | int | None = None,
    min_ratio: float | int | None = None,
) -> Widget:
    """Read one input's hidden states and colour its tokens (:func:`tokens_by_activation_widget`).

    Args:
        model: a TransformerBridge.
        text: one string, or one input's token ids.
        dim: colour by this feature dim (signed) instead of the largest ``|x|``.
        hooks, layers: the hidden states (default: the residual stream, all layers;
            see :func:`massact_lens.viz.hidden_states`).
        prepend_bos: for a string, put BOS / [CLS] first (None: the model's default).
        open_on, min_value, min_ratio: as :func:`tokens_by_activation_widget` takes.

    >>> from massact_lens.examples import minilm
    >>> view = tokens_by_activation(minilm(), "Rain fell.", dim=99, layers=[0])
    >>> round(view.props["values"][0][1])     # [CLS] at blocks.0.ln2.hook_in
    220
    """
    given_criterion(min_value, min_ratio)  # checked before any forward pass
    _check_dim(dim, int(model.cfg.d_model) if hooks is None else None)  # the residual stream is d_model wide
    states = hidden_states(model, text, hooks=hooks, layers=layers, prepend_bos=prepend_bos)
    return tokens_by_activation_widget(states, dim=dim, open_on=open_on, min_value=min_value, min_ratio=min_ratio)
