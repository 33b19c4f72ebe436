"""The implicit bias, causally: edit each head's term from the key set C and measure the perplexity.

For a head, ``z_h(q) = sum_{k in C} p_qk v_k + sum_{k not in C} p_qk v_k``; the first
term is the implicit attention bias (:func:`~massact_lens.attention.implicit_bias`
measures how constant it is). :func:`bias_surgery` asks whether the model *needs* it:
it replaces the term by its mean over a reference corpus (``"mean"``: an explicit
constant bias per head), removes it (``"zero"``), or takes C out of the softmax and
renormalises the rest (``"redistribute"``), for every chosen head at once, per layer
and per head, and reports each run's perplexity next to the unedited model's.

>>> import torch
>>> from massact_lens.examples import tiny_model
>>> model = tiny_model("llama")
>>> tokens = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
>>> r = bias_surgery(model, tokens, "start", mode="zero", levels=["all", "layer"], progress=False)
>>> r.to_dataframe()[["level", "layer", "head"]].values.tolist()
[['none', -1, -1], ['all', -1, -1], ['layer', 0, -1], ['layer', 1, -1]]
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._fingerprint import other_weights, weights_fingerprint
from massact_lens._core._plain_hf import refuse_plain_hf
from massact_lens._core.batching import Batch, BatchPlan, plan_batches
from massact_lens._core.hook_names import resolve_hook_names
from massact_lens._core.loop import UserHooks, measure
from massact_lens._core.options import progress_bar
from massact_lens._core.results import CorpusResult
from massact_lens._core.types import HookList, Inputs, Provenance, is_causal, warn_if_processed
from massact_lens.attention._passes import check_heads, check_layers, key_set_identity
from massact_lens.attention._surgery import MODES, Losses, Mode, TermMeans, surgery_hooks
from massact_lens.attention.keys import Positions, as_rule
from massact_lens.interventions.positions import PositionRule

__all__ = ["BiasSurgery", "bias_surgery"]

#: Which surgeries a run makes: every chosen head at once, each layer's, each head's.
Level = Literal["all", "layer", "head"]
LEVELS: tuple[str, ...] = ("all", "layer", "head")


def _exp(nll: float) -> float:
    if math.isnan(nll):
        return math.nan
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


@dataclass(frozen=True, repr=False)
class BiasSurgery(CorpusResult):
    """Perplexity with each head's term from C edited (``mode``), next to the unedited model's.

    ``all_nll`` (every chosen head at once), ``layer_nll`` (the chosen heads of one layer)
    and ``head_nll`` (one head) are mean next-token losses in nats over the same
    ``n_tokens`` predicted tokens as ``baseline_nll``; NaN where that surgery was not
    run. :meth:`to_dataframe` has them all with their perplexities and the damage
    (``delta_nll``), heads ranked by damage; :meth:`hooks` gives any one surgery as a
    hook list, to measure it with another metric.

    It does not merge: the ``"mean"`` constant depends on the reference corpus of the
    run, and a surgery's damage is read against the baseline of the same tokens; run
    the corpus in one call instead.

    >>> import torch
    >>> from massact_lens.examples import tiny_model
    >>> r = bias_surgery(tiny_model("llama"), torch.randint(0, 64, (3, 10)), mode="redistribute",
    ...                  layers=[1], heads=[0, 2], progress=False)
    >>> r.head_nll.shape, r.ranked()["head"].tolist() in ([0, 2], [2, 0])
    (torch.Size([1, 2]), True)
    """

    #: ``"mean"``, ``"zero"`` or ``"redistribute"``.
    mode: str
    #: The key set C (its description).
    positions: str
    #: The heads the surgeries edit (of each chosen layer).
    heads: tuple[int, ...]
    #: The surgeries run (``all``, ``layer``, ``head``).
    levels: tuple[str, ...]
    #: Where the ``"mean"`` constants came from.
    reference: str
    #: Tokens predicted (every real token of an input after its first).
    n_tokens: int
    #: Mean next-token loss (nats) of the unedited model.
    baseline_nll: float
    #: With every chosen head of every chosen layer edited at once.
    all_nll: float
    #: Per chosen layer, its chosen heads edited.
    layer_nll: Float[torch.Tensor, " layer"]
    #: Per chosen layer and head, that head alone edited.
    head_nll: Float[torch.Tensor, "layer head"]
    #: Mean attention probability on C per chosen layer and head (unedited model, real queries).
    c_mass: Float[torch.Tensor, "layer head"]
    #: The term's mean per layer and head (``[layer, head, d_head]``): what ``"mean"`` writes,
    #: over the reference corpus (the corpus itself in the other modes).
    mean_term: Float[torch.Tensor, "layer head d_head"] = field(repr=False)
    #: The key set as a rule (for :meth:`hooks`).
    rule: PositionRule | None = field(default=None, repr=False, compare=False)
    #: A digest of the model's weights (:meth:`hooks` warns on a model of other weights).
    weights: str = field(default="", repr=False)

    @property
    def baseline_perplexity(self) -> float:
        return _exp(self.baseline_nll)

    def _summary_lines(self) -> list[str]:
        frame = self.to_dataframe()
        lines = [
            f"mode {self.mode}, C = {self.positions}, {self.n_tokens} tokens; perplexity: unedited "
            f"{self.baseline_perplexity:.4g}"
            + (f", all heads {_exp(self.all_nll):.4g}" if "all" in self.levels else "")
        ]
        for level in ("layer", "head"):
            rows = frame[frame["level"] == level]
            if len(rows):
                top = rows.iloc[0]
                where = f"layer {top['layer']}" + (
                    f" head {top['head']}" if level == "head" else ""
                )
                lines.append(f"most damaging {level}: {where}, perplexity {top['perplexity']:.4g}")
        return lines

    def to_dataframe(self) -> pd.DataFrame:
        """One row per run: ``level`` (``none``, ``all``, ``layer``, ``head``), ``layer`` and
        ``head`` (-1: not one), ``nll``, ``perplexity``, ``delta_nll`` (minus the unedited
        loss), ``ppl_ratio``, ``c_mass`` (mean attention on C of the head, or mean over the
        heads edited), ``rank`` (by damage within the level, 1 = worst). Layers and heads
        come ranked by damage."""
        rows = [self._row("none", -1, -1, self.baseline_nll, float(self.c_mass.mean()))]
        if "all" in self.levels:
            rows.append(self._row("all", -1, -1, self.all_nll, float(self.c_mass.mean())))
        if "layer" in self.levels:
            rows += self._ranked(
                [
                    self._row(
                        "layer", layer, -1, float(self.layer_nll[i]), float(self.c_mass[i].mean())
                    )
                    for i, layer in enumerate(self.layers)
                ]
            )
        if "head" in self.levels:
            rows += self._ranked(
                [
                    self._row(
                        "head", layer, head, float(self.head_nll[i, j]), float(self.c_mass[i, j])
                    )
                    for i, layer in enumerate(self.layers)
                    for j, head in enumerate(self.heads)
                ]
            )
        return pd.DataFrame(rows)

    def _row(self, level: str, layer: int, head: int, nll: float, mass: float) -> dict[str, Any]:
        delta = nll - self.baseline_nll
        return {
            "level": level,
            "layer": layer,
            "head": head,
            "nll": nll,
            "perplexity": _exp(nll),
            "delta_nll": delta,
            "ppl_ratio": _exp(delta),
            "c_mass": mass,
            "rank": 1,
        }

    @staticmethod
    def _ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        order = sorted(
            rows, key=lambda r: -r["delta_nll"] if not math.isnan(r["delta_nll"]) else math.inf
        )
        return [{**r, "rank": i + 1} for i, r in enumerate(order)]

    def ranked(self, level: Level = "head") -> pd.DataFrame:
        """The runs of one level, most damaging first (a NaN loss last)."""
        if level not in LEVELS or level not in self.levels:
            raise ValueError(
                f"level must be one of the levels run, {list(self.levels)}, not {level!r}."
            )
        frame = self.to_dataframe()
        return frame[frame["level"] == level].reset_index(drop=True)

    def hooks(
        self, model: TransformerLensModel, layer: int | None = None, head: int | None = None
    ) -> HookList:
        """One surgery of this result as a hook list for ``fwd_hooks`` (a token tracker first):
        every chosen head (no argument), one layer's chosen heads, or one head.

        >>> import torch
        >>> from massact_lens.examples import tiny_model
        >>> model = tiny_model("llama")
        >>> r = bias_surgery(model, torch.randint(0, 64, (2, 8)), mode="mean", levels=["all"], progress=False)
        >>> with model.hooks(fwd_hooks=r.hooks(model, layer=1, head=0)):
        ...     logits = model(torch.randint(0, 64, (1, 8)))
        >>> logits.shape
        torch.Size([1, 8, 64])
        """
        if self.rule is None:
            raise ValueError(
                "This result holds no key set rule (it was rebuilt without one): run bias_surgery again."
            )
        if layer is not None and layer not in self.layers:
            raise ValueError(
                f"Layer {layer} was not among this surgery's layers {list(self.layers)}: pass one of them."
            )
        if head is not None and (layer is None or head not in self.heads):
            raise ValueError(
                f"head needs a layer, and must be one of {list(self.heads)}; got layer={layer}, head={head}."
            )
        self.provenance.check_same(Provenance.of(model), "This surgery and the model")
        if differ := other_weights(model, self.provenance.dtype, self.weights):
            warnings.warn(f"This surgery was measured on other weights than this model's ({differ}): its mean terms "
                          "may not apply. Run bias_surgery on this model.", UserWarning, stacklevel=2)
        layers = list(self.layers) if layer is None else [layer]
        chosen = {lay: (self.heads if head is None else (head,)) for lay in layers}
        return surgery_hooks(model, chosen, self.mode, self.rule, self._means(chosen))

    def _means(self, chosen: Mapping[int, Sequence[int]]) -> dict[int, torch.Tensor] | None:
        if self.mode != "mean":
            return None
        return {
            lay: self.mean_term[self.layers.index(lay)][[self.heads.index(h) for h in hs]]
            for lay, hs in chosen.items()
        }


def _check_keys(model: TransformerLensModel, keys: Positions) -> PositionRule:
    rule = as_rule(model, keys, None)
    if any(getattr(leaf, "reads_activation", False) for leaf in rule.leaves()):
        raise ValueError(
            f"keys={rule.describe()} reads the residual stream of the pass (a profile or where_massive): the "
            "surgery needs C before the heads run. Pass positions instead: 'start', 'delimiters', key indices, a mask."
        )
    if key_set_identity(rule)[1]:
        raise ValueError(
            "keys names positions per input ([n_inputs, key_pos] mask or find_massive records); the "
            "surgery needs a rule that holds in any pass: 'start', 'delimiters', key indices, a [key_pos] mask."
        )
    return rule


def _check_levels(levels: Sequence[str]) -> tuple[str, ...]:
    if isinstance(levels, str) or not isinstance(levels, Sequence) or not levels:
        raise ValueError(
            f"levels must be a non-empty list drawn from {list(LEVELS)}, not {levels!r}."
        )
    bad = [x for x in levels if x not in LEVELS]
    if bad or len(set(levels)) != len(levels):
        raise ValueError(f"levels must be distinct names from {list(LEVELS)}; got {list(levels)}.")
    return tuple(x for x in LEVELS if x in levels)


def _check_hook_list(model: TransformerLensModel, fwd_hooks: Sequence[Any]) -> HookList:
    hooks = list(fwd_hooks)
    for item in hooks:
        if not (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and callable(item[1])
        ):
            raise TypeError(f"fwd_hooks must hold (hook name, function) pairs, not {item!r}.")
        resolve_hook_names(model, item[0])
    return hooks


def _plan(model: TransformerLensModel, inputs: Inputs, name: str, **kwargs: Any) -> BatchPlan:
    """The batches of ``inputs``, made once (the surgeries run them many times)."""
    if not isinstance(inputs, str | Sequence | torch.Tensor):
        raise TypeError(
            f"{name} runs many times, so it must be strings or a token tensor, not a "
            f"{type(inputs).__name__} (a stream would be used up by the first pass)."
        )
    plan = plan_batches(model, inputs, **kwargs)
    batches: list[Batch] = list(plan.batches)
    if name == "corpus" and not any(
        int(b.attention_mask.sum(1).clamp_min(1).sub(1).sum()) for b in batches
    ):
        raise ValueError(
            "Every input of the corpus holds a single token: nothing to predict. Pass longer inputs."
        )
    return BatchPlan(batches, plan.n_inputs, plan.prepend_bos)


def bias_surgery(
    model: TransformerLensModel,
    corpus: Inputs,
    keys: Positions = "start",
    mode: Mode = "mean",
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    levels: Sequence[Level] = ("all", "layer", "head"),
    reference: Inputs | None = None,
    fwd_hooks: Sequence[Any] = (),
    batch_size: int = 8,
    prepend_bos: bool | None = None,
    attention_mask: torch.Tensor | None = None,
    progress: bool = True,
) -> BiasSurgery:
    """Perplexity with each chosen head's term from C replaced by its mean, removed, or redistributed.

    For head ``h`` and query ``q``, ``term_h(q) = sum_{k in C} p_qk v_k`` (``hook_pattern``,
    ``hook_v``); at ``hook_z`` the surgery writes ``z - term + mean`` (``"mean"``, the
    mean over every real query of ``reference``), ``z - term`` (``"zero"``) or
    ``(z - term) / sum_{k not in C} p_qk`` (``"redistribute"``; a query whose every key
    is in C then gets 0, one with no mass on C is left alone). Runs: the unedited model,
    then per ``levels``: every chosen head at once (``all``), the chosen heads of each
    layer (``layer``), each head alone (``head``). Perplexity is the next-token loss over
    every real token of each input after its first (each input one sequence).

    Cost: forward passes over the corpus, each with the logits: 1 (unedited; it also
    measures the means when ``reference`` is None) + 1 over ``reference`` (``"mean"``
    with a reference) + 1 (``all``) + ``len(layers)`` (``layer``) + ``len(layers) x
    len(heads)`` (``head``). On SmolLM2 (30 layers x 9 heads) that is 302 passes:
    restrict ``layers`` / ``heads`` or drop ``"head"`` from ``levels`` on a CPU.

    Args:
        corpus: strings (each one sequence) or a token tensor ``[n, pos]`` (with
            ``attention_mask``); not a stream: it is run many times.
        keys: the key set C: ``"start"``, ``"delimiters"``, key indices, a ``[key_pos]``
            mask, a rule that reads tokens (not the residual stream).
        mode: ``"mean"``, ``"zero"`` or ``"redistribute"``.
        layers, heads: the heads to edit (default all).
        reference: where the ``"mean"`` constants come from (default: the corpus itself).
        fwd_hooks: hooks of yours, attached in every pass before the surgery's.

    Raises:
        ValueError / TypeError: an encoder (bidirectional: no next-token loss; measure its
            sentence embeddings under :meth:`BiasSurgery.hooks` instead), a bad mode,
            layer, head, level, key set or input: before any forward pass.

    >>> import torch
    >>> from massact_lens.examples import tiny_model
    >>> model = tiny_model("gpt2")
    >>> corpus = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    >>> r = bias_surgery(model, corpus, "start", mode="redistribute", layers=[0], heads=[1], progress=False)
    >>> r.n_tokens, len(r.to_dataframe())       # 4 x 15 predicted; none, all, layer 0, head 1
    (60, 4)
    """
    refuse_plain_hf(model, "bias_surgery")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, not {mode!r}.")
    if not is_causal(model):
        raise ValueError(
            "bias_surgery reports next-token perplexity, and this model attends in both directions (an "
            "encoder). Build the edit with a causal model's result .hooks(...), or measure an encoder "
            "under your own hooks with massact_lens.evaluate.embedding_similarity."
        )
    chosen = check_layers(model, layers, ("pattern", "v", "z"))
    head_list = check_heads(model, heads)
    run_levels = _check_levels(levels)
    rule = _check_keys(model, keys)
    user = _check_hook_list(model, fwd_hooks)
    if reference is not None and mode != "mean":
        raise ValueError(f"reference gives the means of mode 'mean'; mode {mode!r} uses none: leave reference out, "
                         "or pass mode='mean'.")
    plan = _plan(
        model,
        corpus,
        "corpus",
        batch_size=batch_size,
        attention_mask=attention_mask,
        prepend_bos=prepend_bos,
    )
    ref_plan = (
        None
        if reference is None
        else _plan(model, reference, "reference", batch_size=batch_size, prepend_bos=prepend_bos)
    )
    warn_if_processed(model)
    return _run(model, plan, ref_plan, rule, mode, chosen, head_list, run_levels, user, progress)


def _run(
    model: TransformerLensModel,
    plan: BatchPlan,
    ref_plan: BatchPlan | None,
    rule: PositionRule,
    mode: str,
    layers: tuple[int, ...],
    heads: tuple[int, ...],
    levels: tuple[str, ...],
    user: HookList,
    progress: bool,
) -> BiasSurgery:
    d_head = int(model.cfg.d_head)
    stats = TermMeans(layers, heads, d_head, rule)
    baseline = Losses()
    measure(model, plan, UserHooks(user), stats, baseline, progress=False)
    mean_term, c_mass = stats.result()
    if stats.c_keys == 0:
        warnings.warn(
            f"The key set {rule.describe()} selected no key in any input: every surgery leaves the model "
            "as it is. Choose other keys.",
            UserWarning,
            stacklevel=3,
        )
    if ref_plan is not None:
        ref = TermMeans(layers, heads, d_head, rule)
        measure(model, ref_plan, UserHooks(user), ref, progress=False)
        mean_term = ref.result()[0]
    runs: list[tuple[str, dict[int, tuple[int, ...]]]] = []
    if "all" in levels:
        runs.append(("all", {layer: heads for layer in layers}))
    if "layer" in levels:
        runs += [("layer", {layer: heads}) for layer in layers]
    if "head" in levels:
        runs += [("head", {layer: (h,)}) for layer in layers for h in heads]
    nan = float("nan")
    all_nll, layer_nll = nan, torch.full((len(layers),), nan, dtype=torch.float64)
    head_nll = torch.full((len(layers), len(heads)), nan, dtype=torch.float64)
    for level, edit in progress_bar(
        runs, total=len(runs), desc=f"bias surgery ({mode})", enabled=progress
    ):
        means = (
            None
            if mode != "mean"
            else {
                layer: mean_term[layers.index(layer)][[heads.index(h) for h in hs]]
                for layer, hs in edit.items()
            }
        )
        losses = Losses()
        hooks = surgery_hooks(model, edit, mode, rule, means)
        measure(model, plan, UserHooks([*user, *hooks]), losses, progress=False)
        layer = next(iter(edit))
        if level == "all":
            all_nll = losses.result()
        elif level == "layer":
            layer_nll[layers.index(layer)] = losses.result()
        else:
            head_nll[layers.index(layer), heads.index(edit[layer][0])] = losses.result()
    return BiasSurgery(
        provenance=Provenance.of(model),
        layers=layers,
        n_inputs=int(plan.n_inputs or 0),
        mode=mode,
        positions=rule.describe(),
        heads=heads,
        levels=levels,
        reference="the corpus itself"
        if ref_plan is None or mode != "mean"
        else f"{ref_plan.n_inputs} inputs",
        n_tokens=baseline.tokens,
        baseline_nll=baseline.result(),
        all_nll=all_nll,
        layer_nll=layer_nll,
        head_nll=head_nll,
        c_mass=c_mass,
        mean_term=mean_term,
        rule=rule,
        weights=weights_fingerprint(model),
    )
