"""Data-parallel scans, profiles and attention measurements on ``torch.distributed``: shard by rank, merge exactly.

Every rank loads the same model and calls the same function with the whole corpus;
each scans the contiguous slice :func:`shard` gives it, and the parts are gathered to
``dst`` and merged in rank order (:meth:`ScanResult.merge`,
:meth:`MassiveProfile.merge`, and the ``merge`` of the attention results): the result is the one a single process gives. Before any
forward pass the ranks compare what they are about to do (model provenance, a
fingerprint of the weights, hooks, corpus size, settings) and all fail together if they
disagree. Works with gloo (CPU) and NCCL (GPU) process groups; launch with ``torchrun``::

    torchrun --nproc-per-node 2 -m massact_lens scan --json scan.json

>>> shard(10, rank=2, world_size=4)
range(6, 8)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.types import Provenance
from massact_lens.attention import (
    AttentionConcentration,
    ImplicitBias,
    TokenFeatures,
    attention_concentration,
    implicit_bias,
    token_features,
)
from massact_lens._core.results import Keep
from massact_lens.attention.keys import Positions, as_rule
from massact_lens._core.hook_names import resolve_hook_names
from massact_lens.find.criterion import DELIMITERS, MassiveActivations
from massact_lens.find.profiles import MassiveProfile, profile
from massact_lens.find.scanner import ScanResult, scan

__all__ = [
    "distributed_attention_concentration",
    "distributed_implicit_bias",
    "distributed_profile",
    "distributed_scan",
    "distributed_token_features",
    "shard",
    "weights_fingerprint",
]


def shard(n_inputs: int, rank: int, world_size: int) -> range:
    """The contiguous slice of ``n_inputs`` that ``rank`` of ``world_size`` reads.

    Sizes differ by at most one; the first ``n_inputs % world_size`` ranks take one
    more. A rank can get an empty slice (more ranks than inputs).

    >>> [len(shard(5, r, 3)) for r in range(3)], shard(1, 1, 2)
    ([2, 2, 1], range(1, 1))
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}.")
    base, extra = divmod(n_inputs, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def weights_fingerprint(model: TransformerLensModel, sample: int = 1024) -> str:
    """A short digest of the first ``sample`` entries of every parameter of the embeddings
    and the blocks: the weights a residual-stream measurement reads (cheap on any size).

    Two ranks that loaded different weights almost surely get different digests. A
    head the bridge initialises at random (MiniLM's MLM head) does not count.

    >>> from massact_lens.examples import tiny_model
    >>> weights_fingerprint(tiny_model(seed=0)) == weights_fingerprint(tiny_model(seed=0))
    True
    """
    digest = hashlib.sha256()
    parts = [getattr(model, name, None) for name in ("embed", "pos_embed", "blocks")]
    named = [(f"{i}.{n}", p) for i, part in enumerate(parts) if isinstance(part, torch.nn.Module)
             for n, p in part.named_parameters()]
    for name, parameter in named:
        head = parameter.detach().flatten()[:sample]
        if head.device.type == "meta":  # offloaded: its shape is what we can see
            digest.update(f"{name}{tuple(parameter.shape)}".encode())
            continue
        digest.update(name.encode())
        digest.update(head.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _check_group() -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "No torch.distributed process group: launch with torchrun and call "
            "torch.distributed.init_process_group('gloo' or 'nccl') first (or use scan / profile)."
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
        "A distributed scan shards the corpus by index: pass a list of strings or a token "
        f"tensor, not {type(inputs).__name__}."
    )


def _plan(model: TransformerLensModel, inputs: Any, settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "provenance": Provenance.of(model).to_dict(),
        "weights": weights_fingerprint(model),
        "n_inputs": len(inputs),
        **settings,
    }


def _gather(local: Any, dst: int) -> list[Any] | None:
    parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(local, parts, dst=dst)
    return parts


def distributed_scan(
    model: TransformerLensModel,
    inputs: Sequence[str] | torch.Tensor,
    *,
    dst: int = 0,
    hooks: str | Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    top_k: int = 10,
    batch_size: int = 16,
    prepend_bos: bool | None = None,
    progress: bool = False,
) -> ScanResult | None:
    """:func:`massact_lens.scan` split across the ranks of the default process group.

    Every rank passes the whole corpus; rank ``dst`` returns the merged result, the
    others ``None``. Identical to one process's ``scan(model, inputs, ...)``.
    """
    rank, world = _check_group()
    names = resolve_hook_names(model, hooks, layers)
    bos = None if isinstance(inputs, torch.Tensor) else (
        bool(model.cfg.default_prepend_bos) if prepend_bos is None else bool(prepend_bos)
    )
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, not {top_k!r}.")
    _agree(_plan(model, inputs, {"hooks": names, "top_k": top_k, "prepend_bos": bos}))
    part = shard(len(inputs), rank, world)
    if len(part):
        local = scan(model, _inputs_slice(inputs, part), hooks=list(names), top_k=top_k,
                     batch_size=batch_size, prepend_bos=prepend_bos, progress=progress)
    else:
        local = ScanResult.empty(Provenance.of(model), names, top_k, bos)
    parts = _gather(local, dst)
    return None if parts is None else ScanResult.merge(parts)


def distributed_profile(
    model: TransformerLensModel,
    inputs: Sequence[str] | torch.Tensor,
    *,
    dst: int = 0,
    min_value: float | int = 100.0,
    min_ratio: float | int = 1000.0,
    hooks: str | Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    top_k: int = 10,
    batch_size: int = 16,
    prepend_bos: bool | None = None,
    delimiters: frozenset[str] = DELIMITERS,
    progress: bool = False,
) -> MassiveProfile | None:
    """:func:`massact_lens.profile` split across ranks; rank ``dst`` gets the merged profile."""
    rank, world = _check_group()
    names = resolve_hook_names(model, hooks, layers)
    _agree(_plan(model, inputs, {"hooks": names, "top_k": top_k, "prepend_bos": prepend_bos,
                                 "min_value": min_value, "min_ratio": min_ratio, "delimiters": sorted(delimiters)}))
    part = shard(len(inputs), rank, world)
    local = None
    if len(part):
        local = profile(model, _inputs_slice(inputs, part), min_value=min_value, min_ratio=min_ratio,
                        hooks=list(names), top_k=top_k, batch_size=batch_size, prepend_bos=prepend_bos,
                        delimiters=delimiters, progress=progress)
    parts = _gather(local, dst)
    if parts is None:
        return None
    found = [p for p in parts if p is not None]
    if not found:
        raise ValueError("No rank had an input: pass at least one.")
    return MassiveProfile.merge(found)


# --- attention results ------------------------------------------------------------------


def _distributed_attention(function: Any, merge: Any, model: TransformerLensModel, inputs: Sequence[str] | torch.Tensor,
                           positions: Positions, dst: int, settings: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    """Shard, run ``function`` on this rank's slice, gather to ``dst`` and ``merge`` there."""
    rank, world = _check_group()
    if isinstance(positions, MassiveActivations) or (isinstance(positions, torch.Tensor) and positions.ndim == 2):
        raise TypeError(
            "A distributed attention measurement cannot shard a key set tied to input indices (an "
            "[n_inputs, key_pos] mask, find_massive records): pass a rule, a profile or a [key_pos] mask."
        )
    description = as_rule(model, positions, None).describe()
    _agree(_plan(model, inputs, {"positions": description, **settings}))
    part = shard(len(inputs), rank, world)
    local = function(model, _inputs_slice(inputs, part), positions, **kwargs) if len(part) else None
    parts = _gather(local, dst)
    if parts is None:
        return None
    return merge([p for p in parts if p is not None])


def distributed_implicit_bias(
    model: TransformerLensModel,
    inputs: Sequence[str] | torch.Tensor,
    positions: Positions = "start",
    *,
    dst: int = 0,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    keep: Keep = 8,
    batch_size: int = 16,
    prepend_bos: bool | None = None,
    progress: bool = False,
) -> ImplicitBias | None:
    """:func:`massact_lens.implicit_bias` split across ranks; rank ``dst`` gets the merged
    :class:`~massact_lens.attention.ImplicitBias` (:meth:`~massact_lens.attention.ImplicitBias.merge`),
    the others ``None``. Key sets tied to input indices are refused (TypeError)."""
    settings = {"layers": layers, "heads": heads, "keep": keep, "prepend_bos": prepend_bos}
    return _distributed_attention(implicit_bias, ImplicitBias.merge, model, inputs, positions, dst, settings,
                                  {**settings, "batch_size": batch_size, "progress": progress})


def distributed_attention_concentration(
    model: TransformerLensModel,
    inputs: Sequence[str] | torch.Tensor,
    positions: Positions = "start",
    *,
    dst: int = 0,
    layers: Sequence[int] | None = None,
    keep: Keep = 1000,
    batch_size: int = 16,
    prepend_bos: bool | None = None,
    progress: bool = False,
) -> AttentionConcentration | None:
    """:func:`massact_lens.attention_concentration` split across ranks; rank ``dst`` gets the
    merged :class:`~massact_lens.attention.AttentionConcentration`, the others ``None``."""
    settings = {"layers": layers, "keep": keep, "prepend_bos": prepend_bos}
    return _distributed_attention(attention_concentration, AttentionConcentration.merge, model, inputs, positions, dst,
                                  settings, {**settings, "batch_size": batch_size, "progress": progress})


def distributed_token_features(
    model: TransformerLensModel,
    inputs: Sequence[str] | torch.Tensor,
    positions: Positions = "start",
    *,
    dst: int = 0,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    prepend_bos: bool | None = None,
    progress: bool = False,
) -> TokenFeatures | None:
    """:func:`massact_lens.attention.token_features` split across ranks; rank ``dst`` gets the
    merged :class:`~massact_lens.attention.TokenFeatures`, the others ``None``."""
    settings = {"layers": layers, "prepend_bos": prepend_bos}
    return _distributed_attention(token_features, TokenFeatures.merge, model, inputs, positions, dst, settings,
                                  {**settings, "batch_size": batch_size, "progress": progress})
