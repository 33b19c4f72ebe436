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

The library's passes then take two shortcuts that give the same numbers
(:mod:`massact_lens._core.fast_paths`): PyTorch's fused attention kernel whenever no
hook reads an attention pattern (switched through HuggingFace's public
``set_attn_implementation``, once per pass, restored after), and the bridge's
LLaMA-family attention and norms run by their own HuggingFace module whenever no hook
point inside them carries a hook (only on the TransformerLens releases this was
checked on). Set the environment variable ``MASSACT_LENS_EAGER=1`` to run every pass
with eager attention and the bridge's own components, e.g. to check a result against
the bridge's own code.

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

import importlib.util
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.types import Provenance, warn_if_processed, weights_processed
from massact_lens.models._placement import check_map_against_model, check_map_values

__all__ = [
    "load_model",
    "model_description",
    "warn_if_processed",
    "weights_processed",
]


def load_model(
    name_or_dir: str | os.PathLike[str] | torch.nn.Module,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    tokenizer: Any | None = None,
    hf_model: Any | None = None,
    device_map: str | dict[str, str | int] | None = None,
    max_memory: dict[str | int, str | int] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
) -> TransformerBridge:
    """Load a model as a raw-weight, eager-attention ``TransformerBridge``.

    Args:
        name_or_dir: a model-hub name (``"gpt2"``) or a local directory holding
            ``config.json``, the weights and the tokenizer files; or a HuggingFace model
            object already loaded (``AutoModelForCausalLM.from_pretrained(...)``): it is
            wrapped as it is (its dtype, devices and placement kept), with ``tokenizer``
            or the one found where it was loaded from.
        device: where to put the model (default: TransformerLens' choice).
        dtype: parameter dtype. Half precision is fine: every statistic of this
            library is computed in float32.
        tokenizer: a tokenizer to use instead of the one next to the weights.
        hf_model: an already loaded HuggingFace model. Use one fresh object per
            bridge: booting the same object twice strips the first bridge's
            attention hooks.
        device_map: for a model larger than one device: Accelerate's device map
            (``"auto"``, ``"balanced"``, or ``{module name: device | "cpu" | "disk"}``),
            passed to HuggingFace. Blocks then run on their own devices and every
            statistic is computed where its block runs. Weight processing
            (``enable_compatibility_mode``) is not supported on such a model.
        max_memory: with ``device_map="auto"``: memory per device (``{0: "70GiB", "cpu": "200GiB"}``).
        offload_folder: where Accelerate writes the blocks mapped to ``"disk"``.

    Raises:
        FileNotFoundError: ``name_or_dir`` looks like a path but does not exist.
        ValueError: ``name_or_dir`` is a file, not a folder; ``device`` together with
            ``device_map``; a ``"disk"`` map without ``offload_folder``; an offload folder
            that cannot be written; a ``device_map`` naming a module the model does not
            have or a device this torch does not have; a ``max_memory`` size that is not
            one; a placement that would offload tied weights to disk (all before any
            weight is read). HuggingFace's own errors keep their message.
        OSError: the hub is unreachable and the model is not in the local cache;
            the message says what to pass instead.
    """
    _check_dtype_device(dtype, device)
    if isinstance(name_or_dir, torch.nn.Module):
        return _wrap(name_or_dir, device, tokenizer, hf_model, device_map, max_memory, offload_folder)
    offload = _check_placement(device, device_map, max_memory, offload_folder)
    name = os.fspath(name_or_dir)
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and not _is_hub_id(name)
    path = Path(name).expanduser()
    if looks_like_path and not path.exists():
        raise FileNotFoundError(
            f"No directory {name!r}. Pass an existing folder with config.json and weights "
            "(as written by save_pretrained), or a model-hub name such as 'gpt2'."
        )
    if path.is_file():
        raise ValueError(
            f"{name!r} is a file, not a model folder: pass the folder that holds it (config.json + weights + "
            "tokenizer, as written by save_pretrained), or a model-hub name such as 'gpt2'."
        )
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{name!r} has no config.json: it is not a HuggingFace model folder. "
                "Pass the folder written by save_pretrained (config.json + weights + tokenizer)."
            )
        name = str(path.resolve())
    if device_map is not None:
        check_map_against_model(name, device_map, max_memory, dtype)
    try:
        model = TransformerBridge.boot_transformers(
            name, device=device, dtype=dtype, tokenizer=tokenizer, hf_model=hf_model, **offload
        )
    except Exception as error:
        if path.is_dir():
            if not _about_weights(error):
                raise
            raise ValueError(
                f"Could not load the weights in {name!r} ({type(error).__name__}: {error}). A weights "
                "file may be truncated or damaged: write the folder again (save_pretrained) or "
                "reinstall the package that ships it."
            ) from error
        if not isinstance(error, OSError):
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


