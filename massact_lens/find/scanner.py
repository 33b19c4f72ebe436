"""Streaming per-layer statistics of hidden states: top-k entries and medians.

Background
----------
Sun et al. (2024) find massive activations by looking, per layer, at the largest
magnitudes of a hidden state next to its median magnitude (their layer-wise
top-1/2/3 vs median plot). :func:`scan` computes exactly that in one forward pass
per batch, reading each hidden state inside a hook and keeping only

* the ``top_k`` largest ``|activation|`` entries of each (input, hook): signed
  value, position, feature dim, token id;
* the median ``|activation|`` of that hidden state, over its real (non-padding)
  positions and all dims, as the paper defines it (``torch.median``: for an even
  count the lower of the two middle values);
* the input's length.

That is ``O(n_hooks x top_k)`` numbers per input and never a cache of
``[pos, d_model]`` tensors: 10,000 inputs over 12 hooks with ``top_k=10`` keep
about 12 MB. Statistics are computed in float32 whatever the model dtype.

Usage
-----
>>> from massact_lens import scan
>>> from massact_lens.examples import tiny_model
>>> import torch
>>> result = scan(tiny_model(), torch.randint(0, 64, (3, 8)), progress=False)
>>> result.values.shape   # inputs x hooks x top_k
torch.Size([3, 2, 10])
>>> list(result.layer_stats().columns)[:6]
['layer', 'hook_name', 'top1', 'top2', 'top3', 'median']
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._plain_hf import refuse_plain_hf
from massact_lens._core.hook_names import HookSelection
from massact_lens._core.loop import measure
from massact_lens._core.types import Inputs
from massact_lens.find._scan_stats import scan_plan
from massact_lens.find.scan_result import ScanResult

__all__ = ["ScanResult", "scan"]


def scan(
    model: TransformerLensModel,
    inputs: Inputs,
    *,
    hooks: HookSelection | None = None,
    layers: Sequence[int] | None = None,
    top_k: int = 10,
    batch_size: int = 16,
    prepend_bos: bool | None = None,
    attention_mask: torch.Tensor | None = None,
    progress: bool = True,
    by_length: bool = True,
) -> ScanResult:
    """One streaming pass: the top-k ``|activation|`` entries and median per hidden state.

    Args:
        model: a TransformerBridge (raw weights: see :func:`massact_lens.load_model`).
        inputs: strings, a token tensor ``[batch, pos]``, or an iterable of batches
            (see :mod:`massact_lens._core.batching`).
        hooks: hook points to read; default the residual stream
            (:func:`massact_lens._core.hook_names.residual_hook_names`). ``{layer}``
            templates are expanded.
        layers: restrict to these layers.
        top_k: entries kept per hidden state. :func:`massact_lens.find_massive`
            warns when all k pass its criterion (raise top_k then).
        batch_size: inputs per forward pass; padding never enters a statistic.
        prepend_bos: for strings, put BOS / [CLS] first (None: model default).
            Recorded in the result.
        attention_mask: with a token tensor, 1 for real tokens, 0 for right padding.
        progress: show a tqdm bar over batches.
        by_length: run the inputs longest first, in batches of similar length, so that
            little padding is computed (a list or a tensor as a whole, an iterable of
            batches within each of its items: see
            :func:`massact_lens._core.batching.plan_batches`). The result is in the order the
            inputs were given either way, with the same records: padding never enters a
            statistic, and only float32 rounding may differ with the batch's shape.

    Returns:
        A frozen :class:`ScanResult`.

    Raises:
        ValueError: empty input, an input longer than the context, an unknown hook
            or layer, ``top_k < 1``: all before any forward pass.
    """
    refuse_plain_hf(model, "scan")
    statistics, plan = scan_plan(model, inputs, hooks=hooks, layers=layers, top_k=top_k, batch_size=batch_size,
                                 prepend_bos=prepend_bos, attention_mask=attention_mask, by_length=by_length)
    measure(model, plan, statistics, progress=progress, desc="scan")
    return statistics.checked_result(stacklevel=2)
