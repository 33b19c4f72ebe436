"""What every result shares: how it was obtained, the exact merge, running sums and kept inputs.

Every result is a frozen dataclass on :class:`Result` (its ``provenance``), and a
result over a corpus on :class:`CorpusResult` (``layers``, ``n_inputs``). A
streamed result holds running sums over every input (memory independent of the
corpus) and the full per-input tensors of only its first ``keep`` inputs
(:class:`StreamedResult`). Results of consecutive slices of a corpus merge exactly
(:meth:`Result.merge`): the parts are checked first (all of the class, one model,
equal in :attr:`Result.merge_same`), then the sums add and the kept inputs
concatenate up to ``keep``.

>>> kept = KeptInputs(2, {"tokens": 1})
>>> kept.add(torch.tensor([[1, 1, 0]]), [0], tokens=torch.tensor([[5, 6, 0]]))
>>> kept.choose([1, 2])  # the next batch holds inputs 1 and 2: only its row 0 (input 1) is kept
([0], [1])
>>> kept.add(torch.tensor([[1, 1, 1]]), [1], tokens=torch.tensor([[7, 8, 9]]))
>>> kept.n, kept.tensors()["tokens"].tolist()
(2, [[5, 6, 0], [7, 8, 9]])
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import torch

from massact_lens._core.summary import Summarised
from massact_lens._core.types import Provenance

__all__ = [
    "CorpusResult",
    "Keep",
    "KeptInputs",
    "Result",
    "StreamedResult",
    "SummedResult",
    "add_sums",
    "check_keep",
    "check_parts",
    "keep_limit",
    "merge_kept",
    "pad_cat",
]

R = TypeVar("R", bound="Result")

#: How many inputs a result keeps in full: a count, or ``"all"``.
Keep = int | Literal["all"]


def check_keep(keep: Any) -> Keep:
    """``keep`` as given, or ValueError / TypeError before any pass."""
    if keep == "all" and isinstance(keep, str):
        return "all"
    if isinstance(keep, bool) or not isinstance(keep, int):
        raise TypeError(f"keep must be a number of inputs or 'all', not {keep!r}.")
    if keep < 0:
        raise ValueError(f"keep must be >= 0 (0: keep no input in full), not {keep}.")
    return keep


def keep_limit(keep: Keep) -> int | None:
    """The number of inputs to keep; None for all."""
    return None if keep == "all" else int(keep)


def pad_cat(parts: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """Concatenate along dim 0, right-padding ``dim`` to the widest part with zeros (False)."""
    width = max(int(p.shape[dim]) for p in parts)
    out = []
    for p in parts:
        pad = [0, 0] * (p.ndim - dim - 1) + [0, width - int(p.shape[dim])]
        out.append(torch.nn.functional.pad(p, pad) if pad[-1] else p)
    if len(out) == 1 and not out[0].is_inference():  # one normal part: itself (no copy of a big kept tensor)
        return out[0]
    return torch.cat(out, dim=0)


def _trim(tensors: dict[str, torch.Tensor], pos_dims: Mapping[str, int], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cut the position axes to the kept inputs' longest real length (padding is on the right)."""
    real = mask.bool().any(0).nonzero()
    width = int(real.max()) + 1 if real.numel() else 0
    return {name: t.narrow(pos_dims[name], 0, min(width, int(t.shape[pos_dims[name]]))) for name, t in tensors.items()}


