"""A short digest of a model's weights: what tells two models of one shape and name apart.

Results that record it (``weights``) refuse to merge with parts of other weights, and
the ranks of a distributed run compare it before any pass.

>>> from massact_lens.examples import tiny_model
>>> weights_fingerprint(tiny_model(seed=0)) == weights_fingerprint(tiny_model(seed=0))
True
>>> weights_fingerprint(tiny_model(seed=0)) == weights_fingerprint(tiny_model(seed=1))
False
>>> other_weights(tiny_model(seed=1), "float32", weights_fingerprint(tiny_model(seed=0))) is not None
True
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

__all__ = ["other_weights", "weights_fingerprint"]


def weights_fingerprint(model: Any, sample: int = 1024) -> str:
    """A short digest of the first ``sample`` entries of every parameter of the embeddings
    and the blocks: the weights a residual-stream measurement reads (cheap on any size:
    one copy to the host per device).

    Two models with different weights almost surely get different digests. A head the
    bridge initialises at random (MiniLM's MLM head) does not count; an offloaded
    parameter counts by its name and shape.
    """
    digest = hashlib.sha256()
    parts = [getattr(model, name, None) for name in ("embed", "pos_embed", "blocks")]
    named = [(f"{i}.{n}", p) for i, part in enumerate(parts) if isinstance(part, torch.nn.Module)
             for n, p in part.named_parameters()]
    heads: dict[torch.device, list[torch.Tensor]] = {}
    for name, parameter in named:
        digest.update(f"{name}{tuple(parameter.shape)}".encode())
        if parameter.device.type != "meta":
            heads.setdefault(parameter.device, []).append(parameter.detach().flatten()[:sample].float())
    for device in sorted(heads, key=str):
        digest.update(torch.cat(heads[device]).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def other_weights(model: Any, dtype: str, weights: str) -> str | None:
    """``"fingerprints <recorded> != <model's>"`` when ``weights`` (a digest recorded by a
    model running in ``dtype``) is not ``model``'s; None when it is, or when they cannot be
    compared (nothing recorded, or the model now runs in another dtype: a cast changes the
    digest, not the checkpoint)."""
    if not weights:
        return None
    with_params = getattr(model, "parameters", None)
    if not callable(with_params):
        return None
    here = next(iter(with_params()), None)
    if here is None or str(here.dtype).replace("torch.", "") != dtype:
        return None
    mine = weights_fingerprint(model)
    return None if mine == weights else f"fingerprints {weights} != {mine}"
