"""Checks of a big-model placement (``device_map``, ``max_memory``) before any weight is read.

:func:`check_map_values` validates what needs no model: the device map's strategy or
devices (those this torch has), and ``max_memory``'s devices and sizes.
:func:`check_map_against_model` builds the model's HuggingFace skeleton with no weights
(meta tensors: its config only) and checks that every module a map names exists, and
that no tied weight would be offloaded to disk (Accelerate cannot: its offload index
never receives the tied copy, and the load ends in a ``KeyError``).

>>> check_map_values({"": "cpu"}, {"cpu": "2GiB"})
>>> check_map_values({"": "cuda:99"}, None)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: device_map sends '' to 'cuda:99', but ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch

#: The strategies HuggingFace accepts as a device_map string.
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_problem(device: Any) -> str | None:
    """Why this torch cannot place weights on ``device`` (None: it can)."""
    if isinstance(device, bool):
        return "is not a device"
    if isinstance(device, int):
        device = f"cuda:{device}"
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        return "is not a device"
    if device in ("cpu", "disk"):
        return None
    kind, _, index = device.partition(":")
    if kind == "mps":
        return None if torch.backends.mps.is_available() else "but MPS is not available here"
    backend = getattr(torch, kind, None) if kind in ("xpu", "npu", "mlu", "hpu") else None
    if backend is not None:
        return None if backend.is_available() else f"but {kind} is not available here"
    if kind != "cuda" or (index and not index.isdigit()):
        return "is not a device (use 'cpu', 'disk', a GPU index such as 0, or 'cuda:0')"
    if not torch.cuda.is_available():
        return "but this torch has no CUDA (a CPU-only build, or no GPU visible)"
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        return f"but this machine has {count} CUDA device(s) (0..{count - 1})"
    return None


def _check_size(key: Any, value: Any) -> None:
    from accelerate.utils import convert_file_size_to_int

    try:
        ok = not isinstance(value, bool) and int(convert_file_size_to_int(value)) >= 0
    except (ValueError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise ValueError(
            f"max_memory[{key!r}] = {value!r} is not a size: give a number of bytes or a string with a "
            "unit, like '5GiB' or '500MB'."
        )


def check_map_values(device_map: Any, max_memory: Any) -> None:
    """ValueError (saying what to pass) for a strategy, device or memory size this torch cannot use."""
    if isinstance(device_map, str) and device_map not in STRATEGIES:
        problem = _device_problem(device_map)
        if problem is not None:
            raise ValueError(
                f"device_map={device_map!r} is neither a strategy ({', '.join(map(repr, STRATEGIES))}) nor a "
                "device: pass one of those, a device ('cpu', 'cuda:0') or a dict {module name: device}."
            )
    if isinstance(device_map, Mapping):
        for module, device in device_map.items():
            problem = _device_problem(device)
            if problem is not None:
                raise ValueError(
                    f"device_map sends {module!r} to {device!r}, {problem}: map it to a device this "
                    "machine has ('cpu', 'disk', or a GPU index it lists in torch.cuda.device_count())."
                )
    if max_memory is None:
        return
    if not isinstance(max_memory, Mapping):
        raise ValueError(f"max_memory must be a dict {{device: size}}, like {{0: '70GiB', 'cpu': '200GiB'}}, not {max_memory!r}.")
    for key, value in max_memory.items():
        problem = _device_problem(key)
        if problem is not None:
            raise ValueError(
                f"max_memory has the key {key!r}, which {problem}: use the devices of this machine "
                "('cpu', 'disk' or GPU indices such as 0)."
            )
        _check_size(key, value)


def skeleton(name: str) -> torch.nn.Module | None:
    """The HuggingFace model ``name`` with no weights (meta tensors), as the bridge would
    build it; None when its config cannot be read here (the load then says why)."""
    try:
        from accelerate import init_empty_weights
        from transformer_lens.model_bridge.sources._hf_format import (
            determine_architecture_from_hf_config,
        )
        from transformer_lens.model_bridge.sources.transformers.helpers import (
            get_hf_model_class_for_architecture,
        )
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name)
        model_class = get_hf_model_class_for_architecture(determine_architecture_from_hf_config(config))
        with init_empty_weights(), contextlib.redirect_stdout(None):
            model = model_class.from_config(config)
        model.tie_weights()  # as from_pretrained does (outside init_empty_weights, or nothing is tied)
        return model
    except Exception:  # noqa: BLE001 (a best-effort check: the load itself reports any real problem)
        return None


def _placed(name: str, device_map: Mapping[str, Any]) -> Any:
    """Where ``device_map`` puts the parameter ``name`` (its longest matching module)."""
    best = None
    for module in device_map:
        matches = module == "" or name == module or name.startswith(f"{module}.")
        if matches and (best is None or len(module) > len(best)):
            best = module
    return None if best is None else device_map[best]


def _inferred_map(model: torch.nn.Module, max_memory: Any, dtype: torch.dtype) -> dict[str, Any] | None:
    """The map Accelerate would choose for ``"auto"`` (None when it cannot be computed here)."""
    try:
        from accelerate import infer_auto_device_map

        return dict(infer_auto_device_map(model, max_memory=max_memory, dtype=dtype,
                                          no_split_module_classes=list(getattr(model, "_no_split_modules", None) or [])))
    except Exception:  # noqa: BLE001 (best effort, as above)
        return None


def check_map_against_model(name: str, device_map: Any, max_memory: Any, dtype: torch.dtype) -> None:
    """ValueError when ``device_map`` names a module ``name``'s model does not have, or would
    offload a tied weight to disk; nothing when the model's config cannot be read here."""
    model = skeleton(name)
    if model is None:
        return
    modules = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    if isinstance(device_map, Mapping):
        unknown = [k for k in device_map if k != "" and k not in modules]
        if unknown:
            examples = [n for n, _ in model.named_modules() if n and n.count(".") <= 1][:6]
            raise ValueError(
                f"device_map names modules this model does not have: {unknown[:3]}. Name modules of the "
                f"HuggingFace model as model.named_modules() lists them (here, e.g. {examples})."
            )
        placed = dict(device_map)
    else:
        placed = _inferred_map(model, max_memory, dtype) or {}
    from accelerate.utils import find_tied_parameters

    tied = [group for group in find_tied_parameters(model) if any(_placed(p, placed) == "disk" for p in group)]
    if tied:
        raise ValueError(
            f"This placement would offload tied weights to disk ({', '.join(tied[0])}), which Accelerate cannot "
            "do (its offload index never receives the tied copy). Keep the modules that hold them on a device: "
            "give max_memory room for the whole model, or pass a device_map dict that maps them to 'cpu' and "
            "only blocks to 'disk'."
        )