def _about_weights(error: BaseException) -> bool:
    """True when a load error is about reading the weights files (not a setting HuggingFace refused)."""
    if "safetensor" in type(error).__name__.lower():
        return True
    if not isinstance(error, OSError | ValueError):
        return False
    text = str(error).lower()
    return any(word in text for word in ("safetensors", "header", "deserializ", "truncat", "incomplete metadata",
                                          "pytorch_model", "model.safetensors", "unable to load weights"))


def _wrap(hf: torch.nn.Module, device: Any, tokenizer: Any, hf_model: Any, device_map: Any, max_memory: Any,
          offload_folder: Any) -> TransformerBridge:
    """A bridge around a HuggingFace model object, with ``tokenizer`` or the one next to its weights."""
    config = getattr(hf, "config", None)
    if config is None or not hasattr(hf, "base_model_prefix"):
        raise TypeError(
            f"load_model takes a model name, a folder or a HuggingFace model (a PreTrainedModel), not "
            f"{type(hf).__name__}."
        )
    if hf_model is not None or device_map is not None or max_memory is not None or offload_folder is not None:
        raise ValueError(
            "This model is already loaded: its placement is its own. Pass it alone (load_model(model)), or "
            "pass its name or folder with device_map / hf_model instead."
        )
    name = str(getattr(config, "_name_or_path", "") or "")
    if tokenizer is None:
        tokenizer = _find_tokenizer(name)
    if device is not None:
        hf = hf.to(device)
    elif not getattr(hf, "hf_device_map", None):  # kept where it is (the bridge would record its default)
        device = next(hf.parameters()).device
    model = TransformerBridge.boot_transformers(name or type(hf).__name__, device=device, tokenizer=tokenizer,
                                                 hf_model=hf, dtype=next(hf.parameters()).dtype)
    model.eval()
    warn_if_processed(model)
    return model


def _find_tokenizer(name: str) -> Any:
    """The tokenizer saved where a model was loaded from; ValueError saying what to pass when there is none."""
    from transformers import AutoTokenizer

    if name:
        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError, KeyError):
            pass
    raise ValueError(
        f"No tokenizer found for this HuggingFace model (loaded from {name or 'a config, not a folder'!r}): pass "
        "tokenizer=AutoTokenizer.from_pretrained(...) with it."
    )


def _check_dtype_device(dtype: Any, device: Any) -> None:
    """TypeError / ValueError, before anything is read, for a dtype that is not a torch dtype or a
    device this torch cannot name or does not have."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch dtype, not {dtype!r}: pass e.g. dtype=torch.bfloat16.")
    if device is None:
        return
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device torch knows: pass 'cpu', 'cuda', 'cuda:1' or 'mps'.") from None
    if where.type == "cuda" and (not torch.cuda.is_available() or (where.index or 0) >= torch.cuda.device_count()):
        raise ValueError(
            f"device {device!r}: this torch sees {torch.cuda.device_count()} CUDA device(s): pass device='cpu' or "
            "one of those (cuda:0 ...)."
        )


def _check_placement(
    device: Any, device_map: Any, max_memory: Any, offload_folder: str | os.PathLike[str] | None
) -> dict[str, Any]:
    """Validate the big-model arguments before any weight is read; the keywords for the bridge."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ValueError("max_memory and offload_folder only apply with device_map (e.g. device_map='auto').")
        return {}
    if device is not None:
        raise ValueError("Pass either device or device_map, not both: with device_map, Accelerate places the blocks.")
    if not isinstance(device_map, str | dict):
        raise ValueError(f"device_map must be a string ('auto', 'balanced', ...) or a dict, not {type(device_map).__name__}.")
    if importlib.util.find_spec("accelerate") is None:
        raise ModuleNotFoundError("device_map needs HuggingFace Accelerate: pip install accelerate")
    check_map_values(device_map, max_memory)
    out: dict[str, Any] = {"device_map": device_map, "max_memory": max_memory}
    if offload_folder is not None:
        folder = Path(offload_folder).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise ValueError(
                f"The offload folder {os.fspath(folder)!r} cannot be written ({error.strerror or error}). "
                "Pass an offload_folder on a writable disk with room for the offloaded weights."
            ) from None
        out["offload_folder"] = str(folder)
    elif isinstance(device_map, dict) and "disk" in device_map.values():
        raise ValueError("device_map sends blocks to 'disk': pass offload_folder=... (a writable folder).")
    return out


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


def model_description(model: TransformerLensModel) -> dict[str, Any]:
    """How a model was loaded, as a plain dict: ``Provenance.of(model).to_dict()``.

    Results carry a typed :class:`~massact_lens.Provenance`; this dict form is kept
    for code written against 0.1.

    >>> from massact_lens.examples import tiny_model
    >>> model_description(tiny_model())["n_layers"]
    2
    """
    return Provenance.of(model).to_dict()
