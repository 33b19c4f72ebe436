"""Task metrics, BOS residual peaks and attention masses of a trained decoder, and the results table.

>>> from massact_lens.models.checkpoints import CHECKPOINTS, load_checkpoint
>>> from massact_lens.training import BigramBackcopy
>>> result = task_metrics(load_checkpoint(CHECKPOINTS / "default"), BigramBackcopy(), n_sequences=8)
>>> result.bos_peak_dim[0], result.attn_bos[1] > 0.9
(53, True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.batching import Batch, plan_batches
from massact_lens._core.hook_names import RESID_POST, attention_hook
from massact_lens._core.loop import measure
from massact_lens._core.results import CorpusResult
from massact_lens._core.types import HookList, Provenance
from massact_lens.models.attention_variants import HeadGate, SoftmaxOffByOne, gate_component
from massact_lens.models.checkpoints import (
    CHECKPOINTS,
    PLACEHOLDERS,
    SPECIAL_TOKENS,
    VARIANTS,
    load_checkpoint,
    read_config,
)
from massact_lens.models.explicit_bias import ExplicitAttentionBias, SinkToken, prefix_component
from massact_lens.training._stats import most_common
from massact_lens.training.tasks import EVAL_SEED, Task, sequences, task_from_dict

__all__ = ["Evaluation", "results_table", "task_metrics"]


@dataclass(frozen=True, repr=False)
class Evaluation(CorpusResult):
    """Task metrics, BOS residual peaks and attention masses of one model, per layer.

    Measured on ``n_inputs`` held-out sequences (seed
    :data:`~massact_lens.training.tasks.EVAL_SEED`), full length (placeholder?, BOS,
    ``seq_len`` task tokens).

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
    trigger queries, on the token before the trigger (the back-copy). For the
    ``softmax1`` variant ``attn_prefix`` is the mass on the zero logit ("nothing").
    ``gate_plain`` / ``gate_trigger``: a gated model's gate values
    (:class:`~massact_lens.models.attention_variants.HeadGate`), averaged over heads
    and over the same non-trigger / trigger queries (NaN without a gate).

    Attributes:
        layers: every layer of the model, one value of each per-layer field per layer.
        loss: mean next-token cross-entropy over the task targets (nats).
        optimal_loss: the Bayes-optimal loss on the same targets.
        copy_accuracy: arg-max accuracy on the targets after a trigger.
    """

    variant: str
    task: dict[str, Any]
    bos_position: int
    hook_names: tuple[str, ...]
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
    gate_plain: tuple[float, ...]
    gate_trigger: tuple[float, ...]
    checkpoint: str | None = field(default=None)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per layer; the task metrics repeat on every row."""
        columns = ("bos_peak_ratio", "bos_peak_dim", "bos_peak_fraction", "prefix_peak_ratio",
                   "prefix_peak_dim", "attn_bos", "attn_prefix", "attn_prev_trigger", "gate_plain", "gate_trigger")
        rows = [
            {
                "variant": self.variant,
                "layer": layer,
                "loss": self.loss,
                "optimal_loss": self.optimal_loss,
                "copy_accuracy": self.copy_accuracy,
                **{name: getattr(self, name)[i] for name in columns},
            }
            for i, layer in enumerate(self.layers)
        ]
        return pd.DataFrame(rows)


