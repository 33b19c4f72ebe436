"""The implicit attention bias: each head's output split into the part from C and the rest.

``bias(q) = sum_{i in C} p_qi v_i`` and ``rest(q) = sum_{i not in C} p_qi v_i``,
exactly (``bias + rest = hook_z``), with how constant each term is
(the paper's section 4; see ``docs/concepts.md``).

>>> from massact_lens.examples import minilm
>>> split = implicit_bias(minilm(), ["The cat sat on the mat."], "start", layers=[2], progress=False)
>>> bool(split.z_error.max() < 1e-4)
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core._plain_hf import refuse_plain_hf
from massact_lens._core.fast_paths import fused_route
from massact_lens._core.loop import measure
from massact_lens._core.results import (
    Keep,
    StreamedResult,
    add_sums,
    check_keep,
    keep_limit,
    merge_kept,
)
from massact_lens._core.types import Inputs, warn_if_processed
from massact_lens.attention._bias_stats import (
    MODES,
    SCOPES,
    TERMS,
    spread,
)
from massact_lens.attention._decomposing import KEPT, Decomposition
from massact_lens.attention._passes import (
    KeyedFields,
    KeyPositions,
    check_heads,
    check_layers,
)
from massact_lens.attention.keys import Positions, keyed_plan

__all__ = ["ImplicitBias", "implicit_bias"]


#: Per-input tensors of an :class:`ImplicitBias`, input-first, and their position axes.
_KEPT = KEPT
_LAYER_FIRST = ("bias_z", "rest_z", "c_mass", "out_scale")


@dataclass(frozen=True, repr=False)
class ImplicitBias(StreamedResult, KeyedFields):
    """The decomposition ``attn(q) = bias(q) + rest(q)`` per layer and head.

    Both terms are in head space (``hook_z``); their images in the residual stream
    are, per head, ``z_h @ W_O[h]`` (:meth:`written`). The output bias ``b_O``
    belongs to neither: ``sum_h (written(bias) + written(rest)) + b_O`` is the
    attention output. On sandwich blocks (Gemma 2 / 3) the attention output passes
    the post-attention norm before it enters the residual stream, so the images there
    are ``z_h @ W_O[h] / rms(full output) * gain`` (``out_scale``: ``1 / rms`` per
    query; ``out_gain``: the norm's gain), and ``sum_h (written(bias) +
    written(rest)) + b_O / rms * gain`` is the write into the residual stream, exactly.
    Every residual-space statistic reads these images.

    Two kinds of content: running sums over **every** input (``sums``: what
    :meth:`constancy` and :meth:`to_dataframe` read and :meth:`merge` adds), and
    the full per-input tensors (``bias_z``, ``rest_z``, ``c_mass``, ``key_mask``,
    ``attention_mask``, ``tokens``) of only the **first** ``n_kept`` inputs
    (``keep``), cut to their longest real length; padding queries hold zeros.

    :meth:`merge` (decompositions of consecutive slices of a corpus, in order): the
    sums add and the kept inputs concatenate (up to ``keep``), so the result is the
    one a single run over the concatenated inputs gives, to float rounding (a
    forward pass over other batches can differ in float32's last bits). The parts
    must come from the same model (provenance, ``gram`` and ``W_O``), layers, heads, key set,
    BOS setting and ``keep`` (ValueError otherwise). Key sets tied to input indices
    (an ``[n_inputs, key_pos]`` mask, ``find_massive`` records) describe their own
    slice and do not merge (refused): use a rule or a profile.

    Non-finite values: an input whose pattern, values, ``hook_z`` or key-set residual
    held a NaN or inf is left out of every statistic (``sums``, ``z_error``,
    ``out_error``) and reported once by a ``RuntimeWarning`` (input, hook, how many
    entries); its kept tensors show what was measured.

    >>> import torch
    >>> from massact_lens.examples import tiny_model
    >>> model, tokens = tiny_model(), torch.randint(0, 64, (4, 6))
    >>> parts = [implicit_bias(model, tokens[:2], keep=4, progress=False), implicit_bias(model, tokens[2:], keep=4, progress=False)]
    >>> merged, whole = ImplicitBias.merge(parts), implicit_bias(model, tokens, keep=4, progress=False)
    >>> merged.n_inputs, torch.allclose(merged.bias_z, whole.bias_z, rtol=1e-5, atol=1e-7)
    (4, True)
    """

    #: The heads decomposed (indices of the model's heads).
    heads: tuple[int, ...]
    #: The hook points decomposed (pattern, v, z per layer).
    hook_names: tuple[str, ...]
    #: Per layer, where the attention output was read for ``out_error``.
    out_hooks: tuple[str, ...]
    #: ``sum_{i in C} p_qi v_i`` of the kept inputs.
    bias_z: Float[torch.Tensor, "layer n_kept query_pos head d_head"]
    #: ``sum_{i not in C} p_qi v_i`` of the kept inputs.
    rest_z: Float[torch.Tensor, "layer n_kept query_pos head d_head"]
    #: Attention probability on C per query, of the kept inputs.
    c_mass: Float[torch.Tensor, "layer n_kept query_pos head"]
    #: C of each kept input.
    key_mask: Bool[torch.Tensor, "n_kept key_pos"]
    #: 1 for real query positions of the kept inputs.
    attention_mask: Int[torch.Tensor, "n_kept query_pos"]
    #: The token ids of the kept inputs.
    tokens: Int[torch.Tensor, "n_kept query_pos"]
    #: ``G_h = W'_O[h] W'_O[h]^T`` per layer and chosen head (float64), with ``W'_O`` the
    #: head's ``W_O`` times the post-attention norm's gain: the residual-space inner
    #: product in head coordinates, all the statistics need (``d_head^2`` per head, not
    #: ``d_head x d_model``).
    gram: Float[torch.Tensor, "layer head d_head d_head"] = field(repr=False)
    #: ``W_O`` of the chosen heads, for :meth:`written`; ``None`` with ``keep=0`` (no
    #: per-query terms to write: on a 70B model it would be ~21 GB in float32).
    W_O: Float[torch.Tensor, "layer head d_head d_model"] | None = field(repr=False)
    #: ``b_O`` per layer.
    b_O: Float[torch.Tensor, "layer d_model"] = field(repr=False)
    #: Per layer, the post-attention norm's gain (sandwich blocks; ones elsewhere).
    out_gain: Float[torch.Tensor, "layer d_model"] = field(repr=False)
    #: ``1 / rms`` of the full attention output per query, of the kept inputs (sandwich
    #: blocks; ones elsewhere).
    out_scale: Float[torch.Tensor, "layer n_kept query_pos"] = field(repr=False)
    #: Per layer, max ``|bias + rest - hook_z|`` over real queries and chosen heads (every input).
    z_error: Float[torch.Tensor, " layer"]
    #: Per layer, max ``|sum_h hook_z_h @ W_O[h] + b_O - attention output|`` over
    #: real queries (all heads, every input; at most 64 query positions per batch,
    #: spread evenly: a wrong ``W_O`` shows on any of them).
    out_error: Float[torch.Tensor, " layer"]
    #: Float64 running sums over every input, ``[layer, query set, term, head, ...]``


    def _next_steps(self) -> str:
        """As every result's, less :meth:`written` when no per-query terms were kept (keep=0)."""
        steps = super()._next_steps().split()
        return " ".join(step for step in steps if self.W_O is not None or step != ".written()")

    def _layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"Layer {layer} was not decomposed; this result has layers {list(self.layers)}.")
        return self.layers.index(layer)

    def written(self, layer: int, term: Literal["bias", "rest"] = "bias") -> Float[torch.Tensor, "n_kept query_pos head d_model"]:
        """The term's image in the residual stream, per head, kept inputs: ``z_h @ W_O[h]`` (no
        ``b_O``); on sandwich blocks through the post-attention norm, ``/ rms(full output) * gain``."""
        if term not in ("bias", "rest"):
            raise ValueError(f"term must be 'bias' or 'rest', not {term!r}.")
        i = self._layer_index(layer)
        if self.W_O is None:
            raise ValueError("This result kept no per-query terms (keep=0): run implicit_bias(..., keep=N) to keep "
                             "the first N inputs' terms.")
        z = (self.bias_z if term == "bias" else self.rest_z)[i]
        scale = self.out_scale[i][:, :, None, None]
        return torch.einsum("nqhd,hdm->nqhm", z, self.W_O[i] * self.out_gain[i]) * scale

    def _mode(self, queries: str) -> int:
        if queries not in MODES:
            raise ValueError(f"queries must be 'all' or 'outside' (drop queries that are themselves in C), not {queries!r}.")
        return MODES.index(queries)

    def constancy(self, queries: Literal["all", "outside"] = "all") -> pd.DataFrame:
        """How constant the bias term is, next to the rest term: the paper's contrast as numbers.

        For each layer, head (``-1``: the sum over the chosen heads, residual space
        only), term (``bias`` / ``rest``), space (``head``: hook_z; ``resid``: through
        ``W_O``) and scope, with ``m`` the mean vector of the scope:

        * ``cos_to_mean``: mean cosine similarity of the vectors to ``m``;
        * ``rel_variation``: ``sqrt(mean ||x - m||^2) / ||m||`` (std norm / mean norm);
        * ``mean_norm``: ``||m||``; ``n``: how many vectors.

        Scopes: ``all`` (every real query of every input), ``within_input`` (across
        the queries of one input, averaged over inputs), ``across_inputs`` (the
        per-input means across inputs). ``queries="outside"`` drops queries that are
        themselves in C (in a causal model the first token's query sees only itself).
        Every input counts, also those not kept. Zero vectors (a query that gives C
        no attention) have no direction: they are left out of the cosine means.
        """
        mode = self._mode(queries)
        rows = []
        for i, layer in enumerate(self.layers):
            g = self.gram[i]
            for t, term in enumerate(TERMS):
                for space, spaces, heads in (("head", ("head",), list(self.heads)),
                                             ("resid", ("resid", "total"), [*self.heads, -1])):
                    for scope, label in SCOPES.items():
                        parts = [spread(self.sums, scope, s, i, mode, t, g) for s in spaces]
                        cos, rel, norm = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                                          torch.cat([p[2] for p in parts]))
                        rows += [{"layer": layer, "head": head, "term": term, "space": space, "scope": label,
                                  "cos_to_mean": float(cos[j]), "rel_variation": float(rel[j]),
                                  "mean_norm": float(norm[j]), "n": parts[0][4]} for j, head in enumerate(heads)]
        return pd.DataFrame(rows)

    def to_dataframe(self, queries: Literal["all", "outside"] = "all") -> pd.DataFrame:
        """One row per (layer, head; ``-1`` = sum over heads): the bias-vs-rest contrast.

        Residual space (through ``W_O``), scope ``all``, every input: ``c_mass`` (mean
        attention on C), ``bias_norm`` / ``rest_norm`` (mean vector norms), ``bias_cos`` /
        ``rest_cos`` (cosine to the mean), ``bias_rel_variation`` / ``rest_rel_variation``.
        """
        mode = self._mode(queries)
        rows = []
        for i, layer in enumerate(self.layers):
            g = self.gram[i]
            mass = self.sums["mass"][i, mode] / self.sums["all.n"][i, mode]
            masses = torch.cat([mass, mass.mean()[None]])
            stats = {}
            for t, term in enumerate(TERMS):
                parts = [spread(self.sums, "all", s, i, mode, t, g) for s in ("resid", "total")]
                stats[term] = [torch.cat([p[3] for p in parts]), torch.cat([p[0] for p in parts]),
                               torch.cat([p[1] for p in parts])]  # mean norm, cos, rel
            for j, head in enumerate([*self.heads, -1]):
                rows.append(
                    {
                        "layer": layer,
                        "head": head,
                        "c_mass": float(masses[j]),
                        "bias_norm": float(stats["bias"][0][j]),
                        "rest_norm": float(stats["rest"][0][j]),
                        "bias_cos": float(stats["bias"][1][j]),
                        "rest_cos": float(stats["rest"][1][j]),
                        "bias_rel_variation": float(stats["bias"][2][j]),
                        "rest_rel_variation": float(stats["rest"][2][j]),
                        "positions": self.positions,
                    }
                )
        return pd.DataFrame(rows)

    def _kept(self) -> dict[str, torch.Tensor]:
        """The per-input tensors, input-first (as :class:`KeptInputs` holds them)."""
        return {name: getattr(self, name).transpose(0, 1) if name in _LAYER_FIRST else getattr(self, name)
                for name in (*_KEPT, "attention_mask")}

    merge_same = ("layers", "heads", "positions", "key_set", "prepend_bos", "hook_names", "out_hooks", "keep", "gram", "W_O",
                  "b_O", "out_gain")

    @classmethod
    def _merged(cls, parts: list[ImplicitBias]) -> ImplicitBias:
        first = parts[0]
        kept = merge_kept([(p.n_inputs, p._kept()) for p in parts], keep_limit(first.keep), _KEPT)
        return replace(
            first,
            n_inputs=sum(p.n_inputs for p in parts),
            **{name: t.transpose(0, 1) if name in _LAYER_FIRST else t for name, t in kept.items()},
            z_error=torch.stack([p.z_error for p in parts]).amax(0),
            out_error=torch.stack([p.out_error for p in parts]).amax(0),
            sums=add_sums([p.sums for p in parts]),
        )


