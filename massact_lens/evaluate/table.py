"""The paper's Table 3: original vs massive activations set to zero vs set to their mean.

Each row is a hook list (built and checked before the first forward pass), each
column a metric: perplexity for a causal LM, embedding cosines for an encoder.

>>> import torch
>>> from massact_lens import profile
>>> from massact_lens.examples import minilm
>>> model = minilm()
>>> p = profile(model, ["The cat sat.", "It rained."], min_value=50, min_ratio=200, progress=False)
>>> ablation_table(model, p, sentences=["A dog ran."], progress=False).to_dataframe().index.tolist()
['Original', 'Set to zero', 'Set to mean']
"""

from __future__ import annotations

import html
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._plain_hf import refuse_plain_hf
from massact_lens._core.results import Result
from massact_lens._core.types import HookList, Provenance, is_causal
from massact_lens.evaluate._embedding import Reference, similarity
from massact_lens.evaluate._hooks import check_hook_list, check_pairs
from massact_lens.evaluate.language_model import Corpus, perplexity
from massact_lens.find.profiles import MassiveProfile
from massact_lens.interventions import ablation_hooks, check_profile_matches, hook_names_of

__all__ = ["AblationTable", "ablation_table"]

#: Row names of the paper's settings.
ORIGINAL, ZERO, MEAN = "Original", "Set to zero", "Set to mean"
#: Column names of the metrics.
PERPLEXITY, COSINE, PAIR_COSINE = "perplexity", "cosine to original", "paraphrase cosine"
#: An ablation row of :func:`ablation_table` (what :func:`massact_lens.interventions.ablation_hooks` sets).
AblationMode = Literal["zero", "mean"]
_ROW_NAMES: dict[str, str] = {"zero": ZERO, "mean": MEAN}
#: What ``**ablation_kwargs`` may name (the keyword-only arguments of ablation_hooks).
_ABLATION_KWARGS = frozenset(("layers", "dims", "hooks", "kinds", "positions"))


@dataclass(frozen=True, repr=False)
class AblationTable(Result):
    """The paper's Table 3 for one model: one row per setting, one column per metric."""

    #: The massive dims of the profile the ablations came from (empty without one).
    profile_dims: tuple[int, ...]
    #: The columns, in order.
    metrics: tuple[str, ...]
    #: ``values[setting][metric]``.
    values: dict[str, dict[str, float]]
    #: The hook points each setting edits.
    hook_names: dict[str, tuple[str, ...]]
    #: ``details[setting][metric]``: the full result (PerplexityResult, SimilarityResult).
    details: dict[str, dict[str, Any]] = field(repr=False)

    def to_dataframe(self) -> pd.DataFrame:
        """Rows: settings (Original, Set to zero, Set to mean, ...); columns: metrics."""
        frame = pd.DataFrame.from_dict(self.values, orient="index", columns=list(self.metrics))
        frame.index.name = "setting"
        return frame

    def _summary_lines(self) -> list[str]:
        dims = ", ".join(map(str, self.profile_dims[:10])) or "none"
        return [*self.to_markdown().splitlines(), f"ablated dims: {dims}; hooks per row: .hook_names"]

    def _field_lines(self) -> list[str]:
        return []

    def _repr_html_(self) -> str:
        """The table itself (a notebook shows it as one)."""
        caption = html.escape(f"{self._headline()}; ablated dims {list(self.profile_dims[:10])}")
        return f"<div><b>{caption}</b>{self.to_dataframe().to_html(float_format=lambda v: f'{v:.4g}')}</div>"

    def to_markdown(self, digits: int = 3) -> str:
        """The table as GitHub markdown (no extra dependency)."""
        header = "| setting | " + " | ".join(self.metrics) + " |"
        rule = "|---|" + "---|" * len(self.metrics)
        rows = [
            f"| {name} | " + " | ".join(_fmt(self.values[name][m], digits) for m in self.metrics) + " |"
            for name in self.values
        ]
        return "\n".join([header, rule, *rows])


def _fmt(value: float, digits: int) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}" if abs(value) < 10**6 else f"{value:.3g}"


