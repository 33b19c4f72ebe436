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

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._plain_hf import refuse_plain_hf
from massact_lens.evaluate._embedding import SimilarityResult, embed, similarity
from massact_lens.evaluate._hooks import check_hook_list, check_pairs

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
    refuse_plain_hf(model, "sentence_embeddings")
    hooks = check_hook_list(model, fwd_hooks)
    return embed(model, sentences, hooks, batch_size=batch_size, normalize=normalize, prepend_bos=prepend_bos,
                 progress=progress)


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
    refuse_plain_hf(model, "embedding_similarity")
    hooks = check_hook_list(model, fwd_hooks)
    return similarity(model, sentences, check_pairs(pairs), hooks, None, batch_size, progress)
