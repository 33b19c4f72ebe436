"""Profiles: which dims carry massive activations, where, on which tokens, and how constant.

:func:`profile` scans a corpus, applies the criterion (:func:`~massact_lens.find_massive`)
and follows every massive (position, dim) through all scanned hooks, keeping running
sums per (hook, dim, token kind): the means that "set to mean" ablation writes. A
:class:`MassiveProfile` saves to JSON (validated on load) and merges across shards.

>>> from massact_lens.examples import minilm
>>> p = profile(minilm(), ["A short sentence.", "Another one here."], min_value=50, min_ratio=200, progress=False)
>>> p.massive_dims
(99,)
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import pandas as pd
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._fingerprint import weights_fingerprint
from massact_lens._core._plain_hf import refuse_plain_hf
from massact_lens._core.files import write_atomic
from massact_lens._core.hook_names import HookSelection, layer_of, resolve_hook_names
from massact_lens._core.loop import measure
from massact_lens._core.results import CorpusResult
from massact_lens._core.types import Inputs, Provenance
from massact_lens.find._scan_stats import scan_plan
from massact_lens.find.criterion import DELIMITERS, TOKEN_KINDS, Criterion, DimSummary, by_count
from massact_lens.find.profile_values import (
    CandidateValues,
    ValueStat,
    pooled,
    second_pass_plan,
    second_pass_values,
)
from massact_lens.find.scan_result import ScanResult

__all__ = ["MassiveProfile", "ValueStat", "profile"]


@dataclass(frozen=True, kw_only=True, repr=False)
class MassiveProfile(CorpusResult):
    """The cross-input picture of a model's massive activations. Save/load as JSON.

    ``stats`` hold, for every scanned hook (also those where the entry is not
    massive), the value of each (input, position, dim) that is massive somewhere in
    that input, grouped by token kind: the means "set to mean" ablation uses.
    ``layers``: the blocks of ``hook_names``.

    ``dims`` (and :attr:`massive_dims`, :meth:`dim_kinds`, ``stats`` and every key set
    built from the profile) are the token-sparse massive activations, the paper's kind;
    ``channel_wide`` lists apart the outlier channels: dims whose entries pass the
    criterion on more than half of the tokens of a hidden state
    (:meth:`~massact_lens.find.criterion.Criterion.channel_wide`, the summaries of
    ``found.channel_wide_summaries()``). A dim can be in both (massive on a few tokens in
    some hidden states, channel-wide in others).

    >>> from massact_lens.examples import minilm
    >>> p = profile(minilm(), ["Rain fell."], min_value=50, min_ratio=200, progress=False)
    >>> p.massive_dims, p.channel_wide_dims
    ((99,), ())
    """

    hook_names: tuple[str, ...]
    prepend_bos: bool | None
    criterion: Criterion
    dims: tuple[DimSummary, ...]
    stats: tuple[ValueStat, ...]
    delimiters: tuple[str, ...] = tuple(sorted(DELIMITERS))
    #: The scan's top_k (entries kept per hidden state): it decides which entries the
    #: criterion can see, so profiles of other top_k do not merge. None: a profile saved
    #: before 0.2.1, which did not record it.
    top_k: int | None = None
    #: A digest of the model's weights (:func:`~massact_lens._core._fingerprint.weights_fingerprint`;
    #: "" when unknown): profiles of other weights do not merge.
    weights: str = ""
    #: The outlier channels, listed apart from ``dims`` (one summary per dim of the
    #: channel-wide entries); () in a profile saved before they were kept.
    channel_wide: tuple[DimSummary, ...] = ()

    #: A profile pools its inputs (see :class:`~massact_lens.find.criterion.MassiveSet`).
    per_input: ClassVar[bool] = False
    merge_same: ClassVar[tuple[str, ...]] = ("hook_names", "prepend_bos", "criterion", "delimiters", "top_k")

    @property
    def min_value(self) -> float:
        return float(self.criterion.min_value)

    @property
    def min_ratio(self) -> float:
        return float(self.criterion.min_ratio)

    @property
    def massive_dims(self) -> tuple[int, ...]:
        """The dims with token-sparse massive activations (what key sets and ablations use)."""
        return tuple(d.dim for d in self.dims)

    @property
    def channel_wide_dims(self) -> tuple[int, ...]:
        """The dims of the outlier channels (``channel_wide``), apart from :attr:`massive_dims`."""
        return tuple(d.dim for d in self.channel_wide)

    def dim_kinds(self) -> tuple[tuple[int, str], ...]:
        """The (dim, token kind) pairs that are massive somewhere, sorted."""
        return tuple(sorted({(d.dim, kind) for d in self.dims for kind in d.kinds}))

    def last_layer(self) -> int:
        """The last layer where an entry is massive (-1: none)."""
        return max((d.last_layer for d in self.dims), default=-1)

    def mean_value(self, hook_name: str, dim: int, kind: str) -> float:
        """The mean signed value at (hook, dim, token kind).

        ``ValueError`` (listing what the profile has) for a hook it did not scan or a token
        kind it has no value of; ``KeyError`` for a dim never massive there.
        """
        kinds = [k for k in TOKEN_KINDS if any(s.kind == k for s in self.stats)]
        if hook_name not in self.hook_names or kind not in kinds:
            what = f"hook {hook_name!r}" if hook_name not in self.hook_names else f"token kind {kind!r}"
            raise ValueError(
                f"The profile has no value for {what}: pass one of its hooks {list(self.hook_names)} and one of "
                f"the token kinds it has values of {kinds} (its dims: {list(self.massive_dims)})."
            )
        for s in self.stats:
            if s.hook_name == hook_name and s.dim == dim and s.kind == kind:
                return s.mean
        raise KeyError(f"The profile has no value for hook {hook_name!r}, dim {dim}, kind {kind!r}: pass one of its "
                       f"dims {list(self.massive_dims)}.")

    def to_dataframe(self) -> pd.DataFrame:
        """The per-(hook, dim, kind) statistics as a table."""
        columns = list(ValueStat.__dataclass_fields__)
        return pd.DataFrame([asdict(s) for s in self.stats], columns=columns)

    def _summary_lines(self) -> list[str]:
        dims = "; ".join(f"{d.dim} (layers {d.first_layer}..{d.last_layer}, {', '.join(d.kinds)})" for d in self.dims[:6])
        more = f" and {len(self.dims) - 6} more" if len(self.dims) > 6 else ""
        lines = [f"{len(self.dims)} massive dims: {dims or 'none'}{more}"]
        if self.channel_wide:
            wide = "; ".join(f"{d.dim} (layers {d.first_layer}..{d.last_layer})" for d in self.channel_wide[:6])
            wide_more = f" and {len(self.channel_wide) - 6} more" if len(self.channel_wide) > 6 else ""
            lines.append(f"{len(self.channel_wide)} outlier channels, listed apart: {wide}{wide_more}")
        return [*lines, f"|x| > {self.min_value:g}, >= {self.min_ratio:g} x median; prepend_bos={self.prepend_bos}"]

    def dims_dataframe(self) -> pd.DataFrame:
        """One row per massive dim: layers, token kinds, how often, how large."""
        return pd.DataFrame([asdict(d) for d in self.dims])

    @classmethod
    def _merged(cls, parts: list[MassiveProfile]) -> MassiveProfile:
        """One profile from profiles of disjoint slices of a corpus, in order (:meth:`merge`).

        The same as profiling the concatenated inputs (counts and maxima exactly; means
        and spreads pooled, equal to float64 rounding). The parts must come from the
        same model, hooks, criterion, top_k, BOS setting and delimiters (ValueError
        otherwise, saying what to do).
        A part with no input (an empty shard) is allowed.

        >>> from massact_lens.examples import minilm
        >>> model = minilm()
        >>> a = profile(model, ["One sentence."], min_value=50, min_ratio=200, progress=False)
        >>> b = profile(model, ["Another sentence here."], min_value=50, min_ratio=200, progress=False)
        >>> MassiveProfile.merge([a, b]).n_inputs
        2
        """
        first = parts[0]
        n_inputs = sum(p.n_inputs for p in parts)
        order = {name: i for i, name in enumerate(first.hook_names)}
        stats: dict[tuple[str, int, str], list[ValueStat]] = defaultdict(list)
        for p in parts:
            for st in p.stats:
                stats[(st.hook_name, st.dim, st.kind)].append(st)
        keys = sorted(stats, key=lambda k: (order[k[0]], k[1], TOKEN_KINDS.index(k[2])))
        return cls(
            provenance=first.provenance,
            layers=first.layers,
            n_inputs=n_inputs,
            hook_names=first.hook_names,
            prepend_bos=first.prepend_bos,
            criterion=first.criterion,
            dims=_merged_dims([(p.dims, p.n_inputs) for p in parts], n_inputs, order),
            stats=tuple(pooled(stats[k]) for k in keys),
            delimiters=first.delimiters,
            top_k=first.top_k,
            weights=first.weights,
            channel_wide=_merged_dims([(p.channel_wide, p.n_inputs) for p in parts], n_inputs, order),
        )

    def to_json(self) -> str:
        """The profile as JSON (``layers`` left out: they follow from ``hook_names``)."""
        data = {
            "format": PROFILE_FORMAT,
            "provenance": asdict(self.provenance),
            "hook_names": list(self.hook_names),
            "prepend_bos": self.prepend_bos,
            "min_value": self.min_value,
            "min_ratio": self.min_ratio,
            "n_inputs": self.n_inputs,
            "dims": [asdict(d) for d in self.dims],
            "stats": [asdict(st) for st in self.stats],
            "delimiters": list(self.delimiters),
            "top_k": self.top_k,
            "weights": self.weights,
            "channel_wide": [asdict(d) for d in self.channel_wide],
        }
        return json.dumps(data, indent=1)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the profile as JSON: the complete file or nothing (a temp name, then a rename);
        a folder that cannot be written is refused with what to do."""
        write_atomic(path, self.to_json())  # serialised first: a failure leaves no file behind

    @classmethod
    def from_json(cls, text: str, *, source: str = "profile JSON") -> MassiveProfile:
        """Read :meth:`to_json`'s output; ``ValueError`` naming ``source`` and the field when it does not fit."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} is not valid JSON ({error}): is the file truncated? Save the profile again.") from None
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"Not a massact_lens profile: {source} has no format {PROFILE_FORMAT!r}.")
        return _profile_from_dict(data, source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MassiveProfile:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except UnicodeDecodeError:
            raise ValueError(f"{os.fspath(path)} is not UTF-8 text: not a saved profile.") from None
        return cls.from_json(text, source=os.fspath(path))


PROFILE_FORMAT = "massact_lens.profile/1"


def _merged_dims(parts: list[tuple[tuple[DimSummary, ...], int]], n_inputs: int,
                 order: dict[str, int]) -> tuple[DimSummary, ...]:
    """The summaries of disjoint slices of a corpus (each with its number of inputs) as one, per dim."""
    dims: dict[int, list[tuple[DimSummary, int]]] = defaultdict(list)
    for summaries, n in parts:
        for d in summaries:
            dims[d.dim].append((d, n))
    merged = []
    for dim, items in sorted(dims.items()):
        kinds: dict[str, int] = defaultdict(int)
        tokens: dict[str, int] = defaultdict(int)
        for d, _ in items:
            for k, v in d.kinds.items():
                kinds[k] += v
            for k, v in d.tokens.items():
                tokens[k] += v
        merged.append(
            DimSummary(
                dim=dim,
                first_layer=min(d.first_layer for d, _ in items),
                last_layer=max(d.last_layer for d, _ in items),
                hook_names=tuple(sorted({h for d, _ in items for h in d.hook_names}, key=order.__getitem__)),
                kinds={k: kinds[k] for k in TOKEN_KINDS if k in kinds},
                tokens=by_count(tokens),
                input_fraction=sum(round(d.input_fraction * n) for d, n in items) / n_inputs,
                max_abs_value=max(d.max_abs_value for d, _ in items),
                max_ratio=max(d.max_ratio for d, _ in items),
                hook_inputs=_sum_counts([d.hook_inputs for d, _ in items], order),
            )
        )
    return tuple(merged)


def _sum_counts(parts: list[dict[str, int]], order: dict[str, int]) -> dict[str, int]:
    total: dict[str, int] = defaultdict(int)
    for part in parts:
        for name, count in part.items():
            total[name] += count
    return dict(sorted(total.items(), key=lambda kv: order[kv[0]]))


def _field(data: dict[str, Any], name: str, kinds: tuple[type, ...], source: str, where: str = "") -> Any:
    if name not in data:
        raise ValueError(f"{source}: {where}{name!r} is missing.")
    value = data[name]
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"{source}: {where}{name!r} must be {names}, not {value!r}.")
    return value


def _dim_summaries_from(items: list[Any], name: str, hooks: list[str], source: str) -> tuple[DimSummary, ...]:
    """The :class:`DimSummary` objects of a saved profile's list ``name`` (``dims`` or ``channel_wide``), checked
    (their hook points among ``hooks``)."""
    number = (int, float)
    out = []
    for i, d in enumerate(items):
        where = f"{name}[{i}]."
        if not isinstance(d, dict):
            raise ValueError(f"{source}: {name}[{i}] must be an object.")
        for field_, kinds in (("dim", (int,)), ("first_layer", (int,)), ("last_layer", (int,)), ("hook_names", (list,)),
                              ("kinds", (dict,)), ("tokens", (dict,)), ("input_fraction", number),
                              ("max_abs_value", number), ("max_ratio", number)):
            _field(d, field_, kinds, source, where)
        counts = d.get("hook_inputs", {})
        if not isinstance(counts, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in counts.items()):
            raise ValueError(f"{source}: {where}'hook_inputs' must map hook names to input counts.")
        unknown = sorted({str(h) for h in [*d["hook_names"], *counts]} - set(hooks))
        if unknown:
            raise ValueError(f"{source}: {where}hook_names {unknown} are not among hook_names.")
        fields_ = {k: d[k] for k in DimSummary.__dataclass_fields__ if k != "hook_inputs"}
        out.append(DimSummary(**fields_ | {"hook_names": tuple(d["hook_names"]), "hook_inputs": counts}))
    return tuple(out)


def _profile_from_dict(data: dict[str, Any], source: str) -> MassiveProfile:
    number = (int, float)
    raw = data.get("provenance", data.get("model"))
    provenance = Provenance.from_dict(raw if raw is not None else {}, source=source)
    hooks = _field(data, "hook_names", (list,), source)
    if not all(isinstance(h, str) for h in hooks):
        raise ValueError(f"{source}: 'hook_names' must be a list of strings.")
    bos = data.get("prepend_bos")
    if bos is not None and not isinstance(bos, bool):
        raise ValueError(f"{source}: 'prepend_bos' must be true, false or null, not {bos!r}.")
    dims = _dim_summaries_from(_field(data, "dims", (list,), source), "dims", hooks, source)
    wide = data.get("channel_wide", [])  # absent from profiles saved before it was kept
    if not isinstance(wide, list):
        raise ValueError(f"{source}: 'channel_wide' must be a list of dim summaries, not {wide!r}.")
    channel_wide = _dim_summaries_from(wide, "channel_wide", hooks, source)
    stats = []
    for i, st in enumerate(_field(data, "stats", (list,), source)):
        where = f"stats[{i}]."
        if not isinstance(st, dict):
            raise ValueError(f"{source}: stats[{i}] must be an object.")
        for name, kinds in (("layer", (int,)), ("hook_name", (str,)), ("dim", (int,)), ("kind", (str,)),
                            ("count", (int,)), ("mean", number), ("std", number), ("cv", number)):
            _field(st, name, kinds, source, where)
        if st["kind"] not in TOKEN_KINDS:
            raise ValueError(f"{source}: {where}kind must be one of {TOKEN_KINDS}, not {st['kind']!r}.")
        if st["hook_name"] not in hooks:
            raise ValueError(f"{source}: {where}hook_name {st['hook_name']!r} is not among hook_names.")
        stats.append(ValueStat(**{k: st[k] for k in ValueStat.__dataclass_fields__}))
    delimiters = data.get("delimiters", sorted(DELIMITERS))
    if not isinstance(delimiters, list) or not all(isinstance(x, str) for x in delimiters):
        raise ValueError(f"{source}: 'delimiters' must be a list of strings.")
    top_k = data.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{source}: 'top_k' must be a positive integer or null, not {top_k!r}.")
    weights = data.get("weights", "")
    if not isinstance(weights, str):
        raise ValueError(f"{source}: 'weights' must be a string (a fingerprint), not {weights!r}.")
    try:
        criterion = Criterion(_field(data, "min_value", number, source), _field(data, "min_ratio", number, source))
        layers = tuple(layer_of(h) for h in hooks)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    return MassiveProfile(
        provenance=provenance,
        layers=layers,
        n_inputs=int(_field(data, "n_inputs", (int,), source)),
        hook_names=tuple(hooks),
        prepend_bos=bos,
        criterion=criterion,
        dims=dims,
        stats=tuple(stats),
        delimiters=tuple(delimiters),
        top_k=top_k,
        weights=weights,
        channel_wide=channel_wide,
    )


def _check_scan_settings(model: TransformerLensModel, scan_result: ScanResult, hooks: HookSelection | None,
                         layers: Sequence[int] | None, top_k: int | None) -> None:
    """ValueError when ``hooks`` / ``layers`` / ``top_k`` given beside ``scan_result`` disagree with it."""
    if top_k is not None and top_k != scan_result.top_k:
        raise ValueError(f"top_k={top_k!r} but scan_result kept top_k={scan_result.top_k}: leave top_k out (the "
                         "scan's is used), or scan again with this top_k.")
    if (hooks is not None or layers is not None) and resolve_hook_names(model, hooks, layers) != scan_result.hook_names:
        raise ValueError("hooks / layers name other hook points than scan_result read "
                         f"({len(scan_result.hook_names)} hooks, layers {list(scan_result.layers)}): leave them out "
                         "(the scan's are used), or scan again with them.")


def profile(
    model: TransformerLensModel,
    inputs: Inputs,
    *,
    min_value: float | int = 100.0,
    min_ratio: float | int = 1000.0,
    hooks: HookSelection | None = None,
    layers: Sequence[int] | None = None,
    top_k: int | None = None,
    batch_size: int = 16,
    prepend_bos: bool | None = None,
    delimiters: frozenset[str] = DELIMITERS,
    progress: bool = True,
    scan_result: ScanResult | None = None,
) -> MassiveProfile:
    """Which dims carry massive activations, where, on which tokens, and how constant.

    One streaming pass over ``inputs``: :func:`scan` + :func:`find_massive`, and, in
    the same forward passes, the value at every hook of each (input, position, dim)
    found massive anywhere in that input, summed per (hook, dim, token kind) (see
    :mod:`massact_lens.find.profile_values`: a batch where a new massive dim appears is
    run once more, reading only). ``inputs`` may be a one-shot iterator of batches.

    ``scan_result``: a scan of these same inputs already made; the values are then
    read in one pass of their own (its hooks, top_k and BOS setting are used; ``hooks``,
    ``layers`` or ``top_k`` given as well must agree with it). ``top_k`` None: 10. Before
    that pass, a scan of another model, of other weights or of other inputs (count,
    lengths, BOS, the tokens at its kept entries) is refused with ``ValueError``.

    The profile's dims and values are the token-sparse massive activations; outlier
    channels (a dim that passes on more than half of the tokens of a hidden state) are
    summarised apart in ``channel_wide`` and not followed.

    >>> from massact_lens.examples import minilm
    >>> p = profile(minilm(), ["A short sentence.", "Another one here."],
    ...             min_value=50, min_ratio=200, progress=False)
    >>> p.massive_dims
    (99,)
    """
    refuse_plain_hf(model, "profile")
    criterion = Criterion(min_value, min_ratio)
    if scan_result is None:
        statistics, plan = scan_plan(model, inputs, hooks=hooks, layers=layers, top_k=10 if top_k is None else top_k,
                                     batch_size=batch_size, prepend_bos=prepend_bos)
        values = CandidateValues(model, statistics, criterion, delimiters)
        measure(model, plan, statistics, values, progress=progress, desc="profile")
        result = statistics.checked_result(stacklevel=2)
        found = values.found(stacklevel=2)
        stats = values.result()
    elif not isinstance(scan_result, ScanResult):
        raise TypeError(f"scan_result must be a ScanResult, not {type(scan_result).__name__}.")
    else:
        _check_scan_settings(model, scan_result, hooks, layers, top_k)
        plan = second_pass_plan(model, inputs, scan_result, batch_size, prepend_bos)  # refuses another model/inputs
        result = scan_result
        found = criterion.find(result, delimiters=delimiters, stacklevel=2)
        stats = second_pass_values(model, plan, result, found, progress)
    return MassiveProfile(
        provenance=result.provenance,
        layers=result.layers,
        n_inputs=result.n_inputs,
        hook_names=result.hook_names,
        prepend_bos=result.prepend_bos,
        criterion=criterion,
        dims=found.dim_summaries(),
        stats=stats,
        delimiters=tuple(sorted(delimiters)),
        top_k=result.top_k,
        weights=weights_fingerprint(model),
        channel_wide=found.channel_wide_summaries(),
    )
