"""Data-parallel measurements on ``torch.distributed``: shard by rank, merge exactly.

:func:`run_distributed` runs any verb of the library whose result merges (``scan``,
``profile``, ``attention_concentration``, ``implicit_bias``, ``token_features``, ...).
Every rank loads the same model and calls it with the same verb and the whole corpus;
each measures the contiguous slice :func:`shard` gives it, and the parts are gathered
to ``dst`` and merged in rank order with the result class's ``merge``
(:meth:`ScanResult.merge <massact_lens.find.scan_result.ScanResult.merge>`,
:meth:`MassiveProfile.merge <massact_lens.find.profiles.MassiveProfile.merge>`, ...): the
result is the one a single process gives. Before any forward pass the ranks compare
what they are about to do (model provenance, a fingerprint of the weights, the corpus
size, the verb and every argument) and all fail together if they disagree; a rank whose
measurement raises stops every rank. Works with gloo (CPU) and NCCL (GPU) process
groups; launch with ``torchrun``::

    torchrun --nproc-per-node 2 -m massact_lens scan --json scan.json

>>> shard(10, rank=2, world_size=4)
range(6, 8)
"""

from __future__ import annotations

import hashlib
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._fingerprint import weights_fingerprint
from massact_lens._core._plain_hf import refuse_plain_hf
from massact_lens._core.results import Result
from massact_lens._core.types import Provenance
from massact_lens.find.criterion import MassiveSet

__all__ = ["run_distributed", "shard"]

R = TypeVar("R")


def shard(n_inputs: int, rank: int, world_size: int) -> range:
    """The contiguous slice of ``n_inputs`` that ``rank`` of ``world_size`` reads.

    Sizes differ by at most one; the first ``n_inputs % world_size`` ranks take one
    more. A rank can get an empty slice (more ranks than inputs).

    >>> [len(shard(5, r, 3)) for r in range(3)], shard(1, 1, 2)
    ([2, 2, 1], range(1, 1))
    """
    if isinstance(n_inputs, bool) or not isinstance(n_inputs, int) or n_inputs < 0:
        raise ValueError(f"n_inputs must be a count (an integer >= 0), not {n_inputs!r}: pass len(inputs).")
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {value!r}: pass torch.distributed.get_rank() and "
                            "get_world_size() (or plain integers).")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank {rank} is not in a world of {world_size}: pass 0 <= rank < world_size (under torchrun: "
            "torch.distributed.get_rank() and get_world_size())."
        )
    base, extra = divmod(n_inputs, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def _check_group() -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "No torch.distributed process group: launch with torchrun and call "
            "torch.distributed.init_process_group('gloo' or 'nccl') first (or call the verb itself)."
        )
    return dist.get_rank(), dist.get_world_size()


def _agree(plan: dict[str, Any]) -> None:
    """All ranks raise the same ValueError unless every rank's ``plan`` is the same."""
    plans: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(plans, plan)
    for rank, other in enumerate(plans):
        if other != plans[0]:
            diff = sorted(k for k in plan if plans[0].get(k) != other.get(k))
            raise ValueError(
                f"Ranks 0 and {rank} disagree on {diff} before scanning: every rank must load the "
                "same model (same weights, dtype, processing) and pass the same inputs and settings."
            )


def _inputs_slice(inputs: Any, part: range) -> Any:
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, torch.Tensor):
        return inputs[part.start : part.stop]
    if isinstance(inputs, Sequence):
        return list(inputs[part.start : part.stop])
    raise TypeError(
        "A distributed measurement shards the corpus by index: pass a list of strings or a token "
        f"tensor, not {type(inputs).__name__}."
    )


def _gather(local: Any, dst: int) -> list[Any] | None:
    parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(local, parts, dst=dst)
    return parts


def _refuse_per_input(name: str) -> None:
    raise TypeError(
        f"A distributed measurement cannot shard a key set tied to input indices ({name}: an "
        "[n_inputs, key_pos] mask, find_massive records): pass a rule, a profile or a [key_pos] mask."
    )


def _describe(name: str, value: Any) -> Any:
    """A picklable, comparable stand-in for an argument, the same on every rank that passes
    the same thing; TypeError for a key set tied to input indices (the slices renumber them)."""
    if isinstance(value, MassiveSet):
        if value.per_input:
            _refuse_per_input(name)
        return ("massive", value.criterion.describe(), tuple(value.hook_names), value.massive_dims)
    if isinstance(value, torch.Tensor):
        if value.ndim == 2:
            _refuse_per_input(name)
        data = value.detach().cpu().contiguous()
        digest = hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()[:16]
        return ("tensor", tuple(data.shape), str(data.dtype), digest)
    if isinstance(value, Mapping):
        return {k: _describe(f"{name}[{k!r}]", v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_describe(f"{name}[{i}]", v) for i, v in enumerate(value)]
    if isinstance(value, set | frozenset):
        return sorted(repr(v) for v in value)
    describe = getattr(value, "describe", None)
    if callable(describe) and not isinstance(value, type):
        return describe()  # a position rule, a criterion
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}"
    return value


