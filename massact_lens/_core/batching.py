"""Inputs to batches: tokenise, right-pad, mask, validate, and order them longest first.

Every measurement of the library (scan, profile, attention, evaluation) takes the
same kinds of input; this module turns them into :class:`Batch` es that
:func:`massact_lens._core.loop.measure` runs, written once.

Inputs may be

* a list of strings (needs a tokenizer; each string is tokenised on its own,
  with or without BOS as asked, so the positions do not depend on the batch);
* a token tensor ``[batch, pos]`` (or ``[pos]``), optionally with an
  ``attention_mask`` of the same shape (1 = real token, 0 = padding);
* an iterable of batches, each a list of strings, a token tensor, or a
  ``(tokens, attention_mask)`` pair: consumed lazily, so a corpus never sits in
  memory at once.

Padding is always on the right and always masked: for causal models right padding
leaves every real position untouched, and bidirectional models get the mask.
Statistics read only the real positions (``Batch.attention_mask``), so a batch with
padding gives the same numbers as one input at a time.

>>> from massact_lens.examples import tiny_model
>>> import torch
>>> plan = plan_batches(tiny_model(), torch.zeros(5, 4, dtype=torch.long), batch_size=2)
>>> [b.tokens.shape[0] for b in plan.batches], plan.n_inputs
([2, 2, 1], 5)
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.options import warn_user
from massact_lens._core.types import Inputs

__all__ = ["Batch", "BatchPlan", "Inputs", "plan_batches", "token_strings"]


@dataclass(frozen=True)
class Batch:
    """One right-padded batch.

    ``start``: how many inputs the batches before this one hold (its first row's place
    in the run). ``indices``: the input index of each row, when the plan reordered the
    inputs (``plan_batches(..., by_length=True)``); None when row ``r`` is input
    ``start + r``. Read a row's input index with :meth:`input_index`.

    >>> b = Batch(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), 4, (9, 2))
    >>> b.input_index(1), Batch(b.tokens, b.attention_mask, 4).input_indices
    (2, [4, 5])
    """

    tokens: Int[torch.Tensor, "batch pos"]
    attention_mask: Int[torch.Tensor, "batch pos"]
    start: int
    indices: tuple[int, ...] | None = None

    @property
    def lengths(self) -> Int[torch.Tensor, " batch"]:
        return self.attention_mask.sum(dim=1)

    def input_index(self, row: int) -> int:
        """The index, among the inputs given, of row ``row``."""
        return self.indices[row] if self.indices is not None else self.start + row

    @property
    def input_indices(self) -> list[int]:
        """The input index of every row."""
        n = int(self.tokens.shape[0])
        return list(self.indices) if self.indices is not None else list(range(self.start, self.start + n))

    def to(self, device: Any) -> Batch:
        """The same batch with its tensors on ``device``."""
        return Batch(self.tokens.to(device), self.attention_mask.to(device), self.start, self.indices)


@dataclass(frozen=True)
class BatchPlan:
    """Batches ready to run, how many inputs they hold (None when streamed), and BOS."""

    batches: Iterable[Batch]
    n_inputs: int | None
    prepend_bos: bool | None  # None: token tensors were used as given


def _tokenize(model: TransformerLensModel, texts: Sequence[str], prepend_bos: bool) -> list[torch.Tensor]:
    if getattr(model, "tokenizer", None) is None:
        raise ValueError(
            "This model has no tokenizer, so it cannot read strings. Pass token ids as a "
            "tensor [batch, pos] instead, or give the model a tokenizer (load_model(..., "
            "tokenizer=...) or boot_native(cfg, tokenizer=...))."
        )
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"Inputs {bad[:5]} are not strings: pass a list of strings, or token ids as a tensor.")
    return [
        model.to_tokens(t, prepend_bos=prepend_bos, truncate=False, move_to_device=False)[0]
        for t in texts
    ]


def _pad(rows: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(int(r.shape[0]) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = 1
    return tokens, mask


def _check_rows(
    model: TransformerLensModel, tokens: torch.Tensor, mask: torch.Tensor, first: int,
    indices: Sequence[int] | None = None,
) -> None:
    n_ctx = int(model.cfg.n_ctx)
    lengths = mask.sum(dim=1)

    def name(i: int) -> int:
        return indices[i] if indices is not None else first + i

    if tokens.shape[1] > n_ctx and bool((lengths > n_ctx).any()):
        i = int(torch.nonzero(lengths > n_ctx)[0, 0])
        raise ValueError(
            f"Input {name(i)} has {int(lengths[i])} tokens, more than the model's context of "
            f"{n_ctx}. Shorten or split it (for perplexity, chunk the text) before measuring."
        )
    if bool((lengths == 0).any()):
        i = int(torch.nonzero(lengths == 0)[0, 0])
        raise ValueError(f"Input {name(i)} is empty (no tokens): remove it.")
    d_vocab = int(model.cfg.d_vocab)
    real = tokens[mask.bool()]
    if real.numel() and (int(real.max()) >= d_vocab or int(real.min()) < 0):
        raise ValueError(f"Token ids must lie in [0, {d_vocab}); got {int(real.min())}..{int(real.max())}.")


def _longest_first(lengths: Sequence[int], batch_size: int) -> list[int] | None:
    """The order that runs the longest inputs first (ties in input order), or None when
    it would change nothing: the inputs already run in that order, or fit one batch.

    >>> _longest_first([3, 9, 5, 9], batch_size=2), _longest_first([3, 9], batch_size=2)
    ([1, 3, 2, 0], None)
    """
    if len(lengths) <= batch_size:
        return None
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return None if order == list(range(len(lengths))) else order


def _chunks(
    n: int, batch_size: int, start: int, order: list[int] | None
) -> Iterator[tuple[int, slice | list[int], tuple[int, ...] | None]]:
    """Per batch: its offset in the run, its rows among the ``n`` inputs (a slice, or
    positions when ``order`` reorders them) and their input indices (None: in order)."""
    for offset in range(0, n, batch_size):
        if order is None:
            yield offset, slice(offset, offset + batch_size), None
        else:
            chunk = order[offset : offset + batch_size]
            yield offset, chunk, tuple(start + i for i in chunk)


def _padding_mask(model: TransformerLensModel, tokens: torch.Tensor) -> torch.Tensor | None:
    """The mask of a token tensor given without one whose rows end in the tokenizer's pad id.

    ``model.to_tokens([...])`` right-pads the shorter rows with the pad id: rows of
    different real lengths, some ending in a run of pad ids, the longest not. When the
    pad id is no token a text holds (not BOS, not EOS) that run is padding, and the mask
    is returned; when it is also EOS or BOS (SmolLM2, GPT-2) it may be real, so a warning
    says what to pass and the tokens are used as given (None).
    """
    tokenizer = getattr(model, "tokenizer", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None or tokens.shape[0] < 2:
        return None
    is_pad = tokens == int(pad)
    run = torch.flip(is_pad.long(), [1]).cumprod(1).sum(1)  # trailing pad ids of each row
    if int(run.max()) == 0 or int(run.min()) > 0 or bool((run == tokens.shape[1]).any()):
        return None
    mask = (torch.arange(tokens.shape[1])[None] < (tokens.shape[1] - run)[:, None]).long()
    special = {getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)}
    if int(pad) not in special:
        return mask
    rows = torch.nonzero(run > 0)[:, 0].tolist()
    warn_user(
        f"Rows {rows[:5]}{' ...' if len(rows) > 5 else ''} of the token tensor end in the pad id {int(pad)} "
        f"({tokenizer.convert_ids_to_tokens(int(pad))!r}, also the start / end token), and no attention_mask "  # type: ignore[union-attr]
        "was given: those positions count as tokens. If they are padding (model.to_tokens([...]) pads "
        "the shorter texts), pass attention_mask=(tokens != pad) with the real ends, or the strings themselves."
    )
    return None


def _tensor_batches(
    model: TransformerLensModel,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None,
    batch_size: int,
    start: int = 0,
    by_length: bool = False,
) -> list[Batch]:
    if tokens.is_floating_point() or tokens.dtype == torch.bool or tokens.is_complex():
        raise TypeError(
            f"Token tensors must hold integer ids, not {str(tokens.dtype).replace('torch.', '')} "
            "(a bool tensor would be read as ids 0 and 1). Tokenise with model.to_tokens(...)."
        )
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise ValueError(f"Token tensors must be [batch, pos]; got shape {tuple(tokens.shape)}.")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError("The token tensor is empty: pass at least one input with at least one token.")
    inferred = _padding_mask(model, tokens.cpu()) if attention_mask is None else None
    mask = attention_mask.to(torch.long) if attention_mask is not None else inferred if inferred is not None else torch.ones_like(tokens)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != tokens.shape:
        raise ValueError(f"attention_mask {tuple(mask.shape)} must have the shape of tokens {tuple(tokens.shape)}.")
    first_pad = (mask.cumsum(1) < torch.arange(1, mask.shape[1] + 1)).long()
    if bool((mask * first_pad).any()):
        raise ValueError("Padding must be on the right (mask 1...1 0...0 per row); re-pad with padding_side='right'.")
    tokens, mask = tokens.cpu().long(), mask.cpu()
    _check_rows(model, tokens, mask, start)
    order = _longest_first(mask.sum(1).tolist(), batch_size) if by_length else None
    out = []
    for offset, rows, indices in _chunks(int(tokens.shape[0]), batch_size, start, order):
        t, m = tokens[rows], mask[rows]
        width = int(m.sum(1).max())
        out.append(Batch(t[:, :width], m[:, :width], start + offset, indices))
    return out


def _string_batches(
    model: TransformerLensModel,
    texts: Sequence[str],
    batch_size: int,
    prepend_bos: bool,
    start: int = 0,
    by_length: bool = False,
) -> list[Batch]:
    rows = _tokenize(model, texts, prepend_bos)
    pad_id = getattr(model.tokenizer, "pad_token_id", None) or 0  # type: ignore[attr-defined]
    order = _longest_first([int(r.shape[0]) for r in rows], batch_size) if by_length else None
    out = []
    for offset, chosen, indices in _chunks(len(rows), batch_size, start, order):
        chunk = rows[chosen] if isinstance(chosen, slice) else [rows[i] for i in chosen]
        tokens, mask = _pad(chunk, pad_id)
        _check_rows(model, tokens, mask, start + offset, indices)
        out.append(Batch(tokens, mask, start + offset, indices))
    return out


def _stream(
    model: TransformerLensModel, items: Iterator[Any], batch_size: int, prepend_bos: bool, by_length: bool = False
) -> Iterator[Batch]:
    start = 0
    for item in items:
        if isinstance(item, str):
            item = [item]
        if isinstance(item, torch.Tensor):
            parts = _tensor_batches(model, item, None, batch_size, start, by_length)
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], torch.Tensor):
            parts = _tensor_batches(model, item[0], item[1], batch_size, start, by_length)
        elif isinstance(item, dict) and "input_ids" in item:
            parts = _tensor_batches(model, item["input_ids"], item.get("attention_mask"), batch_size, start, by_length)
        elif isinstance(item, Sequence) and len(item) > 0:
            parts = _string_batches(model, list(item), batch_size, prepend_bos, start, by_length)
        else:
            raise TypeError(
                f"Batch {start} is a {type(item).__name__}: each batch of an iterable must be a list "
                "of strings, a token tensor, or a (tokens, attention_mask) pair."
            )
        for part in parts:
            yield part
            start += part.tokens.shape[0]


def plan_batches(
    model: TransformerLensModel,
    inputs: Inputs,
    *,
    batch_size: int = 16,
    attention_mask: torch.Tensor | None = None,
    prepend_bos: bool | None = None,
    by_length: bool = False,
) -> BatchPlan:
    """Validate ``inputs`` and cut them into right-padded, masked batches.

    Lists and tensors are validated whole before any forward pass (empty input,
    non-strings, too long for the context, ids outside the vocabulary, no
    tokenizer). An iterable of batches is validated batch by batch as it streams;
    an empty one raises before any work.

    Args:
        prepend_bos: for strings, whether to put the model's BOS (or [CLS]) first;
            ``None`` uses the model's default. Token tensors are used as given.
        by_length: batch the inputs longest first, so that each batch holds inputs of
            similar length and little padding is computed; each :class:`Batch` then
            says which inputs it holds (:meth:`Batch.input_index`). A list or a tensor
            is ordered as a whole; an iterable of batches keeps its order, each of its
            items ordered within itself (memory stays that of one item).

    >>> from massact_lens.examples import tiny_model
    >>> tokens = torch.ones(3, 4, dtype=torch.long)
    >>> mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    >>> plan = plan_batches(tiny_model(), tokens, attention_mask=mask, batch_size=2, by_length=True)
    >>> [b.input_indices for b in plan.batches], [b.tokens.shape[1] for b in plan.batches]
    ([[1, 0], [2]], [4, 1])
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}.")
    if prepend_bos is not None and not isinstance(prepend_bos, bool):
        raise TypeError(f"prepend_bos must be True, False or None (the model's default), not {prepend_bos!r}.")
    bos = bool(model.cfg.default_prepend_bos) if prepend_bos is None else bool(prepend_bos)
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, torch.Tensor):
        batches = _tensor_batches(model, inputs, attention_mask, batch_size, by_length=by_length)
        return BatchPlan(batches, sum(b.tokens.shape[0] for b in batches), None)
    if attention_mask is not None:
        raise ValueError("attention_mask is only meaningful with a token tensor input.")
    if isinstance(inputs, Sequence):
        if len(inputs) == 0:
            raise ValueError("No inputs: pass at least one string (or a non-empty token tensor).")
        strings = [isinstance(x, str) for x in inputs]
        if all(strings):
            return BatchPlan(_string_batches(model, inputs, batch_size, bos, by_length=by_length), len(inputs), bos)
        if any(strings):
            bad = [i for i, ok in enumerate(strings) if not ok]
            kinds = sorted({type(inputs[i]).__name__ for i in bad})
            raise TypeError(
                f"Inputs {bad[:5]} are {', '.join(kinds)}, not strings, in a list of strings: pass "
                "only strings (or one token tensor, or an iterable of batches)."
            )
    if not isinstance(inputs, Iterable):
        raise TypeError(f"Cannot read inputs of type {type(inputs).__name__}: pass strings, a token tensor, or an iterable of batches.")
    items = iter(inputs)
    first = next(items, None)
    if first is None:
        raise ValueError("No inputs: the iterable of batches is empty.")
    stream = _stream(model, itertools.chain([first], items), batch_size, bos, by_length)
    tensors_only = isinstance(first, torch.Tensor | tuple | dict)
    return BatchPlan(stream, None, None if tensors_only else bos)


def token_strings(model: TransformerLensModel, ids: Iterable[int]) -> dict[int, str]:
    """Readable strings for token ids (``str(id)`` when the model has no tokenizer)."""
    tokenizer = getattr(model, "tokenizer", None)
    unique = sorted({int(i) for i in ids})
    if tokenizer is None:
        return {i: str(i) for i in unique}
    return {i: tokenizer.decode([i]) for i in unique}
