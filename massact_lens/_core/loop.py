"""The one forward loop, and the one way to extend it: a :class:`Measurement`.

Every pass the library runs over user inputs is :func:`measure` over a
:class:`~massact_lens._core.batching.BatchPlan` with one or more measurements. A
measurement is a small object with three methods: the hooks it needs for a batch,
how a batch's forward pass updates its running state, and the result it produces.
Several measurements share one forward pass (a profile rides on the scan's pass);
user hooks that want to know the batch (a token tracker) ride along as
:class:`UserHooks`.

The loop attaches every hook with ``model.hooks(...)`` for one batch and removes it
when the batch ends, also when a hook raises; it runs in inference mode, picks fused
attention unless a hook reads a pattern, and stops each pass after the last block any
hook reads unless a measurement asks for the model output (``needs_output``).

>>> import torch
>>> from massact_lens.examples import tiny_model
>>> from massact_lens._core.batching import plan_batches
>>> class Lengths:
...     reads_input_index = True
...     needs_output = False
...     def __init__(self): self.seen = {}
...     def hooks(self, batch): return []
...     def update(self, batch, output):
...         self.seen.update(zip(batch.input_indices, batch.lengths.tolist()))
...     def result(self): return [self.seen[i] for i in sorted(self.seen)]
>>> model = tiny_model()
>>> lengths = Lengths()
>>> measure(model, plan_batches(model, torch.ones(3, 4, dtype=torch.long)), lengths, progress=False)
3
>>> lengths.result()
[4, 4, 4]
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.batching import Batch, BatchPlan
from massact_lens._core.fast_paths import attention_for_run, lean_components
from massact_lens._core.hook_names import RESID_POST, layer_of
from massact_lens._core.options import progress_bar
from massact_lens._core.probes import hf_attention, probing
from massact_lens._core.types import HookList, model_device

__all__ = ["Measurement", "UserHooks", "last_block_hook", "measure", "reads_input_index"]


@runtime_checkable
class Measurement(Protocol):
    """What :func:`measure` runs: one kind of measurement over a stream of batches.

    ``reads_input_index`` (class attribute): True when :meth:`update` names a batch's rows
    by :meth:`Batch.input_index` (never ``batch.start + row``), so the plan may run the
    inputs longest first. ``needs_output``: True when :meth:`update` reads the model's
    logits; otherwise each pass stops after the last block a hook reads.
    """

    reads_input_index: bool
    needs_output: bool

    def hooks(self, batch: Batch) -> HookList:
        """The (hook name, function) pairs this measurement needs for ``batch``'s pass."""
        ...

    def update(self, batch: Batch, output: torch.Tensor | None) -> None:
        """Fold ``batch`` into the running state, after its forward pass (``output``: the
        logits when ``needs_output``, else None)."""
        ...

    def result(self) -> Any:
        """The result, once every batch ran."""
        ...


class UserHooks:
    """Hooks of your own riding along a pass; each function with a ``before_batch(batch)``
    method is told the batch before its forward pass (a token tracker learns the padding).

    >>> seen = []
    >>> class Tracker:
    ...     def before_batch(self, batch): seen.append(batch.start)
    ...     def __call__(self, activation, hook): pass
    >>> batch = Batch(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long), 5)
    >>> len(UserHooks([("embed.hook_in", Tracker())]).hooks(batch)), seen
    (1, [5])
    """

    reads_input_index = True
    needs_output = False

    def __init__(self, fwd_hooks: Iterable[tuple[Any, Any]]) -> None:
        self.fwd_hooks = list(fwd_hooks)

    def hooks(self, batch: Batch) -> HookList:
        for _, fn in self.fwd_hooks:
            before = getattr(fn, "before_batch", None)
            if callable(before):
                before(batch)
        return list(self.fwd_hooks)

    def update(self, batch: Batch, output: torch.Tensor | None) -> None:
        pass

    def result(self) -> None:
        return None


def reads_input_index(*measurements: Any) -> bool:
    """True when every measurement names its rows by input index (so batches may run longest first)."""
    return all(bool(getattr(m, "reads_input_index", False)) for m in measurements)


def last_block_hook(hook_names: Iterable[str]) -> str:
    """The block output after which none of ``hook_names`` can fire.

    >>> last_block_hook(["blocks.0.ln2.hook_in", "blocks.3.hook_resid_pre"])
    'blocks.3.hook_resid_post'
    """
    return RESID_POST.format(layer=max(layer_of(n) for n in hook_names))


class _StopForward(Exception):
    """Raised by the stop hook once every hook of the pass has fired."""


def _stop(activation: torch.Tensor, hook: Any) -> None:  # noqa: ARG001
    raise _StopForward


#: Hook points that fire before block 0: they never keep a pass from stopping early.
_BEFORE_BLOCKS = ("embed.", "pos_embed.", "hook_embed", "hook_pos_embed")


