"""Train small decoders on CPU: Bigram-Backcopy or a text file, in three attention variants.

Background
----------
No pretrained decoder can be downloaded on the project's machines, so the decoder
side of every analysis uses models this module trains in minutes on one CPU core.
On ordinary text a few-million-parameter model trained that long shows neither a
massive activation nor an attention sink. The **Bigram-Backcopy** task of Guo et
al. (2024) does: tokens follow a fixed bigram chain, except that after a
*trigger* token the next token copies the token before the trigger. A head that
copies only after triggers must do nothing everywhere else, and the cheapest way
to do nothing is to attend to BOS and read a small value there: the BOS becomes
an attention sink, with a residual peak at one fixed dim. This is the
extreme-token phenomenon at small scale: tens of times the median, not the
>1,000x of the paper's LLMs.

The task here is synthetic and self-contained (no data file): ``n_tokens``
tokens with Zipf frequencies, each row of the bigram matrix a Dirichlet draw
centred on them (``concentration``), the ``n_triggers`` most frequent tokens
are the triggers, the first token is a non-trigger. With the defaults about 30%
of the targets are copies and the Bayes-optimal loss is about 1.72 nats/token.
Guo et al. estimate their bigram from Shakespeare characters instead.

Three variants (:data:`VARIANTS`), all with BOS ``<s>``:

* ``default``: ``<s> x1 x2 ...``;
* ``sink_token``: ``<sink> <s> x1 ...``, position 0 a learnable sink token
  (:func:`massact_lens.explicit_bias.attach_sink_token`);
* ``explicit_bias``: ``<slot> <s> x1 ...``, position 0 the learnable k'/v' slot of
  every head (:func:`massact_lens.explicit_bias.attach_explicit_bias`).

The loss is the mean next-token cross-entropy over the same targets in all three
(``x1 .. x_L``, predicted from ``<s> .. x_{L-1}``), so losses compare directly.
The models' tokenizers prepend the placeholder, so string prompts work:
``model.to_str_tokens("w7 T1")`` gives ``['<slot>', '<s>', 'w7', 'T1']``.

**What the shipped models show** (``python -m massact_lens.train table``, 256
held-out sequences): the default model has a BOS residual peak of 27.8x the
median at dim 53 after layer 0, in every sequence, and its layer-1 head (the
back-copy head: 0.99 of a trigger query's attention on the token before it)
sends 0.99 of every other query's attention to BOS: active-dormant. With the
explicit k'/v' that attention goes to the slot (1.00) and the BOS peak falls to
12.5x; with a sink token the sink (47x) and BOS (41x) share the peak, at one dim.
All three reach the same loss (1.7309-1.7311; Bayes-optimal 1.7190). The peak
depends on the initialisation: with TransformerLens' native init
(``ModelConfig(init="gpt2")``) the back-copy head forms in layer 0, which reads
the BOS *embedding*, and no peak appears (4.6x); the shipped models use
PyTorch's defaults (``init="torch"``), as the plain-PyTorch measurement this
recipe comes from did.

**Gotcha.** In a causal model the BOS state is identical for every input (it
sees only itself, and a fixed prefix), so "set the massive activation to its
mean" is the identity there; see :mod:`massact_lens.explicit_bias`.

Usage
-----
Command line (the shipped models were made by ``scripts/train_bigram_backcopy.sh``)::

    python -m massact_lens.train bigram-backcopy --variant explicit_bias --out runs/eb \\
        --snapshot-every 500
    python -m massact_lens.train text --file corpus.txt --variant default --out runs/txt
    python -m massact_lens.train table                   # the shipped models' results
    python -m massact_lens.train scan-snapshots runs/eb  # emergence over training

In Python:

>>> from massact_lens.train import BigramBackcopy, TrainConfig, train, evaluate
>>> import tempfile
>>> run = train(BigramBackcopy(seq_len=16), "explicit_bias", tempfile.mkdtemp(),
...             train_config=TrainConfig(steps=3, batch_size=4), progress=False)
>>> run.steps, run.variant
(3, 'explicit_bias')

References
----------
Guo, Pai, Bai, Jiao, Jordan, Mei. *Active-Dormant Attention Heads: Mechanistically
Demystifying Extreme-Token Phenomena in LLMs*, arXiv 2410.13835 (2024).
Sun, Chen, Kolter, Liu. *Massive Activations in Large Language Models*, COLM 2024.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.sources.native import boot as boot_native
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens.batching import Batch, plan_batches, run_batches
from massact_lens.explicit_bias import (
    ExplicitAttentionBias,
    SinkToken,
    attach_explicit_bias,
    attach_sink_token,
    prefix_component,
)
from massact_lens.hook_names import RESID_POST, attention_hook
from massact_lens.models import model_description
from massact_lens.scan import ScanResult, scan

__all__ = [
    "CHECKPOINTS",
    "VARIANTS",
    "BigramBackcopy",
    "Evaluation",
    "ModelConfig",
    "SnapshotScan",
    "TextFile",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "load_checkpoint",
    "results_table",
    "save_checkpoint",
    "scan_snapshots",
    "train",
]

#: The attention variants a model can be trained in.
VARIANTS: tuple[str, ...] = ("default", "sink_token", "explicit_bias")
#: Where the shipped Bigram-Backcopy models live (one folder per variant).
CHECKPOINTS = Path(__file__).parent / "checkpoints" / "bigram_backcopy"
#: Vocabulary layout shared by every model of this module: these ids, then the task's tokens.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "<unk>", "<sink>", "<slot>")
PAD_ID, BOS_ID, UNK_ID, SINK_ID, SLOT_ID = range(5)
_PLACEHOLDER = {"default": None, "sink_token": SINK_ID, "explicit_bias": SLOT_ID}
#: Seed of the held-out evaluation sequences (training draws from ``TrainConfig.seed``).
EVAL_SEED = 2024
FORMAT = "massact_lens.train/1"


# ---------------------------------------------------------------- tasks


@dataclass(frozen=True)
class BigramBackcopy:
    """The Bigram-Backcopy task (Guo et al. 2024), synthetic and seeded.

    Attributes:
        n_tokens: ordinary tokens (``T0 .. T{k-1}`` are the triggers, then
            ``w{k} .. w{n-1}``, ranked by frequency).
        n_triggers: the most frequent ``n_triggers`` tokens are triggers.
        zipf_exponent: token frequencies fall as ``rank^-zipf_exponent``.
        concentration: Dirichlet concentration of each bigram row around those
            frequencies (smaller: sparser, more predictable rows).
        seq_len: tokens per sequence after BOS (= loss targets per sequence).
        seed: seed of the bigram matrix (the task itself, not the training data).
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
        """The task's tokens in vocabulary order (after :data:`SPECIAL_TOKENS`)."""
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