def ablation_table(
    model: TransformerLensModel,
    profile: MassiveProfile | None = None,
    *,
    sentences: Sequence[str] | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    corpus: Corpus | None = None,
    modes: Sequence[AblationMode] = ("zero", "mean"),
    settings: dict[str, Sequence[Any]] | None = None,
    batch_size: int = 16,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    prepend_bos: bool | None = None,
    progress: bool = True,
    **ablation_kwargs: Any,
) -> AblationTable:
    """Original vs massive activations set to zero vs set to their mean (Table 3).

    Metrics: perplexity on ``corpus`` (causal models), and for ``sentences`` the
    mean cosine of each embedding to the original one, and for ``pairs`` the mean
    paraphrase-pair cosine. An encoder with neither gets the built-in
    :data:`massact_lens.examples.sentences.SENTENCES` and :data:`~massact_lens.examples.sentences.PARAPHRASE_PAIRS`.
    Every hook list is built and checked before the first forward pass.

    Args:
        profile: where the massive activations are and their means
            (:func:`massact_lens.profile`); needed for ``"mean"``.
        modes: which ablations to add after "Original" (may be empty when ``settings`` are given).
        settings: extra rows, name -> any hook list.
        prepend_bos: for a text corpus, put the model's start token first (None: the
            model's default). In a causal model the start token's state is the same for
            every input, so "set to mean" there is the identity (a warning says so): the
            paper ran LLaMA without it (``prepend_bos=False``, here and in the profile).
        ablation_kwargs: passed to :func:`massact_lens.ablation_hooks`
            (``layers``, ``dims``, ``kinds``, ``positions``, ``hooks``).

    >>> from massact_lens import profile
    >>> from massact_lens.examples.sentences import SENTENCES, PARAPHRASE_PAIRS
    >>> from massact_lens.examples import minilm
    >>> model = minilm()
    >>> sentences, pairs = list(SENTENCES[:8]), list(PARAPHRASE_PAIRS[:4])
    >>> p = profile(model, sentences, min_value=50, min_ratio=200, progress=False)
    >>> table = ablation_table(model, p, sentences=sentences, pairs=pairs, progress=False)
    >>> print(table.to_markdown(digits=2))
    | setting | cosine to original | paraphrase cosine |
    |---|---|---|
    | Original | 1.00 | 0.81 |
    | Set to zero | 0.64 | 0.75 |
    | Set to mean | 1.00 | 0.81 |
    """
    refuse_plain_hf(model, "ablation_table")
    sentences, pairs = _default_inputs(model, sentences, pairs, corpus)
    with warnings.catch_warnings():
        if not (model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos) and not isinstance(corpus, torch.Tensor):
            # texts run without BOS: the mean written on their first token is a real edit
            warnings.filterwarnings("ignore", message=".*is the identity and tests nothing")
        hook_lists = _hook_lists(model, profile, modes, settings, ablation_kwargs)
    flat_pairs = check_pairs(pairs)
    metrics = [name for name, used in ((PERPLEXITY, corpus is not None), (COSINE, sentences is not None),
                                       (PAIR_COSINE, bool(flat_pairs))) if used]
    reference = None
    if sentences is not None:
        reference = Reference.of(model, sentences, flat_pairs, batch_size=batch_size, progress=progress)
    values: dict[str, dict[str, float]] = {}
    details: dict[str, dict[str, Any]] = {}
    for name, hooks in hook_lists.items():
        values[name], details[name] = {}, {}
        if corpus is not None:
            result = perplexity(model, corpus, fwd_hooks=hooks, seq_len=seq_len, batch_size=batch_size,
                                max_tokens=max_tokens, prepend_bos=prepend_bos, progress=progress)
            values[name][PERPLEXITY] = result.perplexity
            details[name][PERPLEXITY] = result
        if sentences is not None:
            moved = similarity(model, sentences, flat_pairs, hooks, reference, batch_size, progress)
            values[name][COSINE] = moved.mean_cosine
            details[name][COSINE] = moved
            if flat_pairs:
                values[name][PAIR_COSINE] = moved.pair_cosine
    return AblationTable(
        provenance=Provenance.of(model),
        profile_dims=profile.massive_dims if profile is not None else (),
        metrics=tuple(metrics),
        values=values,
        hook_names={name: hook_names_of(hooks) for name, hooks in hook_lists.items()},
        details=details,
    )


def _default_inputs(
    model: TransformerLensModel,
    sentences: Sequence[str] | None,
    pairs: Sequence[tuple[str, str]] | None,
    corpus: Corpus | None,
) -> tuple[Sequence[str] | None, Sequence[tuple[str, str]] | None]:
    """The sentences and pairs to measure: the built-in ones for an encoder given nothing."""
    causal = is_causal(model)
    if sentences is None and corpus is None and pairs is None:
        if causal:
            raise ValueError("Pass corpus=... (a list of strings, a text file, or token ids) to measure perplexity.")
        from massact_lens.examples.sentences import PARAPHRASE_PAIRS, SENTENCES  # noqa: PLC0415

        sentences, pairs = list(SENTENCES), list(PARAPHRASE_PAIRS)
    if corpus is not None and not causal:
        raise ValueError("Perplexity needs a causal LM; for this encoder pass sentences= and pairs= instead of corpus=.")
    if pairs is not None and sentences is None:
        sentences = [s for pair in pairs for s in pair]
    return sentences, pairs


def _hook_lists(
    model: TransformerLensModel,
    profile: MassiveProfile | None,
    modes: Sequence[AblationMode],
    settings: dict[str, Sequence[Any]] | None,
    ablation_kwargs: dict[str, Any],
) -> dict[str, HookList]:
    """Every row's hook list, built and checked before any forward pass."""
    if isinstance(modes, str) or not (list(modes) or settings):
        raise ValueError(
            f"modes must be a non-empty list among 'zero' and 'mean', not {modes!r}: pass modes=['zero', 'mean'] "
            "(or settings={name: hooks} for a table of your own edits only)."
        )
    bad = [m for m in modes if m not in _ROW_NAMES]
    if bad:
        raise ValueError(f"modes must be among 'zero' and 'mean', not {bad}.")
    if settings is not None and not isinstance(settings, Mapping):
        raise TypeError(f"settings must be a dict {{row name: hook list}}, not {type(settings).__name__}: pass e.g. "
                        "settings={'my edit': [(hook_name, fn)]}.")
    unknown = sorted(set(ablation_kwargs) - _ABLATION_KWARGS)
    if unknown:
        raise TypeError(f"ablation_table got unknown arguments {unknown}: the extra keyword arguments go to "
                        f"ablation_hooks, which takes {sorted(_ABLATION_KWARGS)}.")
    if profile is not None:
        check_profile_matches(model, profile)
    hook_lists: dict[str, HookList] = {ORIGINAL: []}
    for mode in modes:
        hook_lists[_ROW_NAMES[mode]] = ablation_hooks(model, profile, mode, **ablation_kwargs)
    for name, hooks in (settings or {}).items():
        if name in hook_lists:
            raise ValueError(f"Setting name {name!r} is taken; choose another.")
        hook_lists[name] = check_hook_list(model, hooks)
    return hook_lists
