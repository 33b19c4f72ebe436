"""Deprecated: the trainer is :mod:`massact_lens.training`, checkpoints :mod:`massact_lens.checkpoints`.

Old imports keep working for one release, with a ``DeprecationWarning``
(``from massact_lens.train import evaluate`` gives
:func:`massact_lens.training.task_metrics`), and so does
``python -m massact_lens.train ...``, which runs ``massact train ...``.

>>> import warnings
>>> with warnings.catch_warnings():
...     warnings.simplefilter("ignore", DeprecationWarning)
...     from massact_lens.train import evaluate
>>> evaluate.__name__
'task_metrics'
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Sequence
from typing import Any

#: Old name -> (module, new name).
_MOVED = {
    **{
        name: ("massact_lens.training", name)
        for name in ("BigramBackcopy", "Evaluation", "ModelConfig", "SnapshotScan", "TextFile", "TrainConfig",
                     "TrainResult", "results_table", "scan_snapshots", "train")
    },
    "evaluate": ("massact_lens.training", "task_metrics"),
    "Task": ("massact_lens.training.tasks", "Task"),
    "EVAL_SEED": ("massact_lens.training.tasks", "EVAL_SEED"),
    **{
        name: ("massact_lens.checkpoints", name)
        for name in ("CHECKPOINTS", "VARIANTS", "FORMAT", "SPECIAL_TOKENS", "PAD_ID", "BOS_ID", "UNK_ID",
                     "SINK_ID", "SLOT_ID", "load_checkpoint", "save_checkpoint")
    },
}

__all__ = ["main"]


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module 'massact_lens.train' has no attribute {name!r}")
    module, new = _MOVED[name]
    warnings.warn(
        f"massact_lens.train.{name} moved to {module}.{new}; massact_lens.train will be removed in the next release.",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), new)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m massact_lens.train ARGS`` = ``massact train ARGS`` (deprecated)."""
    warnings.warn(
        "python -m massact_lens.train is deprecated: run `massact train ...` (or python -m massact_lens train ...).",
        DeprecationWarning,
        stacklevel=2,
    )
    from massact_lens.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
