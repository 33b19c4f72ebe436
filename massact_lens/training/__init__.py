"""Train small decoders on CPU (Bigram-Backcopy or a text file) and measure what they learned.

The recipe, the task and the shipped models' results are in docs/training.md; from
the shell: ``massact train bigram-backcopy --variant default --out runs/bb``.
Analysis never imports this subpackage; checkpoints load through
:mod:`massact_lens.models.checkpoints`.

>>> from massact_lens.training import BigramBackcopy, TrainConfig, train
>>> import tempfile
>>> run = train(BigramBackcopy(seq_len=16), "explicit_bias", tempfile.mkdtemp(),
...             train_config=TrainConfig(steps=3, batch_size=4, eval_sequences=4), progress=False)
>>> run.steps, run.variant
(3, 'explicit_bias')
"""

from massact_lens.training.config import ModelConfig, TrainConfig
from massact_lens.training.evaluation import Evaluation, results_table, task_metrics
from massact_lens.training.loop import TrainResult, train
from massact_lens.training.snapshots import SnapshotScan, scan_snapshots
from massact_lens.training.tasks import BigramBackcopy, TextFile

__all__ = [
    "BigramBackcopy",
    "Evaluation",
    "ModelConfig",
    "SnapshotScan",
    "TextFile",
    "TrainConfig",
    "TrainResult",
    "results_table",
    "scan_snapshots",
    "task_metrics",
    "train",
]
