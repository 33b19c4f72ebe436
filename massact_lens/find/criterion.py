"""The massive-activation criterion, its records, and the cross-input profile.

Background
----------
Sun et al. (2024) call an activation *massive* when its magnitude is above 100 and
at least about 1,000 times the median magnitude of its hidden state ("loose but
broad"); their code never applies it and only ranks top-k. :func:`find_massive`
applies it to a :class:`~massact_lens.find.scanner.ScanResult`, with both thresholds
configurable (a 384-dim encoder needs lower ones than a 4,096-dim LLM).

An entry can pass because its dim is large on a few tokens (the paper's massive
activations: the start token, delimiters) or because its dim is large on most tokens
of the hidden state (an outlier channel, the kind LLM.int8 (Dettmers et al. 2022)
describes: Gemma-3-270m's dim 400 passes on almost every token of blocks 1-3). The
records say which (:meth:`Criterion.channel_wide`); :func:`find_massive` keeps the
token-sparse ones as its records (what every key set, profile and table built from
records uses) and lists the channel-wide ones apart (``found.channel_wide``).

:func:`profile` gives the cross-input picture the paper draws: which feature dims
carry massive activations, the first and last layer where they do, on which kind of
token (the start token, a delimiter such as "." or a newline, other), and per
(hook, dim, token kind) the mean, std and coefficient of variation of the signed
value over inputs: the "input-agnostic bias" claim as numbers, and what
"set to mean" ablation needs.

Usage
-----
>>> from massact_lens import scan, find_massive
>>> from massact_lens.examples import tiny_model
>>> import torch
>>> found = find_massive(scan(tiny_model(), torch.randint(0, 64, (2, 6)), progress=False))
>>> len(found)   # a random model has none
0

References
----------
Sun, Chen, Kolter, Liu. *Massive Activations in Large Language Models*, COLM 2024,
section 2 (definition) and Table 1 (profiles).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import pandas as pd
import torch
from jaxtyping import Bool, Float

from massact_lens._core.checks import check_threshold
from massact_lens._core.statistics import hidden_state_medians
from massact_lens._core.summary import Summarised
from massact_lens._core.types import Provenance
from massact_lens.find.scan_result import ScanResult

__all__ = [
    "DELIMITERS",
    "Criterion",
    "DimSummary",
    "MassiveActivation",
    "MassiveActivations",
    "MassiveSet",
    "find_massive",
    "token_kind",
]

TokenKind = Literal["start", "delimiter", "other"]
TOKEN_KINDS: tuple[str, ...] = ("start", "delimiter", "other")
#: Token texts (whitespace stripped) counted as delimiters. A whitespace-only token
#: containing a newline is a delimiter too.
DELIMITERS: frozenset[str] = frozenset({".", ",", ";", ":", "!", "?", "\n"})


def token_kind(position: int, token: str, delimiters: frozenset[str] = DELIMITERS) -> TokenKind:
    """Classify a token as the paper does: the start token, a delimiter, or other.

    >>> token_kind(0, "[CLS]"), token_kind(5, "."), token_kind(3, "\\n"), token_kind(2, " of")
    ('start', 'delimiter', 'delimiter', 'other')
    """
    if position == 0:
        return "start"
    stripped = token.strip()
    if stripped in delimiters or (stripped == "" and "\n" in token):
        return "delimiter"
    return "other"


@dataclass(frozen=True)
class Criterion:
    """The paper's criterion: an entry is massive when ``|x| > min_value`` and
    ``|x| >= min_ratio x`` the median ``|x|`` of its hidden state.

    The one threshold check of the library: :func:`find_massive`, :func:`profile`,
    ``where_massive`` and the attention key sets all build one. Both thresholds must
    be positive finite numbers (the paper: 100 and 1000; small models need lower
    ones, e.g. 50 and 200).

    >>> c = Criterion(100, 1000)
    >>> c.passes(torch.tensor([150.0, 150.0, 90.0]), torch.tensor([0.1, 0.2, 0.01]))
    tensor([ True, False, False])
    >>> Criterion(0, 1000)
    Traceback (most recent call last):
    ...
    ValueError: min_value must be a positive finite number, not 0. The paper uses min_value=100, min_ratio=1000; small models need lower ones (e.g. 50 and 200).
    """

    min_value: float | int = 100.0
    min_ratio: float | int = 1000.0

    def __post_init__(self) -> None:
        for name in ("min_value", "min_ratio"):
            object.__setattr__(self, name, check_threshold(name, getattr(self, name)))

    def passes(self, magnitude: torch.Tensor, median: torch.Tensor) -> torch.Tensor:
        """Elementwise; ``median`` broadcasts against ``magnitude``."""
        return (magnitude > self.min_value) & (magnitude >= self.min_ratio * median)

    def entries(
        self,
        activation: Float[torch.Tensor, "batch pos d_model"],
        real: Bool[torch.Tensor, "batch pos"],
        dims: torch.Tensor | None = None,
    ) -> Bool[torch.Tensor, "batch pos n_dims"]:
        """Which entries of a hidden state are massive, decided on the activation itself.

        Every entry is tested (not only a scan's top-k), against the median |x| of its
        own hidden state over real positions; padding entries never pass. ``dims``
        restricts the columns tested (``n_dims = len(dims)``, default all ``d_model``).

        >>> x = torch.zeros(1, 3, 4); x[0, 0, 2] = 500.0; x[0, 1:] += 0.1
        >>> Criterion(100, 1000).entries(x, torch.ones(1, 3, dtype=torch.bool)).nonzero().tolist()
        [[0, 0, 2]]
        """
        magnitude = activation.detach().float().abs()
        median = hidden_state_medians(activation, real)
        tested = magnitude if dims is None else magnitude[..., dims]
        return self.passes(tested, median[:, None, None]) & real[..., None]

    def token_sparse(
        self, entries: Bool[torch.Tensor, "batch pos n_dims"], real: Bool[torch.Tensor, "batch pos"]
    ) -> Bool[torch.Tensor, "batch pos n_dims"]:
        """``entries`` (of :meth:`entries`) without the channel-wide ones: an entry is dropped when
        its column passes on **more than half** of the real tokens of its hidden state (an outlier
        channel; the rule of :meth:`channel_wide`, counted directly). What :func:`find_massive`
        keeps as its records, decided on a full hidden state; a state of one real token keeps all.

        >>> x = torch.zeros(1, 4, 3) + 0.1; x[0, 0, 0] = 500.0; x[0, :, 2] = 400.0   # dim 2: every token
        >>> c, real = Criterion(100, 1000), torch.ones(1, 4, dtype=torch.bool)
        >>> c.token_sparse(c.entries(x, real), real).nonzero().tolist()
        [[0, 0, 0]]
        """
        counts = real.sum(dim=1)  # [batch]
        wide = (2 * entries.sum(dim=1) > counts[:, None]) & (counts >= 2)[:, None]  # [batch, n_dims]
        return entries & ~wide[:, None, :]

    def channel_wide(
        self, column_medians: torch.Tensor, medians: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Which entries are channel-wide: their dim passes the criterion on **more than half**
        of the real tokens of their hidden state (an outlier channel, not a massive
        activation of a few tokens).

        Exactly: the lower median ``|x|`` of the entry's dim over the state's real
        positions (a scan's ``column_medians``) passes against the state's median. The
        criterion is monotone in ``|x|``, so that median passes if and only if more than
        half of the tokens pass. A state of one real token can't tell the two kinds
        apart: its entries count as token-sparse. ``column_medians`` ``[*states, k]``,
        ``medians`` and ``lengths`` (real tokens) ``[*states]``.

        >>> Criterion(100, 1000).channel_wide(torch.tensor([[300.0, 0.5]]), torch.tensor([0.1]), torch.tensor([8])).tolist()
        [[True, False]]
        """
        wide = self.passes(column_medians.nan_to_num(nan=0.0), medians[..., None])
        return wide & (lengths >= 2)[..., None]

    def among_top(
        self, values: Float[torch.Tensor, "*states k"], medians: Float[torch.Tensor, "*states"]
    ) -> Bool[torch.Tensor, "*states k"]:
        """Which of a scan's top-k entries (signed ``values``, NaN where missing) pass,
        each against its hidden state's median.

        >>> Criterion(100, 1000).among_top(torch.tensor([[150.0, float("nan")]]), torch.tensor([0.1])).tolist()
        [[True, False]]
        """
        return self.passes(values.abs().nan_to_num(nan=0.0), medians[..., None])

    def find(
        self, scan_result: ScanResult, *, delimiters: frozenset[str] = DELIMITERS, stacklevel: int = 1
    ) -> MassiveActivations:
        """The records of :func:`find_massive` under this criterion (``stacklevel``: where its
        warnings point, 1 the caller, as :func:`warnings.warn` counts)."""
        if not isinstance(scan_result, ScanResult):
            raise TypeError(
                f"find_massive reads a ScanResult (from massact_lens.scan), not {type(scan_result).__name__}."
            )
        scan_result.warn_nonfinite(stacklevel=stacklevel + 2)
        passes = self.among_top(scan_result.values, scan_result.medians)
        full = passes.all(dim=-1)
        if bool(full.any()):
            warnings.warn(
                f"In {int(full.sum())} hidden state(s) all top_k={scan_result.top_k} kept entries are massive: "
                "there may be more. Scan again with a larger top_k.",
                UserWarning,
                stacklevel=stacklevel + 1,
            )
        wide = torch.zeros_like(passes)
        if scan_result.column_medians is not None:
            lengths = scan_result.lengths[:, None].expand(scan_result.medians.shape)
            wide = self.channel_wide(scan_result.column_medians, scan_result.medians, lengths)
        records = [_record(scan_result, i, h, r, delimiters, bool(wide[i, h, r])) for i, h, r in passes.nonzero().tolist()]
        return MassiveActivations(tuple(r for r in records if not r.channel_wide), self, scan_result,
                                  frozenset(delimiters), tuple(r for r in records if r.channel_wide))

    def describe(self) -> str:
        return f"|x| > {self.min_value:g} and >= {self.min_ratio:g} x median"


def _record(scan_result: ScanResult, i: int, h: int, r: int, delimiters: frozenset[str],
            channel_wide: bool) -> MassiveActivation:
    position = int(scan_result.positions[i, h, r])
    token = scan_result.token(int(scan_result.token_ids[i, h, r]))
    value = float(scan_result.values[i, h, r])
    return MassiveActivation(
        layer=scan_result.layers[h],
        hook_name=scan_result.hook_names[h],
        input_index=i,
        position=position,
        token=token,
        dim=int(scan_result.dims[i, h, r]),
        value=value,
        ratio=abs(value) / float(scan_result.medians[i, h]),
        kind=token_kind(position, token, delimiters),
        channel_wide=channel_wide,
    )


@dataclass(frozen=True)
class MassiveActivation:
    """One hidden-state entry that passes the criterion. ``channel_wide``: its dim passes on
    more than half of the tokens of this hidden state (an outlier channel, see
    :meth:`Criterion.channel_wide`), not on a few (a massive activation)."""

    layer: int
    hook_name: str
    input_index: int
    position: int
    token: str
    dim: int
    value: float
    ratio: float
    kind: str
    channel_wide: bool = False


@runtime_checkable
class MassiveSet(Protocol):
    """What every set of massive activations offers, whether records of one scan
    (:class:`MassiveActivations`, ``per_input`` True: tied to that scan's inputs) or a
    cross-input profile (:class:`~massact_lens.find.profiles.MassiveProfile`). Code that
    takes either reads these, never ``isinstance`` of one or the other.

    >>> from massact_lens.examples import minilm
    >>> from massact_lens.find import scan
    >>> found = find_massive(scan(minilm(), ["Rain fell."], progress=False), 50, 200)
    >>> isinstance(found, MassiveSet), found.per_input, found.dim_kinds(), found.last_layer()
    (True, True, ((99, 'start'),), 3)
    """

    @property
    def provenance(self) -> Provenance: ...
    @property
    def prepend_bos(self) -> bool | None: ...
    @property
    def criterion(self) -> Criterion: ...
    @property
    def hook_names(self) -> tuple[str, ...]: ...
    @property
    def delimiters(self) -> Collection[str]: ...
    @property
    def per_input(self) -> bool: ...
    @property
    def massive_dims(self) -> tuple[int, ...]: ...
    def dim_kinds(self) -> tuple[tuple[int, str], ...]: ...
    def last_layer(self) -> int: ...


@dataclass(frozen=True, repr=False)
class MassiveActivations(Sequence[MassiveActivation], Summarised):
    """The records :func:`find_massive` returns, with the criterion and the scan they came from.

    ``records`` (what iterating, ``len``, :attr:`massive_dims` and every key set read) are
    the token-sparse entries, the paper's massive activations; ``channel_wide`` are the
    entries of outlier channels (a dim that passes on more than half of the tokens of
    its hidden state, :meth:`Criterion.channel_wide`), listed apart.
    """

    records: tuple[MassiveActivation, ...]
    criterion: Criterion
    scan: ScanResult = field(repr=False)
    delimiters: frozenset[str] = DELIMITERS
    channel_wide: tuple[MassiveActivation, ...] = ()

    #: Records are tied to the inputs of one scan (see :class:`MassiveSet`).
    per_input: ClassVar[bool] = True

    @property
    def provenance(self) -> Provenance:
        return self.scan.provenance

    @property
    def prepend_bos(self) -> bool | None:
        return self.scan.prepend_bos

    @property
    def weights(self) -> str:
        """The scan's digest of the model's weights ("" when unknown)."""
        return self.scan.weights

    @property
    def hook_names(self) -> tuple[str, ...]:
        return self.scan.hook_names

    @property
    def min_value(self) -> float:
        return float(self.criterion.min_value)

    @property
    def min_ratio(self) -> float:
        return float(self.criterion.min_ratio)

    @property
    def massive_dims(self) -> tuple[int, ...]:
        """The feature dims that carry at least one massive activation."""
        return tuple(sorted({r.dim for r in self.records}))

    @property
    def channel_wide_dims(self) -> tuple[int, ...]:
        """The feature dims of the channel-wide entries (outlier channels), apart from :attr:`massive_dims`."""
        return tuple(sorted({r.dim for r in self.channel_wide}))

    def dim_kinds(self) -> tuple[tuple[int, str], ...]:
        """The (dim, token kind) pairs that are massive somewhere, sorted."""
        return tuple(sorted({(r.dim, r.kind) for r in self.records}))

    def last_layer(self) -> int:
        """The last layer where an entry is massive (-1: none)."""
        return max((r.layer for r in self.records), default=-1)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: Any) -> Any:
        return self.records[index]

    def __iter__(self) -> Iterator[MassiveActivation]:
        return iter(self.records)

    def _summary_lines(self) -> list[str]:
        inputs = len({r.input_index for r in self.records})
        dims = ", ".join(f"{d} ({k})" for d, k in self.dim_kinds()[:8]) or "none"
        return [f"{len(self.records)} massive activations in {inputs} of {self.scan.n_inputs} inputs "
                f"(|x| > {self.min_value:g}, >= {self.min_ratio:g} x median), last layer {self.last_layer()}",
                f"dims: {dims}"]

    def to_dataframe(self, *, include_channel_wide: bool = False) -> pd.DataFrame:
        """One row per record, columns as the :class:`MassiveActivation` fields;
        ``include_channel_wide``: the channel-wide entries too, after them (their
        ``channel_wide`` column is True)."""
        columns = list(MassiveActivation.__dataclass_fields__)
        rows = self.records + (self.channel_wide if include_channel_wide else ())
        return pd.DataFrame([asdict(r) for r in rows], columns=columns)

    def dim_summaries(self) -> tuple[DimSummary, ...]:
        """Per massive dim: first/last layer, token kinds and texts, how often, how large."""
        return _dim_summaries(self.records, self.scan, self.scan.n_inputs)

    def channel_wide_summaries(self) -> tuple[DimSummary, ...]:
        """:meth:`dim_summaries` of the channel-wide entries (the outlier channels)."""
        return _dim_summaries(self.channel_wide, self.scan, self.scan.n_inputs)