class KeptInputs:
    """The first ``limit`` inputs' per-input tensors, gathered batch by batch.

    ``pos_dims`` names each tensor and gives its position axis (``None``: no position
    axis); the input axis is 0. "First" is by input index, whatever the order the
    batches ran in (a plan made longest first holds them out of order): :meth:`choose`
    says which rows of a batch to keep, :meth:`add` takes those rows' attention mask,
    their input indices and their tensors, and :meth:`tensors` returns them in input order.

    >>> kept = KeptInputs(2, {"x": None})
    >>> rows, inputs = kept.choose([5, 1, 0])  # a batch holding inputs 5, 1 and 0
    >>> kept.add(torch.ones(2, 1), inputs, x=torch.tensor([10.0, 20.0, 30.0])[rows])
    >>> rows, kept.tensors()["x"].tolist()
    ([1, 2], [30.0, 20.0])
    """

    def __init__(self, limit: int | None, pos_dims: Mapping[str, int | None]) -> None:
        self.limit = limit
        self.pos_dims = dict(pos_dims)
        self.parts: dict[str, list[torch.Tensor]] = {name: [] for name in ["attention_mask", *pos_dims]}
        self.inputs: list[int] = []  # the input index of every kept row, as added
        self.n = 0

    def choose(self, inputs: Sequence[int]) -> tuple[list[int], list[int]]:
        """The rows to keep of a batch whose rows are the inputs ``inputs`` (in row order),
        and those rows' input indices (what :meth:`add` takes)."""
        rows = [row for row, index in enumerate(inputs) if self.limit is None or index < self.limit]
        return rows, [int(inputs[row]) for row in rows]

    def add(self, attention_mask: torch.Tensor, inputs: Sequence[int], **tensors: torch.Tensor) -> None:
        """The chosen rows: their attention mask, input indices and tensors (input axis first)."""
        if len(inputs) == 0:
            return
        for name, t in {"attention_mask": attention_mask, **tensors}.items():
            self.parts[name].append(t.detach().cpu())
        self.inputs += [int(i) for i in inputs]
        self.n += len(inputs)

    def tensors(self, empty: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Each tensor over the kept inputs, padded to the longest, then cut to the longest real length.

        Call it once, outside inference mode (the tensors are then normal ones): it
        lets go of the pieces. ``empty``: what to return for each name when no input
        was kept.
        """
        if self.n == 0:
            return dict(empty or {})
        dims = {"attention_mask": 1, **self.pos_dims}
        order = None if self.inputs == sorted(self.inputs) else torch.argsort(torch.tensor(self.inputs))
        out = {}
        for name in list(self.parts):  # each name's pieces are let go once joined: one copy at a time
            parts = self.parts.pop(name)
            out[name] = pad_cat(parts, dims[name]) if dims[name] is not None else torch.cat(parts)
            if order is not None:
                out[name] = out[name][order]
            del parts
        positional = {name: t for name, t in out.items() if dims[name] is not None}
        return {**out, **_trim(positional, {n: int(dims[n]) for n in positional}, out["attention_mask"])}  # type: ignore[arg-type]


def merge_kept(
    parts: Sequence[tuple[int, dict[str, torch.Tensor]]], limit: int | None, pos_dims: Mapping[str, int | None]
) -> dict[str, torch.Tensor]:
    """The kept inputs of a merge: ``parts`` are ``(n_inputs, kept tensors)`` in corpus order.

    Tensors are input-first, as :class:`KeptInputs` holds them, with an
    ``attention_mask``. A part that kept fewer inputs than it had ends the run of
    consecutive inputs, so later parts add nothing; the result is cut to ``limit``:
    the inputs one run over the whole corpus keeps.
    """
    chosen: list[dict[str, torch.Tensor]] = []
    for n_inputs, kept in parts:
        chosen.append(kept)
        if int(kept["attention_mask"].shape[0]) < n_inputs:
            break
    dims = {"attention_mask": 1, **pos_dims}
    out = {}
    for name in chosen[0]:
        pieces = [p[name] for p in chosen]
        pos = dims[name]
        joined = torch.cat(pieces) if pos is None else pad_cat(pieces, pos)
        out[name] = joined if limit is None else joined[:limit]
    positional = {name: t for name, t in out.items() if dims[name] is not None}
    return {**out, **_trim(positional, {n: int(dims[n]) for n in positional}, out["attention_mask"])}  # type: ignore[arg-type]


def add_sums(parts: Sequence[Mapping[str, torch.Tensor]], minimum: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Running sums of several parts added (names in ``minimum``: the elementwise minimum)."""
    out = {name: t.clone() for name, t in parts[0].items()}
    for part in parts[1:]:
        if set(part) != set(out):
            raise ValueError(f"The parts hold different running sums ({sorted(set(part) ^ set(out))}).")
        for name, t in part.items():
            out[name] = torch.minimum(out[name], t) if name in minimum else out[name] + t
    return out


def _a(name: str) -> str:
    """``name`` with its indefinite article: ``a ScanResult``, ``an AttentionConcentration``."""
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def check_parts(parts: Any, cls: type, fields: Sequence[str]) -> list[Any]:
    """``parts`` as a list, refused (ValueError / TypeError) unless they can merge.

    They must all be ``cls`` (checked first, before any part is read), from the same
    model (provenance, and weights where both record a fingerprint), equal in ``fields``, and none may refuse to merge
    (``_merge_refusal()``: a key set tied to its own inputs, say). Every refusal says
    what to do.

    >>> check_parts("abc", Result, ())
    Traceback (most recent call last):
    ...
    TypeError: Result.merge takes a list of Result results (one per slice of the corpus, in order), not a str.
    """
    name = cls.__name__
    if isinstance(parts, str | bytes | Mapping) or not isinstance(parts, Sequence | Iterator):
        raise TypeError(
            f"{name}.merge takes a list of {name} results (one per slice of the corpus, in order), "
            f"not {_a(type(parts).__name__)}."
        )
    parts = list(parts)
    if not parts:
        raise ValueError(f"{name}.merge needs at least one result: pass the results of the slices, in order.")
    for i, part in enumerate(parts):  # every part's class first: nothing of a stranger is read
        if not isinstance(part, cls):
            raise TypeError(
                f"Part {i} is {_a(type(part).__name__)}, not {_a(name)}: pass only {name} results to "
                f"{name}.merge (each measured on one slice of the corpus, with the same call)."
            )
    first = parts[0]
    for i, part in enumerate(parts):
        refusal = getattr(part, "_merge_refusal", None)
        reason = refusal() if callable(refusal) else None
        if reason:
            raise ValueError(f"{name} part {i} cannot merge: {reason}")
        if i == 0:
            continue
        first.provenance.check_same(part.provenance, f"{name} parts 0 and {i}")
        for name_ in fields:
            a, b = getattr(first, name_), getattr(part, name_)
            same = (isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)) \
                if isinstance(a, torch.Tensor) else a == b
            if not same:
                shown = (f"{a!r} != {b!r}") if not isinstance(a, torch.Tensor) else "the tensors differ"
                raise ValueError(
                    f"{name} parts 0 and {i} differ in {name_} ({shown}): measure every slice of the "
                    "corpus with the same model, settings and key set, then merge."
                )
        mine, theirs = getattr(first, "weights", ""), getattr(part, "weights", "")
        if mine and theirs and mine != theirs:
            raise ValueError(
                f"{name} parts 0 and {i} were measured on other weights (fingerprints {mine} != {theirs}), though "
                "the models share name and shape: measure every slice with the same checkpoint, then merge."
            )
    return parts


