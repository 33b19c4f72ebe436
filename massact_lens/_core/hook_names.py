"""Which hidden state: every hook-name string of the library lives here.

Background
----------
Massive activations live in the *residual stream*, but "the residual stream" is a
different hook point depending on where the model puts its LayerNorms:

* **pre-norm** models (GPT-2, LLaMA, Mistral, the TransformerLens-native test
  models): the block output ``blocks.{l}.hook_resid_post`` is the un-normalised
  residual sum. Sun et al. measure it there.
* **post-norm** models (BERT and its family): each sub-layer's output is added to
  the residual and the *sum* is normalised, so the block output is already
  LayerNorm-ed and the massive values are gone. They live in the pre-LayerNorm
  sums: ``blocks.{l}.ln1.hook_in`` (residual + attention output) and
  ``blocks.{l}.ln2.hook_in`` (that normalised, + MLP output; TransformerLens also
  calls it ``hook_resid_mid`` for BERT). On all-MiniLM-L6-v2, dim 99 on [CLS]
  reaches ~220 in ``ln2.hook_in`` of layer 0 but only ~8 in ``hook_resid_post``.

A hook function sees ``hook.name`` = the *underlying* name of the point
(``blocks.0.hook_out``), not the alias asked for (``blocks.0.hook_resid_post``):
the library's measurements never route on ``hook.name``; they close over their own
labels. Only the edit and patch hooks read one thing from it, the point's layout
(:func:`point_layout`): called by TransformerLens, with the batch dropped by
``run_with_hooks(remove_batch_dim=True)``, nothing else tells a per-head
``[pos, head, d_head]`` from a residual ``[batch, pos, d_model]``.

Usage
-----
>>> from massact_lens._core.hook_names import layer_of, expand_hook_names
>>> layer_of("blocks.3.hook_resid_post")
3
>>> expand_hook_names("blocks.{layer}.hook_resid_pre", n_layers=2)
('blocks.0.hook_resid_pre', 'blocks.1.hook_resid_pre')
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Sequence
from typing import Literal

from transformer_lens.model_protocol import TransformerLensModel

__all__ = [
    "EMBED_OUT",
    "EMBED_TOKENS",
    "HookSelection",
    "POST_NORM_FAMILIES",
    "RESID_POST",
    "POST_NORM_SUMS",
    "attention_hook",
    "check_edit_point",
    "expand_hook_names",
    "final_hidden_hook",
    "is_post_norm",
    "layer_of",
    "mlp_hook",
    "point_layout",
    "point_names",
    "residual_hook_names",
    "resolve_hook_names",
]

#: Pre-norm models: the block output is the raw residual stream.
RESID_POST = "blocks.{layer}.hook_resid_post"
#: The token ids entering the embedding (``[batch, pos]`` integers).
EMBED_TOKENS = "embed.hook_in"
#: The token embeddings, before positional embeddings are added.
EMBED_OUT = "hook_embed"
#: Post-norm models: the two pre-LayerNorm residual sums of each block.
POST_NORM_SUMS = ("blocks.{layer}.ln1.hook_in", "blocks.{layer}.ln2.hook_in")

#: Architecture-name prefixes of post-LayerNorm model families.
POST_NORM_FAMILIES = (
    "Bert",
    "Roberta",
    "XLMRoberta",
    "Electra",
    "DistilBert",
    "Albert",
    "MPNet",
    "Camembert",
    "OpenAIGPT",
)

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")

#: What ``hooks=`` takes: a hook name or ``{layer}`` template, several, or a names filter.
HookSelection = str | Sequence[str] | Callable[[str], bool]

_ATTENTION_HOOKS = {
    "pattern": "blocks.{layer}.attn.hook_pattern",
    "scores": "blocks.{layer}.attn.hook_attn_scores",
    "q": "blocks.{layer}.attn.hook_q",
    "k": "blocks.{layer}.attn.hook_k",
    "v": "blocks.{layer}.attn.hook_v",
    "z": "blocks.{layer}.attn.hook_z",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "o_out": "blocks.{layer}.attn.o.hook_out",
    "ln1_out": "blocks.{layer}.ln1.hook_out",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
}


#: Points whose activation is per head, ``[batch, pos, head, d_head]`` (``d_model`` for the
#: split inputs and the per-head results): the bridge's names and TransformerLens' aliases
#: (the block-level ones too).
_PER_HEAD_POINTS = (
    "attn.q.hook_out", "attn.k.hook_out", "attn.v.hook_out", "attn.o.hook_in",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_rot_q", "attn.hook_rot_k",
    "attn.hook_result", "attn.hook_attn_in", "attn.hook_q_input", "attn.hook_k_input", "attn.hook_v_input",
    "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input",
)
#: Attention scores and patterns, ``[batch, head, query, key]``, wherever they are (any name ending so).
_PATTERN_ENDINGS = ("hook_attn_scores", "hook_pattern")


def point_layout(name: str | None) -> Literal["residual", "head", "pattern"]:
    """How a hook point's activation is laid out, from its name (a bridge name or an alias):
    ``"head"`` ``[batch, pos, head, d_head]``, ``"pattern"`` ``[batch, head, query, key]``,
    else ``"residual"`` ``[batch, pos, width]`` (also for no name).

    >>> point_layout("blocks.0.attn.hook_k"), point_layout("blocks.0.attn.o.hook_in")
    ('head', 'head')
    >>> point_layout("blocks.3.attn.hook_pattern"), point_layout("blocks.3.hook_resid_post")
    ('pattern', 'residual')
    """
    if name is None:
        return "residual"
    if name.endswith(_PATTERN_ENDINGS):
        return "pattern"
    tail = name.split(".", 2)[-1] if _BLOCK_RE.match(name) else name
    return "head" if tail in _PER_HEAD_POINTS else "residual"


def point_names(model: TransformerLensModel, name: str) -> tuple[tuple[str, int | None], ...]:
    """The names to judge a hook point's layout by, each with its ``pos_dim``: the name as
    given and, when it is an alias, the point's underlying name (``blocks.0.hook_q_input``
    is ``blocks.0.attn.hook_q_input``).

    >>> from massact_lens.examples import tiny_model
    >>> point_names(tiny_model(), "blocks.0.attn.hook_z")
    (('blocks.0.attn.hook_z', None), ('blocks.0.attn.o.hook_in', None))
    """
    point = getattr(model, "hook_dict", {}).get(name)
    pos_dim = getattr(point, "pos_dim", None)
    underlying = getattr(point, "name", None)
    if underlying and underlying != name:
        return ((name, pos_dim), (underlying, pos_dim))
    return ((name, pos_dim),)


def check_edit_point(name: str | None, what: str, per_head: bool = True, pos_dim: int | None = None) -> None:
    """ValueError when ``what`` (an edit, a patch) cannot write at the point ``name``: never at
    an attention pattern or score (``[batch, head, query, key]``: positions would pick
    heads), nor where TransformerLens says positions are not axis 1 (``pos_dim``, as on
    Gemma 3's ``[batch, head, pos, d_head]`` q/k norms), and at a per-head point only when
    ``per_head``.

    >>> check_edit_point("blocks.0.attn.hook_pattern", "An edit")
    Traceback (most recent call last):
    ...
    ValueError: An edit cannot go at 'blocks.0.attn.hook_pattern': an attention pattern is [batch, head, query, key], so its positions would pick heads. Edit the residual stream or q/k/v/z, or change attention with massact_lens.attention.bias_surgery.
    """
    layout = point_layout(name)
    instead = "Edit the residual stream or q/k/v/z" if per_head else "Patch the residual stream"
    if layout == "pattern":
        raise ValueError(
            f"{what} cannot go at {name!r}: an attention pattern is [batch, head, query, key], so its positions "
            f"would pick heads. {instead}, or change attention with massact_lens.attention.bias_surgery."
        )
    if pos_dim not in (None, 1):
        raise ValueError(
            f"{what} cannot go at {name!r}: its positions are on axis {pos_dim} (TransformerLens' pos_dim), "
            f"not axis 1, so they would pick something else. {instead}."
        )
    if layout == "head" and not per_head:
        raise ValueError(
            f"{what} cannot go at {name!r}: it is per head ([batch, pos, head, ...]) and this writes "
            "d_model-wide entries of one position. Use a residual-stream point (hook_resid_post, hook_attn_out, "
            "...); to change this point, use zero_hook, value_hook or scale_hook."
        )


def attention_hook(kind: str, layer: int) -> str:
    """The hook name of one attention quantity of a layer.

    ``kind`` is one of ``pattern, scores, q, k, v, z, attn_out, o_out, ln1_out, resid_pre``.
    ``o_out`` is the output projection (``z @ W_O + b_O``): on BERT bridges it is
    the attention output, while ``hook_attn_out`` there is
    ``LayerNorm(resid_pre + attention output)``.

    >>> attention_hook("pattern", 2)
    'blocks.2.attn.hook_pattern'
    """
    if kind not in _ATTENTION_HOOKS:
        raise ValueError(f"Unknown attention hook kind {kind!r}; use one of {sorted(_ATTENTION_HOOKS)}.")
    return _ATTENTION_HOOKS[kind].format(layer=layer)


_MLP_HOOKS = {
    "hidden": "blocks.{layer}.mlp.out.hook_in",
    "out": "blocks.{layer}.mlp.out.hook_out",
}


def mlp_hook(kind: str, layer: int) -> str:
    """The hook name of one MLP quantity of a layer: ``hidden`` or ``out``.

    ``hidden`` is the down projection's input (GPT-2 / BERT: the post-activation;
    gated LLaMA MLPs: ``act(gate) * up``), the same tensor as ``mlp.hook_post`` on
    the bridges checked (native GPT-2 / LLaMA, HF LLaMA, BERT). ``out`` is the down
    projection's output. On pre-norm and post-norm blocks that is the MLP's write
    into the residual stream (for BERT, before the LayerNorm). On sandwich-norm
    blocks (Gemma 2 / 3) it is not: the write is that output after the
    post-feed-forward norm, ``ln2_post.hook_out``, and it need not equal
    ``hook_mlp_out``; :mod:`massact_lens._core.blocks` says where each write enters.

    >>> mlp_hook("hidden", 11)
    'blocks.11.mlp.out.hook_in'
    """
    if kind not in _MLP_HOOKS:
        raise ValueError(f"Unknown MLP hook kind {kind!r}; use one of {sorted(_MLP_HOOKS)}.")
    return _MLP_HOOKS[kind].format(layer=layer)


def layer_of(hook_name: str) -> int:
    """The block index a ``blocks.{l}.…`` hook name belongs to.

    >>> layer_of("blocks.11.ln2.hook_in")
    11
    """
    match = _BLOCK_RE.match(hook_name)
    if match is None:
        raise ValueError(
            f"Hook {hook_name!r} is not inside a block (expected 'blocks.<layer>.…'). "
            "massact_lens measures per-layer hidden states; name a block hook point "
            "such as 'blocks.0.hook_resid_post'."
        )
    return int(match.group(1))


def expand_hook_names(template: str, n_layers: int, layers: Sequence[int] | None = None) -> tuple[str, ...]:
    """Expand a ``{layer}`` template over ``layers`` (all layers by default).

    A name without ``{layer}`` is returned as a one-element tuple.

    >>> expand_hook_names("blocks.{layer}.ln2.hook_in", n_layers=6, layers=[0, 2])
    ('blocks.0.ln2.hook_in', 'blocks.2.ln2.hook_in')
    """
    if "{layer}" not in template:
        return (template,)
    chosen = range(n_layers) if layers is None else layers
    return tuple(template.format(layer=layer) for layer in chosen)


def is_post_norm(model: TransformerLensModel) -> bool:
    """True when the model normalises the residual sum (BERT-style post-LN)."""
    architecture = str(getattr(model.cfg, "architecture", None) or getattr(model.cfg, "original_architecture", None) or "")
    return architecture.startswith(POST_NORM_FAMILIES)


def final_hidden_hook(model: TransformerLensModel) -> str:
    """The hook point holding the model's last hidden state (what embeddings pool).

    Post-norm (BERT): the last block's output, which is HuggingFace's
    ``last_hidden_state`` (sentence-transformers mean-pools it). Pre-norm: the
    final LayerNorm's output where the model has one, else the last block's output.

    >>> from massact_lens.examples import tiny_model
    >>> final_hidden_hook(tiny_model())
    'ln_final.hook_out'
    """
    last = f"blocks.{int(model.cfg.n_layers) - 1}.hook_resid_post"
    if is_post_norm(model):
        return last
    return "ln_final.hook_out" if "ln_final.hook_out" in model.hook_dict else last  # type: ignore[attr-defined]


def residual_hook_names(model: TransformerLensModel, layers: Sequence[int] | None = None) -> tuple[str, ...]:
    """The residual-stream hook points where massive activations are measured.

    Pre-norm: ``blocks.{l}.hook_resid_post``. Post-norm: both pre-LayerNorm sums
    of each block (``ln1.hook_in``, ``ln2.hook_in``), in forward order.
    """
    templates = POST_NORM_SUMS if is_post_norm(model) else (RESID_POST,)
    chosen = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    return tuple(t.format(layer=layer) for layer in chosen for t in templates)


def _filtered(model: TransformerLensModel, names_filter: Callable[[str], bool]) -> tuple[str, ...]:
    """The block hook points ``names_filter`` accepts, in forward order (one name per point;
    points outside the blocks, which have no layer, are left out)."""
    chosen, points = [], set()
    for name, point in model.hook_dict.items():  # type: ignore[attr-defined]
        if _BLOCK_RE.match(name) is None or id(point) in points or not names_filter(name):
            continue
        points.add(id(point))
        chosen.append(name)
    if not chosen:
        raise ValueError("hooks= (a names filter) accepts none of the model's block hook points "
                         "('blocks.<layer>.…'): see sorted(model.hook_dict).")
    return tuple(sorted(chosen, key=layer_of))


def resolve_hook_names(
    model: TransformerLensModel,
    hooks: HookSelection | None = None,
    layers: Sequence[int] | None = None,
) -> tuple[str, ...]:
    """Validate and expand the hook points a measurement should read.

    Args:
        model: the model whose hook points are checked.
        hooks: ``None`` for the residual points of :func:`residual_hook_names`;
            else one name or several, each a concrete name or a ``{layer}`` template;
            or a TransformerLens-style names filter (``lambda name: name.endswith("resid_post")``),
            which picks among the model's block hook points (one name per point, in
            forward order).
        layers: restrict templates (and the default points, and a filter's picks) to these layers.

    Raises:
        ValueError: a layer outside ``[0, n_layers)``, or a hook name the model
            does not have (the message lists close matches).

    >>> from massact_lens.examples import tiny_model
    >>> resolve_hook_names(tiny_model(), layers=[1])
    ('blocks.1.hook_resid_post',)
    >>> resolve_hook_names(tiny_model(), lambda name: name.endswith("hook_resid_post"))
    ('blocks.0.hook_resid_post', 'blocks.1.hook_resid_post')
    """
    n_layers = int(model.cfg.n_layers)
    if layers is not None and (isinstance(layers, str) or not isinstance(layers, Sequence | range)
                               or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in layers)):
        raise TypeError(f"layers must be a list of layer indices (layers=[{n_layers - 1}]), not {layers!r}.")
    if layers is not None:
        bad = [layer for layer in layers if not 0 <= int(layer) < n_layers]
        if bad:
            raise ValueError(f"Layers {bad} do not exist: the model has {n_layers} layers (0..{n_layers - 1}).")
        if len(layers) == 0:
            raise ValueError("layers is empty: pass None for all layers, or a non-empty list.")
    if hooks is None:
        names = residual_hook_names(model, layers)
    elif callable(hooks):
        names = tuple(n for n in _filtered(model, hooks) if layers is None or layer_of(n) in set(layers))
        if not names:
            raise ValueError(f"hooks= (a names filter) accepts no hook point in layers {list(layers or [])}.")
    else:
        templates = [hooks] if isinstance(hooks, str) else list(hooks)
        if not templates:
            raise ValueError("hooks is empty: pass None for the residual stream, or hook names.")
        names = tuple(n for t in templates for n in expand_hook_names(t, n_layers, layers))
    known = model.hook_dict  # type: ignore[attr-defined]
    for name in names:
        if name not in known:
            stem = name.split(".")[-1]
            close = sorted(k for k in known if k.endswith(stem))[:5]
            hint = f" Similar names: {close}." if close else ""
            raise ValueError(
                f"The model has no hook point {name!r}.{hint} "
                "List them with sorted(model.hook_dict)."
            )
        layer_of(name)
    return tuple(dict.fromkeys(names))  # a point named twice is read once
