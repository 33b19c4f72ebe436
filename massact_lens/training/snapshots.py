"""The emergence of massive activations over training: a scan of every snapshot of a run.

>>> import tempfile
>>> from massact_lens.training import BigramBackcopy, TrainConfig, train
>>> run = train(BigramBackcopy(seq_len=8), "default", tempfile.mkdtemp(),
...             train_config=TrainConfig(steps=2, batch_size=2, snapshot_every=1, eval_sequences=2), progress=False)
>>> scan_snapshots(run.directory, n_sequences=2, progress=False).steps
(0, 1, 2)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from massact_lens._core.options import tqdm
from massact_lens._core.results import Result
from massact_lens._core.types import Provenance
from massact_lens.find.scanner import ScanResult, scan
from massact_lens.models.checkpoints import load_checkpoint, read_config
from massact_lens.training._stats import most_common
from massact_lens.training.tasks import held_out, task_from_dict

__all__ = ["SnapshotScan", "scan_snapshots"]


@dataclass(frozen=True, repr=False)
class SnapshotScan(Result):
    """:func:`massact_lens.scan` of every snapshot of one training run.

    Attributes:
        provenance: the run's model (the last snapshot; every snapshot has its architecture).
        run_dir: the run folder; steps: the snapshot steps, in order.
        results: one :class:`~massact_lens.find.scanner.ScanResult` per step (same inputs).
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
            hooks = range(len(result.hook_names))
            frame["top1_dim"] = [most_common(result.dims[:, h, 0]) for h in hooks]
            frame["top1_position"] = [most_common(result.positions[:, h, 0]) for h in hooks]
            frame["top1_token"] = [result.token(most_common(result.token_ids[:, h, 0])) for h in hooks]
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

    >>> from massact_lens.models.checkpoints import CHECKPOINTS
    >>> scan_snapshots(CHECKPOINTS / "default")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: ...default has no snapshots/step_* folders: train with TrainConfig(snapshot_every=N) (or --snapshot-every N).
    """
    folder = Path(run_dir)
    snapshot_dirs = sorted((folder / "snapshots").glob("step_*"))
    if not snapshot_dirs:
        raise FileNotFoundError(
            f"{folder} has no snapshots/step_* folders: train with TrainConfig(snapshot_every=N) "
            "(or --snapshot-every N)."
        )
    config = read_config(snapshot_dirs[0])
    tokens = held_out(task_from_dict(config["task"]), config["variant"], n_sequences)
    steps, results = [], []
    provenance = None
    for snapshot in tqdm(snapshot_dirs, desc="snapshots", disable=not progress):
        model = load_checkpoint(snapshot)
        provenance = Provenance.of(model)
        steps.append(int(read_config(snapshot)["step"]))
        results.append(scan(model, tokens, top_k=top_k, progress=False))
    assert provenance is not None
    return SnapshotScan(provenance=provenance, run_dir=str(folder), steps=tuple(steps), results=tuple(results))