def implicit_bias(
    model: TransformerLensModel,
    inputs: Inputs,
    positions: Positions = "start",
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    keep: Keep = 0,
    batch_size: int = 16,
    prepend_bos: bool | None = None,
    attention_mask: torch.Tensor | None = None,
    progress: bool = True,
    by_length: bool | None = None,
) -> ImplicitBias:
    """Split each head's attention output into the term from C and the rest, exactly.

    ``bias(q) = sum_{i in C} p_qi v_i`` and ``rest(q) = sum_{i not in C} p_qi v_i``
    with ``p = hook_pattern`` and ``v = hook_v`` (KV heads repeated under
    grouped-query attention), so ``bias + rest = hook_z``; through ``W_O`` per head
    they are the head's write into the residual stream, and their sum over heads
    plus ``b_O`` (in neither term) is the attention output. The result records the
    measured errors of both identities (``z_error``, ``out_error``) and
    :meth:`ImplicitBias.constancy` gives the paper's contrast.

    Cost: one forward pass per batch. Fused route (the default wherever C is known before
    the pass and the model's attention runs through HF's kernel registry): the attention
    kernel itself weighs the keys of C (one extra value column per key of C, or ``[v * c,
    c]`` when C is wider than a head), so no ``[query, key]`` tensor exists; each layer is
    split and folded as its attention output appears, a block of queries at a time
    (SmolLM2-135M, one input of 2,000 tokens: about 1.3x the scan's time and peak memory;
    bench/README.md, "Attention at forward cost"). Eager route (C read from the same
    pass's residual stream, a bridge whose attention is not HF's, or
    ``MASSACT_LENS_EAGER=1``): per chosen layer ``hook_pattern``, ``hook_v`` and
    ``hook_z`` of the batch are held until the pass ends (memory ~ length^2). The route
    taken is in ``result.hook_names``. What it keeps does not grow with the corpus:
    float64 running sums of ``~(12 x heads x d_head + d_model)`` numbers per layer and
    term, and, with ``keep=N``, the ``2 x layers x pos x heads x d_head`` head-space
    floats of the first N inputs (276 MB per input of 2,000 tokens on SmolLM2-135M);
    residual-space images are computed on demand (:meth:`ImplicitBias.written`).

    Args:
        positions: the key positions C (anything :func:`~massact_lens.attention.keys.as_rule` accepts); they must be
            token positions (``hook_v`` has no entry for extra key slots).
        layers, heads: what to decompose (default all).
        keep: how many inputs (the first ones) keep their full per-query tensors
            (``bias_z``, ``rest_z``, ``c_mass``, ...) for :meth:`ImplicitBias.written` and
            your own plots; ``"all"`` for every input. Default 0: the statistics only
            (:meth:`~ImplicitBias.constancy`, :meth:`~ImplicitBias.to_dataframe`, the
            figures), which cover every input either way.
        batch_size, prepend_bos, attention_mask, progress: as in :func:`attention_concentration`.
        by_length: batch the inputs longest first (little padding computed; results in
            input order). None (default): whenever the key set allows it (the library's
            rules; a callable or a rule of your own gets the batches in input order, as
            ``batch.start + row``); False: in input order (batch boundaries as given, e.g.
            for a merge equal bit for bit to one run).

    Non-finite values (a NaN or inf from a hook of yours upstream, an overflow): an input
    whose pattern, values, ``hook_z`` or key-set residual held one is left out of every
    statistic (the pass does not raise) and reported once, after the pass, by a
    ``RuntimeWarning`` naming the input, the hook and how many entries.

    Raises:
        ValueError / TypeError: a layer or head that does not exist, an empty or
            malformed C, bad inputs: before any forward pass.

    >>> from massact_lens.examples import minilm
    >>> split = implicit_bias(minilm(), ["The cat sat on the mat.", "A dog ran home."],
    ...                       "start", layers=[2], keep=1, progress=False)
    >>> split.n_inputs, split.bias_z.shape        # layer, kept input, query, head, d_head
    (2, torch.Size([1, 1, 9, 12, 32]))
    >>> bool(split.z_error.max() < 1e-4 and split.out_error.max() < 1e-3)
    True
    """
    refuse_plain_hf(model, "implicit_bias")
    keep = check_keep(keep)
    chosen = check_layers(model, layers, ("pattern", "v", "z"))
    head_list = check_heads(model, heads)
    plan, rule = keyed_plan(model, inputs, positions, batch_size=batch_size, attention_mask=attention_mask,
                            prepend_bos=prepend_bos, by_length=by_length)
    warn_if_processed(model)
    fused = fused_route(model, chosen) is None
    keys = KeyPositions(model, rule, early=fused)
    split = Decomposition(model, plan, keys, chosen, head_list, keep, fused=fused)
    measure(model, plan, keys, split, progress=progress, desc="implicit bias")
    keys.warn_if_empty()
    keys.nonfinite.warn("implicit_bias")
    return ImplicitBias(**split.result())