class _TaskMeter:
    """Per-layer BOS peaks and attention masses read in hooks, and the task's losses read from
    the logits, one batch at a time (a measurement).

    ``bos``: the BOS position (1 behind a prefix slot); ``trigger_ids``: the task's triggers;
    ``gate``: a gated model's head gate (its values are read on ``attn.hook_in``).
    """

    reads_input_index = False
    needs_output = True

    def __init__(
        self, n_layers: int, bos: int, trigger_ids: list[int], peak_threshold: float, gate: HeadGate | None = None
    ) -> None:
        self.n_layers, self.bos, self.peak_threshold, self.gate = n_layers, bos, peak_threshold, gate
        self.gate_sums = torch.zeros(n_layers, 2, dtype=torch.float64)  # non-trigger, trigger queries
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

    @property
    def hook_names(self) -> tuple[str, ...]:
        """The residual points, then the attention patterns, of every layer."""
        layers = range(self.n_layers)
        return tuple(RESID_POST.format(layer=i) for i in layers) + tuple(attention_hook("pattern", i) for i in layers)

    def hooks(self, batch: Batch) -> HookList:
        names = self.hook_names
        hooks: HookList = [(name, self._residual(i)) for i, name in enumerate(names[: self.n_layers])]
        hooks += [(name, self._attention(i, batch.tokens)) for i, name in enumerate(names[self.n_layers :])]
        if self.gate is not None:
            hooks += [(f"blocks.{i}.attn.hook_in", self._gate(i, batch.tokens)) for i in range(self.n_layers)]
        return hooks

    def _gate(self, layer: int, tokens: torch.Tensor) -> Callable[[torch.Tensor, Any], None]:
        def read(x: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
            assert self.gate is not None
            gates = self.gate.gates(x.detach(), layer).detach().double().mean(-1)[:, self.bos + 1 :]
            is_trigger = torch.isin(tokens[:, self.bos + 1 :], self.triggers.to(tokens.device)).to(gates.device)
            self.gate_sums[layer, 0] += float((gates * ~is_trigger).sum())
            self.gate_sums[layer, 1] += float((gates * is_trigger).sum())

        return read

    def _residual(self, layer: int) -> Callable[[torch.Tensor, Any], None]:
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

    def _attention(self, layer: int, tokens: torch.Tensor) -> Callable[[torch.Tensor, Any], None]:
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

    def update(self, batch: Batch, output: torch.Tensor | None) -> None:
        assert output is not None
        tokens = batch.tokens.to(output.device)
        predicted = output[:, self.bos : -1].float()
        targets = tokens[:, self.bos + 1 :]
        nll = torch.nn.functional.cross_entropy(predicted.transpose(1, 2), targets, reduction="none")
        self.nll.append(nll.cpu())
        after_trigger = torch.isin(tokens[:, self.bos : -1], self.triggers.to(tokens.device))
        self.copy_hits += int(((predicted.argmax(-1) == targets) & after_trigger).sum())
        self.copies += int(after_trigger.sum())

    def result(self) -> dict[str, Any]:
        """The measured fields of an :class:`Evaluation` (all but the optimal loss and the settings)."""
        nan = float("nan")
        ratio = [torch.cat(r) for r in self.ratio]
        dims = [torch.cat(d) for d in self.dim]
        modes = [most_common(d) for d in dims]
        mass = self.mass / self.count[:, [0, 0, 1]].clamp(min=1)
        gate = self.gate_sums / self.count.clamp(min=1)
        fraction = [
            float(((r >= self.peak_threshold) & (d == m)).double().mean()) for r, d, m in zip(ratio, dims, modes, strict=True)
        ]
        return {
            "loss": float(torch.cat(self.nll).mean()),
            "copy_accuracy": self.copy_hits / self.copies if self.copies else nan,
            "bos_peak_ratio": tuple(float(r.median()) for r in ratio),
            "bos_peak_dim": tuple(modes),
            "bos_peak_fraction": tuple(fraction),
            "prefix_peak_ratio": tuple(float(torch.cat(r).median()) if r else nan for r in self.prefix_ratio),
            "prefix_peak_dim": tuple(most_common(torch.cat(d)) if d else -1 for d in self.prefix_dim),
            "attn_bos": tuple(float(x) for x in mass[:, 0]),
            "attn_prefix": tuple(float(x) if self.bos else nan for x in mass[:, 1]),
            "attn_prev_trigger": tuple(float(x) if self.count[i, 1] else nan for i, x in enumerate(mass[:, 2])),
            "gate_plain": tuple(float(x) if self.gate is not None else nan for x in gate[:, 0]),
            "gate_trigger": tuple(float(x) if self.gate is not None and self.count[i, 1] else nan
                                  for i, x in enumerate(gate[:, 1])),
        }


def _variant(model: TransformerLensModel) -> str:
    component = prefix_component(model)
    if gate_component(model) is not None:
        if component is not None:
            raise ValueError("This model has a head gate and a prefix component: no trained variant has both.")
        return "gated"
    if isinstance(component, SoftmaxOffByOne):
        return "softmax1"
    if isinstance(component, ExplicitAttentionBias):
        return "explicit_bias"
    return "sink_token" if isinstance(component, SinkToken) else "default"


def task_metrics(
    model: TransformerLensModel,
    task: Task,
    *,
    n_sequences: int = 256,
    batch_size: int = 64,
    peak_threshold: float = 25.0,
    seed: int = EVAL_SEED,
    progress: bool = False,
) -> Evaluation:
    """Measure a model trained by :mod:`massact_lens.training` on held-out sequences of ``task``.

    Named ``evaluate`` before; see :class:`Evaluation` for every definition. The
    variant is read from the model (its attached bias slot, sink token or head gate).

    >>> from massact_lens.models.checkpoints import CHECKPOINTS, load_checkpoint
    >>> from massact_lens.training import BigramBackcopy
    >>> result = task_metrics(load_checkpoint(CHECKPOINTS / "default"), BigramBackcopy(), n_sequences=8)
    >>> result.bos_peak_ratio[0] > 25, result.bos_peak_dim[0], result.attn_bos[1] > 0.9
    (True, 53, True)
    """
    if n_sequences < 1:
        raise ValueError(f"n_sequences must be positive, not {n_sequences}.")
    variant = _variant(model)
    tokens = sequences(task, variant, np.random.default_rng(seed), n_sequences)
    if int(tokens.max()) >= int(model.cfg.d_vocab) or tokens.shape[1] > int(model.cfg.n_ctx):
        raise ValueError("This task does not fit the model's vocabulary or context: evaluate it on the task it was trained on.")
    bos = 0 if PLACEHOLDERS[variant] is None else 1
    n_layers = int(model.cfg.n_layers)
    meter = _TaskMeter(n_layers, bos, task.trigger_ids(), peak_threshold, gate_component(model))
    plan = plan_batches(model, tokens, batch_size=batch_size)
    measure(model, plan, meter, progress=progress, desc="evaluate")
    optimal = task.optimal_nll(tokens[:, bos + 1 :].numpy() - len(SPECIAL_TOKENS))
    return Evaluation(
        provenance=Provenance.of(model),
        layers=tuple(range(n_layers)),
        n_inputs=n_sequences,
        variant=variant,
        task=task.to_dict(),
        bos_position=bos,
        hook_names=meter.hook_names,
        peak_threshold=peak_threshold,
        optimal_loss=float(np.mean(optimal)),
        **meter.result(),
    )


def results_table(
    directories: Sequence[str | Path] | None = None,
    *,
    n_sequences: int = 256,
    peak_threshold: float = 25.0,
) -> pd.DataFrame:
    """The results table: one row per (checkpoint, layer), as :class:`Evaluation` defines.

    Args:
        directories: checkpoint folders (default: the five shipped Bigram-Backcopy
            models, in :data:`~massact_lens.models.checkpoints.VARIANTS` order).
        n_sequences: held-out sequences per model.
        peak_threshold: the ratio counted in ``bos_peak_fraction``.

    >>> from massact_lens.models.checkpoints import CHECKPOINTS
    >>> results_table([CHECKPOINTS / "default"], n_sequences=4)["layer"].tolist()
    [0, 1, 2]
    """
    folders = [CHECKPOINTS / v for v in VARIANTS] if directories is None else [Path(d) for d in directories]
    frames = []
    for folder in folders:
        model = load_checkpoint(folder)
        task = task_from_dict(read_config(folder)["task"])
        result = task_metrics(model, task, n_sequences=n_sequences, peak_threshold=peak_threshold)
        frame = result.to_dataframe()
        frame.insert(0, "checkpoint", folder.name)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)

