"""Patching: copy one input's massive entries into other runs, and measure what changes.

If massive activations are input-agnostic biases (Sun et al. 2024), replacing a
target's own by another input's changes its output very little.
:func:`patching_hooks` records a source run and returns hooks that write it into
later runs; :func:`massive_patching` runs targets with and without them. Hooks
keep no state: what a patch wrote goes to a :class:`PatchRecorder` the caller
passes in (:func:`massive_patching` returns it in its result).

>>> from massact_lens.examples import minilm
>>> r = massive_patching(minilm(), "The source.", ["A target.", "Another one."], dims=[99],
...                      hooks="blocks.{layer}.ln2.hook_in", layers=[0])
>>> r.to_dataframe()[["target_row", "position", "dim"]].values.tolist()
[[0, 0, 99], [1, 0, 99]]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._plain_hf import refuse_plain_hf
from massact_lens._core.batching import Batch, plan_batches
from massact_lens._core.hook_names import (
    HookSelection,
    check_edit_point,
    point_names,
    resolve_hook_names,
)
from massact_lens._core.loop import UserHooks, measure
from massact_lens._core.results import Result
from massact_lens._core.types import HookFn, HookList, Inputs, Provenance
from massact_lens.evaluate.embeddings import sentence_embeddings
from massact_lens.find.profiles import MassiveProfile
from massact_lens.interventions import (
    PositionRule,
    TokenTracker,
    check_profile_matches,
    intervention_hooks,
    start_token,
    where_massive,
)
from massact_lens.interventions.edits import as_dims
from massact_lens.interventions.lists import check_dims
from massact_lens.interventions.positions import as_position_rule, run_context

__all__ = ["PatchHook", "PatchingResult", "massive_patching", "patching_hooks"]

_COLUMNS = ["hook_name", "target_row", "position", "dim", "before", "after"]


class PatchRecorder:
    """Collects what patch hooks wrote: pass one to :func:`patching_hooks` (``recorder=``).

    One row per (hook, target input, position, dim) written. ``target_row`` is the
    input's index in the stream when the tracker was told the batch (the library's
    loop does it), else its row in the batch.

    >>> recorder = PatchRecorder()
    >>> recorder("blocks.0.hook_resid_post", 3, [0], (5,), torch.tensor([[1.0]]), torch.tensor([[2.0]]))
    >>> recorder.to_dataframe().values.tolist()
    [['blocks.0.hook_resid_post', 3, 0, 5, 1.0, 2.0]]
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def __call__(
        self,
        hook_name: str,
        target_row: int,
        positions: Sequence[int],
        dims: Sequence[int],
        before: Float[torch.Tensor, "n_positions n_dims"],
        after: Float[torch.Tensor, "n_positions n_dims"],
    ) -> None:
        for p, position in enumerate(positions):
            for c, dim in enumerate(dims):
                self.rows.append(
                    {"hook_name": hook_name, "target_row": target_row, "position": position, "dim": dim,
                     "before": float(before[p, c]), "after": float(after[p, c])}
                )

    def to_dataframe(self) -> pd.DataFrame:
        """The entries written, columns hook_name, target_row, position, dim, before, after."""
        return pd.DataFrame(self.rows, columns=_COLUMNS)


@dataclass(frozen=True, eq=False)
class PatchHook:
    """Write a source run's values into the target's selected positions.

    ``source_values[i]`` is ``[n_positions, n_dims]``: the k-th selected source
    position goes to the k-th selected target position of target input ``i`` (or
    of every target when the source is one input). Targets are counted in the
    stream when the tracker was told the batch (the library's loop,
    :func:`massact_lens._core.loop.measure`, tells it), else within the batch.
    """

    #: One ``[n_positions, n_dims]`` tensor per source input.
    source_values: tuple[torch.Tensor, ...]
    #: The columns written; None: all of them.
    dims: tuple[int, ...] | None
    #: Where in the target the values go.
    positions: PositionRule
    #: Where in the source they came from, for describing the result.
    label: str = "patch"
    #: Where the rule reads the tokens of the pass; set by the list builders.
    tracker: TokenTracker | None = None
    #: The hook point the source values were recorded at.
    hook_name: str = ""
    #: Told what each call wrote; None: nobody asked.
    recorder: PatchRecorder | None = None

    def bound(self, tracker: TokenTracker) -> PatchHook:
        """A copy that reads tokens and positions from ``tracker``."""
        return PatchHook(self.source_values, self.dims, self.positions, self.label, tracker, self.hook_name, self.recorder)

    def check_point(self, name: str | None, pos_dim: int | None = None) -> None:
        """ValueError at a per-head or attention-pattern point (a patch writes d_model-wide
        entries) or one whose positions are not axis 1."""
        check_edit_point(name, "A patch", per_head=False, pos_dim=pos_dim)

    def __call__(
        self, activation: Float[torch.Tensor, "*batch pos d_model"], hook: Any = None
    ) -> Float[torch.Tensor, "*batch pos d_model"]:
        self.check_point(getattr(hook, "name", None), getattr(hook, "pos_dim", None))
        if activation.ndim == 2:  # run_with_hooks(remove_batch_dim=True) dropped a batch of one
            return self(activation[None], hook)[0]
        ctx = run_context(self.tracker, self.positions, activation, "patch")
        batch = int(activation.shape[0])
        inputs = ctx.batch.input_indices if ctx.batch is not None else list(range(batch))
        n_source = len(self.source_values)
        if n_source != 1 and (max(inputs) + 1 > n_source or (ctx.batch is None and n_source != batch)):
            raise ValueError(
                f"The source has {n_source} inputs; the targets have {'at least ' if ctx.batch else ''}"
                f"{max(inputs) + 1}. Use one source input, or as many as targets."
            )
        index = None if self.dims is None else torch.tensor(self.dims, device=activation.device)
        selected = self.positions.select(activation, index, ctx)
        if selected.ndim == 3:
            selected = selected.any(dim=-1)
        selected = selected.expand(batch, -1)
        target = activation.clone() if activation.requires_grad else activation
        columns = index if index is not None else torch.arange(int(activation.shape[-1]), device=activation.device)
        for row in range(batch):
            source = self.source_values[0 if n_source == 1 else inputs[row]].to(activation.device, activation.dtype)
            slots = selected[row].nonzero().flatten()[: source.shape[0]]
            if slots.numel() == 0:
                continue
            before = target[row][slots][:, columns].detach().float().cpu()
            target[row, slots[:, None], columns[None]] = source[: slots.numel()]
            if self.recorder is not None:
                after = source[: slots.numel()].detach().float().cpu()
                self.recorder(self.hook_name, inputs[row], slots.tolist(), columns.tolist(), before, after)
        return target


