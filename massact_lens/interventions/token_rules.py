"""Rules that read the token ids of the pass: delimiters and the paper's token kinds.

They need a :class:`~massact_lens.interventions.context.TokenTracker` (the hook-list
builders put one first) and the model's tokenizer, or the delimiter ids given.

>>> import torch
>>> from massact_lens.interventions.positions import start_token
>>> context = RunContext(torch.arange(4)[None], torch.tensor([[5, 9, 6, 9]]))
>>> (start_token() | delimiter_positions(token_ids=[9])).select(torch.zeros(1, 4, 2), None, context)
tensor([[ True,  True, False,  True]])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens.find.criterion import DELIMITERS
from massact_lens.interventions._checks import TOKEN_KINDS, TokenKind, check_choice
from massact_lens.interventions.context import RunContext
from massact_lens.interventions.positions import PositionRule, start_token

__all__ = ["delimiter_positions", "kind_positions"]


class _TokenIds(PositionRule):
    needs_tokens = True
    reads_input_index = True

    def __init__(self, token_ids: frozenset[int], first_only: bool, label: str) -> None:
        self.token_ids = token_ids
        self.first_only = first_only
        self.label = label

    def select(self, activation: Float[torch.Tensor, "batch pos ..."], dims: torch.Tensor | None, ctx: RunContext) -> Bool[torch.Tensor, "_ pos *cols"]:  # noqa: ARG002
        if ctx.tokens is None:
            raise RuntimeError(
                f"The rule '{self.describe()}' needs the token ids of this batch, but no token tracker "
                "saw them. Build the hook list with intervention_hooks / edit_hooks / ablation_hooks "
                "(they put a TokenTracker first), and pass token ids, not embeddings."
            )
        tokens = ctx.tokens.to(activation.device)
        ids = torch.tensor(sorted(self.token_ids), dtype=tokens.dtype, device=tokens.device)
        out = torch.isin(tokens, ids) & (ctx.positions.to(tokens.device) != 0) & ctx.real(activation)
        if self.first_only:
            out = out & (out.cumsum(dim=1) == 1)
        return out

    def describe(self) -> str:
        return self.label + (" (first)" if self.first_only else "")


def delimiter_positions(
    model: TransformerLensModel | None = None,
    *,
    token_ids: Sequence[int] | None = None,
    delimiters: frozenset[str] | Sequence[str] = DELIMITERS,
    first_only: bool = False,
) -> PositionRule:
    """Positions holding a delimiter token ("." "," ";" ":" "!" "?" or a newline).

    The same classification as :func:`massact_lens.find.criterion.token_kind` (the start
    token is never a delimiter). The delimiter ids are read from the model's
    tokenizer, or given as ``token_ids`` (for models without a tokenizer).
    ``first_only`` keeps only the first delimiter of each input (the paper's LLaMA2
    massive activations sit on the first "." or newline).

    >>> delimiter_positions(token_ids=[5, 7], first_only=True)
    delimiters (first)
    """
    if token_ids is None:
        if model is None or getattr(model, "tokenizer", None) is None:
            raise ValueError(
                "delimiter_positions needs the model's tokenizer to find the delimiter tokens; "
                "this model has none. Pass token_ids=[...] (the ids that count as delimiters)."
            )
        ids = _delimiter_ids(model, frozenset(delimiters))
    else:
        ids = frozenset(int(i) for i in token_ids)
        if model is not None:
            d_vocab = int(model.cfg.d_vocab)
            bad = sorted(i for i in ids if not 0 <= i < d_vocab)
            if bad:
                raise ValueError(f"Token ids {bad[:5]} are outside the vocabulary (0..{d_vocab - 1}).")
    if not ids:
        raise ValueError(f"No token of the vocabulary is a delimiter in {sorted(delimiters)}.")
    return _TokenIds(ids, bool(first_only), "delimiters")


_DELIMITER_CACHE: dict[tuple[int, frozenset[str]], frozenset[int]] = {}


def _delimiter_ids(model: TransformerLensModel, delimiters: frozenset[str]) -> frozenset[int]:
    tokenizer = model.tokenizer  # type: ignore[attr-defined]
    key = (id(tokenizer), delimiters)
    if key not in _DELIMITER_CACHE:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        _DELIMITER_CACHE[key] = frozenset(
            i for i, text in enumerate(texts) if text.strip() in delimiters or (text.strip() == "" and "\n" in text)
        )
    return _DELIMITER_CACHE[key]


def kind_positions(
    kind: TokenKind,
    model: TransformerLensModel | None = None,
    *,
    delimiters: frozenset[str] | Sequence[str] = DELIMITERS,
    token_ids: Sequence[int] | None = None,
) -> PositionRule:
    """The positions of one token kind of :func:`massact_lens.token_kind`.

    ``"start"``: the start token; ``"delimiter"``: delimiter tokens; ``"other"``:
    everything else.

    >>> kind_positions("other", token_ids=[5])
    not (start token | delimiters)
    """
    if check_choice("kind", kind, TOKEN_KINDS) == "start":
        return start_token()
    if (
        kind == "other"
        and token_ids is None
        and model is not None
        and getattr(model, "tokenizer", None) is not None
        and not _delimiter_ids(model, frozenset(delimiters))
    ):
        return ~start_token()  # a vocabulary without delimiters: everything but the start
    delims = delimiter_positions(model, token_ids=token_ids, delimiters=delimiters)
    return delims if kind == "delimiter" else ~(start_token() | delims)
