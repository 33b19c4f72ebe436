"""Checkpoints of the project's small decoders: the shipped models, their files, and loading them.

A checkpoint folder holds ``config.json`` (format :data:`FORMAT`), ``model.safetensors``
(weights, k'/v' or sink embedding included) and a tokenizer. Loading one needs no
trainer: :func:`massact_lens.examples.bigram_backcopy` and the ``massact`` command
read checkpoints through this module alone (:mod:`massact_lens.training` writes them).

>>> model = load_checkpoint(CHECKPOINTS / "explicit_bias")
>>> model.to_str_tokens("w7 T1")
['<slot>', '<s>', 'w7', 'T1']
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.sources.native import boot as boot_native

from massact_lens.models.attention_variants import attach_head_gate, attach_softmax_one
from massact_lens.models.explicit_bias import attach_explicit_bias, attach_sink_token

__all__ = ["CHECKPOINTS", "VARIANTS", "is_checkpoint", "load_checkpoint", "save_checkpoint"]

#: The attention variants a model can be trained in (the last two: :mod:`massact_lens.models.attention_variants`).
VARIANTS: tuple[str, ...] = ("default", "sink_token", "explicit_bias", "softmax1", "gated")
#: Where the shipped Bigram-Backcopy models live (one folder per variant).
CHECKPOINTS = Path(__file__).parent / "checkpoints" / "bigram_backcopy"
#: Vocabulary layout shared by every checkpoint: these ids, then the task's tokens.
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "<unk>", "<sink>", "<slot>")
PAD_ID, BOS_ID, UNK_ID, SINK_ID, SLOT_ID = range(5)
#: The id each variant puts at position 0, before BOS (None: BOS is first).
PLACEHOLDERS: dict[str, int | None] = {
    "default": None, "sink_token": SINK_ID, "explicit_bias": SLOT_ID, "softmax1": SLOT_ID, "gated": None,
}
#: ``config.json``'s ``format``: the name the training module had when it was introduced.
FORMAT = "massact_lens.train/1"


def is_checkpoint(path: str | Path) -> bool:
    """True for a folder whose ``config.json`` has this module's format (not HuggingFace's).

    >>> is_checkpoint(CHECKPOINTS / "default"), is_checkpoint(CHECKPOINTS)
    (True, False)
    """
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return str(json.loads(config.read_text(encoding="utf-8")).get("format", "")).startswith("massact_lens.train/")
    except (ValueError, OSError, AttributeError):
        return False


def read_config(directory: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint folder, checked to be this module's format.

    Raises:
        FileNotFoundError: no ``config.json``. ValueError: not JSON, or another format.

    >>> read_config(CHECKPOINTS / "default")["variant"]
    'default'
    """
    folder = Path(directory)
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: pass a folder written by massact_lens.training.")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{file} is not valid JSON ({error}): the checkpoint is damaged; write it again.") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise ValueError(f"{file} is not a {FORMAT} checkpoint (format={found!r}).")
    return config


def build_model(bridge_config: dict[str, Any], variant: str, seed: int) -> TransformerBridge:
    """A fresh model of a checkpoint's architecture, with the variant's prefix component attached.

    >>> config = read_config(CHECKPOINTS / "sink_token")
    >>> type(build_model(config["model"], "sink_token", seed=0)).__name__
    'TransformerBridge'
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}.")
    cfg = TransformerBridgeConfig(**bridge_config)
    model = boot_native(cfg, model_name=bridge_config["model_name"])
    if variant == "explicit_bias":
        attach_explicit_bias(model, placeholder_id=SLOT_ID, seed=seed)
    elif variant == "sink_token":
        attach_sink_token(model, placeholder_id=SINK_ID, seed=seed)
    elif variant == "softmax1":
        attach_softmax_one(model, placeholder_id=SLOT_ID)
    elif variant == "gated":
        attach_head_gate(model, seed=seed)
    return model


def write_tokenizer(directory: str | Path, token_names: Sequence[str], variant: str, *, characters: bool = False) -> None:
    """Write a word-level tokenizer over :data:`SPECIAL_TOKENS` + ``token_names`` to ``directory``.

    ``characters=True`` splits text into single characters (a text-file task);
    otherwise tokens are separated by whitespace. The variant's placeholder is
    prepended to every encoded string; BOS is not (``to_tokens`` adds it).

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> write_tokenizer(folder, ["a", "b"], "default")
    >>> sorted(p.name for p in Path(folder).iterdir())
    ['tokenizer.json', 'tokenizer_config.json']
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    names = list(SPECIAL_TOKENS) + list(token_names)
    vocab = {name: i for i, name in enumerate(names)}
    if len(vocab) != len(names):
        raise ValueError("A task token collides with a special token name.")
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    if characters:
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tokenizer.decoder = decoders.Fuse()
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    placeholder = PLACEHOLDERS[variant]
    if placeholder is not None:
        name = SPECIAL_TOKENS[placeholder]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{name} $A", special_tokens=[(name, placeholder)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="<pad>",  # no task has an end token; this lets generate() run
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<sink>", "<slot>"],
        padding_side="right",
    )
    fast.save_pretrained(str(directory))


