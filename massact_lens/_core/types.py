"""Types shared by every module: hook lists, inputs, and how a result was obtained.

>>> from massact_lens.examples import tiny_model
>>> Provenance.of(tiny_model()).n_layers
2
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from transformer_lens.model_protocol import TransformerLensModel

__all__ = ["HookFn", "HookList", "Inputs", "Provenance", "is_causal", "model_device", "warn_if_processed", "weights_processed"]

#: A TransformerLens forward hook: ``fn(activation, *, hook)``.
HookFn = Callable[..., Any]
#: What ``fwd_hooks`` takes: (hook name, hook function) pairs.
HookList = list[tuple[str, HookFn]]
#: What every measurement reads: strings, a token tensor ``[batch, pos]``, or an
#: iterable of batches (see :mod:`massact_lens._core.batching`).
Inputs = str | Sequence[str] | torch.Tensor | Iterable[Any]


@dataclass(frozen=True)
class Provenance:
    """How a result was obtained: the model as it was when it ran.

    Every result of the library carries one (``result.provenance``). Two results can
    be merged, and a profile applied to a model, only when their provenances agree
    (:meth:`check_same`).

    >>> p = Provenance("m", "LlamaForCausalLM", 2, 8, 2, "float32", False)
    >>> p.with_dtype("bfloat16").dtype
    'bfloat16'
    """

    #: ``cfg.model_name`` (a hub name or the folder's name).
    model_name: str
    #: ``cfg.architecture`` (the HuggingFace class, or "unknown").
    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    #: Parameter dtype while measuring ("float32", "bfloat16", ...).
    dtype: str
    #: True when the weights were folded / centred (TransformerLens processing).
    weights_processed: bool
    d_mlp: int = 0
    d_vocab: int = 0
    #: "LN", "RMS", ... (``cfg.normalization_type``).
    normalization: str = "unknown"

    @classmethod
    def of(cls, model: TransformerLensModel) -> Provenance:
        """The provenance of ``model`` as it is now."""
        cfg = model.cfg
        dtype = getattr(cfg, "dtype", None)
        with contextlib.suppress(AttributeError, StopIteration):
            dtype = next(model.parameters()).dtype  # type: ignore[attr-defined]
        return cls(
            model_name=str(getattr(cfg, "model_name", "unknown")),
            architecture=str(getattr(cfg, "architecture", None) or "unknown"),
            n_layers=int(cfg.n_layers),
            d_model=int(cfg.d_model),
            n_heads=int(getattr(cfg, "n_heads", 0) or 0),
            dtype=str(dtype).replace("torch.", ""),
            weights_processed=weights_processed(model),
            d_mlp=int(getattr(cfg, "d_mlp", 0) or 0),
            d_vocab=int(getattr(cfg, "d_vocab", 0) or 0),
            normalization=str(getattr(cfg, "normalization_type", None) or "unknown"),
        )

    def with_dtype(self, dtype: str) -> Provenance:
        """The same provenance at another dtype."""
        return type(self)(**{**asdict(self), "dtype": dtype})

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (for JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "data") -> Provenance:
        """Read :meth:`to_dict`'s output back; ``ValueError`` naming ``source`` and the field if it does not fit."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: 'provenance' must be an object, not {type(data).__name__}.")
        kinds = {"model_name": str, "architecture": str, "n_layers": int, "d_model": int,
                 "n_heads": int, "dtype": str, "weights_processed": bool, "d_mlp": int,
                 "d_vocab": int, "normalization": str}
        out = {}
        for f in fields(cls):
            if f.name not in data:
                if f.name in ("n_heads", "d_mlp", "d_vocab", "normalization"):  # not in 0.1 files
                    out[f.name] = 0 if f.name != "normalization" else "unknown"
                    continue
                raise ValueError(f"{source}: provenance has no field {f.name!r}.")
            value = data[f.name]
            kind = kinds[f.name]
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{source}: provenance.{f.name} must be an integer, not {value!r}.")
            if kind is not int and not isinstance(value, kind):
                raise ValueError(f"{source}: provenance.{f.name} must be {kind.__name__}, not {value!r}.")
            out[f.name] = value
        return cls(**out)

    def differences(self, other: Provenance, *, ignore: Sequence[str] = ()) -> list[str]:
        """The fields that differ, as ``"name: mine != theirs"`` strings."""
        return [
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in fields(self)
            if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name)
        ]

    def check_same(self, other: Provenance, what: str, *, ignore: Sequence[str] = ()) -> None:
        """Raise ``ValueError`` unless ``other`` describes the same model (``what`` names the pair)."""
        diff = self.differences(other, ignore=ignore)
        if diff:
            raise ValueError(
                f"{what} come from different models ({'; '.join(diff)}): use results and models of one "
                "model, loaded the same way (same weights, dtype and weight processing), or measure again "
                "with the model at hand."
            )


def is_causal(model: TransformerLensModel) -> bool:
    """True unless the model attends bidirectionally (BERT-like encoders).

    >>> from massact_lens.examples import tiny_model
    >>> is_causal(tiny_model())
    True
    """
    return str(getattr(model.cfg, "attention_dir", "causal")) != "bidirectional"


def model_device(model: TransformerLensModel) -> torch.device:
    """The device of the model's input embedding (where token ids must go).

    >>> from massact_lens.examples import tiny_model
    >>> model_device(tiny_model()).type
    'cpu'
    """
    with contextlib.suppress(AttributeError, StopIteration):
        device = next(model.parameters()).device  # type: ignore[attr-defined]
        if device.type != "meta":  # an offloaded embedding runs where accelerate puts it
            return device
    return torch.device(getattr(model.cfg, "device", None) or "cpu")


def weights_processed(model: TransformerLensModel) -> bool:
    """True when the model's weights were folded / centred (compatibility mode)."""
    return bool(getattr(model, "_weights_processed", False)) or bool(
        getattr(model.cfg, "layer_norm_folding", False)
    )


def warn_if_processed(model: TransformerLensModel, stacklevel: int = 3) -> None:
    """Warn that massive-activation values are shifted on a weight-processed model."""
    if weights_processed(model):
        warnings.warn(
            "This model's weights were processed (enable_compatibility_mode / fold_ln / "
            "centred writing weights): the residual stream has its mean over d_model removed, "
            "so massive-activation values and medians are shifted. Load with "
            "massact_lens.load_model(...) and do not call enable_compatibility_mode() to "
            "measure raw values.",
            UserWarning,
            stacklevel=stacklevel,
        )
