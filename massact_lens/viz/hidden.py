"""What the single-input views read: the full hidden states of one input, and where they are massive.

A scan keeps the top-k entries of each hidden state; a picture of one input needs
every ``(token, dim)`` entry. :func:`hidden_states` reads them (one forward pass,
float32 on the CPU); :meth:`HiddenStates.massive` applies the criterion to every entry
and, as :func:`~massact_lens.find_massive`, keeps the token-sparse ones (outlier
channels, large on most tokens of a hidden state, only with ``channel_wide=True``).

>>> from massact_lens.examples import minilm
>>> states = hidden_states(minilm(), "The cat sat on the mat.")
>>> states.values.shape                     # hooks x pos x d_model (post-LN BERT: 2 hooks per layer)
torch.Size([12, 9, 384])
>>> states.massive(min_value=50, min_ratio=200)   # position -> dims
{0: (99,)}
>>> states.massive_dims("blocks.0.ln2.hook_in")
(99,)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.batching import Batch, plan_batches, token_strings
from massact_lens._core.hook_names import HookSelection, layer_of, resolve_hook_names
from massact_lens._core.loop import measure
from massact_lens._core.results import CorpusResult
from massact_lens._core.types import HookList, Provenance, warn_if_processed
from massact_lens.find.criterion import Criterion

__all__ = ["HiddenStates", "hidden_states"]

#: The (min_value, min_ratio) pairs a view tries when given no thresholds: the paper's, then the
#: lower pair small models need (``massact_lens.find.criterion.Criterion`` names both).
VIEW_CRITERIA: tuple[tuple[float, float], ...] = ((100.0, 1000.0), (50.0, 200.0))


def given_criterion(min_value: float | int | None, min_ratio: float | int | None) -> tuple[float, float] | None:
    """The thresholds given (a missing one is the paper's), checked; None when neither is given.

    >>> given_criterion(50, None), given_criterion(None, None)
    ((50.0, 1000.0), None)
    """
    if min_value is None and min_ratio is None:
        return None
    paper_value, paper_ratio = VIEW_CRITERIA[0]
    chosen = (float(paper_value if min_value is None else min_value), float(paper_ratio if min_ratio is None else min_ratio))
    Criterion(*chosen)
    return chosen


@dataclass(frozen=True, repr=False)
class HiddenStates(CorpusResult):
    """The full hidden states of one input (``n_inputs`` is 1) at some hook points.

    Attributes:
        hook_names: the hook points read, in forward order; ``layers`` their blocks.
        prepend_bos: BOS / [CLS] prepended (None: a token tensor used as given).
        tokens: the token strings; ``token_ids`` the ids.
        values: ``[n_hooks, pos, d_model]``, float32.
        subword_prefix: the prefix that marks a word's continuation pieces in this
            tokenizer (``"##"`` for WordPiece), or None (BPE tokens carry their spaces).
    """

    hook_names: tuple[str, ...]
    prepend_bos: bool | None
    tokens: tuple[str, ...]
    token_ids: Int[torch.Tensor, " pos"]
    values: Float[torch.Tensor, "n_hooks pos d_model"]
    subword_prefix: str | None = None

    def hook_index(self, hook: str | int) -> int:
        """Index of a hook point: its name, or a layer (the layer's hook with the largest ``|x|``).

        >>> from massact_lens.examples import minilm
        >>> states = hidden_states(minilm(), "Hi.", layers=[0])
        >>> states.hook_names[states.hook_index(0)]     # ln2.hook_in holds the 222
        'blocks.0.ln2.hook_in'
        """
        if isinstance(hook, str):
            if hook not in self.hook_names:
                raise ValueError(f"Hook {hook!r} was not read; these were: {list(self.hook_names)}. Pass one of them, "
                                 f"or read it first: hidden_states(model, text, hooks=[{hook!r}]).")
            return self.hook_names.index(hook)
        if isinstance(hook, bool) or not isinstance(hook, int):
            raise TypeError(f"hook must be a hook name or a layer index, not {hook!r}.")
        candidates = [i for i, layer in enumerate(self.layers) if layer == hook]
        if not candidates:
            n_layers = self.provenance.n_layers
            remedy = (f"or read that layer first: hidden_states(model, text, layers=[{hook}])" if 0 <= hook < n_layers
                      else f"the model has no layer {hook} (its layers are 0..{n_layers - 1})")
            raise ValueError(f"Layer {hook} was not read; these layers were: {sorted(set(self.layers))}. Pass one of "
                             f"them ({remedy}).")
        peaks = self.values.abs().amax(dim=(1, 2))
        return max(candidates, key=lambda i: float(peaks[i]))

    def state(self, hook: str | int) -> Float[torch.Tensor, "pos d_model"]:
        """The hidden state at one hook point (name, or layer as in :meth:`hook_index`)."""
        return self.values[self.hook_index(hook)]

    def medians(self) -> Float[torch.Tensor, " n_hooks"]:
        """Median ``|x|`` of each hidden state (all positions and dims; the lower median, as scan)."""
        return self.values.abs().flatten(1).median(dim=1).values

    def _passes(self, min_value: float | int, min_ratio: float | int, channel_wide: bool) -> torch.Tensor:
        """``[n_hooks, pos, d_model]``: the entries that pass the criterion (token-sparse unless ``channel_wide``)."""
        if not isinstance(channel_wide, bool):
            raise TypeError(f"channel_wide must be True or False, not {channel_wide!r}.")
        criterion = Criterion(min_value, min_ratio)
        real = torch.ones(self.values.shape[:2], dtype=torch.bool)  # hooks as the batch axis; one input, no padding
        passes = criterion.entries(self.values, real)
        return passes if channel_wide else criterion.token_sparse(passes, real)

    def massive(self, min_value: float | int = 100.0, min_ratio: float | int = 1000.0, *,
                channel_wide: bool = False) -> dict[int, tuple[int, ...]]:
        """Positions with an entry that passes the criterion at some hook -> those entries' dims.

        The criterion of :func:`massact_lens.find_massive`, applied to every entry
        (:meth:`massact_lens.find.criterion.Criterion.entries`), and like it keeping the
        token-sparse entries: a dim that passes on more than half of the tokens of a hidden
        state there is an outlier channel, not a massive activation, and is left out of that
        state (:meth:`~massact_lens.find.criterion.Criterion.token_sparse`).
        ``channel_wide=True``: every entry that passes, outlier channels included.

        >>> import torch
        >>> from massact_lens.examples import tiny_model
        >>> from massact_lens.models.planting import plant_massive_activation
        >>> model = plant_massive_activation(tiny_model("llama", n_layers=3), layer=1, dim=5, value=1000.0)
        >>> states = hidden_states(model, torch.tensor([0, 0, 0, 9]))   # the planted token three times of four
        >>> states.massive(50, 100), states.massive(50, 100, channel_wide=True)
        ({}, {0: (5,), 1: (5,), 2: (5,)})
        """
        passes = self._passes(min_value, min_ratio, channel_wide)
        out: dict[int, set[int]] = {}
        for _, position, dim in passes.nonzero().tolist():
            out.setdefault(position, set()).add(dim)
        return {p: tuple(sorted(d)) for p, d in sorted(out.items())}

    def massive_hooks(self, min_value: float | int = 100.0, min_ratio: float | int = 1000.0, *,
                      channel_wide: bool = False) -> tuple[str, ...]:
        """The hook points (forward order) with at least one entry that passes the criterion
        (token-sparse, as :meth:`massive`; ``channel_wide=True``: outlier channels too).

        >>> from massact_lens.examples import minilm
        >>> hidden_states(minilm(), "Hi.", layers=[0, 1]).massive_hooks(50, 200)
        ('blocks.0.ln2.hook_in', 'blocks.1.ln2.hook_in')
        """
        passes = self._passes(min_value, min_ratio, channel_wide)
        return tuple(name for name, hit in zip(self.hook_names, passes.flatten(1).any(1).tolist(), strict=True) if hit)

    def criterion(self, min_value: float | int | None = None, min_ratio: float | int | None = None) -> tuple[float, float]:
        """The thresholds a view of this input uses: those given, else the first of :data:`VIEW_CRITERIA` that finds something.

        The paper's 100 / 1000 when some entry passes them, else 50 / 200 (what
        small models such as MiniLM need); a threshold given replaces its default.

        >>> from massact_lens.examples import minilm
        >>> hidden_states(minilm(), "Hi.", layers=[0]).criterion()
        (50.0, 200.0)
        """
        given = given_criterion(min_value, min_ratio)
        if given is not None:
            return given
        for pair in VIEW_CRITERIA:
            if self.massive(*pair):
                return pair
        return VIEW_CRITERIA[0]

    def massive_dims(self, hook: str | int, min_ratio: float | int = 100.0, max_dims: int = 6) -> tuple[int, ...]:
        """The dims of one hidden state whose largest ``|x|`` is at least ``min_ratio x`` its median.

        Largest first, at most ``max_dims``. What the 3D figure labels.
        """
        Criterion(1.0, min_ratio)  # the criterion's check of a ratio
        if not isinstance(max_dims, int) or max_dims < 1:
            raise ValueError(f"max_dims must be a positive integer, not {max_dims!r}.")
        i = self.hook_index(hook)
        peak = self.values[i].abs().amax(dim=0)  # [d_model]
        median = float(self.medians()[i])
        order = peak.argsort(descending=True).tolist()
        return tuple(d for d in order[:max_dims] if float(peak[d]) >= float(min_ratio) * median)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (hook, position): the largest ``|x|``, its dim and signed value, the median, the ratio."""
        magnitude = self.values.abs()
        peak, dim = magnitude.max(dim=2)  # [hooks, pos]
        medians = self.medians()
        rows = []
        for h, name in enumerate(self.hook_names):
            for p, token in enumerate(self.tokens):
                d = int(dim[h, p])
                rows.append(
                    {
                        "layer": self.layers[h],
                        "hook_name": name,
                        "position": p,
                        "token": token,
                        "dim": d,
                        "value": float(self.values[h, p, d]),
                        "max_abs": float(peak[h, p]),
                        "median": float(medians[h]),
                        "ratio": float(peak[h, p] / medians[h]) if float(medians[h]) > 0 else math.inf,
                    }
                )
        return pd.DataFrame(rows)


def hidden_states(
    model: TransformerLensModel,
    text: str | torch.Tensor,
    *,
    hooks: HookSelection | None = None,
    layers: Sequence[int] | None = None,
    prepend_bos: bool | None = None,
) -> HiddenStates:
    """Read the full hidden states of one input (one forward pass, nothing left attached).

    Args:
        model: a TransformerBridge (raw weights: see :func:`massact_lens.load_model`).
        text: one string, or one input's token ids (``[pos]`` or ``[1, pos]``).
        hooks: hook points (names or ``{layer}`` templates); default the residual
            stream (:func:`massact_lens.residual_hook_names`).
        layers: restrict to these layers.
        prepend_bos: for a string, put BOS / [CLS] first (None: the model's default).

    Raises:
        ValueError / TypeError: more than one input, an unknown hook or layer, bad
            tokens: before the forward pass.

    >>> from massact_lens.examples import tiny_model
    >>> import torch
    >>> hidden_states(tiny_model(), torch.arange(5)).values.shape
    torch.Size([2, 5, 32])
    """
    if isinstance(text, torch.Tensor):
        if text.ndim == 2 and text.shape[0] != 1:
            raise ValueError(f"hidden_states reads one input; got a token tensor of {text.shape[0]} rows: pass one "
                             "row (tokens[i]), or use massact_lens.scan for many inputs.")
        if text.ndim not in (1, 2):
            raise ValueError(f"Pass one input's token ids as [pos] or [1, pos], not shape {tuple(text.shape)}.")
        inputs: Any = text.reshape(1, -1)
    elif isinstance(text, str):
        inputs = [text]
    else:
        raise TypeError(f"hidden_states reads one input (a string or a token tensor), not {type(text).__name__}: "
                        "pass one string, or torch.tensor(ids) for a list of token ids.")
    names = resolve_hook_names(model, hooks, layers)
    plan = plan_batches(model, inputs, batch_size=1, prepend_bos=prepend_bos)
    warn_if_processed(model)
    states = _FullStates(names)
    measure(model, plan, states, progress=False, desc="hidden states")
    read, ids = states.result()
    _warn_nonfinite(read)
    strings = token_strings(model, ids.tolist())
    return HiddenStates(
        provenance=Provenance.of(model),
        layers=tuple(layer_of(n) for n in names),
        n_inputs=1,
        hook_names=names,
        prepend_bos=plan.prepend_bos,
        tokens=tuple(strings[int(i)] for i in ids.tolist()),
        token_ids=ids.clone(),
        values=torch.stack([read[n] for n in names]).clone(),
        subword_prefix=_subword_prefix(model),
    )


class _FullStates:
    """Every entry of one input's hidden states at ``names`` (a measurement over one batch of one input)."""

    reads_input_index = False
    needs_output = False

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.read: dict[str, torch.Tensor] = {}
        self.token_ids: torch.Tensor | None = None

    def hooks(self, batch: Batch) -> HookList:
        self.token_ids = batch.tokens[0].cpu().long()
        return [(name, self._reader(name)) for name in self.names]

    def _reader(self, name: str) -> Any:
        def read_state(activation: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            self.read[name] = activation[0].detach().float().cpu()

        return read_state

    def update(self, batch: Batch, output: torch.Tensor | None) -> None:
        pass

    def result(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The state read at each hook point (checked: all fired, all ``[pos, d_model]`` of one
        width), and the input's token ids."""
        missing = [n for n in self.names if n not in self.read]
        if missing:
            raise RuntimeError(f"Hook points {missing} did not fire during the forward pass.")
        shapes = {n: tuple(self.read[n].shape) for n in self.names}
        if any(len(s) != 2 for s in shapes.values()) or len({s[1] for s in shapes.values()}) != 1:
            raise ValueError(
                f"hidden_states reads [batch, pos, d_model] hidden states of one width; these hook points "
                f"gave {shapes}. Read attention tensors with massact_lens.attention instead."
            )
        assert self.token_ids is not None
        return self.read, self.token_ids


def _warn_nonfinite(read: dict[str, torch.Tensor]) -> None:
    """One RuntimeWarning naming the hook points whose state holds a NaN or inf (their medians are then NaN)."""
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in read.items()}
    bad = {name: n for name, n in bad.items() if n}
    if bad:
        shown = ", ".join(f"{name} ({n} entries)" for name, n in list(bad.items())[:5])
        warnings.warn(f"The hidden states hold NaN or infinite values at {len(bad)} hook point(s): {shown}. A "
                      "state with one has no median, so massive() finds nothing there. Check the model's dtype "
                      "and any hook of yours that runs before these points.", RuntimeWarning, stacklevel=3)


def _subword_prefix(model: TransformerLensModel) -> str | None:
    """``"##"`` for a WordPiece tokenizer (its continuation prefix), else None."""
    backend = getattr(getattr(model, "tokenizer", None), "backend_tokenizer", None)
    piece_model = getattr(backend, "model", None)
    if type(piece_model).__name__ != "WordPiece":
        return None
    return str(getattr(piece_model, "continuing_subword_prefix", "##") or "##")
