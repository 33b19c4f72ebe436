"""The architecture and the optimisation of a training run, and the config a checkpoint records.

>>> TrainConfig(steps=100, snapshot_every=10).snapshot_every
10
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

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

