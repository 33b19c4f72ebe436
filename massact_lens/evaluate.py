"""What a model does under a hook list: perplexity, embedding similarity, the paper's Table 3.

Background
----------
Sun et al. (2024, Table 3) judge an intervention on massive activations by what it
does to the model: WikiText / C4 / PG-19 perplexity and zero-shot accuracy of
LLaMA2-7B, original vs massive activations set to zero vs set to their mean. This
module measures the same under *any* ``fwd_hooks`` list (from
:mod:`massact_lens.interventions` or your own), with the library's one forward
loop (:mod:`massact_lens.batching`):

* :func:`perplexity`: a causal LM on a corpus (list of strings, a text file, a
  token tensor, or a ``datasets`` name when the hub is reachable), tokenised as a
  stream, cut into chunks of ``seq_len`` tokens, batched, with a progress bar.
  An infinite or NaN perplexity is reported as such (``n_nonfinite`` says how many
  token losses were not finite), never raised.
* :func:`sentence_embeddings` / :func:`embedding_similarity`: for encoders, the
  sentence-transformers embedding (mean of the last hidden state over real tokens,
  then L2-normalised: for all-MiniLM-L6-v2 the output of the last block, matching
  HuggingFace's ``last_hidden_state``) with and without the hooks: cosine of each
  sentence to its unablated embedding, and the mean cosine of paraphrase pairs.
* :func:`ablation_table`: original / set to zero / set to mean (and any extra
  setting) in the layout of the paper's Table 3.

Usage
-----
>>> import torch
>>> from massact_lens.examples import tiny_model
>>> from massact_lens.interventions import edit_hooks, zero_hook
>>> model = tiny_model()
>>> corpus = torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(0))
>>> clean = perplexity(model, corpus, seq_len=16, progress=False)
>>> clean.n_chunks, clean.n_tokens   # 12 chunks of 16 and one of 8 tokens
(13, 187)
>>> broken = perplexity(model, corpus, seq_len=16, progress=False,
...                     fwd_hooks=edit_hooks(model, zero_hook(), layers=[1]))
>>> broken.perplexity != clean.perplexity
True

References
----------
Sun, Chen, Kolter, Liu. *Massive Activations in Large Language Models*, COLM 2024,
Table 3. Reimers & Gurevych, *Sentence-BERT*, EMNLP 2019 (mean pooling).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens.batching import Batch, plan_batches, run_batches
from massact_lens.hook_names import final_hidden_hook
from massact_lens.interventions import (
    HookList,
    ablation_hooks,
    announce_batch,
    check_profile_matches,
    hook_names_of,
)
from massact_lens.massive import MassiveProfile
from massact_lens.models import hub_reachable, model_description, warn_if_processed

__all__ = [
    "AblationTable",
    "PerplexityResult",
    "SimilarityResult",
    "ablation_table",
    "embedding_similarity",
    "perplexity",
    "sentence_embeddings",
]

Corpus = str | os.PathLike[str] | Sequence[str] | torch.Tensor
_BLOCK_CHARS = 1 << 16  # text read from a file per tokenizer call

ORIGINAL, ZERO, MEAN = "Original", "Set to zero", "Set to mean"


def _check_hooks(model: TransformerLensModel, fwd_hooks: Sequence[Any]) -> HookList:
    hooks = list(fwd_hooks)
    known = model.hook_dict  # type: ignore[attr-defined]
    for item in hooks:
        if not (isinstance(item, tuple) and len(item) == 2 and callable(item[1])):
            raise TypeError(f"fwd_hooks must hold (hook name, function) pairs, not {item!r}.")
        name = item[0]
        if isinstance(name, str) and name not in known:
            raise ValueError(f"The model has no hook point {name!r}; list them with sorted(model.hook_dict).")
        if not isinstance(name, str) and not callable(name):
            raise TypeError(f"A hook name must be a string or a filter function, not {name!r}.")
    return hooks


def _make_hooks(fwd_hooks: HookList, extra: HookList | None = None) -> Any:
    def make(batch: Batch) -> HookList:
        announce_batch(fwd_hooks, batch.attention_mask)
        return fwd_hooks + (extra or [])

    return make


# --------------------------------------------------------------------------- perplexity


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of a causal LM on a corpus under a hook list.

    ``nll`` is the mean negative log-likelihood per predicted token (nats);
    ``perplexity = exp(nll)``, ``inf`` when it overflows and ``nan`` when some
    token loss is NaN (``n_nonfinite`` counts token losses that were not finite).
    """

    model: dict[str, Any]
    hook_names: tuple[str, ...]
    corpus: str
    seq_len: int
    prepend_bos: bool
    n_chunks: int
    n_tokens: int
    nll: float
    perplexity: float
    n_nonfinite: int

    @property
    def finite(self) -> bool:
        return math.isfinite(self.perplexity)

    def to_dataframe(self) -> pd.DataFrame:
        """One row: corpus, seq_len, tokens, nll, perplexity, non-finite losses, hooks."""
        return pd.DataFrame(
            [
                {
                    "corpus": self.corpus,
                    "seq_len": self.seq_len,
                    "n_tokens": self.n_tokens,
                    "nll": self.nll,
                    "perplexity": self.perplexity,
                    "n_nonfinite": self.n_nonfinite,
                    "n_hooks": len(self.hook_names),
                }
            ]
        )


