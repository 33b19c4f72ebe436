"""Attention sinks, attention logits, and the implicit attention bias of massive tokens.

Each function measures attention against a key set C (``positions=``, see
:func:`~massact_lens.attention.keys.as_rule`): :func:`attention_concentration`
(the sink), :func:`attention_logits` (heat maps), :func:`implicit_bias` (the exact
``bias + rest`` split of each head's output), :func:`token_features` (keys, values
and attention inputs of C vs the other tokens), :func:`sink_curve` (the mass on C as
a function of the query's position, over a long context). The science: ``docs/concepts.md``.

**At the cost of a forward pass.** attention_concentration, implicit_bias,
token_features and sink_curve measure inside the model's fused attention kernel
wherever the bridge runs HuggingFace's attention (the LLaMA family, Gemma 3, BERT;
:func:`~massact_lens._core.fast_paths.fused_route`): extra value columns ride along one
SDPA call, so no ``[query, key]`` tensor exists and a pass over 8,192 tokens costs a
forward pass (``bench/README.md``). Elsewhere (GPT-2-style joint QKV, soft-capped
logits, a hook of yours inside attention, ``MASSACT_LENS_EAGER=1``) they read the eager
``hook_pattern``, equal to float32 rounding. attention_logits and the heads widget
always read every pattern (what they show is the pattern).

Memory does not grow with the corpus: each result holds float64 running sums over
every input (what its tables read) and the per-input tensors of only the first
``keep`` inputs; ``ImplicitBias.merge``, ``AttentionConcentration.merge`` and
``TokenFeatures.merge`` combine results of consecutive slices of a corpus exactly
(:mod:`massact_lens.distributed` does it across ranks).

>>> import torch
>>> from massact_lens.examples import tiny_model
>>> model = tiny_model("llama")                 # rotary, grouped-query attention
>>> tokens = torch.randint(0, 64, (3, 7))
>>> attention_concentration(model, tokens, "start", progress=False).mass.shape   # inputs x layers x heads
torch.Size([3, 2, 4])
>>> bool(implicit_bias(model, tokens, "start", layers=[1], progress=False).z_error.max() < 1e-5)
True
"""

from massact_lens.attention.concentration import AttentionConcentration, attention_concentration
from massact_lens.attention.curves import SinkCurve, sink_curve
from massact_lens.attention.decomposition import ImplicitBias, implicit_bias
from massact_lens.attention.features import GROUPS, TokenFeatures, token_features
from massact_lens.attention.keys import TOKEN_RULES, MassiveTokens, Positions, as_rule, key_mask
from massact_lens.attention.logits import AttentionLogits, attention_logits
from massact_lens.attention.qk import QKMassiveValues, qk_massive_values
from massact_lens.attention.surgery import BiasSurgery, bias_surgery

__all__ = [
    "GROUPS",
    "TOKEN_RULES",
    "AttentionConcentration",
    "AttentionLogits",
    "BiasSurgery",
    "ImplicitBias",
    "MassiveTokens",
    "QKMassiveValues",
    "Positions",
    "SinkCurve",
    "TokenFeatures",
    "as_rule",
    "attention_concentration",
    "attention_logits",
    "bias_surgery",
    "implicit_bias",
    "key_mask",
    "qk_massive_values",
    "sink_curve",
    "token_features",
]