def _task_from_dict(data: dict[str, Any]) -> Task:
    data = dict(data)
    kind = data.pop("kind")
    if kind == BigramBackcopy.kind:
        return BigramBackcopy(**data)
    if kind == TextFile.kind:
        return TextFile(**data)
    raise ValueError(f"Unknown task kind {kind!r} in the checkpoint config.")


def _sequences(task: Task, variant: str, rng: np.random.Generator, n: int) -> torch.Tensor:
    """Full token sequences ``[n, prefix + 1 + seq_len]``: placeholder?, BOS, task tokens."""
    body = task.sample(rng, n) + len(SPECIAL_TOKENS)
    head = [BOS_ID] if _PLACEHOLDER[variant] is None else [_PLACEHOLDER[variant], BOS_ID]
    prefix = np.broadcast_to(np.array(head, dtype=np.int64), (n, len(head)))
    return torch.from_numpy(np.concatenate([prefix, body], axis=1))


# ---------------------------------------------------------------- configs


@dataclass(frozen=True)
class ModelConfig:
    """The decoder: pre-LN, learned positions, GELU MLP (``TransformerBridge.boot_native``).

    ``init``: ``"gpt2"`` is TransformerLens' native initialisation (every weight
    ``N(0, (0.8 / sqrt(d_model))^2)``, output projections scaled down by
    ``sqrt(2 n_layers)``); ``"torch"`` keeps PyTorch's module defaults
    (embeddings ``N(0, 1)``, linear layers ``U(+-1/sqrt(fan_in))``), as a model
    written in plain PyTorch has them.
    """

    n_layers: int = 3
    d_model: int = 64
    n_heads: int = 1
    d_mlp: int = 256
    act_fn: str = "gelu"
    normalization_type: str = "LN"
    init: str = "torch"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: AdamW, constant learning rate, fresh batches every step.

    ``snapshot_every`` > 0 also writes a checkpoint at step 0 and every that many
    steps under ``<out>/snapshots/step_XXXXXX``. ``threads`` is what training sets
    ``torch.set_num_threads`` to (restored afterwards).
    """

    steps: int = 5000
    batch_size: int = 32
    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.0
    seed: int = 0
    snapshot_every: int = 0
    eval_sequences: int = 256
    threads: int = 1


def _bridge_config(task: Task, variant: str, model_config: ModelConfig, seed: int) -> dict[str, Any]:
    if model_config.d_model % model_config.n_heads:
        raise ValueError("d_model must be divisible by n_heads.")
    if model_config.init not in ("gpt2", "torch"):
        raise ValueError(f"init must be 'gpt2' or 'torch', not {model_config.init!r}.")
    return {
        "d_model": model_config.d_model,
        "d_head": model_config.d_model // model_config.n_heads,
        "n_heads": model_config.n_heads,
        "n_layers": model_config.n_layers,
        "d_mlp": model_config.d_mlp,
        "act_fn": model_config.act_fn,
        "normalization_type": model_config.normalization_type,
        "n_ctx": task.seq_len + 2,
        "d_vocab": len(SPECIAL_TOKENS) + len(task.token_names()),
        "seed": seed,
        "init_weights": model_config.init == "gpt2",
        "model_name": f"{task.kind}-{variant}",
    }


# ---------------------------------------------------------------- tokenizer


def _write_tokenizer(directory: Path, task: Task, variant: str) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    names = list(SPECIAL_TOKENS) + task.token_names()
    vocab = {name: i for i, name in enumerate(names)}
    if len(vocab) != len(names):
        raise ValueError("A task token collides with a special token name.")
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    if isinstance(task, TextFile):
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tokenizer.decoder = decoders.Fuse()
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    placeholder = _PLACEHOLDER[variant]
    if placeholder is not None:
        name = SPECIAL_TOKENS[placeholder]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{name} $A", special_tokens=[(name, placeholder)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="<pad>",  # no task has an end token; this lets generate() run
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<sink>", "<slot>"],
        padding_side="right",
    )
    fast.save_pretrained(str(directory))


def _set_tokenizer(model: TransformerBridge, directory: Path) -> None:
    """Give the model the tokenizer saved in ``directory``, as saved.

    Assigned after boot on purpose: the bridge's own tokenizer setup reloads it
    with ``add_bos_token=True``, which rebuilds the post-processor and drops the
    placeholder the variants prepend. The tokenizer never prepends BOS itself;
    ``to_tokens(prepend_bos=True)`` does.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    tokenizer.padding_side = "right"
    model.tokenizer = tokenizer
    model.cfg.tokenizer_prepends_bos = False
    model.cfg.tokenizer_appends_eos = False
    model.cfg.default_prepend_bos = True