def _texts(corpus: Corpus, dataset_config: str | None, dataset_split: str, text_field: str) -> tuple[Iterator[str], str]:
    if isinstance(corpus, str | os.PathLike):
        path = Path(os.fspath(corpus)).expanduser()
        if path.is_file():
            return _file_blocks(path), str(path)
        looks_like_path = os.sep in os.fspath(corpus) and os.fspath(corpus).count("/") != 1 or path.suffix in (".txt", ".md", ".raw")
        if looks_like_path or isinstance(corpus, os.PathLike):
            raise FileNotFoundError(f"No corpus file {os.fspath(corpus)!r}. Pass an existing text file, a list of strings or a token tensor.")
        return _dataset_texts(str(corpus), dataset_config, dataset_split, text_field), f"{corpus}:{dataset_split}"
    if isinstance(corpus, Sequence):
        if not corpus:
            raise ValueError("The corpus is empty: pass at least one string.")
        bad = [i for i, t in enumerate(corpus) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"Corpus items {bad[:5]} are not strings.")
        return iter(corpus), f"{len(corpus)} texts"
    raise TypeError(f"A corpus is a list of strings, a text-file path, a dataset name or a token tensor, not {type(corpus).__name__}.")


def _file_blocks(path: Path) -> Iterator[str]:
    block: list[str] = []
    size = 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            block.append(line)
            size += len(line)
            if size >= _BLOCK_CHARS:
                yield "".join(block)
                block, size = [], 0
    if block:
        yield "".join(block)


def _dataset_texts(name: str, config: str | None, split: str, text_field: str) -> Iterator[str]:
    try:
        import datasets  # noqa: PLC0415
    except ImportError:
        raise ValueError(f"{name!r} is not a file, and reading it as a dataset name needs the 'datasets' package (pip install datasets). Or pass a list of strings.") from None
    offline = any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline and not hub_reachable():
        raise ValueError(
            f"{name!r} is not a file, and the model hub (huggingface.co) is unreachable, so it cannot be "
            "loaded as a dataset. Pass a list of strings, a text file, or token ids."
        )
    try:
        data = datasets.load_dataset(name, config, split=split, streaming=True)
        first = next(iter(data))
    except Exception as error:  # noqa: BLE001 (offline hubs fail in many ways)
        raise ValueError(
            f"{name!r} is not a file, and loading it as a dataset (config={config!r}, split={split!r}) "
            f"failed: {type(error).__name__}: {error}. Offline, pass a list of strings or a text file."
        ) from error
    if text_field not in first:
        raise ValueError(f"Dataset {name!r} has no field {text_field!r}; its fields: {sorted(first)}.")
    return (row[text_field] for row in data)


def _token_stream(model: TransformerLensModel, texts: Iterator[str], separator: str) -> Iterator[list[int]]:
    tokenizer = model.tokenizer  # type: ignore[attr-defined]
    sep = tokenizer(separator, add_special_tokens=False)["input_ids"] if separator else []
    first = True
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not first and sep:
            yield list(sep)
        first = False
        yield list(ids)


def _chunks(stream: Iterable[list[int]], body: int, bos: int | None, max_tokens: int | None) -> Iterator[list[int]]:
    buffer: list[int] = []
    taken = 0
    for ids in stream:
        if max_tokens is not None:
            ids = ids[: max(max_tokens - taken, 0)]
        taken += len(ids)
        buffer.extend(ids)
        while len(buffer) >= body:
            yield ([bos] if bos is not None else []) + buffer[:body]
            del buffer[:body]
        if max_tokens is not None and taken >= max_tokens:
            break
    if buffer and len(buffer) + (bos is not None) >= 2:
        yield ([bos] if bos is not None else []) + buffer