def _settings(verb: Callable[..., Any], model: Any, inputs: Any, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every argument of the call but the model, the inputs and ``progress``, described."""
    bound = inspect.signature(verb).bind(model, inputs, *args, **kwargs)  # TypeError: not the verb's arguments
    bound.apply_defaults()
    names = list(bound.arguments)[2:]
    return {name: _describe(name, bound.arguments[name]) for name in names if name != "progress"}


def _run_here(verb: Callable[..., R], model: TransformerLensModel, inputs: Any, part: range,
              args: tuple[Any, ...], kwargs: dict[str, Any]) -> R | None:
    """The verb on this rank's slice (None for an empty one); if any rank's call raises, every
    rank raises (its own error, or a RuntimeError naming the rank that failed)."""
    local, error = None, None
    if len(part):
        try:
            local = verb(model, _inputs_slice(inputs, part), *args, **kwargs)
        except Exception as caught:  # noqa: BLE001 (told to every rank, then raised)
            error = caught
    failures: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for rank, failure in enumerate(failures):
        if failure is not None:
            raise RuntimeError(f"Rank {rank} failed ({failure}): every rank stops. Fix what rank {rank} reports "
                               "(its own traceback has the details) and launch again.")
    return local


def _refuse_unmergeable(verb: Callable[..., Any]) -> None:
    """TypeError, before any pass, when ``verb`` is annotated to return a result class that does not merge."""
    try:
        returned = typing.get_type_hints(verb).get("return")
    except Exception:  # noqa: BLE001 (an annotation that does not resolve: the merge at the end says so)
        return
    if isinstance(returned, type) and issubclass(returned, Result) and "_merged" not in vars(returned) and \
            not any("_merged" in vars(base) for base in returned.__mro__[1:] if base is not Result):
        raise TypeError(f"{getattr(verb, '__name__', verb)} returns {returned.__name__}, and those results do not "
                        "merge: call the verb itself in one process, or run a verb whose result merges (scan, "
                        "profile, attention_concentration, ...).")


def run_distributed(verb: Callable[..., R], model: TransformerLensModel, inputs: Sequence[str] | torch.Tensor,
                    *args: Any, dst: int = 0, **kwargs: Any) -> R | None:
    """``verb(model, inputs, *args, **kwargs)`` split across the ranks of the default process group.

    Every rank passes the whole corpus (a list of strings or a token tensor); rank ``dst``
    returns the merged result (the result class's ``merge``), the others ``None``.
    Identical to one process's ``verb(model, inputs, ...)`` up to float32 rounding where
    the batches' shapes differ. ``progress`` defaults to False. The ranks first agree on
    the model, the weights and every argument (ValueError on every rank, before any
    forward pass, naming what differs); key sets tied to input indices (find_massive
    records, an ``[n_inputs, key_pos]`` mask) are refused (TypeError), as the slices
    renumber the inputs.

    >>> from massact_lens.find import scan
    >>> from massact_lens.examples import tiny_model
    >>> run_distributed(scan, tiny_model(), ["a"])  # no process group here
    Traceback (most recent call last):
    ...
    RuntimeError: No torch.distributed process group: launch with torchrun and call torch.distributed.init_process_group('gloo' or 'nccl') first (or call the verb itself).
    """
    refuse_plain_hf(model, "run_distributed")
    if not isinstance(inputs, str | Sequence | torch.Tensor):
        raise TypeError(
            f"run_distributed splits the inputs by index, so it needs a list of strings or a token tensor, not "
            f"{type(inputs).__name__}: pass list(inputs) (every rank passes the whole corpus)."
        )
    try:
        inspect.signature(verb).bind(model, inputs, *args, **kwargs)
    except TypeError as error:
        raise TypeError(
            f"{getattr(verb, '__name__', verb)}(model, inputs, ...) does not take these arguments ({error}): pass a "
            "verb of the library (scan, profile, attention_concentration, ...) and its own arguments."
        ) from None
    _refuse_unmergeable(verb)
    rank, world = _check_group()
    if "progress" in inspect.signature(verb).parameters:
        kwargs.setdefault("progress", False)
    settings = _settings(verb, model, inputs, args, kwargs)
    _agree({
        "provenance": Provenance.of(model).to_dict(),
        "weights": weights_fingerprint(model),
        "n_inputs": len(inputs),
        "verb": f"{verb.__module__}.{verb.__qualname__}",
        **settings,
    })
    if len(inputs) == 0:
        raise ValueError("No inputs: pass at least one.")
    local = _run_here(verb, model, inputs, shard(len(inputs), rank, world), args, kwargs)
    parts = _gather(local, dst)
    if parts is None:
        return None
    found = [p for p in parts if p is not None]
    return type(found[0]).merge(found)  # type: ignore[attr-defined]
