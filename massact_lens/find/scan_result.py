"""What a scan keeps (:class:`ScanResult`), and the range check every scan runs on it.

A :class:`ScanResult` holds, per (input, hook) hidden state, the top-k ``|x|``
entries and the median ``|x|`` (:func:`massact_lens.find.scan` makes one).
A massive activation can be larger than float16 holds (65,504: Gemma-3-270m's reaches
~104,000): :func:`check_range` warns when a scan's values leave (or come near the edge
of) the model's dtype, or would overflow float16.

>>> import torch
>>> from massact_lens.examples import tiny_model
>>> from massact_lens.models.planting import plant_massive_activation
>>> from massact_lens.find import scan
>>> model = plant_massive_activation(tiny_model("llama", n_layers=3), layer=1, dim=5, value=70000.0)
>>> import warnings
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     result = scan(model, torch.zeros(1, 4, dtype=torch.long), progress=False)  # warns
>>> round(check_range(result, stacklevel=1)), "exceeds float16" in str(caught[0].message)
(70000, True)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from massact_lens._core.hook_names import layer_of
from massact_lens._core.results import CorpusResult
from massact_lens._core.types import Provenance

__all__ = ["ScanResult"]

FLOAT16_MAX = float(torch.finfo(torch.float16).max)


@dataclass(frozen=True, kw_only=True, repr=False)
class ScanResult(CorpusResult):
    """The top-k entries and medians of every (input, hook) hidden state.

    Attributes:
        provenance: the model as it was measured (:class:`massact_lens.Provenance`).
        hook_names: the hook points read, in forward order; ``layers`` their blocks.
        n_inputs: the inputs scanned.
        prepend_bos: BOS prepended to strings (None: token tensors used as given).
        values: signed values of the top-k ``|x|`` entries, ``[input, hook, k]``
            (NaN where a hidden state has fewer than k entries).
        positions, dims, token_ids: where each entry sits (-1 for NaN entries).
        medians: median ``|x|`` of each hidden state, ``[input, hook]``.
        lengths: real tokens per input.
        tokens: id -> readable string, for the ids that appear in the entries.
        nonfinite: ``[input, hook]``, True where the hidden state held a NaN or an
            infinite entry: its median is NaN and :func:`find_massive` and
            :meth:`layer_stats` leave it out, saying so.
        column_medians: ``[input, hook, k]``, per kept entry the median ``|x|`` of its
            dim over the input's real positions (NaN where the entry is missing): a
            dim large on most tokens of a hidden state (an outlier channel) shows here,
            which the top-k entries alone cannot show. :func:`find_massive` lists such
            entries apart (``channel_wide``). None in a result made without them.
        weights: a digest of the model's weights
            (:func:`~massact_lens._core._fingerprint.weights_fingerprint`; "" when unknown):
            scans of a model of the same name and shape but other weights do not merge, and
            records of this scan used on another model are refused or warned about.

    Scans of consecutive slices of a corpus merge (:meth:`merge`) into exactly the result
    one scan of the concatenated inputs gives (input ``i`` of part ``j`` becomes input
    ``sum(n_inputs of parts before j) + i``). The parts must come from the same model,
    hooks, top_k and BOS setting, and the same weights (ValueError otherwise); parts with no input (empty
    shards, :meth:`empty`) are allowed.

    >>> import torch
    >>> from massact_lens.examples import tiny_model
    >>> from massact_lens.find import scan
    >>> model = tiny_model()
    >>> tokens = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(0))
    >>> parts = [scan(model, tokens[:1], progress=False), scan(model, tokens[1:], progress=False)]
    >>> merged, whole = ScanResult.merge(parts), scan(model, tokens, progress=False)
    >>> merged.n_inputs, torch.allclose(merged.values, whole.values, atol=1e-6)  # batch shapes round apart
    (4, True)
    """

    hook_names: tuple[str, ...]
    prepend_bos: bool | None
    top_k: int
    values: Float[torch.Tensor, "n_inputs n_hooks k"]
    positions: Int[torch.Tensor, "n_inputs n_hooks k"]  # int32, like dims and token_ids
    dims: Int[torch.Tensor, "n_inputs n_hooks k"]
    token_ids: Int[torch.Tensor, "n_inputs n_hooks k"]
    medians: Float[torch.Tensor, "n_inputs n_hooks"]
    lengths: Int[torch.Tensor, " n_inputs"]
    tokens: dict[int, str] = field(repr=False)
    nonfinite: Bool[torch.Tensor, "n_inputs n_hooks"] | None = None
    column_medians: Float[torch.Tensor, "n_inputs n_hooks k"] | None = None
    weights: str = ""

    merge_same: ClassVar[tuple[str, ...]] = ("hook_names", "top_k", "prepend_bos")

    @classmethod
    def _merged(cls, parts: list[ScanResult]) -> ScanResult:
        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(p, name) for p in parts])

        tokens: dict[int, str] = {}
        for part in parts:
            tokens.update(part.tokens)
        nonfinite = torch.cat(
            [p.nonfinite if p.nonfinite is not None else torch.zeros(p.medians.shape, dtype=torch.bool) for p in parts]
        )
        first = parts[0]
        fields = {name: cat(name) for name in ("values", "positions", "dims", "token_ids", "medians", "lengths")}
        with_columns = all(p.column_medians is not None for p in parts)  # else unknown for some inputs: none
        return cls(provenance=first.provenance, layers=first.layers, n_inputs=sum(p.n_inputs for p in parts),
                   hook_names=first.hook_names, prepend_bos=first.prepend_bos, top_k=first.top_k,
                   tokens=tokens, nonfinite=nonfinite, column_medians=cat("column_medians") if with_columns else None,
                   weights=next((p.weights for p in parts if p.weights), ""), **fields)

    @classmethod
    def empty(
        cls, provenance: Provenance, hook_names: Sequence[str], top_k: int, prepend_bos: bool | None,
        weights: str = "",
    ) -> ScanResult:
        """A result of no input (what a rank with an empty shard contributes to a merge)."""
        n_hooks = len(hook_names)
        ints = torch.zeros(0, n_hooks, top_k, dtype=torch.int32)
        return cls(
            provenance=provenance,
            hook_names=tuple(hook_names),
            layers=tuple(layer_of(n) for n in hook_names),
            n_inputs=0,
            prepend_bos=prepend_bos,
            top_k=top_k,
            values=torch.zeros(0, n_hooks, top_k),
            positions=ints,
            dims=ints.clone(),
            token_ids=ints.clone(),
            medians=torch.zeros(0, n_hooks),
            lengths=torch.zeros(0, dtype=torch.long),
            tokens={},
            nonfinite=torch.zeros(0, n_hooks, dtype=torch.bool),
            column_medians=torch.zeros(0, n_hooks, top_k),
            weights=weights,
        )

    def nonfinite_states(self) -> list[tuple[int, str]]:
        """(input index, hook name) of every hidden state that held a NaN or inf."""
        if self.nonfinite is None:
            return []
        return [(int(i), self.hook_names[int(h)]) for i, h in self.nonfinite.nonzero().tolist()]

    def warn_nonfinite(self, stacklevel: int = 2) -> None:
        """Warn (``RuntimeWarning``) when some hidden state held a NaN or inf."""
        bad = self.nonfinite_states()
        if bad:
            shown = ", ".join(f"input {i} at {h}" for i, h in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            warnings.warn(
                f"{len(bad)} hidden state(s) held NaN or infinite values ({shown}{more}): their "
                "medians are NaN and find_massive / layer_stats leave them out. Check the "
                "model's dtype and any hook that runs before these points.",
                RuntimeWarning,
                stacklevel=stacklevel,
            )

    def token(self, token_id: int) -> str:
        """The readable string of a token id seen in the entries."""
        return self.tokens.get(int(token_id), str(int(token_id)))

    def layer_stats(self) -> pd.DataFrame:
        """The paper's layer-wise plot data: per hook, top-1/2/3 ``|x|`` and median.

        Each column is the mean over inputs; ``ratio`` is the mean of top1/median,
        ``top1_std`` the spread of top-1 across inputs. Hidden states that held a NaN
        or inf are left out: ``n_inputs`` counts those used, ``n_nonfinite`` the others.
        """
        bad = self.nonfinite if self.nonfinite is not None else torch.zeros(self.medians.shape, dtype=torch.bool)
        mags = self.values.abs().masked_fill(bad[..., None], float("nan"))
        rows = []
        for h, name in enumerate(self.hook_names):
            top = [mags[:, h, i] if i < self.top_k else torch.full_like(mags[:, h, 0], float("nan")) for i in range(3)]
            med = self.medians[:, h].masked_fill(bad[:, h], float("nan"))
            finite_top1 = top[0][~torch.isnan(top[0])]
            rows.append(
                {
                    "layer": self.layers[h],
                    "hook_name": name,
                    "top1": float(top[0].nanmean()),
                    "top2": float(top[1].nanmean()),
                    "top3": float(top[2].nanmean()),
                    "median": float(med.nanmean()),
                    "ratio": float((top[0] / med).nanmean()),
                    "top1_std": float(finite_top1.std()) if finite_top1.numel() > 1 else 0.0,
                    "n_inputs": self.n_inputs - int(bad[:, h].sum()),
                    "n_nonfinite": int(bad[:, h].sum()),
                }
            )
        return pd.DataFrame(rows)

    def to_dataframe(self) -> pd.DataFrame:
        """Every kept entry as a row: input, layer, hook, rank, position, token, dim, value, median, ratio."""
        n, h, k = self.values.shape
        keep = ~torch.isnan(self.values)
        idx = keep.nonzero()
        i, j, r = idx[:, 0], idx[:, 1], idx[:, 2]
        values = self.values[i, j, r]
        medians = self.medians[i, j]
        return pd.DataFrame(
            {
                "input_index": i.numpy(),
                "layer": [self.layers[x] for x in j.tolist()],
                "hook_name": [self.hook_names[x] for x in j.tolist()],
                "rank": r.numpy(),
                "position": self.positions[i, j, r].numpy(),
                "token": [self.token(t) for t in self.token_ids[i, j, r].tolist()],
                "dim": self.dims[i, j, r].numpy(),
                "value": values.numpy(),
                "median": medians.numpy(),
                "ratio": (values.abs() / medians).numpy(),
            }
        )


def check_range(result: ScanResult, *, margin: float = 0.5, stacklevel: int = 2) -> float:
    """Warn when the scan's largest ``|x|`` leaves or nears the range of a half dtype.

    * The model runs in float16 and some hidden state overflowed (inf / NaN), or a
      kept value is above ``margin`` x 65,504 (the sums that produce it may overflow).
    * The model runs in a wider dtype but a value is above float16's 65,504: the same
      model in float16 would overflow there.

    Returns the largest finite ``|x|`` seen.
    """
    finite = result.values[torch.isfinite(result.values)]
    largest = float(finite.abs().max()) if finite.numel() else 0.0
    dtype = result.provenance.dtype
    where = _where_largest(result)
    if dtype == "float16":
        if result.nonfinite is not None and bool(result.nonfinite.any()):
            warnings.warn(
                f"Hidden states overflowed in float16 (which holds |x| <= {FLOAT16_MAX:,.0f}): massive "
                "activations can exceed it. Load the model in bfloat16 or float32 "
                "(load_model(..., dtype=torch.bfloat16)).",
                RuntimeWarning,
                stacklevel=stacklevel,
            )
        elif largest > margin * FLOAT16_MAX:
            warnings.warn(
                f"A massive value of {largest:,.0f} ({where}) is within {1 / margin:g}x of float16's "
                f"maximum {FLOAT16_MAX:,.0f}: sums that produce it may overflow. Prefer bfloat16 or float32.",
                RuntimeWarning,
                stacklevel=stacklevel,
            )
    elif largest > FLOAT16_MAX:
        warnings.warn(
            f"A massive value of {largest:,.0f} ({where}) exceeds float16's maximum {FLOAT16_MAX:,.0f}: "
            "this model overflows if run in float16. Use bfloat16 or float32.",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
    return largest


def _where_largest(result: ScanResult) -> str:
    values = result.values.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    if values.numel() == 0:
        return "nowhere"
    i, h, k = (int(x) for x in torch.unravel_index(values.argmax(), values.shape))
    return f"input {i}, {result.hook_names[h]}, position {int(result.positions[i, h, k])}, dim {int(result.dims[i, h, k])}"
