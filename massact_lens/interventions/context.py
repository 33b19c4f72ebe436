"""What a position rule knows about the pass in progress, and the tracker that tells it.

>>> import torch
>>> from massact_lens._core.batching import Batch
>>> tracker = TokenTracker()
>>> tracker.before_batch(Batch(torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]), 7))
>>> tracker.on_tokens(torch.tensor([[5, 6, 0]]))
>>> ctx = tracker.context(torch.zeros(1, 3, 4))
>>> ctx.positions.tolist(), ctx.real(torch.zeros(1, 3, 4)).tolist(), ctx.batch.start
([[0, 1, 2]], [[True, True, False]], 7)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Int
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.batching import Batch
from massact_lens._core.hook_names import EMBED_TOKENS
from massact_lens._core.options import warn_user
from massact_lens._core.types import HookList

__all__ = ["RunContext", "TokenTracker"]

_POSITIONS_HOOK = "pos_embed.hook_in"


@dataclass(frozen=True)
class RunContext:
    """What a position rule knows about the forward pass in progress."""

    #: Absolute position of each slot, ``[1 or batch, pos]`` (not ``arange(pos)``
    #: during a KV-cached decoding step).
    positions: Int[torch.Tensor, "_ pos"]
    #: The token ids, ``[batch, pos]``; None when no tracker saw them.
    tokens: Int[torch.Tensor, "batch pos"] | None = None
    #: 1 = real token, when the batch's padding is known.
    attention_mask: Int[torch.Tensor, "batch pos"] | None = None
    #: The batch announced before this pass (``batch.input_index(row)`` is the index of
    #: each row's input); None when the pass was not announced.
    batch: Batch | None = None
    #: Key sets only: what each activation-reading rule found in this pass (the
    #: union over its hook points), ``[batch, pos]`` per rule.
    found: Mapping[Any, torch.Tensor] | None = None

    @property
    def starts_sequence(self) -> bool:
        """True when this pass holds position 0 (not a KV-cached continuation)."""
        return bool((self.positions == 0).any())

    def real(self, activation: torch.Tensor) -> Bool[torch.Tensor, "batch pos"]:
        """The real (non-padding) positions of ``activation``: all when the padding is unknown."""
        if self.attention_mask is not None:
            return self.attention_mask.to(activation.device).bool()
        return torch.ones(activation.shape[:2], dtype=torch.bool, device=activation.device)


def default_context(activation: torch.Tensor) -> RunContext:
    """The context of a pass nothing was told about: positions ``0..pos-1``, no tokens.

    >>> default_context(torch.zeros(2, 3, 4)).positions.tolist()
    [[0, 1, 2]]
    """
    return RunContext(torch.arange(int(activation.shape[1]), device=activation.device)[None])


class TokenTracker:
    """Read-only hooks that tell position rules the tokens of the pass in progress.

    :meth:`hooks` gives the hook pairs to put *first* in a hook list (the list
    builders of :mod:`massact_lens.interventions` do it). Fresh sequence or
    KV-cache continuation is decided from explicit state: a pass announced with
    ``before_batch`` (the library's loop, :func:`~massact_lens._core.loop.measure`,
    tells every hook of a :class:`~massact_lens._core.loop.UserHooks`) is always a fresh sequence;
    a pass *not* announced, of one token and the batch size of the pass before,
    continues that pass (a ``generate()`` decoding step). Where the model has
    position ids (``pos_embed.hook_in``) they are used instead.

    >>> from massact_lens.examples import tiny_model
    >>> [name for name, _ in TokenTracker().hooks(tiny_model("llama"))]
    ['embed.hook_in']
    """

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        self.batch: Batch | None = None
        self._announced: Batch | None = None
        self._end: tuple[int, int] | None = None  # (batch, absolute end) of the last pass
        #: Per edit of the list (its description): whether it selected any entry in the run
        #: in progress (announced passes; a bool tensor, no sync per call).
        self._selected: dict[str, torch.Tensor | bool] = {}
        self._warned: set[str] = set()  # edits already said to select nothing in an unannounced pass

    def hooks(self, model: TransformerLensModel) -> HookList:
        """The tracker's hooks for this model (token ids; position ids where the model has them)."""
        known = model.hook_dict  # type: ignore[attr-defined]
        if EMBED_TOKENS not in known:
            raise ValueError(
                f"The model has no {EMBED_TOKENS!r} hook point, so rules cannot see the tokens. "
                "Use position rules that need no tokens (at_positions, start_token, where_massive, "
                "all_positions) and pass the edit hooks to fwd_hooks directly."
            )
        out: HookList = [(EMBED_TOKENS, _TokenIdsHook(self))]
        if _POSITIONS_HOOK in known:
            out.append((_POSITIONS_HOOK, _PositionIdsHook(self)))
        return out

    def before_batch(self, batch: Batch) -> None:
        """The next pass is ``batch``, a fresh sequence (its padding mask and its rows' inputs)."""
        self._announced = batch

    def on_tokens(self, tokens: torch.Tensor) -> None:
        announced, self._announced = self._announced, None
        if tokens.is_floating_point() or tokens.dtype == torch.bool or tokens.ndim not in (1, 2):
            self.tokens = None  # embeddings (or a bool mask) were passed in: no ids to read
            return
        if tokens.ndim == 1:
            tokens = tokens[None]
        batch, n = (int(s) for s in tokens.shape)
        offset = 0
        if announced is None and n == 1 and self._end is not None and self._end[0] == batch:
            offset = self._end[1]  # an unannounced one-token pass continues the last one
        self.tokens = tokens
        self.positions = torch.arange(offset, offset + n, device=tokens.device)[None]
        self._end = (batch, offset + n)
        fits = announced is not None and tuple(announced.tokens.shape) == (batch, n)
        self.batch = announced if fits else None
        self.attention_mask = announced.attention_mask.to(tokens.device) if fits else None  # type: ignore[union-attr]

    def note_edit(self, description: str, selected: torch.Tensor, ctx: RunContext) -> None:
        """An edit's hook tells what its rule selected in this pass.

        In the library's passes (announced: ``ctx.batch`` is set) it is kept for the run, and
        :meth:`finish_run` warns about every edit that selected nothing in any of them. A pass
        not announced (``run_with_hooks``, ``generate``, a plain forward) is a run of its own:
        a fresh one that selects nothing warns at once, once per edit of the list.
        """
        if ctx.batch is not None:
            self._selected[description] = self._selected.get(description, False) | selected.any()
        elif ctx.starts_sequence and description not in self._warned and not bool(selected.any()):
            self._warned.add(description)
            warn_selected_nothing([description], "this pass")

    def finish_run(self, *, warn: bool = True) -> None:
        """Warn (once) about the edits that selected nothing in the library's passes so far
        (``warn=False``: forget them); start a new run."""
        unused = [d for d, hit in self._selected.items() if not bool(hit)]
        self._selected = {}
        if unused and warn:
            warn_selected_nothing(unused, "any input of the run")

    def on_position_ids(self, ids: torch.Tensor) -> None:
        if ids.is_floating_point() or self.tokens is None or ids.shape[-1] != self.tokens.shape[-1]:
            return
        ids = ids if ids.ndim == 2 else ids.reshape(1, -1)
        self.positions = ids
        self._end = (int(self.tokens.shape[0]), int(ids.max()) + 1)

    def context(self, activation: torch.Tensor) -> RunContext:
        """The context of ``activation``, a ``[batch, pos, ...]`` hidden state of this pass."""
        tokens = self.tokens
        if tokens is None or tuple(tokens.shape) != tuple(activation.shape[:2]) or self.positions is None:
            return default_context(activation)
        device = activation.device
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return RunContext(self.positions.to(device), tokens.to(device), mask, self.batch)