def find_massive(
    scan_result: ScanResult,
    min_value: float | int = 100.0,
    min_ratio: float | int = 1000.0,
    *,
    delimiters: frozenset[str] = DELIMITERS,
) -> MassiveActivations:
    """Apply the paper's criterion: ``|x| > min_value`` and ``|x| >= min_ratio x median``.

    The median is that of the entry's own hidden state (one input, one hook, real
    positions, all dims). Only the scan's top-k entries are candidates: when all k of
    some hidden state pass, more may exist and a warning says to raise ``top_k``.
    The records are the token-sparse entries (the paper's kind); entries whose dim
    passes on more than half of the tokens of their hidden state (outlier channels,
    :meth:`Criterion.channel_wide`) are listed apart in ``found.channel_wide``.

    >>> from massact_lens import scan
    >>> from massact_lens.examples import minilm
    >>> result = scan(minilm(), ["The cat sat on the mat."], progress=False)
    >>> found = find_massive(result, min_value=50, min_ratio=200)
    >>> sorted({(r.layer, r.token, r.dim) for r in found})[:3]
    [(0, '[CLS]', 99), (1, '[CLS]', 99), (2, '[CLS]', 99)]
    """
    return Criterion(min_value, min_ratio).find(scan_result, delimiters=delimiters, stacklevel=2)


