"""The architecture and the optimisation of a training run, and the config a checkpoint records.

>>> TrainConfig(steps=100, snapshot_every=10).snapshot_every
10
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from transformer_lens.utilities import SUPPORTED_ACTIVATIONS

from massact_lens.models.checkpoints import PLACEHOLDERS, SPECIAL_TOKENS
from massact_lens.training.tasks import Task

__all__ = ["ModelConfig", "TrainConfig"]


@dataclass(frozen=True)
class ModelConfig:
    """The decoder: pre-LN, learned positions, GELU MLP (``TransformerBridge.boot_native``).

    ``init``: ``"gpt2"`` is TransformerLens' native initialisation (every weight
    ``N(0, (0.8 / sqrt(d_model))^2)``, output projections scaled down by
    ``sqrt(2 n_layers)``); ``"torch"`` keeps PyTorch's module defaults
    (embeddings ``N(0, 1)``, linear layers ``U(+-1/sqrt(fan_in))``), as a model
    written in plain PyTorch has them.

    >>> ModelConfig().n_layers, ModelConfig().init
    (3, 'torch')
    """

    n_layers: int = 3
    d_model: int = 64
    n_heads: int = 1
    d_mlp: int = 256
    act_fn: str = "gelu"
    normalization_type: str = "LN"
    init: str = "torch"

    def __post_init__(self) -> None:
        _positive(self, ("n_layers", "d_model", "n_heads", "d_mlp"))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads}): change one.")
        if self.normalization_type not in NORMALIZATIONS:
            raise ValueError(f"normalization_type must be one of {list(NORMALIZATIONS)}, not {self.normalization_type!r}.")
        if self.init not in ("gpt2", "torch"):
            raise ValueError(f"init must be 'gpt2' or 'torch', not {self.init!r}.")
        if self.act_fn not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"act_fn must be one of TransformerLens' activations {sorted(SUPPORTED_ACTIVATIONS)}, "
                             f"not {self.act_fn!r}: choose one of them.")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: AdamW, constant learning rate, fresh batches every step.

    ``snapshot_every`` > 0 also writes a checkpoint at step 0 and every that many
    steps under ``<out>/snapshots/step_XXXXXX``. ``threads`` is what training sets
    ``torch.set_num_threads`` to (restored afterwards).

    >>> TrainConfig(steps=10).batch_size
    32
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

    def __post_init__(self) -> None:
        _positive(self, ("steps", "batch_size", "eval_sequences", "threads"))
        if isinstance(self.snapshot_every, bool) or not isinstance(self.snapshot_every, int) or self.snapshot_every < 0:
            raise ValueError(f"snapshot_every must be an integer >= 0 (0: no snapshots), not {self.snapshot_every!r}.")
        for name, low, high in (("lr", 0.0, math.inf), ("beta1", 0.0, 1.0), ("beta2", 0.0, 1.0),
                                ("weight_decay", 0.0, math.inf)):
            value = getattr(self, name)
            ok = low <= value < high and (name != "lr" or value > 0)
            if isinstance(value, bool) or not isinstance(value, int | float) or not ok:
                raise ValueError(f"{name} must be a number in {'(' if name == 'lr' else '['}{low:g}, {high:g}), "
                                 f"not {value!r}: the defaults are {name}={getattr(TrainConfig, name)}.")


#: The norms a trained decoder may use (TransformerLens' normalization_type).
NORMALIZATIONS = ("LN", "LNPre", "RMS", "RMSPre")


def _positive(config: Any, names: tuple[str, ...]) -> None:
    """ValueError unless each named field of ``config`` is a positive integer."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, not {value!r}.")


def bridge_config(task: Task, variant: str, model_config: ModelConfig, seed: int) -> dict[str, Any]:
    """The ``TransformerBridgeConfig`` fields of a model of ``model_config`` for ``task``.

    >>> from massact_lens.training.tasks import BigramBackcopy
    >>> bridge_config(BigramBackcopy(seq_len=16), "default", ModelConfig(), seed=0)["n_ctx"]
    18
    """
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


def checkpoint_config(
    task: Task,
    variant: str,
    bridge: dict[str, Any],
    model_config: ModelConfig,
    train_config: TrainConfig,
    step: int,
    versions: dict[str, str],
) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint (:func:`massact_lens.models.checkpoints.save_checkpoint`).

    >>> from massact_lens.training.tasks import BigramBackcopy
    >>> task = BigramBackcopy(seq_len=4)
    >>> config = checkpoint_config(task, "sink_token", {}, ModelConfig(), TrainConfig(), 0, {})
    >>> config["placeholder_token"], config["task"]["seq_len"]
    ('<sink>', 4)
    """
    placeholder = PLACEHOLDERS[variant]
    return {
        "variant": variant,
        "placeholder_token": None if placeholder is None else SPECIAL_TOKENS[placeholder],
        "model": bridge,
        "model_config": asdict(model_config),
        "task": task.to_dict(),
        "train": asdict(train_config),
        "step": step,
        "versions": versions,
    }

