"""What the small decoders learn: the Bigram-Backcopy task (Guo et al. 2024) or a text file.

The task and its numbers are described in docs/training.md.

>>> task = BigramBackcopy(seq_len=8)
>>> held_out(task, "explicit_bias", 2).shape        # <slot>, <s>, 8 task tokens
torch.Size([2, 10])
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from massact_lens.models.checkpoints import BOS_ID, PLACEHOLDERS, SPECIAL_TOKENS

__all__ = ["BigramBackcopy", "TextFile"]

#: Seed of the held-out evaluation sequences (training draws from ``TrainConfig.seed``).
EVAL_SEED = 2024


@dataclass(frozen=True)
class BigramBackcopy:
    """The Bigram-Backcopy task (Guo et al. 2024), synthetic and seeded.

    Tokens follow a fixed bigram chain, except that after a *trigger* token the
    next token copies the token before the trigger.

    Attributes:
        n_tokens: ordinary tokens (``T0 .. T{k-1}`` are the triggers, then
            ``w{k} .. w{n-1}``, ranked by frequency).
        n_triggers: the most frequent ``n_triggers`` tokens are triggers.
        zipf_exponent: token frequencies fall as ``rank^-zipf_exponent``.
        concentration: Dirichlet concentration of each bigram row around those
            frequencies (smaller: sparser, more predictable rows).
        seq_len: tokens per sequence after BOS (= loss targets per sequence).
        seed: seed of the bigram matrix (the task itself, not the training data).

    >>> task = BigramBackcopy()
    >>> task.token_names()[:4], task.trigger_ids()
    (['T0', 'T1', 'T2', 'w3'], [5, 6, 7])
    """

    n_tokens: int = 64
    n_triggers: int = 3
    zipf_exponent: float = 1.0
    concentration: float = 0.25
    seq_len: int = 64
    seed: int = 0
    kind: ClassVar[str] = "bigram_backcopy"

    def __post_init__(self) -> None:
        if self.n_tokens < 2 or not 0 <= self.n_triggers < self.n_tokens:
            raise ValueError("Need n_tokens >= 2 and 0 <= n_triggers < n_tokens.")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, not {self.seq_len}.")

    def token_names(self) -> list[str]:
        """The task's tokens in vocabulary order (after :data:`~massact_lens.models.checkpoints.SPECIAL_TOKENS`)."""
        return [f"T{i}" if i < self.n_triggers else f"w{i}" for i in range(self.n_tokens)]

    def trigger_ids(self) -> list[int]:
        """Vocabulary ids of the trigger tokens."""
        return [len(SPECIAL_TOKENS) + i for i in range(self.n_triggers)]

    def distributions(self) -> tuple[np.ndarray, np.ndarray]:
        """``(initial [n], transition [n, n])`` probabilities over task-local ids."""
        return _bigram(self.n_tokens, self.n_triggers, self.zipf_exponent, self.concentration, self.seed)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` sequences of ``seq_len`` task-local ids (no BOS)."""
        initial, transition = self.distributions()
        cdf = transition.cumsum(axis=1)
        trigger = np.arange(self.n_tokens) < self.n_triggers
        out = np.empty((n, self.seq_len), dtype=np.int64)
        out[:, 0] = rng.choice(self.n_tokens, size=n, p=initial)
        for i in range(1, self.seq_len):
            previous = out[:, i - 1]
            drawn = (cdf[previous] < rng.random(n)[:, None]).sum(axis=1).clip(max=self.n_tokens - 1)
            if i >= 2:
                drawn = np.where(trigger[previous], out[:, i - 2], drawn)
            out[:, i] = drawn
        return out

    def optimal_nll(self, sequences: np.ndarray) -> np.ndarray:
        """Per-target loss of the Bayes-optimal predictor, ``[n, seq_len]`` (0 at copies)."""
        initial, transition = self.distributions()
        trigger = np.arange(self.n_tokens) < self.n_triggers
        first = -np.log(initial[sequences[:, :1]])
        previous, target = sequences[:, :-1], sequences[:, 1:]
        rest = np.where(trigger[previous], 0.0, -np.log(transition[previous, target]))
        return np.concatenate([first, rest], axis=1)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


@lru_cache(maxsize=8)
def _bigram(n: int, k: int, zipf: float, concentration: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    unigram = 1.0 / np.arange(1, n + 1) ** zipf
    unigram /= unigram.sum()
    transition = rng.dirichlet(concentration * n * unigram, size=n)
    transition = np.maximum(transition, 1e-12)
    transition /= transition.sum(axis=1, keepdims=True)
    initial = np.where(np.arange(n) < k, 0.0, unigram)
    initial /= initial.sum()
    return initial, transition


@dataclass(frozen=True)
class TextFile:
    """Character-level language modelling on random windows of a text file.

    Attributes:
        path: the UTF-8 text file (its distinct characters are the vocabulary).
        seq_len: characters per sequence after BOS.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "t.txt")
    >>> _ = open(path, "w").write("abcabc" * 4)
    >>> TextFile(path, seq_len=4).token_names()
    ['a', 'b', 'c']
    """

    path: str
    seq_len: int = 64
    kind: ClassVar[str] = "text_file"
    n_triggers: ClassVar[int] = 0

    def __post_init__(self) -> None:
        text = _read_text(self.path)
        if len(text) <= self.seq_len:
            raise ValueError(f"{self.path} has {len(text)} characters; need more than seq_len={self.seq_len}.")

    def token_names(self) -> list[str]:
        return sorted(set(_read_text(self.path)))

    def trigger_ids(self) -> list[int]:
        return []

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        ids = _text_ids(self.path)
        starts = rng.integers(0, len(ids) - self.seq_len + 1, size=n)
        return np.stack([ids[s : s + self.seq_len] for s in starts])

    def optimal_nll(self, sequences: np.ndarray) -> np.ndarray:
        return np.full(sequences.shape, np.nan)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "seq_len": self.seq_len}


@lru_cache(maxsize=4)
def _read_text(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"No text file {path!r}: pass an existing UTF-8 file.")
    return file.read_text(encoding="utf-8")


@lru_cache(maxsize=4)
def _text_ids(path: str) -> np.ndarray:
    text = _read_text(path)
    index = {c: i for i, c in enumerate(sorted(set(text)))}
    return np.array([index[c] for c in text], dtype=np.int64)


Task = BigramBackcopy | TextFile


def task_from_dict(data: dict[str, Any]) -> Task:
    """The task a checkpoint's ``config.json`` records (``task.to_dict()`` read back).

    >>> task_from_dict(BigramBackcopy(seq_len=8).to_dict())
    BigramBackcopy(n_tokens=64, n_triggers=3, zipf_exponent=1.0, concentration=0.25, seq_len=8, seed=0)
    """
    data = dict(data)
    kind = data.pop("kind")
    if kind == BigramBackcopy.kind:
        return BigramBackcopy(**data)
    if kind == TextFile.kind:
        return TextFile(**data)
    raise ValueError(f"Unknown task kind {kind!r} in the checkpoint config.")


def sequences(task: Task, variant: str, rng: np.random.Generator, n: int) -> torch.Tensor:
    """Full token sequences ``[n, prefix + 1 + seq_len]``: placeholder?, BOS, task tokens.

    >>> sequences(BigramBackcopy(seq_len=4), "default", np.random.default_rng(0), 1)[0, 0].item()  # BOS
    1
    """
    body = task.sample(rng, n) + len(SPECIAL_TOKENS)
    head = [BOS_ID] if PLACEHOLDERS[variant] is None else [PLACEHOLDERS[variant], BOS_ID]
    prefix = np.broadcast_to(np.array(head, dtype=np.int64), (n, len(head)))
    return torch.from_numpy(np.concatenate([prefix, body], axis=1))


def held_out(task: Task, variant: str, n: int) -> torch.Tensor:
    """The ``n`` held-out sequences every evaluation reads (seed :data:`EVAL_SEED`).

    >>> held_out(BigramBackcopy(seq_len=4), "default", 3).shape
    torch.Size([3, 5])
    """
    return sequences(task, variant, np.random.default_rng(EVAL_SEED), n)
