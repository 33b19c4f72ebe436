"""The bridge's components run by their own HuggingFace module when nothing reads inside.

TransformerBridge wraps every HuggingFace module in a component that fires the
TransformerLens hook points. Two of them recompute what HuggingFace already computes,
only so that inner hook points have something to fire on:

* the LLaMA-family attention (``PositionEmbeddingsAttentionBridge``: LLaMA, Mistral,
  Qwen, Gemma, SmolLM2, ...) reimplements attention step by step, in eager
  arithmetic, for ``hook_rot_q`` / ``hook_attn_scores`` / ``hook_pattern`` and the
  q/k/v/o hooks. On SmolLM2 at 500 tokens that costs a third of the forward pass: the
  [batch, head, query, key] scores are built, masked and soft-maxed whatever kernel
  the HuggingFace config names;
* a normalisation (``NormalizationBridge`` on its native path, which every raw-weight
  HuggingFace model takes) computes mean, variance and scale for ``hook_scale`` /
  ``hook_normalized`` and then calls the HuggingFace module anyway.

:func:`lean_components` gives such a component, for the passes this library runs, a
forward that calls the HuggingFace module directly between the component's own
``hook_in`` and ``hook_out``, **decided at every call**: whenever a hook point inside
the component (``hook_pattern``, ``hook_scale``, ``q.hook_out``, ...) carries a
TransformerLens hook (``HookPoint.has_hooks()``: forward or backward, ours or the
user's, added by ``add_hook``, ``hooks()``, ``run_with_hooks`` or ``run_with_cache``),
the component's own forward runs instead, so every hook still sees what it always saw.
Hooks on ``hook_in`` / ``hook_out`` of the component fire on both paths. The
normalisation path is bit-identical (the bridge returns the HuggingFace module's output
there too); the attention path runs the kernel the pass chose (SDPA inside
:func:`fast_attention`) and agrees with the bridge's eager arithmetic to float32
rounding. A block also filters the keyword arguments it passes on with its HuggingFace
layer's signature read once instead of at every call (:func:`_filter_block_kwargs`).

**Guarded.** These paths replace bridge code, so they run only on the TransformerLens
releases they were checked on (:data:`VERIFIED_TRANSFORMER_LENS`; tests/test_fast_paths.py
and tests/test_lean_components.py compare each lean component with the bridge's own
forward on every bundled model and on a tiny random GPT-2, LLaMA, BERT, Gemma 2 and
Gemma 3). On any other release, or when a bridge class cannot be imported, they switch
off with one warning per process and the bridge's own code runs.

Left alone: models with processed weights (folded LayerNorm and friends change what
the HuggingFace module would compute), attention with TransformerLens's per-head
input / result modes switched on, calls that carry a KV cache, subclasses that
override the component's forward, and everything when the environment variable
``MASSACT_LENS_EAGER=1`` is set: then every pass runs the bridge's own components and
eager attention (no SDPA), to check a result against the bridge's own code.

>>> from massact_lens.examples import tiny_model
>>> model = tiny_model("llama")
>>> with lean_components(model) as n:
...     n > 0
True
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import inspect
import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.hook_names import point_layout
from massact_lens._core.probes import PROBE_KERNEL, delegates_attention, register_probe_kernel
from massact_lens._core.types import weights_processed

__all__ = [
    "VERIFIED_TRANSFORMER_LENS",
    "attention_for_run",
    "attention_implementation",
    "fast_attention",
    "fused_route",
    "lean_components",
    "reads_attention_pattern",
    "wants_fast_attention",
]

#: The TransformerLens releases on which every lean path was compared with the bridge's
#: own forward (tests/test_lean_components.py). Add a release only after those tests
#: pass on it; on any other release the bridge's own code runs.
VERIFIED_TRANSFORMER_LENS: tuple[str, ...] = ("4.3.0",)

#: TransformerLens config switches under which attention is computed per head.
_PER_HEAD_MODES = ("use_split_qkv_input", "use_attn_in", "use_attn_result")
#: Keyword arguments that carry a KV cache (the bridge keeps its own cache logic).
_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")
_EAGER_SETTING = "MASSACT_LENS_EAGER"

_installed: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()
_inner_cache: weakref.WeakKeyDictionary[torch.nn.Module, tuple[HookPoint, ...]] = weakref.WeakKeyDictionary()
_warned = False  # the one "switched off" warning of this process was given


class _Bridge(NamedTuple):
    """The bridge classes whose methods the lean paths stand in for."""

    attention: type
    norm: type
    block: type


@functools.cache
def _transformer_lens_version() -> str | None:
    try:
        return importlib.metadata.version("transformer-lens")
    except importlib.metadata.PackageNotFoundError:
        import transformer_lens

        return getattr(transformer_lens, "__version__", None)


def _bridge() -> _Bridge | None:
    """The bridge classes when the installed TransformerLens is a verified release and
    they import; otherwise None, after one warning per process."""
    version = _transformer_lens_version()
    if version not in VERIFIED_TRANSFORMER_LENS:
        return _switched_off(f"TransformerLens {version} is not among the releases they were checked on "
                             f"({', '.join(VERIFIED_TRANSFORMER_LENS)})")
    try:
        from transformer_lens.model_bridge.generalized_components import (
            BlockBridge,
            NormalizationBridge,
            PositionEmbeddingsAttentionBridge,
        )
    except ImportError as error:
        return _switched_off(f"a TransformerBridge class could not be imported ({error})")
    return _Bridge(PositionEmbeddingsAttentionBridge, NormalizationBridge, BlockBridge)


def _switched_off(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"massact_lens runs TransformerBridge's own components (its faster HuggingFace paths "
            f"are off): {reason}. Results are the same; passes may be slower.",
            RuntimeWarning,
            stacklevel=4,
        )


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
    return any(point.has_hooks() for point in _inner_points(component))


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
    return self.hook_out(result.to(hidden_states.dtype))  # no copy when the dtype is the same


def _native_norm(component: Any) -> bool:
    """The bridge's own forward returns the HuggingFace module's output on this path."""
    config = component.config
    return bool(component.use_native_layernorm_autograd or getattr(config, "layer_norm_folding", False))


#: Per HuggingFace forward function: its parameter names, and whether it takes **kwargs.
_signatures: weakref.WeakKeyDictionary[Any, tuple[tuple[str, ...], bool]] = weakref.WeakKeyDictionary()


def _filter_block_kwargs(self: Any, kwargs: dict[str, Any], num_positional_args: int = 0) -> dict[str, Any]:
    """``BlockBridge._filter_kwargs_for_forward`` (keep the keyword arguments the
    HuggingFace layer's forward accepts, but not those given positionally), with the
    signature read once per forward function instead of at every call. A forward set on
    the instance (accelerate's hooks wrap it so) takes the bridge's own path."""
    original = self._modules.get("_original_component")
    if original is None or "forward" in original.__dict__:
        return type(self)._filter_kwargs_for_forward(self, kwargs, num_positional_args)
    function = type(original).forward
    known = _signatures.get(function)
    if known is None:
        try:
            parameters = inspect.signature(original.forward).parameters
        except (ValueError, TypeError):
            return type(self)._filter_kwargs_for_forward(self, kwargs, num_positional_args)
        known = (tuple(parameters), any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()))
        _signatures[function] = known
    names, takes_any = known
    if takes_any:
        return kwargs
    given = names[:num_positional_args]
    return {k: v for k, v in kwargs.items() if k in names and k not in given}


def _lean_methods(module: torch.nn.Module, bridge: _Bridge) -> dict[str, Callable[..., Any]]:
    """The lean methods for this component (attribute name: function); {} when its
    class changes what the lean path stands in for."""
    kind = type(module)
    if isinstance(module, bridge.attention):
        unchanged = kind.forward is bridge.attention.forward and (
            kind._pre_output_projection is bridge.attention._pre_output_projection  # type: ignore[attr-defined]
        )
        return {"forward": _lean_attention} if unchanged else {}
    if isinstance(module, bridge.norm) and kind.forward is bridge.norm.forward and _native_norm(module):
        return {"forward": _lean_norm}
    block_filter = bridge.block._filter_kwargs_for_forward  # type: ignore[attr-defined]
    if isinstance(module, bridge.block) and kind._filter_kwargs_for_forward is block_filter:  # type: ignore[attr-defined]
        return {"_filter_kwargs_for_forward": _filter_block_kwargs}
    return {}


def _modules_but_hook_points(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Every submodule once but hook points (no lean path replaces them): 760 of SmolLM2's 2,002."""
    seen: set[int] = set()
    stack = [model]
    while stack:
        for child in stack.pop()._modules.values():
            if child is None or isinstance(child, HookPoint) or id(child) in seen:
                continue
            seen.add(id(child))
            stack.append(child)
            yield child


@contextlib.contextmanager
def lean_components(model: torch.nn.Module) -> Iterator[int]:
    """Inside: the bridge's attention and norm components take the HuggingFace path
    whenever nothing reads inside them, and blocks filter their keyword arguments with
    a signature read once (see the module's docstring). Yields how many components were
    given the lean forward (0 when the model is left alone: ``MASSACT_LENS_EAGER=1``,
    processed weights, or a TransformerLens release not in
    :data:`VERIFIED_TRANSFORMER_LENS`). Reentrant; each lean method is set on its
    component instance only, and removed on exit, also on error.
    """
    bridge = None if os.environ.get(_EAGER_SETTING) == "1" or weights_processed(model) else _bridge()  # type: ignore[arg-type]
    if bridge is None:
        yield 0
        return
    touched: list[tuple[torch.nn.Module, tuple[str, ...]]] = []
    try:  # not model.modules(): its 1,242 hook points made that walk 3x as long on SmolLM2
        for module in _modules_but_hook_points(model):
            lean = _lean_methods(module, bridge)
            if not lean or module._modules.get("_original_component") is None:
                continue
            depth = _installed.get(module, 0)
            if depth == 0:
                for name, function in lean.items():
                    # Into the instance's __dict__: the bridge's own __setattr__ forwards
                    # unknown names to the HuggingFace module.
                    vars(module)[name] = function.__get__(module)
            _installed[module] = depth + 1
            touched.append((module, tuple(lean)))
        yield sum(1 for _, names in touched if "forward" in names)
    finally:
        for module, names in touched:
            depth = _installed.get(module, 1) - 1
            if depth <= 0:
                _installed.pop(module, None)
                for name in names:
                    vars(module).pop(name, None)
            else:
                _installed[module] = depth


# --- the attention kernel ----------------------------------------------------------------

#: Per HuggingFace model: the kernels it refused (set_attn_implementation raised or kept its own).
_refused: weakref.WeakKeyDictionary[torch.nn.Module, set[str]] = weakref.WeakKeyDictionary()


def _hf_model(model: Any) -> Any:
    """The HuggingFace model whose config names the attention kernel, or None
    (``boot_native`` models have none)."""
    hf = getattr(model, "original_model", None)
    return hf if hasattr(getattr(hf, "config", None), "_attn_implementation") else None


def _kernel(hf: Any) -> Any:
    return hf.config._attn_implementation


def _set_kernel(hf: Any, implementation: Any) -> Any:
    """Switch ``hf``'s attention kernel; return the kernel in effect after.

    HuggingFace's public ``set_attn_implementation`` checks the model supports the
    kernel (Gemma 2 refuses SDPA, which cannot soft-cap its scores): a refused kernel
    leaves the model as it is, and is not asked for again. Only a model without that
    method gets the config field written directly, here and nowhere else.
    """
    if implementation == _kernel(hf) or implementation in _refused.get(hf, ()):
        return _kernel(hf)
    if implementation == PROBE_KERNEL:
        register_probe_kernel()
    setter = getattr(hf, "set_attn_implementation", None)
    if callable(setter):
        with contextlib.suppress(ValueError, ImportError):  # not supported by this model
            setter(implementation)
        if _kernel(hf) != implementation:
            _refused.setdefault(hf, set()).add(implementation)
    else:  # transformers without the public switch: the config field every release reads
        hf.config._attn_implementation = implementation
    return _kernel(hf)


@contextlib.contextmanager
def attention_implementation(model: TransformerLensModel, implementation: str) -> Iterator[None]:
    """Run HuggingFace attention with ``implementation`` ("sdpa", "eager", ...) inside the block.

    :func:`load_model` boots with eager attention so that ``hook_pattern`` is filled;
    a pass that reads no pattern runs faster with PyTorch's fused kernel. The
    setting is restored on exit, also when the body raises. Models without a
    HuggingFace config (``boot_native``), and models that do not support the kernel,
    are left as they are. One switch costs about a millisecond (HuggingFace checks
    the model): a loop over batches takes :func:`attention_for_run` instead.

    >>> from massact_lens.examples import minilm
    >>> model = minilm()
    >>> with attention_implementation(model, "sdpa"):
    ...     model.original_model.config._attn_implementation
    'sdpa'
    >>> model.original_model.config._attn_implementation
    'eager'
    """
    hf = _hf_model(model)
    if hf is None:
        yield
        return
    before = _kernel(hf)
    try:
        _set_kernel(hf, implementation)
        yield
    finally:
        _set_kernel(hf, before)


class _KernelChoice:
    """What :func:`attention_for_run` yields: call it with a batch's hook names."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.hf = _hf_model(model)
        self.original = None if self.hf is None else _kernel(self.hf)
        self.current = self.original
        self.decided: dict[tuple[str, ...], bool] = {}

    def __call__(self, hook_names: Iterable[Any], probe: bool = False) -> None:
        if self.hf is None:
            return
        if probe:  # a pass measuring inside the kernel (fused_route decided it may)
            if self.current != PROBE_KERNEL:
                self.current = _set_kernel(self.hf, PROBE_KERNEL)
            return
        names = list(hook_names)
        if all(isinstance(n, str) for n in names):  # decided once per run for the same names
            key = tuple(names)
            if key not in self.decided:
                if len(self.decided) >= 64:  # names that change every batch: keep memory flat
                    self.decided.clear()
                self.decided[key] = wants_fast_attention(self.model, names)
            fast = self.decided[key]
        else:  # a filter: decided every batch
            fast = wants_fast_attention(self.model, names)
        wanted = "sdpa" if fast else self.original
        if wanted != self.current:
            self.current = _set_kernel(self.hf, wanted)


@contextlib.contextmanager
def attention_for_run(model: TransformerLensModel) -> Iterator[Callable[[Iterable[Any]], None]]:
    """The attention kernel of a loop over batches, switched only when it changes.

    Yields a function to call before each batch's forward pass with the batch's hook
    names: fused attention (SDPA) unless a name, or a hook already attached, reads an
    attention pattern (:func:`wants_fast_attention`, decided once per run for the same
    names), else the model's own kernel; ``probe=True``: the probe kernel
    (:data:`~massact_lens._core.probes.PROBE_KERNEL`) of a pass that measures inside it.
    A run of batches that all read no pattern switches once, and the model's kernel is
    restored on exit, also on error.

    >>> from massact_lens.examples import minilm
    >>> model = minilm()
    >>> with attention_for_run(model) as choose:
    ...     choose(["blocks.0.hook_resid_post"])
    ...     model.original_model.config._attn_implementation
    'sdpa'
    >>> model.original_model.config._attn_implementation
    'eager'
    """
    choice = _KernelChoice(model)
    try:
        yield choice
    finally:
        if choice.hf is not None and choice.current != choice.original:
            _set_kernel(choice.hf, choice.original)


def reads_attention_pattern(model: TransformerLensModel, hook_names: Iterable[str] = ()) -> bool:
    """True when ``hook_names``, or a hook already attached to the model, reads an
    attention pattern or score (which only eager attention computes).

    >>> from massact_lens.examples import minilm
    >>> reads_attention_pattern(minilm(), ["blocks.0.attn.hook_pattern"]), reads_attention_pattern(minilm())
    (True, False)
    """
    if any(point_layout(str(name)) == "pattern" for name in hook_names):  # only eager attention fills them
        return True
    points = getattr(model, "hook_dict", {})
    return any(point_layout(name) == "pattern" and point.has_hooks() for name, point in points.items())


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
    return os.environ.get(_EAGER_SETTING) != "1" and not reads_attention_pattern(model, hook_names)


# --- the fused route of the attention analyses -------------------------------------------


def fused_route(model: TransformerLensModel, layers: Iterable[int]) -> str | None:
    """None when the attention of every layer in ``layers`` runs HuggingFace's own module
    through the kernel its config names, so that a pass can measure inside the fused
    kernel (:mod:`massact_lens._core.probes`); otherwise why not, in a few words.

    Taken: the bridge's generic attention (BERT-style: it always calls the HuggingFace
    module) and the LLaMA-family attention on its lean path (this TransformerLens is
    verified, weights not processed, no hook attached inside it). Not taken: GPT-2-style
    joint-QKV attention (the bridge computes it in its own code), soft-capped logits
    (SDPA has no soft cap), ``MASSACT_LENS_EAGER=1``.

    >>> from massact_lens.examples import minilm, tiny_model
    >>> fused_route(minilm(), [0]) is None, fused_route(tiny_model(), [0])
    (True, 'the model has no HuggingFace attention module (boot_native)')
    """
    if os.environ.get(_EAGER_SETTING) == "1":
        return f"{_EAGER_SETTING}=1 is set"
    hf = _hf_model(model)
    if hf is None or not hasattr(model, "blocks"):
        return "the model has no HuggingFace attention module (boot_native)"
    config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "its attention logits are soft-capped (the fused kernel has no soft cap)"
    if not register_probe_kernel():
        return "this transformers has no AttentionInterface"
    for layer in layers:
        attention = model.blocks[layer].attn  # type: ignore[index]
        if delegates_attention(model, layer):
            continue
        bridge = None if weights_processed(model) else _bridge()  # type: ignore[arg-type]
        if bridge is None or "forward" not in _lean_methods(attention, bridge):
            return (f"layer {layer}'s attention ({type(attention).__name__}) is computed by the bridge's own code "
                    "(a joint-QKV or processed-weights model, or a TransformerLens release not verified here)")
        if _read_inside(attention) or any(bool(getattr(attention.config, m, False)) for m in _PER_HEAD_MODES):
            return f"a hook is attached inside layer {layer}'s attention (or a per-head mode is on)"
    return None
