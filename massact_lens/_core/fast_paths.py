"""The bridge's components run by their own HuggingFace module when nothing reads inside.

TransformerBridge wraps every HuggingFace module in a component that fires the
TransformerLens hook points. Two of them recompute what HuggingFace already computes,
only so that inner hook points have something to fire on:

* the LLaMA-family attention (``PositionEmbeddingsAttentionBridge``: LLaMA, Mistral,
  Qwen, Gemma, SmolLM2, ...) reimplements attention step by step, in eager
  arithmetic, for ``hook_rot_q`` / ``hook_attn_scores`` / ``hook_pattern`` and the
  q/k/v/o hooks. On SmolLM2 at 500 tokens that costs a third of the forward pass: the
  [batch, head, query, key] scores are built, masked and soft-maxed whatever
  ``config._attn_implementation`` says;
* a normalisation (``NormalizationBridge`` on its native path, which every raw-weight
  model takes) computes mean, variance and scale for ``hook_scale`` /
  ``hook_normalized`` and then calls the HuggingFace module anyway.

:func:`lean_components` gives such a component, for the passes this library runs, a
forward that calls the HuggingFace module directly between the component's own
``hook_in`` and ``hook_out``, **decided at every call**: whenever any hook point
inside the component (``hook_pattern``, ``hook_scale``, ``q.hook_out``, ...) carries
a hook, forward or backward, ours or the user's, the component's own forward runs
instead, so every hook still sees what it always saw. Hooks on ``hook_in`` /
``hook_out`` of the component fire on both paths. The normalisation path is
bit-identical (the bridge returns the HuggingFace module's output there too); the
attention path runs the model's configured kernel (SDPA inside
:func:`massact_lens.models.load.fast_attention`) and agrees with the bridge's eager
arithmetic to float32 rounding (tests/test_fast_paths.py).

Every bridge component's call also enters accelerate's ``align_module_device`` on its
HuggingFace module (a generator context manager and an import per call, a few hundred
calls per short MiniLM forward pass): inside :func:`lean_components` a module with no accelerate hook at
all skips it (the same no-op; an offloaded module still aligns, see
:func:`_quick_align`). And every block call reads its HuggingFace layer's signature
(``inspect.signature``, parsed anew at every call) to filter the keyword arguments it passes on:
inside, the signature's parameter names are read once per forward function
(:func:`_filter_block_kwargs`: the same filter).

Left alone: models with processed weights (folded LayerNorm and friends change what
the HuggingFace module would compute), attention with TransformerLens's per-head
input / result modes switched on, calls that carry a KV cache, subclasses that
override the component's forward, and everything when ``MASSACT_LENS_EAGER=1``.

>>> from massact_lens.examples import tiny_model
>>> model = tiny_model()
>>> with lean_components(model) as n:
...     n > 0
True
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge.generalized_components import base as _component_base
from transformer_lens.model_bridge.generalized_components.block import BlockBridge
from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge
from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
    PositionEmbeddingsAttentionBridge,
)
from transformer_lens.model_protocol import TransformerLensModel

__all__ = [
    "attention_implementation",
    "fast_attention",
    "lean_components",
    "reads_attention_pattern",
    "wants_fast_attention",
]

#: TransformerLens config switches under which attention is computed per head.
_PER_HEAD_MODES = ("use_split_qkv_input", "use_attn_in", "use_attn_result")
#: Keyword arguments that carry a KV cache (the bridge keeps its own cache logic).
_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")

_installed: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()
_inner_cache: weakref.WeakKeyDictionary[torch.nn.Module, tuple[HookPoint, ...]] = weakref.WeakKeyDictionary()


def _inner_points(component: torch.nn.Module) -> tuple[HookPoint, ...]:
    """The hook points inside ``component`` other than its own hook_in / hook_out."""
    points = _inner_cache.get(component)
    if points is None:
        own = {id(component._modules.get("hook_in")), id(component._modules.get("hook_out"))}
        points = tuple(m for m in component.modules() if isinstance(m, HookPoint) and id(m) not in own)
        _inner_cache[component] = points
    return points


def _read_inside(component: torch.nn.Module) -> bool:
    """True when some hook point inside the component carries any hook."""
    return any(
        p._forward_hooks or p._forward_pre_hooks or p._backward_hooks or p._backward_pre_hooks
        for p in _inner_points(component)
    )


def _lean_attention(self: Any, *args: Any, **kwargs: Any) -> Any:
    config = self.config
    if (
        _read_inside(self)
        or any(bool(getattr(config, mode, False)) for mode in _PER_HEAD_MODES)
        or any(kwargs.get(name) is not None for name in _CACHE_KWARGS)
    ):
        return type(self).forward(self, *args, **kwargs)
    if "hidden_states" in kwargs:
        kwargs["hidden_states"] = self.hook_in(kwargs["hidden_states"])
    elif args and isinstance(args[0], torch.Tensor):
        args = (self.hook_in(args[0]), *args[1:])
    else:
        return type(self).forward(self, *args, **kwargs)
    output = self.original_component(*args, **kwargs)
    if isinstance(output, tuple):
        return (self.hook_out(output[0]), *output[1:])
    return self.hook_out(output)


def _lean_norm(self: Any, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    if _read_inside(self) or not _native_norm(self):
        return type(self).forward(self, hidden_states, **kwargs)
    hidden_states = self.hook_in(hidden_states)
    result = self.original_component(hidden_states)
    if result.dtype != hidden_states.dtype:
        result = result.to(hidden_states.dtype)
    return self.hook_out(result)


def _native_norm(component: Any) -> bool:
    """The bridge's own forward returns the HuggingFace module's output on this path."""
    config = component.config
    return bool(component.use_native_layernorm_autograd or getattr(config, "layer_norm_folding", False))


#: The bridge's own keyword filter (the lean one falls back to it).
_BLOCK_FILTER = BlockBridge._filter_kwargs_for_forward
#: Per HuggingFace forward function: its parameter names, and whether it takes **kwargs.
_signatures: weakref.WeakKeyDictionary[Any, tuple[tuple[str, ...], bool]] = weakref.WeakKeyDictionary()


def _filter_block_kwargs(self: Any, kwargs: dict[str, Any], num_positional_args: int = 0) -> dict[str, Any]:
    """``BlockBridge._filter_kwargs_for_forward`` (keep the keyword arguments the
    HuggingFace layer's forward accepts, but not those given positionally), with the
    signature read once per forward function instead of at every call. A forward set on
    the instance (accelerate's hooks wrap it so) takes the bridge's own path."""
    original = self._modules.get("_original_component")
    if original is None or "forward" in original.__dict__:
        return _BLOCK_FILTER(self, kwargs, num_positional_args)
    function = type(original).forward
    known = _signatures.get(function)
    if known is None:
        try:
            parameters = inspect.signature(original.forward).parameters
        except (ValueError, TypeError):
            return _BLOCK_FILTER(self, kwargs, num_positional_args)
        known = (tuple(parameters), any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()))
        _signatures[function] = known
    names, takes_any = known
    if takes_any:
        return kwargs
    given = names[:num_positional_args]
    return {k: v for k, v in kwargs.items() if k in names and k not in given}


def _lean_methods(module: torch.nn.Module) -> dict[str, Any]:
    """The lean methods for this component's class (attribute name: function)."""
    kind = type(module)
    if isinstance(module, PositionEmbeddingsAttentionBridge):
        unchanged = kind.forward is PositionEmbeddingsAttentionBridge.forward and (
            kind._pre_output_projection is PositionEmbeddingsAttentionBridge._pre_output_projection
        )
        return {"forward": _lean_attention} if unchanged else {}
    if isinstance(module, NormalizationBridge) and kind.forward is NormalizationBridge.forward:
        return {"forward": _lean_norm}
    if isinstance(module, BlockBridge) and kind._filter_kwargs_for_forward is _BLOCK_FILTER:
        return {"_filter_kwargs_for_forward": _filter_block_kwargs}
    return {}


_NO_OP = contextlib.nullcontext()  # stateless: one instance serves every call
_align_lock = threading.Lock()
_align_depth = 0
_accelerate_align: Any = None


def _quick_align(module: torch.nn.Module, execution_device: Any = None) -> Any:
    """accelerate's ``align_module_device`` for what TransformerBridge components call it
    on: a module with no ``_hf_hook`` (accelerate sets it as a plain attribute) has
    nothing to align, so the context is a no-op without the generator; any other module
    gets accelerate's own."""
    if execution_device is None and "_hf_hook" not in module.__dict__:
        return _NO_OP
    return _accelerate_align(module, execution_device)


def _install_quick_align() -> None:
    global _align_depth, _accelerate_align
    with _align_lock:
        if _align_depth == 0:
            _accelerate_align = _component_base.align_module_device
            _component_base.align_module_device = _quick_align
        _align_depth += 1


def _remove_quick_align() -> None:
    global _align_depth
    with _align_lock:
        _align_depth -= 1
        if _align_depth == 0 and _component_base.align_module_device is _quick_align:
            _component_base.align_module_device = _accelerate_align


@contextlib.contextmanager
def lean_components(model: torch.nn.Module) -> Iterator[int]:
    """Inside: the bridge's attention and norm components take the HuggingFace path
    whenever nothing reads inside them, and blocks filter their keyword arguments with
    a signature read once (see the module's docstring). Yields how many components were
    given the lean forward (0 when the model is left alone). Reentrant; restored on
    exit, also on error.
    """
    from massact_lens._core.types import weights_processed

    if os.environ.get("MASSACT_LENS_EAGER") == "1" or weights_processed(model):  # type: ignore[arg-type]
        yield 0
        return
    touched: list[tuple[torch.nn.Module, tuple[str, ...]]] = []
    _install_quick_align()
    try:
        for module in model.modules():
            lean = _lean_methods(module)
            if not lean or module._modules.get("_original_component") is None:
                continue
            depth = _installed.get(module, 0)
            if depth == 0:
                for name, function in lean.items():
                    # object.__setattr__: the bridge's own __setattr__ forwards unknown
                    # names to the HuggingFace module.
                    object.__setattr__(module, name, function.__get__(module))
            _installed[module] = depth + 1
            touched.append((module, tuple(lean)))
        yield sum(1 for _, names in touched if "forward" in names)
    finally:
        _remove_quick_align()
        for module, names in touched:
            depth = _installed.get(module, 1) - 1
            if depth <= 0:
                _installed.pop(module, None)
                for name in names:
                    module.__dict__.pop(name, None)
            else:
                _installed[module] = depth


def _hf_configs(model: TransformerLensModel) -> list[Any]:
    """The HuggingFace configs whose ``_attn_implementation`` picks the attention kernel."""
    hf = getattr(model, "original_model", None)
    config = getattr(hf, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        return []
    out = [config]
    for name in ("text_config", "vision_config"):
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            out.append(sub)
    return out


@contextlib.contextmanager
def attention_implementation(model: TransformerLensModel, implementation: str) -> Iterator[None]:
    """Run HuggingFace attention with ``implementation`` ("sdpa", "eager", ...) inside the block.

    :func:`load_model` boots with eager attention so that ``hook_pattern`` is filled;
    a pass that reads no pattern runs faster with PyTorch's fused kernel. The
    setting is restored on exit, also when the body raises. Models without a
    HuggingFace config (``boot_native``) are left as they are.

    >>> from massact_lens.examples import minilm
    >>> model = minilm()
    >>> with attention_implementation(model, "sdpa"):
    ...     model.original_model.config._attn_implementation
    'sdpa'
    >>> model.original_model.config._attn_implementation
    'eager'
    """
    configs = _hf_configs(model)
    before = [c._attn_implementation for c in configs]
    try:
        for config in configs:
            config._attn_implementation = implementation
        yield
    finally:
        for config, value in zip(configs, before, strict=True):
            config._attn_implementation = value


#: Hook points that only eager attention fills.
_PATTERN_HOOKS = ("hook_pattern", "hook_attn_scores")


def reads_attention_pattern(model: TransformerLensModel, hook_names: Iterable[str] = ()) -> bool:
    """True when ``hook_names``, or a hook already attached to the model, reads an
    attention pattern or score (which only eager attention computes).

    >>> from massact_lens.examples import minilm
    >>> reads_attention_pattern(minilm(), ["blocks.0.attn.hook_pattern"]), reads_attention_pattern(minilm())
    (True, False)
    """
    if any(str(name).endswith(_PATTERN_HOOKS) for name in hook_names):
        return True
    points = getattr(model, "hook_dict", {})
    return any(
        name.endswith(_PATTERN_HOOKS) and (point._forward_hooks or point._forward_pre_hooks)
        for name, point in points.items()
    )


def fast_attention(model: TransformerLensModel, hook_names: Iterable[str] = ()) -> contextlib.AbstractContextManager[None]:
    """``attention_implementation(model, "sdpa")`` for passes that read no attention pattern.

    Eager attention stays when ``hook_names`` or a hook already attached to the model
    reads a pattern or score (:func:`reads_attention_pattern`): the fast kernel never
    computes them. Set ``MASSACT_LENS_EAGER=1`` to keep eager attention everywhere.
    """
    if not wants_fast_attention(model, hook_names):
        return contextlib.nullcontext()
    return attention_implementation(model, "sdpa")


def wants_fast_attention(model: TransformerLensModel, hook_names: Iterable[str] = ()) -> bool:
    """What :func:`fast_attention` decides: False when ``MASSACT_LENS_EAGER=1`` or a
    hook reads an attention pattern (:func:`reads_attention_pattern`)."""
    return os.environ.get("MASSACT_LENS_EAGER") != "1" and not reads_attention_pattern(model, hook_names)