@dataclass(frozen=True, kw_only=True, repr=False)
class Result(Summarised):
    """The base of every result: the model as it was measured, and the exact merge.

    It shows itself short (:class:`~massact_lens._core.summary.Summarised`): a dataclass
    subclass says ``repr=False``, or its generated ``__repr__`` prints every tensor.
    A subclass that merges names in :attr:`merge_same` the fields its parts must share
    and implements :meth:`_merged` (the parts already checked).
    """

    provenance: Provenance

    #: Fields that must be equal in every part of a merge (besides the provenance).
    merge_same: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def merge(cls: type[R], parts: Any) -> R:  # Any: a wrong argument gets check_parts' message
        """One result from results of consecutive slices of a corpus, in corpus order:
        exactly what one run over the whole corpus gives. Parts of another class, model
        or setting are refused (before any is read) with what to do."""
        return cls._merged(check_parts(parts, cls, cls.merge_same))

    @classmethod
    def _merged(cls: type[R], parts: list[R]) -> R:  # noqa: ARG003 (what a merging subclass implements)
        raise TypeError(f"{cls.__name__} results do not merge: run the measurement on the whole corpus.")


@dataclass(frozen=True, kw_only=True, repr=False)
class CorpusResult(Result):
    """A result over a corpus: the layers measured and how many inputs it covers."""

    layers: tuple[int, ...]
    n_inputs: int


@dataclass(frozen=True, kw_only=True, repr=False)
class SummedResult(CorpusResult):
    """A corpus result whose tables read float64 running sums over every input (``sums``:
    memory independent of the corpus; a merge adds them)."""

    #: Float64 running sums over every input, by name (each result's docstring lists them).
    sums: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)


@dataclass(frozen=True, kw_only=True, repr=False)
class StreamedResult(SummedResult):
    """A summed result that also keeps the per-input tensors of its first ``keep`` inputs."""

    keep: Keep

    @property
    def n_kept(self) -> int:
        """How many inputs have their per-input tensors here: the first ``keep`` ones."""
        return self.n_inputs if self.keep == "all" else min(self.n_inputs, int(self.keep))
