"""Massive values inside queries and keys, per rotary frequency pair (Jin et al. 2025).

Rotary position embeddings rotate pairs of a head's query and key dims, each pair at
its own frequency ``theta_i = base^(-2i / d_rot)`` (``i = 0``: the fastest, 1 radian per
token). A rotation keeps a pair's norm, so the norm of q and of k per pair, averaged
over real tokens, is the same before and after the rotary step. Jin et al. 2025
report that a few pairs carry far larger norms than the rest ("massive values"),
concentrated in the low-frequency pairs, in queries and keys but not in values.
:func:`qk_massive_values` measures that on any rotary model: per layer, head and pair,
the mean norm, its ratio to the head's median pair, and the pair's frequency.

Pairs follow the model's convention: HuggingFace's ``rotate_half`` pairs dims ``i``
and ``i + d_rot / 2`` (LLaMA, Mistral, Qwen, SmolLM2, ...); GPT-J / CodeGen and the
native TransformerLens rotary pair adjacent dims ``2i, 2i + 1``. The frequencies are
the model's own (HF's ``inv_freq`` buffer, which includes ``rope_theta``, partial
rotary and rope scaling; never ``cfg.rotary_base``, which can disagree).

>>> import torch
>>> from massact_lens.examples import tiny_model
>>> qk = qk_massive_values(tiny_model("llama"), torch.randint(0, 64, (3, 10)), progress=False)
>>> qk.q_norm.shape, qk.k_norm.shape, qk.pairing   # layer x head x pair (keys: KV heads)
(torch.Size([2, 4, 4]), torch.Size([2, 2, 4]), 'adjacent')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._fingerprint import weights_fingerprint
from massact_lens._core._plain_hf import refuse_plain_hf
from massact_lens._core.batching import Batch, plan_batches
from massact_lens._core.hook_names import attention_hook
from massact_lens._core.loop import measure
from massact_lens._core.results import SummedResult, add_sums
from massact_lens._core.types import HookList, Inputs, Provenance, warn_if_processed
from massact_lens.attention._passes import NonFinite, check_layers

__all__ = ["QKMassiveValues", "qk_massive_values"]

Kind = Literal["q", "k"]
#: HF model types whose rotary pairs adjacent dims (``rotate_every_two``).
_ADJACENT_TYPES = ("gptj", "codegen")


def rotary_pairs(model: TransformerLensModel) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The model's rotary pairs ``[pair, 2]`` (dims of a head), their frequencies ``[pair]``
    (radians per token) and the pairing (``"rotate_half"`` / ``"adjacent"``).

    ValueError for a model without rotary embeddings, or one whose layers use different
    frequencies (Gemma 3's local and global layers).

    >>> from massact_lens.examples import tiny_model
    >>> pairs, freqs, pairing = rotary_pairs(tiny_model("llama"))
    >>> pairs.tolist(), [round(f, 4) for f in freqs.tolist()], pairing
    ([[0, 1], [2, 3], [4, 5], [6, 7]], [1.0, 0.1, 0.01, 0.001], 'adjacent')
    """
    kind = str(getattr(model.cfg, "positional_embedding_type", ""))
    original = getattr(model, "original_model", None)
    native = (
        [m for m in original.modules() if type(m).__name__ == "NativeRotary"]
        if original is not None
        else []
    )
    found = _inv_freqs(original) if original is not None else []
    if kind != "rotary" and not native and not found:
        raise ValueError(
            f"qk_massive_values needs rotary position embeddings, and this model has {kind or 'none'} "
            "(GPT-2 learns absolute positions, BERT too): there are no frequency pairs to measure."
        )
    if native:
        rotary = native[0]
        angle = torch.atan2(
            rotary.sin_cached[1, 0::2].float(), rotary.cos_cached[1, 0::2].float()
        )  # position 1
        n = int(rotary.rotary_dim) // 2
        pairs = torch.stack([torch.arange(0, 2 * n, 2), torch.arange(1, 2 * n, 2)], 1)
        return pairs, angle.detach().cpu(), "adjacent"
    if not found:
        raise ValueError(
            "This rotary model exposes no inv_freq buffer, so its frequencies are unknown here."
        )
    if any(f.shape != found[0].shape or not torch.allclose(f, found[0]) for f in found[1:]):
        raise ValueError(
            "The model's layers use different rotary frequencies (local and global layers, as in "
            "Gemma 3): qk_massive_values supports one set of frequencies per model."
        )
    freqs = found[0]
    n = int(freqs.numel())
    config = getattr(original, "config", None)
    adjacent = getattr(config, "model_type", "") in _ADJACENT_TYPES or bool(
        getattr(model.cfg, "rotary_adjacent_pairs", False)
    )
    if adjacent:
        pairs = torch.stack([torch.arange(0, 2 * n, 2), torch.arange(1, 2 * n, 2)], 1)
    else:
        pairs = torch.stack([torch.arange(n), torch.arange(n) + n], 1)
    return pairs, freqs, "adjacent" if adjacent else "rotate_half"