def patching_hooks(
    model: TransformerLensModel,
    source: Inputs,
    profile: MassiveProfile | None = None,
    *,
    hooks: HookSelection | None = None,
    layers: Sequence[int] | None = None,
    dims: int | Sequence[int] | None = None,
    positions: PositionRule | None = None,
    target_positions: PositionRule | None = None,
    prepend_bos: bool | None = None,
    recorder: PatchRecorder | None = None,
) -> HookList:
    """Run ``source`` once and return hooks that write its entries into later runs.

    At every hook point, the ``dims`` of the positions ``positions`` selects in the
    source (an entry-level rule such as :func:`where_massive` selects the positions
    where any chosen dim is massive) are recorded; in a target run they are
    written, in order, into the positions ``target_positions`` selects (default:
    the same rule, evaluated on the target).

    Args:
        source: one input (or one per target input), as strings or token ids.
        profile: gives defaults: dims = its massive dims, hooks = the points where
            they are massive, positions = where massive with its thresholds.
        positions: default (no profile): the start token.
        recorder: told what every patch wrote (:class:`PatchRecorder`); the
            hooks themselves keep nothing.

    >>> from massact_lens.examples import minilm
    >>> model = minilm()
    >>> hooks = patching_hooks(model, "A source sentence.", dims=[99], layers=[0], hooks="blocks.{layer}.ln2.hook_in")
    >>> [name for name, _ in hooks]
    ['embed.hook_in', 'pos_embed.hook_in', 'blocks.0.ln2.hook_in']
    """
    refuse_plain_hf(model, "patching_hooks")
    chosen = as_dims(dims)
    if profile is not None:
        check_profile_matches(model, profile)
        chosen = chosen or profile.massive_dims
        if hooks is None:
            hooks = sorted({n for d in profile.dims for n in d.hook_names}, key=profile.hook_names.index)
        if positions is None:
            positions = where_massive(profile.criterion.min_value, profile.criterion.min_ratio)
    if not chosen:
        raise ValueError("Say which dims to patch: dims=[...] or a profile with massive dims.")
    rule = as_position_rule(positions or start_token())
    target_rule = as_position_rule(target_positions or rule)
    names = resolve_hook_names(model, hooks, layers)
    for name in names:
        for point_name, pos_dim in point_names(model, name):
            check_edit_point(point_name, "A patch", per_head=False, pos_dim=pos_dim)
        check_dims(model, name, chosen)
    rule.check(model)
    target_rule.check(model)
    recorded = _record(model, source, names, chosen, rule, prepend_bos)
    label = f"patch from source at {rule.describe()}"
    pairs: list[tuple[str, HookFn]] = [
        (name, PatchHook(recorded[name], chosen, target_rule, label, hook_name=name, recorder=recorder)) for name in names
    ]
    return intervention_hooks(model, pairs)


def _record(
    model: TransformerLensModel,
    source: Inputs,
    names: tuple[str, ...],
    dims: tuple[int, ...],
    rule: PositionRule,
    prepend_bos: bool | None,
) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per hook point, the source's ``dims`` at the positions ``rule`` selects, per input."""
    plan = plan_batches(model, source, batch_size=1 << 30, prepend_bos=prepend_bos)
    tracker = TokenTracker()
    values = _SourceValues(tracker, names, dims, rule)
    measure(model, plan, UserHooks(tracker.hooks(model)), values, progress=False, desc="source")
    return values.result()


