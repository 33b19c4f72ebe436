"""Sentence embeddings under a hook list, and how far the hooks move them.

The sentence-transformers embedding (mean of the last hidden state over real
tokens, L2-normalised; for all-MiniLM-L6-v2 HuggingFace's ``last_hidden_state``)
with and without ``fwd_hooks``: cosine of each sentence to its unhooked embedding,
and the cosine within paraphrase pairs.

>>> from massact_lens.examples import minilm
>>> r = embedding_similarity(minilm(), ["A cat sat.", "Rain fell."])
>>> round(r.mean_cosine, 4)
1.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.types import HookList, Provenance
from massact_lens._core.batching import Batch, plan_batches, run_batches
from massact_lens.evaluate._hooks import check_hook_list
from massact_lens._core.hook_names import final_hidden_hook
from massact_lens.interventions import hook_names_of

__all__ = ["SimilarityResult", "embedding_similarity", "sentence_embeddings"]


def sentence_embeddings(
    model: TransformerLensModel,
    sentences: Sequence[str] | str | torch.Tensor,
    *,
    fwd_hooks: Sequence[Any] = (),
    batch_size: int = 32,
    normalize: bool = True,
    prepend_bos: bool | None = None,
    progress: bool = False,
) -> Float[torch.Tensor, "n_sentences d_model"]:
    """Sentence embeddings as sentence-transformers makes them, under ``fwd_hooks``.

    Mean of the last hidden state (:func:`massact_lens._core.hook_names.final_hidden_hook`)
    over real tokens ([CLS] and [SEP] included, padding not), then L2-normalised.
    Float32, on the CPU.

    >>> from massact_lens.examples import minilm
    >>> e = sentence_embeddings(minilm(), ["A cat.", "A dog."])
    >>> tuple(e.shape), round(float(e[0].norm()), 4)
    ((2, 384), 1.0)
    """
    hooks = check_hook_list(model, fwd_hooks)
    point = final_hidden_hook(model)
    plan = plan_batches(model, sentences, batch_size=batch_size, prepend_bos=prepend_bos)
    parts: list[torch.Tensor] = []
    current: dict[str, Batch] = {}

    def read(activation: torch.Tensor, hook: Any = None) -> None:  # noqa: ARG001
        mask = current["batch"].attention_mask.to(activation.device).float()[..., None]
        pooled = (activation.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        parts.append(pooled.cpu())

    def make(batch: Batch) -> HookList:
        current["batch"] = batch
        return hooks + [(point, read)]

    # Stop after the last hidden state: a BERT bridge's (untrained) MLM head is most of the cost.
    run_batches(model, plan, make, progress=progress, desc="embeddings", stop_after=point)
    out = torch.cat(parts)
    return F.normalize(out, dim=-1) if normalize else out


@dataclass(frozen=True)
class SimilarityResult:
    """Sentence embeddings under a hook list, compared with the unhooked model."""

    #: The model as it was when it ran.
    provenance: Provenance
    #: The hook points the hook list touched (tracker hooks left out).
    hook_names: tuple[str, ...]
    #: Per sentence: cosine of its embedding to its unhooked one.
    cosines: tuple[float, ...]
    #: Per paraphrase pair: cosine within the pair, with the hooks.
    pair_cosines: tuple[float, ...] = ()
    #: Per paraphrase pair: cosine within the pair, without the hooks.
    pair_cosines_original: tuple[float, ...] = ()


    @property
    def mean_cosine(self) -> float:
        return _mean(self.cosines)

    @property
    def pair_cosine(self) -> float:
        return _mean(self.pair_cosines)

    @property
    def pair_cosine_original(self) -> float:
        return _mean(self.pair_cosines_original)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per sentence: index and cosine to the unhooked embedding."""
        return pd.DataFrame({"sentence": range(len(self.cosines)), "cosine": self.cosines})


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def _check_pairs(pairs: Sequence[tuple[str, str]] | None) -> list[str]:
    if pairs is None:
        return []
    flat = []
    for pair in pairs:
        if not (isinstance(pair, tuple | list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise TypeError(f"pairs must hold (sentence, paraphrase) string pairs, not {pair!r}.")
        flat.extend(pair)
    if not flat:
        raise ValueError("pairs is empty: pass None or at least one pair.")
    return flat


def embedding_similarity(
    model: TransformerLensModel,
    sentences: Sequence[str],
    *,
    fwd_hooks: Sequence[Any] = (),
    pairs: Sequence[tuple[str, str]] | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> SimilarityResult:
    """How far ``fwd_hooks`` move sentence embeddings, and what they do to paraphrases.

    >>> from massact_lens.examples import minilm
    >>> r = embedding_similarity(minilm(), ["A cat sat.", "Rain fell."], pairs=[("Hi.", "Hello.")])
    >>> round(r.mean_cosine, 4), r.pair_cosine == r.pair_cosine_original
    (1.0, True)
    """
    return _similarity(model, sentences, pairs, check_hook_list(model, fwd_hooks), None, batch_size, progress)


def _similarity(
    model: TransformerLensModel,
    sentences: Sequence[str],
    pairs: Sequence[tuple[str, str]] | None,
    hooks: HookList,
    clean: tuple[torch.Tensor, torch.Tensor | None] | None,
    batch_size: int,
    progress: bool,
) -> SimilarityResult:
    flat = _check_pairs(pairs)
    if isinstance(sentences, str) or not sentences:
        raise ValueError("sentences must be a non-empty list of strings.")
    if clean is None:
        clean = _clean_embeddings(model, sentences, flat, batch_size, progress)
    clean_sent, clean_pairs = clean
    edited = sentence_embeddings(model, sentences, fwd_hooks=hooks, batch_size=batch_size, progress=progress)
    cosines = (edited * clean_sent).sum(dim=-1)
    pair_cos: tuple[float, ...] = ()
    pair_orig: tuple[float, ...] = ()
    if flat:
        assert clean_pairs is not None
        edited_pairs = sentence_embeddings(model, flat, fwd_hooks=hooks, batch_size=batch_size, progress=progress)
        pair_cos = tuple(float(c) for c in (edited_pairs[0::2] * edited_pairs[1::2]).sum(dim=-1))
        pair_orig = tuple(float(c) for c in (clean_pairs[0::2] * clean_pairs[1::2]).sum(dim=-1))
    return SimilarityResult(
        provenance=Provenance.of(model),
        hook_names=hook_names_of(hooks),
        cosines=tuple(float(c) for c in cosines),
        pair_cosines=pair_cos,
        pair_cosines_original=pair_orig,
    )


def _clean_embeddings(
    model: TransformerLensModel, sentences: Sequence[str], flat_pairs: list[str], batch_size: int, progress: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    clean_sent = sentence_embeddings(model, sentences, batch_size=batch_size, progress=progress)
    clean_pairs = sentence_embeddings(model, flat_pairs, batch_size=batch_size, progress=progress) if flat_pairs else None
    return clean_sent, clean_pairs

