"""Hook lists: validated, self-contained lists of edits, and the paper's ablation.

Every builder checks names, dims and positions against the model before any
forward pass and puts one :class:`~massact_lens.interventions.TokenTracker` first,
so the list works alone or concatenated with your hooks in ``run_with_hooks``,
``run_with_cache``, ``generate`` or ``model.hooks()``.

>>> from massact_lens.examples import tiny_model
>>> from massact_lens.interventions import zero_hook, start_token
>>> [name for name, _ in edit_hooks(tiny_model(), zero_hook(dims=[3], positions=start_token()), layers=[0, 1])]
['embed.hook_in', 'pos_embed.hook_in', 'blocks.0.hook_resid_post', 'blocks.1.hook_resid_post']
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._plain_hf import refuse_plain_hf
from massact_lens._core.hook_names import (
    HookSelection,
    layer_of,
    point_layout,
    point_names,
    resolve_hook_names,
)
from massact_lens._core.options import warn_user
from massact_lens._core.types import HookFn, HookList, is_causal
from massact_lens.find.criterion import Criterion, DimSummary, MassiveActivations
from massact_lens.find.profiles import MassiveProfile
from massact_lens.interventions._checks import (
    ABLATION_MODES,
    TOKEN_KINDS,
    AblationMode,
    TokenKind,
    check_choice,
)
from massact_lens.interventions.coerce import Positions, as_positions, check_profile_matches
from massact_lens.interventions.context import TokenTracker, TrackerHook
from massact_lens.interventions.edits import EditHook, RuleHook, as_dims, mean_hook
from massact_lens.interventions.positions import PositionRule, where_massive
from massact_lens.interventions.token_rules import kind_positions

__all__ = ["ablated", "ablation_hooks", "edit_hooks", "intervention_hooks"]

#: Hook-name endings whose last axis is d_model (dims are checked before running).
_RESIDUAL_SUFFIXES = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_in",
    "hook_out",
    "hook_attn_out",
    "hook_mlp_out",
)
_RESIDUAL_EXCEPTIONS = (".mlp.in.", ".mlp.out.hook_in", "embed.hook_in", "pos_embed.hook_in")


def _is_residual(name: str) -> bool:
    """d_model wide: a residual-like ending, not a per-head or pattern point (point_layout), not an MLP hidden."""
    return (name.endswith(_RESIDUAL_SUFFIXES) and point_layout(name) == "residual"
            and not any(x in name for x in _RESIDUAL_EXCEPTIONS))


def check_dims(model: TransformerLensModel, name: str, dims: tuple[int, ...] | None) -> None:
    """ValueError when ``dims`` do not exist at hook point ``name`` (a d_model-wide point).

    >>> from massact_lens.examples import tiny_model
    >>> check_dims(tiny_model(), "blocks.0.hook_resid_post", (40,))
    Traceback (most recent call last):
    ...
    ValueError: Dims [40] do not exist at 'blocks.0.hook_resid_post': the model has d_model=32 (dims 0..31).
    """
    d_model = int(model.cfg.d_model)
    if dims is not None and _is_residual(name) and max(dims) >= d_model:
        bad = [d for d in dims if d >= d_model]
        raise ValueError(f"Dims {bad} do not exist at {name!r}: the model has d_model={d_model} (dims 0..{d_model - 1}).")


def intervention_hooks(model: TransformerLensModel, edits: Sequence[tuple[str, HookFn]]) -> HookList:
    """Validate ``(hook name, hook)`` pairs and make them a self-contained hook list.

    Hook names are checked against the model, and against what each edit (or patch)
    hook can write (no attention patterns; patches no per-head points), dims of edit
    hooks against ``d_model`` and their positions against the model (what an edit was given
    before the model was known, ``positions="delimiters"`` say, is completed here:
    :func:`~massact_lens.interventions.as_positions`), all before any forward pass.
    Those hooks are bound to one :class:`TokenTracker`, whose hooks come first. Other
    callables (your own hooks) pass through unchanged, in order.

    >>> from massact_lens.examples import tiny_model
    >>> from massact_lens.interventions import zero_hook
    >>> hooks = intervention_hooks(tiny_model(), [("blocks.0.hook_resid_post", zero_hook(dims=2))])
    >>> len(hooks)   # tracker (tokens, positions) + the edit
    3
    """
    refuse_plain_hf(model, "intervention_hooks")
    if isinstance(edits, tuple) and len(edits) == 2 and isinstance(edits[0], str):
        edits = [edits]  # type: ignore[list-item]
    pairs = list(edits)
    for item in pairs:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and callable(item[1])):
            raise TypeError(f"Each edit must be a (hook name, hook function) pair, not {item!r}.")
    tracked = [fn for _, fn in pairs if isinstance(fn, RuleHook)]
    tracker: TokenTracker | None = TokenTracker() if tracked else None
    out: HookList = []
    if tracker is not None:
        try:
            out.extend(tracker.hooks(model))
        except ValueError:
            if any(fn.positions.needs_tokens for fn in tracked):
                raise
            tracker = None
    for name, fn in pairs:
        resolve_hook_names(model, name)
        if isinstance(fn, RuleHook):
            for point_name, pos_dim in point_names(model, name):
                fn.check_point(point_name, pos_dim)
            check_dims(model, name, fn.dims)
            rule = as_positions(model, fn.positions)
            if rule is not fn.positions:  # completed for this model (RuleHooks are dataclasses)
                fn = dataclasses.replace(fn, positions=rule)  # type: ignore[type-var]
            fn = fn.bound(tracker) if tracker is not None else fn
        out.append((name, fn))
    return out


def edit_hooks(
    model: TransformerLensModel,
    edit: EditHook | Sequence[EditHook],
    *,
    hooks: HookSelection | None = None,
    layers: Sequence[int] | None = None,
) -> HookList:
    """Apply ``edit`` (or several, in order) at every chosen hook point.

    Args:
        model: the model the hooks are for (names, dims, positions are checked).
        edit: from :func:`zero_hook`, :func:`value_hook`, :func:`scale_hook`, ...
        hooks: hook names or ``{layer}`` templates; default the residual stream
            (:func:`massact_lens._core.hook_names.residual_hook_names`).
        layers: restrict to these layers.

    >>> from massact_lens.examples import tiny_model
    >>> from massact_lens.interventions import scale_hook
    >>> hooks = edit_hooks(tiny_model(), scale_hook(2.0, dims=[0]), hooks="blocks.{layer}.hook_resid_mid", layers=[1])
    >>> hooks[-1][0]
    'blocks.1.hook_resid_mid'
    """
    refuse_plain_hf(model, "edit_hooks")
    edits = [edit] if isinstance(edit, EditHook) else list(edit)
    if not edits or not all(isinstance(e, EditHook) for e in edits):
        raise TypeError("edit must be an EditHook (zero_hook(...), value_hook(...), ...) or a list of them.")
    names = resolve_hook_names(model, hooks, layers)
    return intervention_hooks(model, [(name, e) for name in names for e in edits])


def ablation_hooks(
    model: TransformerLensModel,
    profile: MassiveProfile | MassiveActivations | None = None,
    mode: AblationMode = "zero",
    *,
    layers: Sequence[int] | Literal["first"] | None = None,
    dims: int | Sequence[int] | None = None,
    hooks: HookSelection | None = None,
    kinds: Sequence[TokenKind] | None = None,
    positions: Positions | None = None,
) -> HookList:
    """The paper's ablation as a hook list: massive entries set to zero or to their mean.

    With a profile, by default every massive dim is edited at every hook point
    where the profile found it massive, on each token kind it was found on: the
    start token at position 0; delimiters and other tokens only where the entry
    is massive in the input at hand (:func:`where_massive` with the profile's
    thresholds). ``mode="mean"`` writes the profile's mean for (hook, dim, kind).

    Args:
        model: the model to ablate; the profile must come from a model of its shape.
        profile: from :func:`massact_lens.profile`. Required for ``"mean"``. ``"zero"`` also
            takes records of one scan (:func:`massact_lens.find_massive`): their dims, where
            they are massive, on the token kinds they were found on.
            Without one, ``"zero"`` needs ``dims`` (positions default: where massive,
            with the paper's thresholds 100 / 1000).
        mode: ``"zero"`` or ``"mean"``.
        layers: only these layers (among the profile's hook points); ``"first"``:
            each dim only at the first hook point where it is massive in at least
            half of the profiled inputs (where it appears: the paper's LLaMA2 setting;
            an earlier build-up in a few inputs does not count).
        dims: only these dims (default: the profile's massive dims).
        hooks: explicit hook names or ``{layer}`` templates instead of the
            profile's points.
        kinds: only these token kinds (``"start"``, ``"delimiter"``, ``"other"``).
        positions: one rule for every kind instead of the kinds' rules (with
            ``"mean"``, select a single kind): anything
            :func:`~massact_lens.interventions.as_positions` accepts.

    Raises:
        ValueError: unknown mode; "mean" without a profile; a profile from a model
            of another shape; a layer, dim, kind or hook not in the model or profile.

    >>> from massact_lens import profile
    >>> from massact_lens.examples import minilm
    >>> model = minilm()
    >>> p = profile(model, ["The cat sat on the mat.", "It rained all day."], min_value=50, min_ratio=200, progress=False)
    >>> hooks = ablation_hooks(model, p, "mean")
    >>> [name for name, _ in hooks]
    ['embed.hook_in', 'pos_embed.hook_in', 'blocks.0.ln2.hook_in', 'blocks.1.ln2.hook_in', 'blocks.2.ln2.hook_in', 'blocks.3.ln2.hook_in']
    >>> hooks[2][1]
    EditHook(set to mean, dims [99], at start token)
    """
    refuse_plain_hf(model, "ablation_hooks")
    check_choice("mode", mode, ABLATION_MODES)
    if profile is not None and not isinstance(profile, MassiveProfile | MassiveActivations):
        raise TypeError(
            f"profile must be a MassiveProfile (massact_lens.profile(model, inputs)) or find_massive's records, "
            f"not {type(profile).__name__}: pass the object itself, not a table made from it."
        )
    if isinstance(layers, str) and layers != "first":
        raise ValueError(f"layers must be a list of layers, None, or 'first', not {layers!r}.")
    rule = None if positions is None else as_positions(model, positions)
    if kinds is not None:
        bad = [k for k in kinds if k not in TOKEN_KINDS]
        if bad or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {TOKEN_KINDS}, not {kinds!r}.")
    if profile is not None and profile.per_input:
        if mode == "mean":
            raise TypeError(
                "mode='mean' writes each massive activation's mean over many inputs: records of one scan "
                "hold no means. Pass a profile: p = massact_lens.profile(model, inputs, ...)."
            )
        check_profile_matches(model, profile)
        profile = _RecordsPlan.of(profile)  # type: ignore[arg-type] (zero needs only where: the records say it)
    if profile is None:
        if mode == "mean":
            raise ValueError(
                "mode='mean' writes each massive activation's mean over many inputs, so it needs a "
                "profile: p = massact_lens.profile(model, inputs, ...); ablation_hooks(model, p, 'mean')."
            )
        chosen = as_dims(dims)
        if chosen is None:
            raise ValueError("Without a profile, pass dims=[...] (the massive dims to zero).")
        if layers == "first":
            raise ValueError("layers='first' needs a profile (it says where each dim first appears).")
        zero = EditHook("set", (0.0,), chosen, rule or where_massive(), "set to zero")
        return edit_hooks(model, zero, hooks=hooks, layers=layers)  # type: ignore[arg-type]

    if not isinstance(profile, _RecordsPlan):
        check_profile_matches(model, profile)
    plan = _ablation_plan(model, profile, layers, as_dims(dims), hooks, kinds)
    if rule is not None and mode == "mean" and len({kind for _, _, kind in plan}) > 1:
        raise ValueError("With mode='mean' and one positions rule, select one token kind: kinds=['start'], for example.")
    if mode == "mean" and rule is None:
        _warn_if_identity(model, profile, plan)
    rules: dict[str, PositionRule] = {}

    def rule_for(kind: TokenKind) -> PositionRule:
        if rule is not None:
            return rule
        if kind not in rules:
            base = kind_positions(kind, model, delimiters=frozenset(profile.delimiters))
            rules[kind] = base if kind == "start" else base & where_massive(criterion=profile.criterion)
        return rules[kind]

    grouped: dict[tuple[str, str], list[int]] = {}
    for name, dim, kind in plan:
        grouped.setdefault((name, kind), []).append(dim)
    pairs: list[tuple[str, HookFn]] = []
    for (name, kind), group in grouped.items():
        if mode == "zero":
            edit = EditHook("set", (0.0,), tuple(group), rule_for(kind), "set to zero")
        else:
            edit = mean_hook(profile, name, group, kind, rule_for(kind))
        pairs.append((name, edit))
    return intervention_hooks(model, pairs)


@dataclasses.dataclass(frozen=True)
class _RecordsPlan:
    """What :func:`_ablation_plan` reads of a profile, from records of one scan (zero ablation needs only where)."""

    dims: tuple[DimSummary, ...]
    criterion: Criterion
    n_inputs: int
    hook_names: tuple[str, ...]
    delimiters: frozenset[str]

    @classmethod
    def of(cls, found: MassiveActivations) -> _RecordsPlan:
        return cls(found.dim_summaries(), found.criterion, found.scan.n_inputs, found.hook_names, frozenset(found.delimiters))


def _warn_if_identity(model: TransformerLensModel, profile: MassiveProfile, plan: list[tuple[str, int, TokenKind]]) -> None:
    """Warn when mean ablation edits only start tokens whose state was the same in every profiled input.

    A causal model's first state depends on the first token alone: with BOS prepended
    (or every input starting with the same token) it is the same for every input, so its
    mean is the value already there and "set to mean" is the identity.
    """
    if not is_causal(model) or {kind for _, _, kind in plan} != {"start"}:
        return
    stats = {(s.hook_name, s.dim): s for s in profile.stats if s.kind == "start"}
    edited = [stats.get((name, dim)) for name, dim, _ in plan]
    if not all(s is not None and s.count >= 2 and s.cv <= 1e-3 for s in edited):
        return
    if profile.prepend_bos and not bool(getattr(model.cfg, "default_prepend_bos", True)):
        return  # profiled with BOS, run without it by default: the mean of BOS's state is a real edit
    dims = sorted({dim for _, dim, _ in plan})
    warn_user(
        f"Mean ablation here edits only the start token (dims {dims}), whose state was the same in every "
        "profiled input (a causal model's first state depends on the first token alone, and the start "
        "token (BOS) is prepended): 'set to mean' writes back the value already there, so it is the "
        "identity and tests nothing. The paper's test runs without BOS: profile(..., prepend_bos=False) "
        "and run without it (ablation_table(..., prepend_bos=False), model.to_tokens(text, prepend_bos=False))."
    )


def _ablation_plan(
    model: TransformerLensModel,
    profile: MassiveProfile | _RecordsPlan,
    layers: Sequence[int] | Literal["first"] | None,
    dims: tuple[int, ...] | None,
    hooks: HookSelection | None,
    kinds: Sequence[TokenKind] | None,
) -> list[tuple[str, int, TokenKind]]:
    """(hook, dim, kind) triples to edit, in forward order of the profile's hook points."""
    if not profile.dims:
        criterion = profile.criterion
        raise ValueError(
            f"The profile found no massive activations (min_value={criterion.min_value:g}, "
            f"min_ratio={criterion.min_ratio:g}): nothing to ablate. Profile again with lower thresholds."
        )
    summaries = {d.dim: d for d in profile.dims}
    d_model = int(model.cfg.d_model)
    if dims is not None:
        bad = [d for d in dims if not 0 <= d < d_model]
        if bad:
            raise ValueError(f"Dims {bad} do not exist: the model has d_model={d_model}.")
        unknown = [d for d in dims if d not in summaries]
        if unknown:
            raise ValueError(f"Dims {unknown} are not massive in the profile (its massive dims: {list(summaries)}).")
    chosen = dims or tuple(summaries)
    order = {name: i for i, name in enumerate(profile.hook_names)}
    if hooks is not None:
        names = resolve_hook_names(model, hooks, None if layers in (None, "first") else layers)  # type: ignore[arg-type]
    elif layers is not None and layers != "first":
        n_layers = int(model.cfg.n_layers)
        bad = [layer for layer in layers if not 0 <= int(layer) < n_layers]
        if bad:
            raise ValueError(f"Layers {bad} do not exist: the model has {n_layers} layers (0..{n_layers - 1}).")
        scanned = sorted({layer_of(n) for n in profile.hook_names})
        missing = [layer for layer in layers if layer not in scanned]
        if missing:
            raise ValueError(f"Layers {missing} were not scanned by the profile (it covers layers {scanned}).")
        names = tuple(n for n in profile.hook_names if layer_of(n) in set(layers))
    else:
        names = None
    plan = []
    for dim in chosen:
        summary = summaries[dim]
        if names is None:
            points = (summary.first_hook(profile.n_inputs),) if layers == "first" else summary.hook_names
        else:
            points = names
        found_kinds = [k for k in TOKEN_KINDS if summary.kinds.get(k, 0) > 0]
        for kind in found_kinds if kinds is None else [k for k in kinds if k in found_kinds]:
            plan.extend((name, dim, kind) for name in points)
    if not plan:
        raise ValueError(f"Nothing to ablate: the profile's dims {list(chosen)} were never massive on kinds {list(kinds or [])}.")
    plan.sort(key=lambda t: (order.get(t[0], len(order)), t[1]))
    return plan


@contextlib.contextmanager
def ablated(
    model: TransformerLensModel,
    profile: MassiveProfile | MassiveActivations | None = None,
    mode: AblationMode = "zero",
    **kwargs: Any,
) -> Iterator[TransformerLensModel]:
    """Run the model with :func:`ablation_hooks` attached; they are gone afterwards.

    Works around any call: forward, ``run_with_cache``, ``generate``, and the
    evaluation functions. Other hook contexts nest inside or outside it.
    Resetting the model's hooks inside the block removes the ablation too: a warning says so
    when the block ends.

    >>> from massact_lens import profile
    >>> from massact_lens.examples import minilm
    >>> model = minilm()
    >>> p = profile(model, ["A short sentence."], min_value=50, min_ratio=200, progress=False)
    >>> with ablated(model, p, "zero"):
    ...     _, cache = model.run_with_cache(model.to_tokens("Hello there."))
    >>> float(cache["blocks.0.ln2.hook_in"][0, 0, 99])
    0.0
    """
    refuse_plain_hf(model, "ablated")
    hooks = ablation_hooks(model, profile, mode, **kwargs)
    hook_dict = model.hook_dict  # type: ignore[attr-defined]
    points = list({id(hook_dict[name]): hook_dict[name] for name, _ in hooks if isinstance(name, str)}.values())
    before = {id(p): {id(h) for h in getattr(p, "fwd_hooks", [])} for p in points}
    with model.hooks(fwd_hooks=hooks):  # type: ignore[attr-defined]
        added = [(p, h) for p in points for h in getattr(p, "fwd_hooks", []) if id(h) not in before[id(p)]]
        yield model
        if any(all(h is not other for other in getattr(p, "fwd_hooks", [])) for p, h in added):
            warn_user(
                "The ablation's hooks were removed inside the `with ablated(...)` block (model.reset_hooks() "
                "removes every hook): what ran after that was not ablated. Add hooks of your own with "
                "model.hooks(...) or run_with_hooks(...) inside the block instead of resetting."
            )


def hook_names_of(hooks: Sequence[tuple[Any, HookFn]]) -> tuple[str, ...]:
    """The hook-point names a hook list touches (tracker hooks left out; filters by name).

    >>> from massact_lens.examples import tiny_model
    >>> from massact_lens.interventions import zero_hook
    >>> hook_names_of(edit_hooks(tiny_model(), zero_hook(dims=[1]), layers=[1]))
    ('blocks.1.hook_resid_post',)
    """
    return tuple(
        name if isinstance(name, str) else getattr(name, "__name__", "filter")
        for name, fn in hooks
        if not isinstance(fn, TrackerHook)
    )