def set_tokenizer(model: TransformerBridge, directory: str | Path) -> None:
    """Give the model the tokenizer saved in ``directory``, as saved.

    Assigned after boot on purpose: the bridge's own tokenizer setup reloads it
    with ``add_bos_token=True``, which rebuilds the post-processor and drops the
    placeholder the variants prepend. The tokenizer never prepends BOS itself;
    ``to_tokens(prepend_bos=True)`` does.

    >>> model = build_model(read_config(CHECKPOINTS / "default")["model"], "default", seed=0)
    >>> set_tokenizer(model, CHECKPOINTS / "default")
    >>> model.to_str_tokens("w7")
    ['<s>', 'w7']
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    tokenizer.padding_side = "right"
    model.tokenizer = tokenizer
    model.cfg.tokenizer_prepends_bos = False
    model.cfg.tokenizer_appends_eos = False
    model.cfg.default_prepend_bos = True


def save_checkpoint(model: TransformerBridge, directory: str | Path, config: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` (weights, k'/v', sink embedding or gates included) and ``config.json``.

    ``config`` is the JSON written next to the weights; it must hold ``model``
    (the ``TransformerBridgeConfig`` fields), ``variant`` and ``task``, as
    :func:`massact_lens.training.train` writes it. Tokenizer files are written by
    :func:`write_tokenizer`.

    >>> import tempfile
    >>> config = read_config(CHECKPOINTS / "default")
    >>> folder = save_checkpoint(load_checkpoint(CHECKPOINTS / "default"), tempfile.mkdtemp(), config)
    >>> sorted(p.name for p in folder.iterdir())
    ['config.json', 'model.safetensors']
    """
    missing = [key for key in ("model", "variant", "task") if key not in config]
    if missing:
        raise ValueError(f"config lacks {missing}: pass the config massact_lens.training.train builds.")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": FORMAT})
    (folder / "model.safetensors").chmod(0o644)  # safetensors writes 0600
    config = {key: value for key, value in config.items() if key != "format"}
    (folder / "config.json").write_text(json.dumps({"format": FORMAT, **config}, indent=1) + "\n")
    return folder


def load_checkpoint(directory: str | Path, *, device: str | None = None) -> TransformerBridge:
    """Load a checkpoint folder as a ``TransformerBridge`` with its tokenizer.

    The variant's bias slot or sink token is attached again with its trained
    parameters, and string prompts get the placeholder and BOS.

    Raises:
        FileNotFoundError: the folder lacks ``config.json`` or ``model.safetensors``.
        ValueError: the folder was not written by massact_lens, or its weights are
            truncated, damaged, or do not fit its config.

    >>> model = load_checkpoint(CHECKPOINTS / "explicit_bias")
    >>> model.to_str_tokens("w7 T1")
    ['<slot>', '<s>', 'w7', 'T1']
    """
    folder = Path(directory)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}: pass a folder written by massact_lens.training.")
    config = read_config(folder)
    weights = folder / "model.safetensors"
    try:
        state = load_file(str(weights))
    except SafetensorError as error:
        raise ValueError(
            f"{weights} is truncated or damaged ({error}); copy or train the checkpoint again."
        ) from None
    with torch.random.fork_rng(devices=[]):  # a "torch"-init model draws from the global RNG
        model = build_model(config["model"], config["variant"], seed=0)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{weights} does not fit {folder / 'config.json'}: {error}") from None
    set_tokenizer(model, folder)
    if device is not None:
        model.to(device, print_details=False)
    model.eval()
    return model