def _batched(chunks: Iterator[list[int]], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    group: list[list[int]] = []
    for chunk in chunks:
        group.append(chunk)
        if len(group) == batch_size:
            yield _pad(group)
            group = []
    if group:
        yield _pad(group)


def _pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return tokens, mask


def perplexity(
    model: TransformerLensModel,
    corpus: Corpus,
    *,
    fwd_hooks: Sequence[Any] = (),
    seq_len: int | None = None,
    batch_size: int = 8,
    prepend_bos: bool | None = None,
    max_tokens: int | None = None,
    separator: str = "\n\n",
    dataset_config: str | None = None,
    dataset_split: str = "test",
    text_field: str = "text",
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a causal LM on ``corpus`` with ``fwd_hooks`` attached.

    The corpus is read and tokenised as a stream (texts joined by ``separator``),
    cut into chunks of ``seq_len`` tokens (BOS first when ``prepend_bos``; the last
    chunk may be shorter), and evaluated ``batch_size`` chunks at a time. Every
    token after the first of a chunk is predicted once.

    Args:
        model: a causal LM (TransformerBridge).
        corpus: a list of strings, a text-file path, a token stream (1-D
            tensor), sequences ``[n, seq]`` (2-D tensor: each row evaluated as
            it is, BOS and all; ``seq_len`` and ``prepend_bos`` do not apply), or a
            ``datasets`` name (``dataset_config``, ``dataset_split``,
            ``text_field``) when the hub is reachable.
        fwd_hooks: any hook list (e.g. :func:`massact_lens.ablation_hooks`).
        seq_len: tokens per chunk, BOS included; default ``min(n_ctx, 512)``.
        prepend_bos: default: the model's default. The paper ran LLaMA2 without.
        max_tokens: read at most this many corpus tokens.

    Raises:
        ValueError: not a causal model, ``seq_len`` outside ``[2, n_ctx]``, no
            tokenizer for text, an unknown hook, an unreadable corpus: before any
            forward pass.

    >>> import torch
    >>> from massact_lens.examples import tiny_model
    >>> r = perplexity(tiny_model(), torch.arange(64), seq_len=8, progress=False)
    >>> r.n_chunks, r.n_tokens, r.finite   # 8 chunks of 8 tokens, 7 predicted in each
    (8, 56, True)
    """
    if getattr(model.cfg, "attention_dir", "causal") != "causal":
        raise ValueError(
            "perplexity needs a causal (decoder) language model; this one attends in both directions. "
            "For encoders, measure embedding_similarity(model, sentences, fwd_hooks=...)."
        )
    n_ctx = int(model.cfg.n_ctx)
    seq_len = min(n_ctx, 512) if seq_len is None else seq_len
    if not isinstance(seq_len, int) or not 2 <= seq_len <= n_ctx:
        raise ValueError(f"seq_len must be an integer in [2, {n_ctx}] (the model's context), not {seq_len!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}.")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 2):
        raise ValueError(f"max_tokens must be an integer >= 2, not {max_tokens!r}.")
    hooks = _check_hooks(model, fwd_hooks)
    bos = bool(model.cfg.default_prepend_bos) if prepend_bos is None else bool(prepend_bos)
    tokenizer = getattr(model, "tokenizer", None)
    bos_id = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos and bos_id is None:
        if prepend_bos:
            raise ValueError("prepend_bos=True, but the model has no tokenizer with a BOS token: put BOS into the token ids yourself, or pass prepend_bos=False.")
        bos = False  # the model's default asks for a BOS it does not know
    rows = isinstance(corpus, torch.Tensor) and corpus.ndim == 2
    if isinstance(corpus, torch.Tensor):
        if corpus.is_floating_point() or corpus.ndim not in (1, 2) or corpus.shape[-1] < 2:
            raise ValueError("A token-tensor corpus must hold integer ids: a stream [n_tokens] or sequences [n, seq] of 2+ tokens.")
        d_vocab = int(model.cfg.d_vocab)
        if int(corpus.min()) < 0 or int(corpus.max()) >= d_vocab:
            raise ValueError(f"Corpus token ids must lie in [0, {d_vocab}).")
        if rows:
            if corpus.shape[1] > n_ctx:
                raise ValueError(f"Sequences of {corpus.shape[1]} tokens are longer than the model's context ({n_ctx}).")
            seq_len, bos, bos_id = int(corpus.shape[1]), False, None
            if max_tokens is not None:
                corpus = corpus[: max(1, max_tokens // seq_len)]
        stream: Iterable[list[int]] = iter([corpus.flatten().tolist()])
        label = f"{corpus.shape[0]} sequences of {corpus.shape[1]} tokens" if rows else f"{corpus.numel()} token ids"
    else:
        if tokenizer is None:
            raise ValueError("This model has no tokenizer, so it cannot read text: pass the corpus as a token tensor.")
        texts, label = _texts(corpus, dataset_config, dataset_split, text_field)
        stream = _token_stream(model, texts, separator)
    body = seq_len - (1 if bos else 0)
    chunks = _chunks(stream, body, bos_id if bos else None, None if rows else max_tokens)
    first = next(chunks, None)
    if first is None:
        raise ValueError(f"The corpus ({label}) gave fewer than 2 tokens: nothing to predict.")
    warn_if_processed(model)

    def rechained() -> Iterator[list[int]]:
        yield first
        yield from chunks

    plan = plan_batches(model, _batched(rechained(), batch_size), batch_size=batch_size)
    totals = {"nll": torch.zeros((), dtype=torch.float64), "tokens": 0, "nonfinite": 0, "chunks": 0}

    def on_batch(batch: Batch, logits: torch.Tensor) -> None:
        tokens = batch.tokens.to(logits.device)
        mask = batch.attention_mask.to(logits.device).bool()
        targets = tokens[:, 1:]
        valid = mask[:, 1:]
        losses = F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="none"
        ).view_as(targets)[valid]
        totals["nll"] += losses.double().sum().cpu()
        totals["tokens"] += int(valid.sum())
        totals["nonfinite"] += int((~torch.isfinite(losses)).sum())
        totals["chunks"] += int(tokens.shape[0])

    run_batches(model, plan, _make_hooks(hooks), progress=progress, desc="perplexity", on_batch=on_batch)
    nll = float(totals["nll"]) / max(int(totals["tokens"]), 1)
    return PerplexityResult(
        model=model_description(model),
        hook_names=hook_names_of(hooks),
        corpus=label,
        seq_len=seq_len,
        prepend_bos=bos,
        n_chunks=int(totals["chunks"]),
        n_tokens=int(totals["tokens"]),
        nll=nll,
        perplexity=_exp(nll),
        n_nonfinite=int(totals["nonfinite"]),
    )


def _exp(value: float) -> float:
    if math.isnan(value):
        return math.nan
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


# --------------------------------------------------------------------------- embeddings


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

    Mean of the last hidden state (:func:`massact_lens.hook_names.final_hidden_hook`)
    over real tokens ([CLS] and [SEP] included, padding not), then L2-normalised.
    Float32, on the CPU.

    >>> from massact_lens.examples import minilm
    >>> e = sentence_embeddings(minilm(), ["A cat.", "A dog."])
    >>> tuple(e.shape), round(float(e[0].norm()), 4)
    ((2, 384), 1.0)
    """
    hooks = _check_hooks(model, fwd_hooks)
    point = final_hidden_hook(model)
    plan = plan_batches(model, sentences, batch_size=batch_size, prepend_bos=prepend_bos)
    parts: list[torch.Tensor] = []
    current: dict[str, Batch] = {}

    def read(activation: torch.Tensor, *, hook: Any = None) -> None:  # noqa: ARG001
        mask = current["batch"].attention_mask.to(activation.device).float()[..., None]
        pooled = (activation.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        parts.append(pooled.cpu())

    def make(batch: Batch) -> HookList:
        current["batch"] = batch
        announce_batch(hooks, batch.attention_mask)
        return hooks + [(point, read)]

    run_batches(model, plan, make, progress=progress, desc="embeddings")
    out = torch.cat(parts)
    return F.normalize(out, dim=-1) if normalize else out


@dataclass(frozen=True)
class SimilarityResult:
    """Sentence embeddings under a hook list, compared with the unhooked model.

    ``cosines[i]``: cosine of sentence ``i``'s embedding to its unhooked one.
    ``pair_cosines`` / ``pair_cosines_original``: cosine within each paraphrase pair,
    with and without the hooks.
    """

    model: dict[str, Any]
    hook_names: tuple[str, ...]
    cosines: tuple[float, ...]
    pair_cosines: tuple[float, ...] = ()
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
    return _similarity(model, sentences, pairs, _check_hooks(model, fwd_hooks), None, batch_size, progress)


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
        model=model_description(model),
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


# --------------------------------------------------------------------------- Table 3


@dataclass(frozen=True)
class AblationTable:
    """The paper's Table 3 for one model: one row per setting, one column per metric.

    ``values[setting][metric]``; ``hook_names[setting]``: the hook points each
    setting edits; ``details[setting]``: the full results
    (:class:`PerplexityResult`, :class:`SimilarityResult`).
    """

    model: dict[str, Any]
    profile_dims: tuple[int, ...]
    metrics: tuple[str, ...]
    values: dict[str, dict[str, float]]
    hook_names: dict[str, tuple[str, ...]]
    details: dict[str, dict[str, Any]] = field(repr=False)

    def to_dataframe(self) -> pd.DataFrame:
        """Rows: settings (Original, Set to zero, Set to mean, ...); columns: metrics."""
        frame = pd.DataFrame.from_dict(self.values, orient="index", columns=list(self.metrics))
        frame.index.name = "setting"
        return frame

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


PERPLEXITY, COSINE, PAIR_COSINE = "perplexity", "cosine to original", "paraphrase cosine"


def ablation_table(
    model: TransformerLensModel,
    profile: MassiveProfile | None = None,
    *,
    sentences: Sequence[str] | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    corpus: Corpus | None = None,
    modes: Sequence[str] = ("zero", "mean"),
    settings: dict[str, Sequence[Any]] | None = None,
    batch_size: int = 16,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    **ablation_kwargs: Any,
) -> AblationTable:
    """Original vs massive activations set to zero vs set to their mean (Table 3).

    Metrics: perplexity on ``corpus`` (causal models), and for ``sentences`` the
    mean cosine of each embedding to the original one, and for ``pairs`` the mean
    paraphrase-pair cosine. An encoder with neither gets the built-in
    :data:`massact_lens.data.SENTENCES` and :data:`~massact_lens.data.PARAPHRASE_PAIRS`.
    Every hook list is built and checked before the first forward pass.

    Args:
        profile: where the massive activations are and their means
            (:func:`massact_lens.profile`); needed for ``"mean"``.
        modes: which ablations to add after "Original".
        settings: extra rows, name -> any hook list.
        ablation_kwargs: passed to :func:`massact_lens.ablation_hooks`
            (``layers``, ``dims``, ``kinds``, ``positions``, ``hooks``).

    >>> from massact_lens import profile
    >>> from massact_lens.data import SENTENCES, PARAPHRASE_PAIRS
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
    causal = getattr(model.cfg, "attention_dir", "causal") == "causal"
    if sentences is None and corpus is None and pairs is None:
        if causal:
            raise ValueError("Pass corpus=... (a list of strings, a text file, or token ids) to measure perplexity.")
        from massact_lens.data import PARAPHRASE_PAIRS, SENTENCES  # noqa: PLC0415

        sentences, pairs = list(SENTENCES), list(PARAPHRASE_PAIRS)
    if corpus is not None and not causal:
        raise ValueError("Perplexity needs a causal LM; for this encoder pass sentences= and pairs= instead of corpus=.")
    if pairs is not None and sentences is None:
        sentences = [s for pair in pairs for s in pair]
    names = {"zero": ZERO, "mean": MEAN}
    bad = [m for m in modes if m not in names]
    if bad:
        raise ValueError(f"modes must be among 'zero' and 'mean', not {bad}.")
    if profile is not None:
        check_profile_matches(model, profile)
    hook_lists: dict[str, HookList] = {ORIGINAL: []}
    for mode in modes:
        hook_lists[names[mode]] = ablation_hooks(model, profile, mode, **ablation_kwargs)  # type: ignore[arg-type]
    for name, hooks in (settings or {}).items():
        if name in hook_lists:
            raise ValueError(f"Setting name {name!r} is taken; choose another.")
        hook_lists[name] = _check_hooks(model, hooks)
    flat_pairs = _check_pairs(pairs)

    metrics: list[str] = []
    if corpus is not None:
        metrics.append(PERPLEXITY)
    if sentences is not None:
        metrics.append(COSINE)
    if flat_pairs:
        metrics.append(PAIR_COSINE)
    clean = None
    if sentences is not None:
        clean = _clean_embeddings(model, sentences, flat_pairs, batch_size, progress)
    values: dict[str, dict[str, float]] = {}
    details: dict[str, dict[str, Any]] = {}
    for name, hooks in hook_lists.items():
        values[name], details[name] = {}, {}
        if corpus is not None:
            result = perplexity(model, corpus, fwd_hooks=hooks, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens, progress=progress)
            values[name][PERPLEXITY] = result.perplexity
            details[name][PERPLEXITY] = result
        if sentences is not None:
            similarity = _similarity(model, sentences, pairs, hooks, clean, batch_size, progress)
            values[name][COSINE] = similarity.mean_cosine
            details[name][COSINE] = similarity
            if flat_pairs:
                values[name][PAIR_COSINE] = similarity.pair_cosine
    return AblationTable(
        model=model_description(model),
        profile_dims=profile.massive_dims if profile is not None else (),
        metrics=tuple(metrics),
        values=values,
        hook_names={name: hook_names_of(hooks) for name, hooks in hook_lists.items()},
        details=details,
    )
