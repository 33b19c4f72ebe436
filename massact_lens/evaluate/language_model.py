"""Perplexity of a causal LM on a corpus, under any hook list (the paper's Table 3 metric).

The corpus is read as a stream (strings, a text file, token ids, or a ``datasets``
name when the hub is reachable), cut into chunks of ``seq_len`` tokens, batched,
and run with the library's one forward loop. An infinite or NaN perplexity is
reported as such, never raised.

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
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._plain_hf import refuse_plain_hf
from massact_lens._core.batching import Batch, plan_batches
from massact_lens._core.loop import UserHooks, measure
from massact_lens._core.results import Result
from massact_lens._core.types import HookList, Provenance, is_causal, warn_if_processed
from massact_lens.evaluate._hooks import check_hook_list
from massact_lens.interventions import hook_names_of
from massact_lens.interventions.context import finish_runs
from massact_lens.models.load import hub_reachable

__all__ = ["PerplexityResult", "perplexity"]

#: What :func:`perplexity` reads: strings, a text-file path or dataset name, or token ids.
Corpus = str | os.PathLike[str] | Sequence[str] | torch.Tensor
_BLOCK_CHARS = 1 << 16  # text read from a file per tokenizer call


@dataclass(frozen=True, repr=False)
class PerplexityResult(Result):
    """Perplexity of a causal LM on a corpus under a hook list."""

    #: The hook points the hook list touched (tracker hooks left out).
    hook_names: tuple[str, ...]
    #: What was read: a file path, "N texts", "N token ids", a dataset and split.
    corpus: str
    #: Tokens per chunk, BOS included.
    seq_len: int
    #: Whether each chunk started with BOS.
    prepend_bos: bool
    #: Chunks evaluated.
    n_chunks: int
    #: Tokens predicted (every token of a chunk after its first).
    n_tokens: int
    #: Mean negative log-likelihood per predicted token (nats).
    nll: float
    #: ``exp(nll)``; ``inf`` when it overflows, ``nan`` when some token loss is NaN.
    perplexity: float
    #: Token losses that were not finite.
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
        try:
            is_file = path.is_file()
        except OSError:  # a name too long for the file system: text, not a path
            is_file = False
        if is_file:
            return _file_blocks(path), str(path)
        text = os.fspath(corpus)
        if isinstance(corpus, str) and (len(text) > 200 or any(c.isspace() for c in text)):
            raise ValueError(
                "A string corpus is a text-file path or a dataset name; this one looks like text "
                f"({text[:40]!r}...). Pass the text as a list of strings: perplexity(model, [text])."
            )
        looks_like_path = os.sep in text and text.count("/") != 1 or path.suffix in (".txt", ".md", ".raw")
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
    refuse_plain_hf(model, "perplexity")
    hooks, seq_len, bos, bos_id = _settings(model, fwd_hooks, seq_len, batch_size, max_tokens, prepend_bos)
    rows = isinstance(corpus, torch.Tensor) and corpus.ndim == 2
    if isinstance(corpus, torch.Tensor):
        stream, label, corpus = _token_corpus(model, corpus, max_tokens)
        if rows:
            seq_len, bos, bos_id = int(corpus.shape[1]), False, None
    else:
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("This model has no tokenizer, so it cannot read text: pass the corpus as a token tensor.")
        texts, label = _texts(corpus, dataset_config, dataset_split, text_field)
        stream = _token_stream(model, texts, separator)
    body = seq_len - (1 if bos else 0)
    chunks = _chunks(stream, body, bos_id if bos else None, None if rows else max_tokens)
    first = next(chunks, None)
    if first is None:
        raise ValueError(f"The corpus ({label}) gave fewer than 2 tokens: nothing to predict.")
    warn_if_processed(model)
    plan = plan_batches(model, _batched(itertools.chain([first], chunks), batch_size), batch_size=batch_size)
    losses = _NextTokenLosses(provenance=Provenance.of(model), hook_names=hook_names_of(hooks), corpus=label,
                              seq_len=seq_len, prepend_bos=bos)
    finish_runs(hooks, warn=False)
    measure(model, plan, UserHooks(hooks), losses, progress=progress, desc="perplexity")
    finish_runs(hooks)  # an edit that selected nothing in the whole run is said
    return losses.result()


def _settings(
    model: TransformerLensModel,
    fwd_hooks: Sequence[Any],
    seq_len: int | None,
    batch_size: int,
    max_tokens: int | None,
    prepend_bos: bool | None,
) -> tuple[HookList, int, bool, int | None]:
    """The checked hook list, chunk length, BOS setting and BOS id of a perplexity run."""
    if not is_causal(model):
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
    hooks = check_hook_list(model, fwd_hooks)
    bos = bool(model.cfg.default_prepend_bos) if prepend_bos is None else bool(prepend_bos)
    tokenizer = getattr(model, "tokenizer", None)
    bos_id = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos and bos_id is None:
        if prepend_bos:
            raise ValueError("prepend_bos=True, but the model has no tokenizer with a BOS token: put BOS into the token ids yourself, or pass prepend_bos=False.")
        bos = False  # the model's default asks for a BOS it does not know
    return hooks, seq_len, bos, bos_id


def _token_corpus(
    model: TransformerLensModel, corpus: torch.Tensor, max_tokens: int | None
) -> tuple[Iterable[list[int]], str, torch.Tensor]:
    """A token-tensor corpus checked: its token stream, its label, and the tensor (sequences
    ``[n, seq]`` cut to ``max_tokens``)."""
    if corpus.is_floating_point() or corpus.dtype == torch.bool or corpus.ndim not in (1, 2) or corpus.shape[-1] < 2:
        raise ValueError("A token-tensor corpus must hold integer ids: a stream [n_tokens] or sequences [n, seq] of 2+ tokens.")
    d_vocab = int(model.cfg.d_vocab)
    if int(corpus.min()) < 0 or int(corpus.max()) >= d_vocab:
        raise ValueError(f"Corpus token ids must lie in [0, {d_vocab}).")
    rows = corpus.ndim == 2
    if rows:
        n_ctx = int(model.cfg.n_ctx)
        if corpus.shape[1] > n_ctx:
            raise ValueError(f"Sequences of {corpus.shape[1]} tokens are longer than the model's context ({n_ctx}).")
        if max_tokens is not None:
            corpus = corpus[: max(1, max_tokens // int(corpus.shape[1]))]
    label = f"{corpus.shape[0]} sequences of {corpus.shape[1]} tokens" if rows else f"{corpus.numel()} token ids"
    return iter([corpus.flatten().tolist()]), label, corpus


class _NextTokenLosses:
    """Next-token losses of every chunk, summed (a measurement that reads the logits).

    ``settings``: the fields of the :class:`PerplexityResult` that the run does not count.
    """

    reads_input_index = False
    needs_output = True

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.nll = torch.zeros((), dtype=torch.float64)
        self.tokens = self.nonfinite = self.chunks = 0

    def hooks(self, batch: Batch) -> HookList:  # noqa: ARG002
        return []

    def update(self, batch: Batch, output: torch.Tensor | None) -> None:
        assert output is not None
        tokens = batch.tokens.to(output.device)
        mask = batch.attention_mask.to(output.device).bool()
        targets = tokens[:, 1:]
        valid = mask[:, 1:]
        losses = F.cross_entropy(
            output[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="none"
        ).view_as(targets)[valid]
        self.nll += losses.double().sum().cpu()
        self.tokens += int(valid.sum())
        self.nonfinite += int((~torch.isfinite(losses)).sum())
        self.chunks += int(tokens.shape[0])

    def result(self) -> PerplexityResult:
        nll = float(self.nll) / max(self.tokens, 1)
        return PerplexityResult(**self.settings, n_chunks=self.chunks, n_tokens=self.tokens, nll=nll,
                                perplexity=_exp(nll), n_nonfinite=self.nonfinite)


def _exp(value: float) -> float:
    if math.isnan(value):
        return math.nan
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf

