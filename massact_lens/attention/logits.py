"""The pre-softmax attention logits of one input, per layer and head, for heat maps.

>>> from massact_lens.examples import minilm
>>> heat = attention_logits(minilm(), "The cat sat.", layers=[2])
>>> heat.logits.shape, heat.source
(torch.Size([1, 12, 6, 6]), ('q.k',))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.batching import Batch, BatchPlan, plan_batches, token_strings
from massact_lens._core.hook_names import attention_hook
from massact_lens._core.loop import measure
from massact_lens._core.results import Result
from massact_lens._core.types import HookList, Provenance, is_causal
from massact_lens.attention._passes import (
    allowed_keys,
    attention_windows,
    centred_logits,
    check_layers,
    detached,
    repeat_kv,
)

__all__ = ["AttentionLogits", "attention_logits"]


@dataclass(frozen=True, repr=False)
class AttentionLogits(Result):
    """The pre-softmax attention logits of one input, for heat maps (one input: no merge)."""

    #: The layers read.
    layers: tuple[int, ...]
    #: Per layer, how the logits were obtained: ``"hook_attn_scores"`` (real
    #: pre-softmax scores), ``"q.k"`` (rebuilt from ``hook_q`` and ``hook_k`` with the
    #: model's scale, and checked: their softmax matches ``hook_pattern``), or
    #: ``"log(hook_pattern) centred"`` (exact up to a per-query constant; each
    #: query's row has mean 0 over its visible keys).
    source: tuple[str, ...]
    #: BOS / [CLS] prepended (None: a token tensor as given).
    prepend_bos: bool | None
    #: The token strings of the input.
    tokens: tuple[str, ...]
    #: The token ids of the input.
    token_ids: Int[torch.Tensor, " pos"]
    #: NaN where a query cannot see a key (causal mask).
    logits: Float[torch.Tensor, "layer head_index query_pos key_pos"]
    #: The attention probabilities (``hook_pattern``).
    pattern: Float[torch.Tensor, "layer head_index query_pos key_pos"]


    def to_dataframe(self) -> pd.DataFrame:
        """Every visible (layer, head, query, key) as a row with tokens, logit and probability."""
        idx = (~torch.isnan(self.logits)).nonzero()
        lay, h, q, k = idx.unbind(1)
        names = list(self.tokens) + ["<slot>"] * max(0, self.logits.shape[-1] - len(self.tokens))
        return pd.DataFrame(
            {
                "layer": [self.layers[x] for x in lay.tolist()],
                "head": h.numpy(),
                "query": q.numpy(),
                "key": k.numpy(),
                "query_token": [names[x] for x in q.tolist()],
                "key_token": [names[x] for x in k.tolist()],
                "logit": self.logits[lay, h, q, k].numpy(),
                "prob": self.pattern[lay, h, q, k].numpy(),
            }
        )


def _attn_scale(model: TransformerLensModel) -> float:
    cfg = model.cfg
    if getattr(cfg, "use_attn_scale", True) is False:
        return 1.0
    scale = getattr(cfg, "attn_scale", -1.0)
    return float(scale) if scale is not None and scale > 0 else math.sqrt(int(cfg.d_head))


def attention_logits(
    model: TransformerLensModel,
    text: str | torch.Tensor,
    *,
    layers: Sequence[int] | None = None,
    prepend_bos: bool | None = None,
) -> AttentionLogits:
    """The pre-softmax attention logits of one input, per layer and head, for heat maps.

    Where ``hook_attn_scores`` holds real pre-softmax scores they are used; where it
    holds the pattern (BERT and native bridges of TransformerLens 4.3) the logits
    are rebuilt as ``q . k / scale`` from ``hook_q`` / ``hook_k`` and kept only if
    their softmax reproduces ``hook_pattern`` (1e-4, float32); otherwise (rotary
    models whose ``hook_q`` precedes the rotation) they are ``log(hook_pattern)``
    centred per query, which differs from the logits by a per-query constant only.

    Cost: one forward pass, stopped after the last chosen layer; caches
    ``hook_pattern``, ``hook_attn_scores``, ``hook_q`` and ``hook_k`` of the chosen
    layers for this input. Always the eager route (what it returns is pattern-sized):
    memory ``layers x heads x length^2``; for the sink over a long context use
    :func:`~massact_lens.attention.sink_curve` or :func:`~massact_lens.attention.attention_concentration`,
    which run in the fused kernel.

    >>> from massact_lens.examples import minilm
    >>> heat = attention_logits(minilm(), "The cat sat.", layers=[2])
    >>> heat.logits.shape, heat.source
    (torch.Size([1, 12, 6, 6]), ('q.k',))
    """
    chosen = check_layers(model, layers, ("pattern", "q", "k"))
    if isinstance(text, torch.Tensor) and text.ndim == 2 and text.shape[0] != 1:
        raise ValueError(f"attention_logits reads one input; got a token tensor of {text.shape[0]} rows.")
    if not isinstance(text, str | torch.Tensor):
        raise TypeError(f"attention_logits reads one input (a string or a token tensor), not {type(text).__name__}.")
    plan = plan_batches(model, text, batch_size=1, prepend_bos=prepend_bos)
    heat = _Logits(model, plan, chosen)
    measure(model, plan, heat, progress=False, desc="logits")
    return heat.result()


class _Logits:
    """The measurement behind :func:`attention_logits`: the attention hooks of the chosen
    layers for the one batch of the pass, read into logits once it ends."""

    reads_input_index = True
    needs_output = False

    def __init__(self, model: TransformerLensModel, plan: BatchPlan, layers: tuple[int, ...]) -> None:
        self.model, self.layers, self.prepend_bos = model, layers, plan.prepend_bos
        has_scores = all(attention_hook("scores", x) in model.hook_dict for x in layers)  # type: ignore[attr-defined]
        self.kinds = ("pattern", "q", "k", "scores") if has_scores else ("pattern", "q", "k")
        self.cache: dict[tuple[int, str], torch.Tensor] = {}
        self.batch: Batch | None = None

    def hooks(self, batch: Batch) -> HookList:
        self.batch = batch
        return [(attention_hook(kind, layer), self._reader((layer, kind))) for layer in self.layers for kind in self.kinds]

    def _reader(self, key: tuple[int, str]) -> Callable[..., None]:
        def read(tensor: torch.Tensor, hook: object) -> None:  # noqa: ARG001
            self.cache[key] = tensor.detach()

        return read

    def update(self, batch: Batch, output: torch.Tensor | None) -> None:
        pass

    def _layer(self, layer: int, real: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, str]:
        """One layer's logits ``[1, head, q, k]`` (visible keys only; the others NaN), and their source."""
        cache, n_heads = self.cache, int(self.model.cfg.n_heads)
        pattern = cache[(layer, "pattern")].float()
        key_len = int(pattern.shape[-1])
        allowed = allowed_keys(real, key_len, causal, attention_windows(self.model)[layer])[:, None]  # windows too
        scores = cache.get((layer, "scores"))
        if scores is not None and not torch.equal(scores, cache[(layer, "pattern")]):
            logits = scores.float()
            source = "hook_attn_scores"
        else:
            q = cache[(layer, "q")].float()
            k = repeat_kv(cache[(layer, "k")].float(), n_heads)
            logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / scale if k.shape[1] == key_len else None
            source = "q.k"
            if logits is not None:
                rebuilt = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
                if float((rebuilt - pattern).abs().max()) > 1e-4:
                    logits = None
            if logits is None:
                centred, _, _ = centred_logits(cache[(layer, "pattern")], None, allowed[:, 0])
                logits = centred
                source = "log(hook_pattern) centred"
        visible = allowed & torch.isfinite(logits) & (logits > -1e30)
        return logits.masked_fill(~visible, float("nan")), source

    def result(self) -> AttentionLogits:
        batch = self.batch
        assert batch is not None
        real = batch.attention_mask.bool().to(self.cache[(self.layers[0], "pattern")].device)
        causal, scale = is_causal(self.model), _attn_scale(self.model)
        logits, sources = zip(*(self._layer(layer, real, causal, scale) for layer in self.layers), strict=True)
        ids = batch.tokens[0]
        strings = token_strings(self.model, ids.tolist())
        return AttentionLogits(
            provenance=Provenance.of(self.model),
            layers=self.layers,
            source=tuple(sources),
            prepend_bos=self.prepend_bos,
            tokens=tuple(strings[int(i)] for i in ids.tolist()),
            token_ids=detached(ids.long()),
            logits=detached(torch.stack([x[0] for x in logits])),
            pattern=detached(torch.stack([self.cache[(layer, "pattern")].float()[0] for layer in self.layers])),
        )