def _inv_freqs(module: torch.nn.Module) -> list[torch.Tensor]:
    """The distinct ``inv_freq`` buffers of a HuggingFace model (a bridge wraps some modules twice)."""
    out: list[torch.Tensor] = []
    for sub in module.modules():
        buffer = getattr(sub, "inv_freq", None)
        if isinstance(buffer, torch.Tensor):
            t = buffer.detach().float().cpu()
            if not any(t.shape == o.shape and torch.equal(t, o) for o in out):
                out.append(t)
    return out


@dataclass(frozen=True, repr=False)
class QKMassiveValues(SummedResult):
    """Mean norm of each rotary pair of q and k per layer and head, its ratio to the head's median pair.

    ``sums``: float64 running sums over every real token: ``q`` ``[layer, head, pair]`` and
    ``k`` ``[layer, kv_head, pair]`` (pair norms), ``tokens`` (how many). :meth:`merge`
    adds them: results of consecutive slices of a corpus merge to the whole, exactly.
    A pair is *massive* when its ratio to the median pair of its head is at least
    ``min_ratio``; :meth:`summary` says how many are, and how many of them lie in the
    low-frequency half (frequency below the median frequency).

    >>> import torch
    >>> from massact_lens.examples import tiny_model
    >>> model, tokens = tiny_model("llama"), torch.randint(0, 64, (4, 8))
    >>> parts = [qk_massive_values(model, t, progress=False) for t in (tokens[:1], tokens[1:])]
    >>> torch.allclose(QKMassiveValues.merge(parts).q_norm, qk_massive_values(model, tokens, progress=False).q_norm)
    True
    """

    #: The dims of each pair (of a head): ``[pair, 2]``.
    pairs: Int[torch.Tensor, "pair two"]
    #: Each pair's rotary frequency, radians per token.
    frequencies: Float[torch.Tensor, " pair"]
    #: ``"rotate_half"`` (dims i, i + d_rot/2) or ``"adjacent"`` (2i, 2i + 1).
    pairing: str
    #: The ratio to the median pair from which a pair counts as massive.
    min_ratio: float
    #: Where q and k were read, per kind (post-rotary hooks where they fire).
    hook_names: tuple[str, ...]
    #: BOS put first (None: token tensors as given).
    prepend_bos: bool | None
    #: A digest of the model's weights: parts of other weights do not merge.
    weights: str = field(default="", repr=False)

    merge_same: ClassVar[tuple[str, ...]] = (
        "layers",
        "pairs",
        "frequencies",
        "pairing",
        "min_ratio",
        "prepend_bos",
    )

    @classmethod
    def _merged(cls, parts: list[QKMassiveValues]) -> QKMassiveValues:
        return replace(
            parts[0],
            n_inputs=sum(p.n_inputs for p in parts),
            sums=add_sums([p.sums for p in parts]),
        )

    @property
    def n_tokens(self) -> int:
        return int(self.sums["tokens"])

    @property
    def q_norm(self) -> Float[torch.Tensor, "layer head pair"]:
        """Mean norm of each query pair over real tokens."""
        return (self.sums["q"] / self.sums["tokens"].clamp_min(1)).float()

    @property
    def k_norm(self) -> Float[torch.Tensor, "layer kv_head pair"]:
        """Mean norm of each key pair over real tokens (per KV head)."""
        return (self.sums["k"] / self.sums["tokens"].clamp_min(1)).float()

    def ratio(self, kind: Kind = "q") -> Float[torch.Tensor, "layer head pair"]:
        """Each pair's mean norm over the median of its head's pairs (the middle two averaged)."""
        norm = self._norm(kind)
        return norm / torch.quantile(norm, 0.5, dim=-1, keepdim=True).clamp_min(
            torch.finfo(torch.float32).tiny
        )

    def _norm(self, kind: str) -> torch.Tensor:
        if kind not in ("q", "k"):
            raise ValueError(f"kind must be 'q' or 'k', not {kind!r}.")
        return self.q_norm if kind == "q" else self.k_norm

    def massive(self, kind: Kind = "q") -> torch.Tensor:
        """Bool ``[layer, head, pair]``: ratio to the median pair >= ``min_ratio``."""
        return self.ratio(kind) >= self.min_ratio

    @property
    def low_frequency(self) -> torch.Tensor:
        """Bool ``[pair]``: the pair's frequency is below the median frequency (the slow half)."""
        return self.frequencies < torch.quantile(self.frequencies, 0.5)

    def summary(self) -> pd.DataFrame:
        """Per kind: massive pairs (over layers and heads), how many in the low-frequency half, and
        the pair indices most often massive with their frequencies."""
        rows = []
        for kind in ("q", "k"):
            massive = self.massive(kind)
            per_pair = massive.sum((0, 1))
            top = [int(i) for i in per_pair.argsort(descending=True)[:3] if per_pair[i] > 0]
            n = int(massive.sum())
            low = int(massive[..., self.low_frequency].sum())
            rows.append(
                {
                    "kind": kind,
                    "massive_pairs": n,
                    "of_pairs": int(massive.numel()),
                    "low_frequency_share": low / n if n else float("nan"),
                    "top_pairs": top,
                    "top_frequencies": [float(self.frequencies[i]) for i in top],
                }
            )
        return pd.DataFrame(rows)

    def _summary_lines(self) -> list[str]:
        out = [
            f"{self.n_tokens} tokens, {len(self.frequencies)} rotary pairs ({self.pairing}), min_ratio {self.min_ratio:g}"
        ]
        for row in self.summary().itertuples():
            share = (
                ""
                if row.massive_pairs == 0
                else f", {row.low_frequency_share:.0%} low-frequency, most often pairs {row.top_pairs}"
            )
            out.append(f"{row.kind}: {row.massive_pairs} of {row.of_pairs} pairs massive{share}")
        return out

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (kind, layer, head, pair): ``dims``, ``frequency`` (rad/token),
        ``wavelength`` (tokens per turn), ``norm``, ``ratio``, ``massive``, ``low_frequency``.
        Keys are per KV head."""
        frames = []
        for kind in ("q", "k"):
            norm, ratio = self._norm(kind), self.ratio(kind)
            n_layers, n_heads, n_pairs = norm.shape
            layer, head, pair = torch.meshgrid(
                torch.arange(n_layers), torch.arange(n_heads), torch.arange(n_pairs), indexing="ij"
            )
            frames.append(
                pd.DataFrame(
                    {
                        "kind": kind,
                        "layer": torch.tensor(self.layers)[layer.flatten()].numpy(),
                        "head": head.flatten().numpy(),
                        "pair": pair.flatten().numpy(),
                        "dim_a": self.pairs[pair.flatten(), 0].numpy(),
                        "dim_b": self.pairs[pair.flatten(), 1].numpy(),
                        "frequency": self.frequencies[pair.flatten()].numpy(),
                        "wavelength": (2 * torch.pi / self.frequencies[pair.flatten()]).numpy(),
                        "norm": norm.flatten().numpy(),
                        "ratio": ratio.flatten().numpy(),
                        "massive": (ratio >= self.min_ratio).flatten().numpy(),
                        "low_frequency": self.low_frequency[pair.flatten()].numpy(),
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)


class _PairNorms:
    """The measurement: per chosen layer, q and k pair norms summed over real tokens (float64)."""

    reads_input_index = True
    needs_output = False

    def __init__(
        self, layers: tuple[int, ...], pairs: torch.Tensor, n_heads: int, n_kv: int, known: Any
    ) -> None:
        self.layers, self.pairs, self.known = layers, pairs, known
        n = int(pairs.shape[0])
        self.sums = {
            "q": torch.zeros(len(layers), n_heads, n, dtype=torch.float64),
            "k": torch.zeros(len(layers), n_kv, n, dtype=torch.float64),
            "tokens": torch.zeros((), dtype=torch.float64),
        }
        self.state: dict[tuple[int, str], torch.Tensor] = {}
        self.used: set[str] = set()
        #: Inputs whose q or k held a NaN / inf: left out of every sum, reported after the pass.
        self.nonfinite = NonFinite()
        self.real = torch.zeros(0, 0, dtype=torch.bool)

    def hooks(self, batch: Batch) -> HookList:
        self.state = {}
        self.real = batch.attention_mask.bool()
        out: HookList = []
        for layer in self.layers:
            for kind in ("q", "k"):
                out.append((attention_hook(kind, layer), self._read(layer, kind)))
                rotated = f"blocks.{layer}.attn.hook_rot_{kind}"
                if rotated in self.known:
                    out.append((rotated, self._read(layer, f"rot_{kind}")))
        return out

    def _read(self, layer: int, kind: str) -> Any:
        def read(tensor: torch.Tensor, hook: Any = None) -> None:  # noqa: ARG001
            pairs = self.pairs.to(tensor.device)
            x = tensor.detach().float()
            self.nonfinite.note(f"blocks.{layer}.attn.hook_{kind}", x, self.real, 1)
            self.state[(layer, kind)] = torch.sqrt(
                x[..., pairs[:, 0]] ** 2 + x[..., pairs[:, 1]] ** 2
            )  # [b, pos, h, pair]

        return read

    def update(self, batch: Batch, output: torch.Tensor | None) -> None:  # noqa: ARG002
        real = batch.attention_mask.bool() & ~self.nonfinite.end_batch(batch)[:, None]
        for i, layer in enumerate(self.layers):
            for kind in ("q", "k"):
                source = (
                    f"rot_{kind}" if (layer, f"rot_{kind}") in self.state else kind
                )  # post-rotary where it fires
                self.used.add(f"blocks.{{layer}}.attn.hook_{source}")
                norms = self.state[(layer, source)].double().cpu()
                self.sums[kind][i] += norms[real].sum(0)
        self.sums["tokens"] += int(real.sum())

    def result(self) -> dict[str, torch.Tensor]:
        return self.sums


def qk_massive_values(
    model: TransformerLensModel,
    inputs: Inputs,
    *,
    layers: Sequence[int] | None = None,
    min_ratio: float | int = 5.0,
    batch_size: int = 16,
    prepend_bos: bool | None = None,
    attention_mask: torch.Tensor | None = None,
    progress: bool = True,
) -> QKMassiveValues:
    """Per layer, head and rotary pair: the mean norm of q and of k over real tokens, its ratio
    to the head's median pair, the pair's frequency, and which pairs are massive.

    One pass per batch that stops after the last chosen layer's attention; memory holds the
    running sums only (``layers x heads x pairs`` per kind), whatever the corpus. Queries and
    keys are read after the rotary step where the model has those hooks (``hook_rot_q`` /
    ``hook_rot_k``, HF models), else before it (``hook_q`` / ``hook_k``): a rotation keeps
    each pair's norm, so both give the same numbers. Dims past the rotary part of a head
    (partial rotary) are not pairs and are left out.

    Args:
        layers: which layers (default all).
        min_ratio: a pair is massive when its norm is at least this many times its head's median pair.
        batch_size, prepend_bos, attention_mask, progress: as in the other attention measurements.

    Raises:
        ValueError: a model without rotary embeddings (GPT-2, BERT), a bad layer, threshold
            or input: before any forward pass.

    To zero a massive pair afterwards, zero its two rows of the query (key) projection,
    ``head * d_head + dim_a`` and ``head * d_head + dim_b`` of ``attn.q`` (``attn.k``, per KV
    head), with :func:`~massact_lens.interventions.edited_weights` (and the bias rows where the
    model has one): the pair is then 0 before and after the rotation. docs/beyond_the_paper.md
    has the example; the position edit hooks take ``[batch, pos, d]`` points, not the
    ``[batch, pos, head, d_head]`` of ``hook_q``.

    >>> import torch
    >>> from massact_lens.examples import tiny_model
    >>> qk = qk_massive_values(tiny_model("llama"), torch.randint(0, 64, (2, 6)), layers=[1], progress=False)
    >>> qk.n_tokens, list(qk.to_dataframe().columns[:5])
    (12, ['kind', 'layer', 'head', 'pair', 'dim_a'])
    """
    refuse_plain_hf(model, "qk_massive_values")
    pairs, frequencies, pairing = rotary_pairs(model)
    chosen = check_layers(model, layers, ("q", "k"))
    if (
        isinstance(min_ratio, bool)
        or not isinstance(min_ratio, int | float)
        or not min_ratio > 1
        or min_ratio == float("inf")
    ):
        raise ValueError(
            f"min_ratio must be a finite number above 1 (how many times the head's median pair), not {min_ratio!r}."
        )
    ratio = float(min_ratio)
    plan = plan_batches(
        model,
        inputs,
        batch_size=batch_size,
        attention_mask=attention_mask,
        prepend_bos=prepend_bos,
        by_length=True,
    )
    warn_if_processed(model)
    n_heads = int(model.cfg.n_heads)
    n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or n_heads)
    norms = _PairNorms(chosen, pairs, n_heads, n_kv, model.hook_dict)  # type: ignore[attr-defined]
    n_inputs = measure(model, plan, norms, progress=progress, desc="q/k pair norms")
    norms.nonfinite.warn("qk_massive_values")
    return QKMassiveValues(
        provenance=Provenance.of(model),
        layers=chosen,
        n_inputs=n_inputs,
        sums=norms.sums,
        pairs=pairs,
        frequencies=frequencies,
        pairing=pairing,
        min_ratio=ratio,
        hook_names=tuple(sorted(norms.used)),
        prepend_bos=plan.prepend_bos,
        weights=weights_fingerprint(model),
    )
