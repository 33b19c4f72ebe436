"""What a model does under a hook list: perplexity, embedding similarity, Table 3, patching.

Every function takes any ``fwd_hooks`` list (from :mod:`massact_lens.interventions`
or your own) and runs the library's one forward loop (:func:`massact_lens._core.loop.measure`).

>>> import torch
>>> from massact_lens.examples import tiny_model
>>> perplexity(tiny_model(), torch.arange(64), seq_len=8, progress=False).n_chunks
8
"""

from massact_lens.evaluate.embeddings import (
    SimilarityResult,
    embedding_similarity,
    sentence_embeddings,
)
from massact_lens.evaluate.language_model import PerplexityResult, perplexity
from massact_lens.evaluate.patching import (
    PatchHook,
    PatchingResult,
    massive_patching,
    patching_hooks,
)
from massact_lens.evaluate.table import (
    AblationTable,
    ablation_table,
)

__all__ = [
    "AblationTable",
    "PatchHook",
    "PatchingResult",
    "PerplexityResult",
    "SimilarityResult",
    "ablation_table",
    "embedding_similarity",
    "massive_patching",
    "patching_hooks",
    "perplexity",
    "sentence_embeddings",
]
