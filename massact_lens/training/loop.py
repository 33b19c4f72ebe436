"""The training loop: one seeded run from scratch to a checkpoint folder, snapshots on request.

>>> import tempfile
>>> from massact_lens.training import BigramBackcopy, TrainConfig
>>> run = train(BigramBackcopy(seq_len=16), "explicit_bias", tempfile.mkdtemp(),
...             train_config=TrainConfig(steps=3, batch_size=4, eval_sequences=4), progress=False)
>>> run.steps, run.variant
(3, 'explicit_bias')
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from massact_lens._core.options import tqdm
from massact_lens._core.results import Result
from massact_lens._core.types import Provenance
from massact_lens.models.checkpoints import (
    PLACEHOLDERS,
    VARIANTS,
    build_model,
    save_checkpoint,
    set_tokenizer,
    write_tokenizer,
)
from massact_lens.training.config import ModelConfig, TrainConfig, bridge_config, checkpoint_config
from massact_lens.training.evaluation import Evaluation, task_metrics
from massact_lens.training.tasks import Task, TextFile, sequences

__all__ = ["TrainResult", "train"]


@dataclass(frozen=True, repr=False)
class TrainResult(Result):
    """What one training run produced.

    Attributes:
        directory: the checkpoint folder (weights, config.json, tokenizer).
        variant, task: what was trained.
        steps: optimisation steps run; tokens: loss targets seen.
        seconds: wall time of the optimisation steps (no evaluation, no snapshots).
        cpu_seconds: CPU time of the process over the training loop (snapshots included).
        tokens_per_second: ``tokens / seconds``.
        loss_curve: ``(step, mean training loss of the preceding 100 steps)``.
        evaluation: the held-out :class:`~massact_lens.training.Evaluation` of the final model.
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


def _versions() -> dict[str, str]:
    try:
        tl = version("transformer-lens")
    except PackageNotFoundError:
        tl = "unknown"
    return {"torch": torch.__version__, "transformer_lens": tl}


def _copy_tokenizer(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            (target / name).write_bytes((source / name).read_bytes())


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
        task: :class:`~massact_lens.training.BigramBackcopy` or :class:`~massact_lens.training.TextFile`.
        variant: one of :data:`~massact_lens.models.checkpoints.VARIANTS`.
        out_dir: the checkpoint folder (created; files in it are overwritten).
        model_config: the architecture (default: 3 layers, 1 head, d_model 64).
        train_config: the optimisation (default: the shipped models' recipe).
        progress: show a tqdm bar with the running loss.

    Returns:
        A :class:`TrainResult`; the final model is at
        :func:`massact_lens.models.checkpoints.load_checkpoint` ``(out_dir)``.

    >>> import tempfile
    >>> from massact_lens.training import BigramBackcopy, TrainConfig
    >>> run = train(BigramBackcopy(seq_len=8), "default", tempfile.mkdtemp(),
    ...             train_config=TrainConfig(steps=2, batch_size=2, eval_sequences=2), progress=False)
    >>> run.tokens, run.provenance.n_layers
    (32, 3)
    """
    model_config = model_config or ModelConfig()
    train_config = train_config or TrainConfig()
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}.")
    if train_config.steps < 1 or train_config.batch_size < 1:
        raise ValueError("steps and batch_size must be positive.")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    bridge = bridge_config(task, variant, model_config, train_config.seed)
    versions = _versions()
    write_tokenizer(folder, task.token_names(), variant, characters=isinstance(task, TextFile))
    threads = torch.get_num_threads()
    torch.set_num_threads(train_config.threads)
    try:
        torch.manual_seed(train_config.seed)
        model = build_model(bridge, variant, train_config.seed)
        set_tokenizer(model, folder)
        snapshots: list[str] = []

        def snapshot(step: int) -> None:
            target = folder / "snapshots" / f"step_{step:06d}"
            config = checkpoint_config(task, variant, bridge, model_config, train_config, step, versions)
            save_checkpoint(model, target, config)
            _copy_tokenizer(folder, target)
            snapshots.append(str(target))

        curve, seconds, cpu_seconds = _optimise(model, task, variant, train_config, snapshot, progress)
        model.eval()
        evaluation = task_metrics(model, task, n_sequences=train_config.eval_sequences)
        n_tokens = train_config.steps * train_config.batch_size * task.seq_len
        config = checkpoint_config(task, variant, bridge, model_config, train_config, train_config.steps, versions)
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
        provenance=Provenance.of(model),
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


def _optimise(
    model: Any,
    task: Task,
    variant: str,
    train_config: TrainConfig,
    snapshot: Callable[[int], None],
    progress: bool,
) -> tuple[list[tuple[int, float]], float, float]:
    """The optimisation steps, ``snapshot(step)`` where asked: the loss curve, the wall
    seconds of the steps and the CPU seconds of the loop."""
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=train_config.lr,
        betas=(train_config.beta1, train_config.beta2),
        weight_decay=train_config.weight_decay,
    )
    rng = np.random.default_rng(train_config.seed)
    start = 0 if PLACEHOLDERS[variant] is None else 1
    if train_config.snapshot_every > 0:
        snapshot(0)
    losses: list[float] = []
    curve: list[tuple[int, float]] = []
    seconds = 0.0
    cpu_start = time.process_time()
    bar = tqdm(range(1, train_config.steps + 1), desc=f"train {variant}", disable=not progress)
    for step in bar:
        tick = time.perf_counter()
        tokens = sequences(task, variant, rng, train_config.batch_size)
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
    return curve, seconds, time.process_time() - cpu_start
