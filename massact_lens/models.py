"""Load a TransformerBridge with raw weights, and describe how a model was loaded.

Background
----------
Massive activations are properties of the *raw* residual stream. TransformerLens'
``enable_compatibility_mode()`` folds LayerNorms and centres the writing weights,
which subtracts the mean over ``d_model`` from everything written to the residual
stream: a 2,000-valued entry comes out shifted, and the median changes too. A
bridge from :func:`load_model` keeps the HuggingFace weights untouched and eager
attention (so ``hook_pattern`` is filled); :func:`warn_if_processed` flags a model
whose weights were processed.

Usage
-----
>>> from massact_lens import load_model
>>> model = load_model("gpt2")                              # doctest: +SKIP
>>> model = load_model("/path/to/a/save_pretrained/folder") # doctest: +SKIP

References
----------
Sun, Chen, Kolter, Liu. *Massive Activations in Large Language Models*, COLM 2024.
"""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from pathlib import Path
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_protocol import TransformerLensModel

__all__ = ["hub_reachable", "load_model", "model_description", "weights_processed", "warn_if_processed"]


def load_model(
    name_or_dir: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    tokenizer: Any | None = None,
    hf_model: Any | None = None,
) -> TransformerBridge:
    """Load a model as a raw-weight, eager-attention ``TransformerBridge``.

    Args:
        name_or_dir: a model-hub name (``"gpt2"``) or a local directory holding
            ``config.json``, the weights and the tokenizer files.
        device: where to put the model (default: TransformerLens' choice).
        dtype: parameter dtype. Half precision is fine: every statistic of this
            library is computed in float32.
        tokenizer: a tokenizer to use instead of the one next to the weights.
        hf_model: an already loaded HuggingFace model. Use one fresh object per
            bridge: booting the same object twice strips the first bridge's
            attention hooks.

    Raises:
        FileNotFoundError: ``name_or_dir`` looks like a path but does not exist.
        OSError: the hub is unreachable and the model is not in the local cache;
            the message says what to pass instead.
    """
    name = os.fspath(name_or_dir)
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and not _is_hub_id(name)
    path = Path(name).expanduser()
    if looks_like_path and not path.exists():
        raise FileNotFoundError(
            f"No directory {name!r}. Pass an existing folder with config.json and weights "
            "(as written by save_pretrained), or a model-hub name such as 'gpt2'."
        )
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{name!r} has no config.json: it is not a HuggingFace model folder. "
                "Pass the folder written by save_pretrained (config.json + weights + tokenizer)."
            )
        name = str(path.resolve())
    try:
        model = TransformerBridge.boot_transformers(
            name, device=device, dtype=dtype, tokenizer=tokenizer, hf_model=hf_model
        )
    except OSError as error:
        if path.is_dir():
            raise
        raise OSError(
            f"Could not load {name!r}: the model hub is unreachable and the model is not in "
            "the local HuggingFace cache. Pass a local directory instead "
            "(load_model('/path/to/folder'), a folder written by save_pretrained), or use the "
            "bundled real model: massact_lens.examples.minilm()."
        ) from error
    model.eval()
    warn_if_processed(model)
    return model


def _is_hub_id(name: str) -> bool:
    """``owner/name`` hub ids contain one slash and no leading dot or slash."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the HuggingFace hub answers a TCP connection within ``timeout`` seconds.

    A cheap check before work that would otherwise spend ~25 s in retries offline.
    """
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


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


def model_description(model: TransformerLensModel) -> dict[str, Any]:
    """How a model was loaded, as recorded in every result of the library.

    >>> from massact_lens.examples import tiny_model
    >>> model_description(tiny_model())["n_layers"]
    2
    """
    cfg = model.cfg
    dtype = getattr(cfg, "dtype", None)
    with contextlib.suppress(AttributeError, StopIteration):
        dtype = next(model.parameters()).dtype  # type: ignore[attr-defined]
    return {
        "model_name": str(getattr(cfg, "model_name", "unknown")),
        "architecture": str(getattr(cfg, "architecture", None) or "unknown"),
        "n_layers": int(cfg.n_layers),
        "d_model": int(cfg.d_model),
        "dtype": str(dtype).replace("torch.", ""),
        "weights_processed": weights_processed(model),
    }