@dataclass(frozen=True)
class DimSummary:
    """Where one feature dim carries massive activations, across all inputs."""

    dim: int
    first_layer: int
    last_layer: int
    hook_names: tuple[str, ...]
    kinds: dict[str, int]  # token kind -> number of records
    tokens: dict[str, int]  # token text -> number of records
    input_fraction: float  # fraction of inputs where it is massive somewhere
    max_abs_value: float
    max_ratio: float
    #: hook name -> number of inputs where the dim is massive there (forward order).
    hook_inputs: dict[str, int] = field(default_factory=dict)

    def first_hook(self, n_inputs: int, share: float = 0.5) -> str:
        """The first hook where the dim is massive in at least ``share`` of the inputs.

        "Where it appears" in the paper's sense: a build-up that crosses the threshold in
        a few inputs at an earlier block does not count. Falls back to the first hook
        where it is massive at all (and for profiles saved before 0.2, which lack counts).
        """
        for name, count in self.hook_inputs.items():
            if count >= share * n_inputs:
                return name
        return self.hook_names[0]


def by_count(counts: dict[str, int]) -> dict[str, int]:
    """Counts sorted by count (descending), then text: one order however they were summed."""
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _dim_summaries(found: Sequence[MassiveActivation], scan: ScanResult, n_inputs: int) -> tuple[DimSummary, ...]:
    by_dim: dict[int, list[MassiveActivation]] = defaultdict(list)
    for record in found:
        by_dim[record.dim].append(record)
    order = {name: i for i, name in enumerate(scan.hook_names)}
    out = []
    for dim, records in sorted(by_dim.items()):
        kinds: dict[str, int] = defaultdict(int)
        tokens: dict[str, int] = defaultdict(int)
        for r in records:
            kinds[r.kind] += 1
            tokens[r.token] += 1
        out.append(
            DimSummary(
                dim=dim,
                first_layer=min(r.layer for r in records),
                last_layer=max(r.layer for r in records),
                hook_names=tuple(sorted({r.hook_name for r in records}, key=order.__getitem__)),
                kinds=dict(kinds),
                tokens=by_count(tokens),
                input_fraction=len({r.input_index for r in records}) / n_inputs,
                max_abs_value=max(abs(r.value) for r in records),
                max_ratio=max(r.ratio for r in records),
                hook_inputs={
                    name: len({r.input_index for r in records if r.hook_name == name})
                    for name in sorted({r.hook_name for r in records}, key=order.__getitem__)
                },
            )
        )
    return tuple(out)
