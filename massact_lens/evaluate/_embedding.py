"""Mean-pooled sentence embeddings as a measurement, and how far hooks move them.

What :mod:`~massact_lens.evaluate.embeddings` (the verbs), :mod:`~massact_lens.evaluate.table`
and :mod:`~massact_lens.evaluate.patching` share: :class:`MeanPooled` (one
:class:`~massact_lens._core.loop.Measurement`), :func:`embed` (one pass of it),
the unhooked :class:`Reference` and :func:`similarity` against it.

>>> from massact_lens.examples import minilm
>>> model = minilm()
>>> reference = Reference.of(model, ["A cat sat."], [], batch_size=8, progress=False)
>>> round(similarity(model, ["A cat sat."], [], [], reference, 8, False).mean_cosine, 4)
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

from massact_lens._core.batching import Batch, plan_batches
from massact_lens._core.hook_names import final_hidden_hook
from massact_lens._core.loop import UserHooks, measure
from massact_lens._core.results import Result
from massact_lens._core.types import HookList, Inputs, Provenance
from massact_lens.interventions import hook_names_of
from massact_lens.interventions.context import finish_runs


class MeanPooled:
    """The mean of one hook point's hidden state over each input's real tokens.

    The pass ends after that hook point's block (the loop stops after the last block a
    hook reads; hooks before the blocks, such as a token tracker on ``embed.hook_in``, do
    not keep it running): a BERT bridge's untrained MLM head is never computed.

    >>> pooled = MeanPooled("blocks.0.hook_resid_post", normalize=False)
    >>> batch = Batch(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[1, 1, 0]]), 0)
    >>> (name, read), = pooled.hooks(batch)
    >>> read(torch.tensor([[[1.0], [3.0], [50.0]]]))
    >>> pooled.result().tolist()
    [[2.0]]
    """

    reads_input_index = False  # rows are kept in the order the batches run: the plan keeps input order
    needs_output = False

    def __init__(self, point: str, *, normalize: bool) -> None:
        self.point = point
        self.normalize = normalize
        self.parts: list[torch.Tensor] = []

    def hooks(self, batch: Batch) -> HookList:
        mask = batch.attention_mask

        def read(activation: torch.Tensor, hook: Any = None) -> None:  # noqa: ARG001
            real = mask.to(activation.device).float()[..., None]
            pooled = (activation.float() * real).sum(dim=1) / real.sum(dim=1).clamp(min=1.0)
            self.parts.append(pooled.cpu())

        return [(self.point, read)]

    def update(self, batch: Batch, output: torch.Tensor | None) -> None:
        pass

    def result(self) -> Float[torch.Tensor, "n_inputs d_model"]:
        out = torch.cat(self.parts)
        return F.normalize(out, dim=-1) if self.normalize else out


def embed(
    model: TransformerLensModel,
    inputs: Inputs,
    hooks: HookList,
    *,
    batch_size: int,
    normalize: bool = True,
    prepend_bos: bool | None = None,
    progress: bool = False,
) -> Float[torch.Tensor, "n_inputs d_model"]:
    """Sentence embeddings of ``inputs`` under ``hooks`` (checked by the caller): one pass of :class:`MeanPooled`."""
    plan = plan_batches(model, inputs, batch_size=batch_size, prepend_bos=prepend_bos)
    pooled = MeanPooled(final_hidden_hook(model), normalize=normalize)
    finish_runs(hooks, warn=False)
    measure(model, plan, UserHooks(hooks), pooled, progress=progress, desc="embeddings")
    finish_runs(hooks)  # an edit that selected nothing in the whole run is said
    return pooled.result()


@dataclass(frozen=True, repr=False)
class SimilarityResult(Result):
    """Sentence embeddings under a hook list, compared with the unhooked model."""

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


@dataclass(frozen=True)
class Reference:
    """The unhooked embeddings: of the sentences, and of the flattened pairs (None without pairs)."""

    sentences: torch.Tensor
    pairs: torch.Tensor | None

    @classmethod
    def of(
        cls, model: TransformerLensModel, sentences: Sequence[str], flat_pairs: Sequence[str], *, batch_size: int,
        progress: bool,
    ) -> Reference:
        clean = embed(model, sentences, [], batch_size=batch_size, progress=progress)
        pairs = embed(model, flat_pairs, [], batch_size=batch_size, progress=progress) if flat_pairs else None
        return cls(clean, pairs)


def similarity(
    model: TransformerLensModel,
    sentences: Sequence[str],
    flat_pairs: Sequence[str],
    hooks: HookList,
    reference: Reference | None,
    batch_size: int,
    progress: bool,
) -> SimilarityResult:
    """How far ``hooks`` move the embeddings of ``sentences`` from ``reference`` (None: measure it
    first), and the paraphrase cosines of ``flat_pairs`` (checked by the caller) with and without them."""
    if isinstance(sentences, str) or not sentences:
        raise ValueError("sentences must be a non-empty list of strings.")
    if reference is None:
        reference = Reference.of(model, sentences, flat_pairs, batch_size=batch_size, progress=progress)
    edited = embed(model, sentences, hooks, batch_size=batch_size, progress=progress)
    cosines = (edited * reference.sentences).sum(dim=-1)
    pair_cos: tuple[float, ...] = ()
    pair_orig: tuple[float, ...] = ()
    if flat_pairs:
        assert reference.pairs is not None
        edited_pairs = embed(model, flat_pairs, hooks, batch_size=batch_size, progress=progress)
        pair_cos = tuple(float(c) for c in (edited_pairs[0::2] * edited_pairs[1::2]).sum(dim=-1))
        pair_orig = tuple(float(c) for c in (reference.pairs[0::2] * reference.pairs[1::2]).sum(dim=-1))
    return SimilarityResult(
        provenance=Provenance.of(model),
        hook_names=hook_names_of(hooks),
        cosines=tuple(float(c) for c in cosines),
        pair_cosines=pair_cos,
        pair_cosines_original=pair_orig,
    )