def warn_selected_nothing(edits: list[str], where: str) -> None:
    """The UserWarning of edits whose position rule selected no entry (they changed nothing).

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_selected_nothing(["set to zero, dims [3], at positions [9]"], "this pass")
    >>> "selected no entry in this pass" in str(caught[0].message)
    True
    """
    shown = "; ".join(edits[:3]) + (f" and {len(edits) - 3} more" if len(edits) > 3 else "")
    warn_user(
        f"The edit ({shown}) selected no entry in {where}: it changed nothing there. Check its "
        "positions against the inputs (a position past their length, no delimiter in them, a "
        "where_massive threshold above every value) or choose other positions."
    )


def finish_runs(fwd_hooks: Sequence[tuple[Any, Any]], *, warn: bool = True) -> None:
    """:meth:`TokenTracker.finish_run` for every tracker of a hook list: what a verb that runs
    ``fwd_hooks`` in the library's loop calls before its run (``warn=False``) and after it."""
    trackers = {id(fn.tracker): fn.tracker for _, fn in fwd_hooks if isinstance(fn, TrackerHook)}
    for tracker in trackers.values():
        tracker.finish_run(warn=warn)


class TrackerHook:
    """One of a :class:`TokenTracker`'s read-only hooks; ``fn(tensor, hook)`` or ``fn(tensor, *, hook)``."""

    def __init__(self, tracker: TokenTracker) -> None:
        self.tracker = tracker

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _TokenIdsHook(TrackerHook):
    def before_batch(self, batch: Batch) -> None:
        self.tracker.before_batch(batch)

    def __call__(self, tokens: torch.Tensor, hook: Any = None) -> None:  # noqa: ARG002
        self.tracker.on_tokens(tokens)


class _PositionIdsHook(TrackerHook):
    def __call__(self, ids: torch.Tensor, hook: Any = None) -> None:  # noqa: ARG002
        self.tracker.on_position_ids(ids)