# ---------------------------------------------------------------- checkpoints


def _build(bridge_config: dict[str, Any], variant: str, seed: int) -> TransformerBridge:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}.")
    cfg = TransformerBridgeConfig(**bridge_config)
    model = boot_native(cfg, model_name=bridge_config["model_name"])
    if variant == "explicit_bias":
        attach_explicit_bias(model, placeholder_id=SLOT_ID, seed=seed)
    elif variant == "sink_token":
        attach_sink_token(model, placeholder_id=SINK_ID, seed=seed)
    return model


def save_checkpoint(model: TransformerBridge, directory: str | Path, config: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` (weights, k'/v' or sink embedding included) and ``config.json``.

    ``config`` is the JSON written next to the weights; it must hold ``model``
    (the ``TransformerBridgeConfig`` fields), ``variant`` and ``task``, as
    :func:`train` writes it. Tokenizer files are written by :func:`train`.
    """
    missing = [key for key in ("model", "variant", "task") if key not in config]
    if missing:
        raise ValueError(f"config lacks {missing}: pass the config train() builds.")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": FORMAT})
    (folder / "model.safetensors").chmod(0o644)  # safetensors writes 0600
    (folder / "config.json").write_text(json.dumps({"format": FORMAT, **config}, indent=1) + "\n")
    return folder


def load_checkpoint(directory: str | Path, *, device: str | None = None) -> TransformerBridge:
    """Load a model written by :func:`train` as a ``TransformerBridge`` with its tokenizer.

    The variant's bias slot or sink token is attached again with its trained
    parameters, and string prompts get the placeholder and BOS.

    Raises:
        FileNotFoundError: the folder lacks ``config.json`` or ``model.safetensors``.
        ValueError: the folder was not written by this module.

    >>> from massact_lens.train import CHECKPOINTS, load_checkpoint
    >>> model = load_checkpoint(CHECKPOINTS / "explicit_bias")
    >>> model.to_str_tokens("w7 T1")
    ['<slot>', '<s>', 'w7', 'T1']
    """
    folder = Path(directory)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}: pass a folder written by massact_lens.train.")
    config = json.loads((folder / "config.json").read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{folder}/config.json is not a {FORMAT} checkpoint (format={config.get('format')!r}).")
    with torch.random.fork_rng(devices=[]):  # a "torch"-init model draws from the global RNG
        model = _build(config["model"], config["variant"], seed=0)
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    _set_tokenizer(model, folder)
    if device is not None:
        model.to(device, print_details=False)
    model.eval()
    return model


def _checkpoint_config(
    task: Task, variant: str, bridge_config: dict[str, Any], model_config: ModelConfig, train_config: TrainConfig, step: int
) -> dict[str, Any]:
    return {
        "variant": variant,
        "placeholder_token": None if _PLACEHOLDER[variant] is None else SPECIAL_TOKENS[_PLACEHOLDER[variant]],
        "model": bridge_config,
        "model_config": asdict(model_config),
        "task": task.to_dict(),
        "train": asdict(train_config),
        "step": step,
        "versions": {"torch": torch.__version__, "transformer_lens": _version("transformer-lens")},
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _copy_tokenizer(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            (target / name).write_bytes((source / name).read_bytes())


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainResult:
    """What one training run produced.

    Attributes:
        directory: the checkpoint folder (weights, config.json, tokenizer).
        variant, task: what was trained.
        steps: optimisation steps run; tokens: loss targets seen.
        seconds: wall time of the optimisation steps (no evaluation, no snapshots).
        cpu_seconds: CPU time of the process over the training loop (snapshots included).
        tokens_per_second: ``tokens / seconds``.
        loss_curve: ``(step, mean training loss of the preceding 100 steps)``.
        evaluation: the held-out :class:`Evaluation` of the final model.
        snapshots: the snapshot folders written, in step order.
    """

    directory: str
    variant: str
    task: dict[str, Any]
    steps: int
    tokens: int
    seconds: float
    cpu_seconds: float
    tokens_per_second: float
    loss_curve: tuple[tuple[int, float], ...]
    evaluation: Evaluation
    snapshots: tuple[str, ...] = ()


def train(
    task: Task,
    variant: str,
    out_dir: str | Path,
    *,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train one model from scratch and write its checkpoint to ``out_dir``.

    Seeded: the same arguments give the same weights on the same machine and
    library versions (one thread). Uses ``torch.set_num_threads(train_config.threads)``
    while it runs.

    Args:
        task: :class:`BigramBackcopy` or :class:`TextFile`.
        variant: one of :data:`VARIANTS`.
        out_dir: the checkpoint folder (created; files in it are overwritten).
        model_config: the architecture (default: 3 layers, 1 head, d_model 64).
        train_config: the optimisation (default: the shipped models' recipe).
        progress: show a tqdm bar with the running loss.

    Returns:
        A :class:`TrainResult`; the final model is at ``load_checkpoint(out_dir)``.
    """
    model_config = model_config or ModelConfig()
    train_config = train_config or TrainConfig()
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}.")
    if train_config.steps < 1 or train_config.batch_size < 1:
        raise ValueError("steps and batch_size must be positive.")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    bridge_config = _bridge_config(task, variant, model_config, train_config.seed)
    _write_tokenizer(folder, task, variant)
    threads = torch.get_num_threads()
    torch.set_num_threads(train_config.threads)
    try:
        torch.manual_seed(train_config.seed)
        model = _build(bridge_config, variant, train_config.seed)
        _set_tokenizer(model, folder)
        model.train()
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=train_config.lr,
            betas=(train_config.beta1, train_config.beta2),
            weight_decay=train_config.weight_decay,
        )
        rng = np.random.default_rng(train_config.seed)
        start = 0 if _PLACEHOLDER[variant] is None else 1
        snapshots: list[str] = []

        def snapshot(step: int) -> None:
            target = folder / "snapshots" / f"step_{step:06d}"
            save_checkpoint(model, target, _checkpoint_config(task, variant, bridge_config, model_config, train_config, step))
            _copy_tokenizer(folder, target)
            snapshots.append(str(target))

        if train_config.snapshot_every > 0:
            snapshot(0)
        losses: list[float] = []
        curve: list[tuple[int, float]] = []
        seconds = 0.0
        cpu_start = time.process_time()
        bar = tqdm(range(1, train_config.steps + 1), desc=f"train {variant}", disable=not progress)
        for step in bar:
            tick = time.perf_counter()
            tokens = _sequences(task, variant, rng, train_config.batch_size)
            logits = model(tokens[:, :-1], return_type="logits")
            loss = torch.nn.functional.cross_entropy(
                logits[:, start:].reshape(-1, logits.shape[-1]), tokens[:, start + 1 :].reshape(-1)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seconds += time.perf_counter() - tick
            losses.append(float(loss.detach()))
            if step % 100 == 0 or step == train_config.steps:
                curve.append((step, float(np.mean(losses[-100:]))))
                bar.set_postfix(loss=f"{curve[-1][1]:.4f}")
            if train_config.snapshot_every > 0 and step % train_config.snapshot_every == 0:
                snapshot(step)
        cpu_seconds = time.process_time() - cpu_start
        model.eval()
        evaluation = evaluate(model, task, n_sequences=train_config.eval_sequences)
        n_tokens = train_config.steps * train_config.batch_size * task.seq_len
        config = _checkpoint_config(task, variant, bridge_config, model_config, train_config, train_config.steps)
        config["metrics"] = {
            "loss": evaluation.loss,
            "optimal_loss": evaluation.optimal_loss,
            "copy_accuracy": evaluation.copy_accuracy,
            "train_seconds": round(seconds, 2),
            "train_cpu_seconds": round(cpu_seconds, 2),
            "tokens_per_second": round(n_tokens / seconds, 1),
        }
        config["loss_curve"] = curve
        save_checkpoint(model, folder, config)
    finally:
        torch.set_num_threads(threads)
    return TrainResult(
        directory=str(folder),
        variant=variant,
        task=task.to_dict(),
        steps=train_config.steps,
        tokens=n_tokens,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        tokens_per_second=n_tokens / seconds,
        loss_curve=tuple(curve),
        evaluation=evaluation,
        snapshots=tuple(snapshots),
    )


# ---------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Evaluation:
    """Task metrics, BOS residual peaks and attention masses of one model, per layer.

    Measured on ``n_sequences`` held-out sequences (seed :data:`EVAL_SEED`), full
    length (placeholder?, BOS, ``seq_len`` task tokens).

    Residual statistics read ``blocks.{l}.hook_resid_post`` (the raw pre-LN
    residual) at the BOS position; the median ``|x|`` is taken over the task
    positions (BOS and after, all dims), *not* the prefix position. Per sequence,
    the BOS peak ratio is ``max_d |x[BOS, d]| / median``; ``bos_peak_ratio`` is its
    median over sequences, ``bos_peak_dim`` the most common arg-max dim and
    ``bos_peak_fraction`` the fraction of sequences whose BOS ratio is at least
    ``peak_threshold`` *at that dim*. ``prefix_*`` is the same at position 0 of a
    sink-token or explicit-bias model (for the latter that position is the
    bias slot, whose residual stream nothing reads).

    Attention masses average ``hook_pattern`` over heads and over the task
    queries after BOS: ``attn_bos`` and ``attn_prefix`` over *non-trigger*
    queries (where the model should stay dormant), ``attn_prev_trigger`` over
    trigger queries, on the token before the trigger (the back-copy).

    Attributes:
        loss: mean next-token cross-entropy over the task targets (nats).
        optimal_loss: the Bayes-optimal loss on the same targets.
        copy_accuracy: arg-max accuracy on the targets after a trigger.
    """

    model: dict[str, Any]
    variant: str
    task: dict[str, Any]
    n_sequences: int
    bos_position: int
    hook_names: tuple[str, ...]
    layers: tuple[int, ...]
    peak_threshold: float
    loss: float
    optimal_loss: float
    copy_accuracy: float
    bos_peak_ratio: tuple[float, ...]
    bos_peak_dim: tuple[int, ...]
    bos_peak_fraction: tuple[float, ...]
    prefix_peak_ratio: tuple[float, ...]
    prefix_peak_dim: tuple[int, ...]
    attn_bos: tuple[float, ...]
    attn_prefix: tuple[float, ...]
    attn_prev_trigger: tuple[float, ...]
    checkpoint: str | None = field(default=None)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per layer; the task metrics repeat on every row."""
        rows = []
        for i, layer in enumerate(self.layers):
            rows.append(
                {
                    "variant": self.variant,
                    "layer": layer,
                    "loss": self.loss,
                    "optimal_loss": self.optimal_loss,
                    "copy_accuracy": self.copy_accuracy,
                    "bos_peak_ratio": self.bos_peak_ratio[i],
                    "bos_peak_dim": self.bos_peak_dim[i],
                    "bos_peak_fraction": self.bos_peak_fraction[i],
                    "prefix_peak_ratio": self.prefix_peak_ratio[i],
                    "prefix_peak_dim": self.prefix_peak_dim[i],
                    "attn_bos": self.attn_bos[i],
                    "attn_prefix": self.attn_prefix[i],
                    "attn_prev_trigger": self.attn_prev_trigger[i],
                }
            )
        return pd.DataFrame(rows)


class _Meter:
    """Per-layer accumulators filled inside hooks, one batch at a time."""

    def __init__(self, n_layers: int, bos: int, trigger_ids: list[int]) -> None:
        self.bos = bos
        self.triggers = torch.tensor(trigger_ids, dtype=torch.long)
        self.ratio: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.dim: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.prefix_ratio: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.prefix_dim: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.mass = torch.zeros(n_layers, 3, dtype=torch.float64)  # bos, prefix, prev (sums)
        self.count = torch.zeros(n_layers, 2, dtype=torch.float64)  # non-trigger, trigger queries
        self.nll: list[torch.Tensor] = []
        self.copy_hits = 0
        self.copies = 0

    def residual(self, layer: int):  # noqa: ANN201
        def read(x: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            x = x.detach().float()
            task = x[:, self.bos :].abs()
            median = task.flatten(1).median(dim=1).values
            peak, dim = task[:, 0].max(dim=1)
            self.ratio[layer].append((peak / median).cpu())
            self.dim[layer].append(dim.cpu())
            if self.bos > 0:
                pre, pre_dim = x[:, 0].abs().max(dim=1)
                self.prefix_ratio[layer].append((pre / median).cpu())
                self.prefix_dim[layer].append(pre_dim.cpu())

        return read

    def attention(self, layer: int, tokens: torch.Tensor):  # noqa: ANN201
        def read(pattern: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            p = pattern.detach().float().mean(dim=1)  # [batch, query, key]
            queries = torch.arange(self.bos + 1, p.shape[1], device=p.device)
            is_trigger = torch.isin(tokens[:, queries], self.triggers.to(tokens.device))
            rows = p[:, queries]  # [batch, n_query, key]
            plain = (~is_trigger).double()
            self.mass[layer, 0] += float((rows[..., self.bos].double() * plain).sum())
            if self.bos > 0:
                self.mass[layer, 1] += float((rows[..., 0].double() * plain).sum())
            previous = rows.gather(2, (queries - 1).expand(rows.shape[0], -1)[..., None])[..., 0]
            self.mass[layer, 2] += float((previous.double() * is_trigger.double()).sum())
            self.count[layer, 0] += float(plain.sum())
            self.count[layer, 1] += float(is_trigger.sum())

        return read

    def logits(self, batch: Batch, logits: torch.Tensor) -> None:
        tokens = batch.tokens.to(logits.device)
        predicted = logits[:, self.bos : -1].float()
        targets = tokens[:, self.bos + 1 :]
        nll = torch.nn.functional.cross_entropy(predicted.transpose(1, 2), targets, reduction="none")
        self.nll.append(nll.cpu())
        after_trigger = torch.isin(tokens[:, self.bos : -1], self.triggers.to(tokens.device))
        self.copy_hits += int(((predicted.argmax(-1) == targets) & after_trigger).sum())
        self.copies += int(after_trigger.sum())


def _mode(values: torch.Tensor) -> int:
    return int(torch.mode(values).values) if values.numel() else -1


def evaluate(
    model: TransformerLensModel,
    task: Task,
    *,
    n_sequences: int = 256,
    batch_size: int = 64,
    peak_threshold: float = 25.0,
    seed: int = EVAL_SEED,
    progress: bool = False,
) -> Evaluation:
    """Measure a model trained by this module on held-out sequences of ``task``.

    See :class:`Evaluation` for every definition. The variant is read from the
    model (its attached bias slot or sink token).

    >>> from massact_lens.train import CHECKPOINTS, BigramBackcopy, evaluate, load_checkpoint
    >>> result = evaluate(load_checkpoint(CHECKPOINTS / "default"), BigramBackcopy(), n_sequences=8)
    >>> result.bos_peak_ratio[0] > 25, result.bos_peak_dim[0], result.attn_bos[1] > 0.9
    (True, 53, True)
    """
    if n_sequences < 1:
        raise ValueError(f"n_sequences must be positive, not {n_sequences}.")
    component = prefix_component(model)
    variant = (
        "explicit_bias" if isinstance(component, ExplicitAttentionBias)
        else "sink_token" if isinstance(component, SinkToken)
        else "default"
    )
    tokens = _sequences(task, variant, np.random.default_rng(seed), n_sequences)
    if int(tokens.max()) >= int(model.cfg.d_vocab) or tokens.shape[1] > int(model.cfg.n_ctx):
        raise ValueError("This task does not fit the model's vocabulary or context: evaluate it on the task it was trained on.")
    bos = 0 if variant == "default" else 1
    n_layers = int(model.cfg.n_layers)
    meter = _Meter(n_layers, bos, task.trigger_ids())
    resid = [RESID_POST.format(layer=layer) for layer in range(n_layers)]
    patterns = [attention_hook("pattern", layer) for layer in range(n_layers)]

    def make_hooks(batch: Batch) -> list[tuple[str, Any]]:
        hooks: list[tuple[str, Any]] = [(name, meter.residual(i)) for i, name in enumerate(resid)]
        return hooks + [(name, meter.attention(i, batch.tokens)) for i, name in enumerate(patterns)]

    plan = plan_batches(model, tokens, batch_size=batch_size)
    run_batches(model, plan, make_hooks, progress=progress, desc="evaluate", on_batch=meter.logits)
    nan = float("nan")
    ratio = [torch.cat(r) for r in meter.ratio]
    dims = [torch.cat(d) for d in meter.dim]
    modes = [_mode(d) for d in dims]
    optimal = task.optimal_nll(tokens[:, bos + 1 :].numpy() - len(SPECIAL_TOKENS))
    mass = meter.mass / meter.count[:, [0, 0, 1]].clamp(min=1)
    return Evaluation(
        model=model_description(model),
        variant=variant,
        task=task.to_dict(),
        n_sequences=n_sequences,
        bos_position=bos,
        hook_names=tuple(resid) + tuple(patterns),
        layers=tuple(range(n_layers)),
        peak_threshold=peak_threshold,
        loss=float(torch.cat(meter.nll).mean()),
        optimal_loss=float(np.mean(optimal)),
        copy_accuracy=meter.copy_hits / meter.copies if meter.copies else nan,
        bos_peak_ratio=tuple(float(r.median()) for r in ratio),
        bos_peak_dim=tuple(modes),
        bos_peak_fraction=tuple(
            float(((r >= peak_threshold) & (d == m)).double().mean()) for r, d, m in zip(ratio, dims, modes, strict=True)
        ),
        prefix_peak_ratio=tuple(float(torch.cat(r).median()) if r else nan for r in meter.prefix_ratio),
        prefix_peak_dim=tuple(_mode(torch.cat(d)) if d else -1 for d in meter.prefix_dim),
        attn_bos=tuple(float(x) for x in mass[:, 0]),
        attn_prefix=tuple(float(x) if bos else nan for x in mass[:, 1]),
        attn_prev_trigger=tuple(float(x) if meter.count[i, 1] else nan for i, x in enumerate(mass[:, 2])),
    )


def results_table(
    directories: Sequence[str | Path] | None = None,
    *,
    n_sequences: int = 256,
    peak_threshold: float = 25.0,
) -> pd.DataFrame:
    """The results table: one row per (checkpoint, layer), as :class:`Evaluation` defines.

    Args:
        directories: checkpoint folders (default: the three shipped Bigram-Backcopy
            models, in :data:`VARIANTS` order).
        n_sequences: held-out sequences per model.
        peak_threshold: the ratio counted in ``bos_peak_fraction``.
    """
    folders = [CHECKPOINTS / v for v in VARIANTS] if directories is None else [Path(d) for d in directories]
    frames = []
    for folder in folders:
        model = load_checkpoint(folder)
        config = json.loads((folder / "config.json").read_text())
        task = _task_from_dict(config["task"])
        result = evaluate(model, task, n_sequences=n_sequences, peak_threshold=peak_threshold)
        frame = result.to_dataframe()
        frame.insert(0, "checkpoint", folder.name)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _markdown(frame: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "n/a" if math.isnan(value) else f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


# ---------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class SnapshotScan:
    """:func:`massact_lens.scan` of every snapshot of one training run.

    Attributes:
        run_dir: the run folder; steps: the snapshot steps, in order.
        results: one :class:`~massact_lens.scan.ScanResult` per step (same inputs).
    """

    run_dir: str
    steps: tuple[int, ...]
    results: tuple[ScanResult, ...]

    def to_dataframe(self) -> pd.DataFrame:
        """Per (step, hook): the scan's layer statistics and where top-1 sits most often."""
        frames = []
        for step, result in zip(self.steps, self.results, strict=True):
            frame = result.layer_stats()
            frame.insert(0, "step", step)
            frame["top1_dim"] = [_mode(result.dims[:, h, 0]) for h in range(len(result.hook_names))]
            positions = [_mode(result.positions[:, h, 0]) for h in range(len(result.hook_names))]
            frame["top1_position"] = positions
            frame["top1_token"] = [
                result.token(_mode(result.token_ids[:, h, 0])) for h in range(len(result.hook_names))
            ]
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)


def scan_snapshots(
    run_dir: str | Path,
    *,
    n_sequences: int = 32,
    top_k: int = 10,
    progress: bool = True,
) -> SnapshotScan:
    """Scan the snapshots of a run (``train(..., TrainConfig(snapshot_every=N))``) on the same inputs.

    Every snapshot reads the same ``n_sequences`` held-out sequences of the run's
    task, so ``to_dataframe()`` plots the emergence of the BOS peak over
    training: ``ratio`` against ``step``, one line per layer.

    Raises:
        FileNotFoundError: the run has no ``snapshots/step_*`` folders.
    """
    folder = Path(run_dir)
    snapshot_dirs = sorted((folder / "snapshots").glob("step_*"))
    if not snapshot_dirs:
        raise FileNotFoundError(
            f"{folder} has no snapshots/step_* folders: train with TrainConfig(snapshot_every=N) "
            "(or --snapshot-every N)."
        )
    config = json.loads((snapshot_dirs[0] / "config.json").read_text())
    task = _task_from_dict(config["task"])
    tokens = _sequences(task, config["variant"], np.random.default_rng(EVAL_SEED), n_sequences)
    steps, results = [], []
    for snapshot in tqdm(snapshot_dirs, desc="snapshots", disable=not progress):
        model = load_checkpoint(snapshot)
        steps.append(int(json.loads((snapshot / "config.json").read_text())["step"]))
        results.append(scan(model, tokens, top_k=top_k, progress=False))
    return SnapshotScan(str(folder), tuple(steps), tuple(results))


# ---------------------------------------------------------------- command line


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    parser.add_argument("--variant", choices=VARIANTS, default="default")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    for item in fields(TrainConfig):
        parser.add_argument(f"--{item.name.replace('_', '-')}", type=type(getattr(defaults, item.name)), default=getattr(defaults, item.name))
    model_defaults = ModelConfig()
    for item in fields(ModelConfig):
        parser.add_argument(f"--{item.name.replace('_', '-')}", type=type(getattr(model_defaults, item.name)), default=getattr(model_defaults, item.name))
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--no-progress", action="store_true")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m massact_lens.train {bigram-backcopy,text,table,scan-snapshots} ...``."""
    parser = argparse.ArgumentParser(prog="python -m massact_lens.train", description=(__doc__ or "").split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    bb = commands.add_parser("bigram-backcopy", help="train on the Bigram-Backcopy task")
    _add_training_arguments(bb)
    bb.add_argument("--task-seed", type=int, default=0, help="seed of the bigram matrix")
    text = commands.add_parser("text", help="train a character-level model on a text file")
    _add_training_arguments(text)
    text.add_argument("--file", required=True)
    table = commands.add_parser("table", help="the results table of checkpoints (default: the shipped ones)")
    table.add_argument("directories", nargs="*")
    table.add_argument("--n-sequences", type=int, default=256)
    table.add_argument("--csv", action="store_true", help="CSV instead of markdown")
    snaps = commands.add_parser("scan-snapshots", help="scan every snapshot of a run")
    snaps.add_argument("run_dir")
    snaps.add_argument("--n-sequences", type=int, default=32)
    snaps.add_argument("--csv", action="store_true")
    args = parser.parse_args(argv)

    if args.command in ("bigram-backcopy", "text"):
        task: Task = (
            BigramBackcopy(seq_len=args.seq_len, seed=args.task_seed)
            if args.command == "bigram-backcopy"
            else TextFile(args.file, seq_len=args.seq_len)
        )
        train_config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
        model_config = ModelConfig(**{f.name: getattr(args, f.name) for f in fields(ModelConfig)})
        result = train(task, args.variant, args.out, model_config=model_config, train_config=train_config, progress=not args.no_progress)
        sys.stdout.write(
            f"{result.variant}: {result.steps} steps, {result.tokens} tokens in {result.seconds:.1f} s "
            f"({result.tokens_per_second:,.0f} tokens/s, {result.cpu_seconds:.1f} s CPU); held-out loss {result.evaluation.loss:.4f} "
            f"(optimal {result.evaluation.optimal_loss:.4f}), back-copy accuracy "
            f"{result.evaluation.copy_accuracy:.4f} -> {result.directory}\n"
        )
        return 0
    if args.command == "table":
        frame = results_table(args.directories or None, n_sequences=args.n_sequences)
    else:
        frame = scan_snapshots(args.run_dir, n_sequences=args.n_sequences).to_dataframe()
    sys.stdout.write((frame.to_csv(index=False) if args.csv else _markdown(frame)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