def _stop_point(hooks: HookList) -> str | None:
    """The block output after which no hook of the pass fires; None (run it all) when a
    hook is a filter or lies after the blocks (final norm, unembedding).

    >>> _stop_point([("embed.hook_in", print), ("blocks.1.hook_resid_mid", print)])
    'blocks.1.hook_resid_post'
    >>> _stop_point([("ln_final.hook_normalized", print)]) is None
    True
    """
    names = [name for name, _ in hooks]
    if not names or not all(isinstance(n, str) for n in names):
        return None
    in_blocks = [n for n in names if not n.startswith(_BEFORE_BLOCKS)]
    if not in_blocks:
        return None
    try:
        return last_block_hook(in_blocks)
    except ValueError:  # a hook after the blocks: run it all
        return None


def no_cache(model: TransformerLensModel) -> dict[str, bool]:
    """``{"use_cache": False}`` where the HuggingFace model takes it: a pass reads each input
    once, so the key/value cache HF would fill by default (``2 x kv_heads x length x d_head``
    per layer, kept to the end of the forward) is memory for nothing.

    >>> from massact_lens.examples import tiny_model
    >>> no_cache(tiny_model("llama"))   # a native TransformerLens model: no HF forward
    {}
    """
    hf = getattr(model, "original_model", None)
    if hf is None or not hasattr(hf, "forward"):
        return {}
    try:
        parameters = inspect.signature(hf.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in parameters else {}


def warn_detached_components(model: TransformerLensModel) -> None:
    """Warn when a component the model carries (a head gate, softmax1, an explicit bias: a
    module on ``model.original_model`` with ``hooks_attached()``) has lost its hooks, so that
    a pass would measure the plain model while the component's parameters are still there."""
    modules = getattr(getattr(model, "original_model", None), "_modules", None) or {}
    for name, module in modules.items():
        attached = getattr(module, "hooks_attached", None)
        if callable(attached) and not attached():
            warnings.warn(
                f"The model carries {getattr(module, 'kind', name) or name} ({name!r}) whose hooks were removed "
                "(model.reset_hooks(including_permanent=True)?): this pass runs without it, so its numbers are "
                "the plain model's. Attach it again, or remove it (detach_gate / detach_prefix).",
                UserWarning,
                stacklevel=3,
            )


def _probes(model: TransformerLensModel, measurements: Iterable[Any],
            batch: Batch) -> tuple[dict[torch.nn.Module, Any], set[int]]:
    """The attention probes the measurements ask for this batch, by HuggingFace module
    (every submodule of a layer's attention: the one that calls the kernel gets it), and
    the layers probed."""
    probes: dict[torch.nn.Module, Any] = {}
    layers: set[int] = set()
    for m in measurements:
        ask = getattr(m, "probes", None)
        for layer, probe in (ask(batch) if callable(ask) else {}).items():
            for module in hf_attention(model, layer).modules():
                if module in probes:
                    raise ValueError(f"Two measurements of one pass probe the attention of layer {layer}: run them "
                                     "in separate passes.")
                probes[module] = probe
            layers.add(layer)
    return probes, layers


def measure(
    model: TransformerLensModel,
    plan: BatchPlan,
    *measurements: Measurement,
    progress: bool = True,
    desc: str = "batches",
) -> int:
    """Run every batch of ``plan`` once, under the hooks of all ``measurements``; return the number of inputs.

    For each batch: every measurement's :meth:`~Measurement.hooks`, one forward pass
    with them attached (removed after, also when a hook raises), then every
    measurement's :meth:`~Measurement.update`, in the order given (a later one may read
    what an earlier one just computed). A measurement with a ``probes(batch)`` method
    (``{layer: probe}``) measures inside the attention kernel of those layers
    (:mod:`massact_lens._core.probes`); it asks only where
    :func:`~massact_lens._core.fast_paths.fused_route` allowed it.
    """
    if not measurements:
        raise ValueError("measure() needs at least one measurement.")
    wants_output = any(getattr(m, "needs_output", False) for m in measurements)
    batches = plan.batches
    total = len(batches) if isinstance(batches, list) else None
    bar = progress_bar(batches, total=total, desc=desc, enabled=progress)
    device = model_device(model)
    seen = 0
    cache = no_cache(model)
    warn_detached_components(model)
    with torch.inference_mode(), lean_components(model), attention_for_run(model) as choose_kernel:  # type: ignore[arg-type]
        for batch in bar:
            hooks: HookList = [pair for m in measurements for pair in m.hooks(batch)]
            probes, probed = _probes(model, measurements, batch)
            # the pass ends after the last block a hook reads or a probe measures
            points = [*hooks, *((RESID_POST.format(layer=layer), _stop) for layer in probed)]
            stop_here = None if wants_output else _stop_point(points)
            if stop_here is not None:
                hooks = [*hooks, (stop_here, _stop)]
            tokens = batch.tokens.to(device) if device is not None else batch.tokens
            out = None
            choose_kernel([name for name, _ in hooks], probe=bool(probes))
            with probing(probes), model.hooks(fwd_hooks=hooks), contextlib.suppress(_StopForward):  # type: ignore[attr-defined]
                out = model(tokens, attention_mask=batch.attention_mask.to(tokens.device),  # type: ignore[operator]
                            return_type="logits" if wants_output else None, **cache)
            for m in measurements:
                m.update(batch, out)
            seen += int(batch.tokens.shape[0])
    return seen