class _SourceValues:
    """Per hook point, the ``dims`` of every input at the positions ``rule`` selects there
    (``tracker``: the token tracker riding on the same pass)."""

    reads_input_index = False  # one batch: the plan holds the whole source
    needs_output = False

    def __init__(self, tracker: TokenTracker, names: tuple[str, ...], dims: tuple[int, ...], rule: PositionRule) -> None:
        self.tracker, self.names, self.dims, self.rule = tracker, names, dims, rule
        self.recorded: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def hooks(self, batch: Batch) -> HookList:  # noqa: ARG002
        return [(name, self._reader(name)) for name in self.names]

    def _reader(self, name: str) -> HookFn:
        def read(activation: torch.Tensor, hook: Any = None) -> None:  # noqa: ARG001
            ctx = self.tracker.context(activation)
            index = torch.tensor(self.dims, device=activation.device)
            selected = self.rule.select(activation, index, ctx)
            if selected.ndim == 3:
                selected = selected.any(dim=-1)
            selected = selected.expand(int(activation.shape[0]), -1) & ctx.real(activation)
            self.recorded[name] += [
                activation[row][selected[row]][:, index].detach().clone() for row in range(int(activation.shape[0]))
            ]

        return read

    def update(self, batch: Batch, output: torch.Tensor | None) -> None:
        pass

    def result(self) -> dict[str, tuple[torch.Tensor, ...]]:
        return {name: tuple(values) for name, values in self.recorded.items()}


@dataclass(frozen=True, repr=False)
class PatchingResult(Result):
    """How much patching a source's massive entries into targets changed them."""

    #: The hook points patched, in forward order.
    hook_names: tuple[str, ...]
    #: The feature dims patched.
    dims: tuple[int, ...]
    #: Where in the source the values were read.
    positions: str
    #: Where in each target they were written.
    target_positions: str
    #: Per target: cosine of its sentence embedding with and without the patch (1.0: no change).
    output_cosine: tuple[float, ...]
    #: One row per (hook, target, position, dim) written, with the value before and after.
    entries: pd.DataFrame = field(repr=False)

    @property
    def mean_output_cosine(self) -> float:
        return float(sum(self.output_cosine) / len(self.output_cosine))

    def to_dataframe(self) -> pd.DataFrame:
        """The written entries (hook_name, target_row, position, dim, before, after)."""
        return self.entries


def _count(model: TransformerLensModel, inputs: Any, prepend_bos: bool | None) -> int | None:
    if isinstance(inputs, Iterator) or not isinstance(inputs, str | Sequence | torch.Tensor):
        return None  # counting would consume a stream
    return plan_batches(model, inputs, batch_size=1 << 30, prepend_bos=prepend_bos).n_inputs


def massive_patching(
    model: TransformerLensModel,
    source: Inputs,
    targets: Sequence[str] | str | torch.Tensor,
    profile: MassiveProfile | None = None,
    *,
    batch_size: int = 16,
    progress: bool = False,
    **kwargs: Any,
) -> PatchingResult:
    """Patch ``source``'s massive entries into each target; how much did the targets change?

    If the massive activations are input-agnostic biases (the paper's claim), a
    target barely changes when its own are replaced by another input's:
    ``output_cosine`` stays near 1. The source is one input or one per target
    (checked before any forward pass). Keyword arguments go to :func:`patching_hooks`.

    >>> from massact_lens.examples import minilm
    >>> model = minilm()
    >>> r = massive_patching(model, "The source sentence.", ["A target.", "Another target here."],
    ...                      dims=[99], hooks="blocks.{layer}.ln2.hook_in", layers=[0, 1, 2, 3])
    >>> r.mean_output_cosine > 0.999
    True
    """
    refuse_plain_hf(model, "massive_patching")
    if "recorder" in kwargs:
        raise TypeError("massive_patching records what it wrote itself (result.entries); do not pass recorder=.")
    n_source = _count(model, source, kwargs.get("prepend_bos"))
    n_targets = _count(model, targets, None)
    if n_source is not None and n_targets is not None and n_source not in (1, n_targets):
        raise ValueError(f"The source has {n_source} inputs and there are {n_targets} targets: use one source input, or one per target.")
    recorder = PatchRecorder()
    hooks = patching_hooks(model, source, profile, recorder=recorder, **kwargs)
    patches = [fn for _, fn in hooks if isinstance(fn, PatchHook)]
    clean = sentence_embeddings(model, targets, batch_size=batch_size, progress=progress)
    patched = sentence_embeddings(model, targets, fwd_hooks=hooks, batch_size=batch_size, progress=progress)
    first = patches[0] if patches else None
    return PatchingResult(
        provenance=Provenance.of(model),
        hook_names=tuple(fn.hook_name for fn in patches),
        dims=tuple(first.dims or ()) if first is not None else (),
        positions=first.label if first is not None else "",
        target_positions=first.positions.describe() if first is not None else "",
        output_cosine=tuple(float(c) for c in (clean * patched).sum(dim=-1)),
        entries=recorder.to_dataframe(),
    )
