"""What the ``massact`` command reads and writes: model names, thresholds, prompt and pair
files, JSON and tables; each argument checked before any model is loaded.

>>> _label("minilm"), _positive_int("3")
('all-MiniLM-L6-v2 (bundled)', 3)
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2"
#: The short names ``--model`` takes for the bundled models, and how they are described.
BUNDLED = {
    "smollm2": "SmolLM2-135M-Instruct (bundled; weights dequantised from Q4_1, not the original bf16)",
    "minilm": "all-MiniLM-L6-v2 (bundled)",
    "bigram_backcopy": "Bigram-Backcopy decoder trained by the project (bundled)",
}
#: The paper's thresholds, and lower ones for the small bundled models.
PAPER_THRESHOLDS = (100.0, 1000.0)
SMALL_THRESHOLDS = {"minilm": (50.0, 200.0), "bigram_backcopy": (10.0, 20.0)}


def _short_name(model_arg: str | None) -> tuple[str, str | None] | None:
    """(bundled name, variant) for a short ``--model`` name, else None."""
    name = DEFAULT_MODEL if model_arg is None else model_arg
    base, _, variant = name.partition(":")
    if base.replace("-", "_").lower() not in BUNDLED or Path(name).exists():
        return None
    return base.replace("-", "_").lower(), variant or None


def _label(model_arg: str | None) -> str:
    short = _short_name(model_arg)
    if short is None:
        return str(model_arg)
    name, variant = short
    return BUNDLED[name] + (f", variant {variant}" if variant else "")


# ---------------------------------------------------------------- checks (no torch, no model)


def _positive_int(text: str) -> int:
    """An argparse type: its message says what to pass (argparse would name this function)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"pass a positive integer such as 10, not {text!r}")
    return value


def _index(text: str) -> int:
    """An argparse type for an index (0, 1, ...)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"pass an integer index 0, 1, ..., not {text!r}")
    return value


def _check_model(model_arg: str | None) -> None:
    """A short name's variant, checked before anything is read."""
    from massact_lens.models.checkpoints import VARIANTS

    short = _short_name(model_arg)
    if short is None or short[1] is None:
        return
    name, variant = short
    if name != "bigram_backcopy":
        raise SystemExit(f"massact: --model {model_arg!r}: {name} has no variants. Pass --model {name}.")
    if variant not in VARIANTS:
        choices = ", ".join(f"{name}:{v}" for v in VARIANTS)
        raise SystemExit(f"massact: --model {model_arg!r}: no such variant. Pass one of {choices}.")


def _criterion(args: argparse.Namespace) -> Any:
    """The criterion the run uses (defaults by --model given or not), checked before any model loads."""
    from massact_lens._core.checks import check_threshold

    short = _short_name(args.model)
    defaults = SMALL_THRESHOLDS.get(short[0], PAPER_THRESHOLDS) if short else PAPER_THRESHOLDS
    values = (defaults[0] if args.min_value is None else args.min_value,
              defaults[1] if args.min_ratio is None else args.min_ratio)
    try:
        checked = [check_threshold(name, value) for name, value in zip(("min_value", "min_ratio"), values, strict=True)]
    except ValueError as error:
        raise SystemExit(f"massact: --min-value / --min-ratio: {error}") from None
    return argparse.Namespace(min_value=checked[0], min_ratio=checked[1])


def _describe(criterion: Any) -> str:
    return f"|x| > {criterion.min_value:g} and >= {criterion.min_ratio:g}x median"


def _check_output(path: str | None, option: str) -> None:
    """A file to write at the end: refuse a folder or a missing parent folder now, not after the work."""
    if path is None:
        return
    out = Path(path)
    if out.is_dir():
        raise SystemExit(f"massact: {option} {path!r} is a folder; give a file name such as {out / 'out'}.")
    if not (out.parent if str(out.parent) else Path(".")).is_dir():
        raise SystemExit(f"massact: folder {str(out.parent)!r} of {option} does not exist; create it or choose another {option}.")
    from massact_lens._core.files import check_writable

    try:
        check_writable(out)
    except OSError as error:
        raise SystemExit(f"massact: {option} {path!r}: {error}") from None


def _check_out_folder(path: str, option: str) -> None:
    """A folder to fill (``train --out``): it, or the nearest folder above it that exists, must be writable."""
    from massact_lens._core.files import check_writable

    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        check_writable(folder / ".massact_probe")
    except OSError as error:
        raise SystemExit(f"massact: {option} {path!r}: {error}") from None


def _lines(path: Path, option: str) -> list[str]:
    """The lines of a UTF-8 text file, split at newlines only (U+2028 and friends stay inside a line)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise SystemExit(f"massact: {option} {str(path)!r} is not UTF-8 text (byte {error.start}): save it as UTF-8.") from None
    return [line.rstrip("\r") for line in text.split("\n")]


def _read_pairs(arg: str | None) -> list[tuple[str, str]] | str | None:
    """--pairs: 'builtin' (not given), None ('none'), or the pairs of a file."""
    if arg is None:
        return "builtin"
    if arg.lower() == "none":
        return None
    file = Path(arg)
    if not file.is_file():
        raise SystemExit(f"massact: --pairs {arg!r} is not a file. Give a text file with one pair per line, "
                         "the two sentences separated by a tab, or 'none'.")
    pairs = []
    for number, line in enumerate(_lines(file, "--pairs"), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("\t")]
        if len(parts) != 2 or not all(parts):
            found = f"{len(parts)} part{'s' if len(parts) != 1 else ''}" + ("" if all(parts) else ", one empty")
            raise SystemExit(f"massact: {arg}:{number} is not two tab-separated sentences ({found}). Put one pair "
                             "per line, the two sentences separated by one tab, or pass --pairs none.")
        pairs.append((parts[0], parts[1]))
    if not pairs:
        raise SystemExit(f"massact: --pairs {arg!r} has no pairs. Put one pair per line, the two sentences separated "
                         "by one tab, or pass --pairs none (or leave out --pairs for the 20 built-in pairs).")
    return pairs


def _prompts(path: str | None) -> list[str]:
    from massact_lens.examples.sentences import SENTENCES

    if path is None:
        return list(SENTENCES)
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"massact: --prompts {path!r} is not a file. Give a text file with one prompt per line.")
    prompts = [line.strip() for line in _lines(file, "--prompts") if line.strip()]
    if not prompts:
        raise SystemExit(f"massact: --prompts {path!r} has no non-empty lines. Write one prompt per line, or "
                         "leave out --prompts for the 40 built-in sentences.")
    return prompts


# ---------------------------------------------------------------- after the checks


def _load(model_arg: str | None) -> Any:
    from massact_lens import examples
    from massact_lens.models.checkpoints import is_checkpoint, load_checkpoint
    from massact_lens.models.load import load_model

    _check_model(model_arg)
    short = _short_name(model_arg)
    if short is not None:
        name, variant = short
        if name == "bigram_backcopy":
            return examples.bigram_backcopy(variant or "default")
        return examples.smollm2() if name == "smollm2" else examples.minilm()
    assert model_arg is not None
    path = Path(model_arg).expanduser()
    return load_checkpoint(path) if is_checkpoint(path) else load_model(model_arg)


def _pairs_for(model: Any, pairs: list[tuple[str, str]] | str | None) -> list[tuple[str, str]] | None:
    """The paraphrase pairs an encoder is judged on; decoders are judged by perplexity instead."""
    from massact_lens._core.types import is_causal
    from massact_lens.examples.sentences import PARAPHRASE_PAIRS

    if is_causal(model):
        if isinstance(pairs, list):
            raise SystemExit("massact: --pairs is for encoders; a causal model is judged by perplexity on the prompts. "
                             "Leave out --pairs.")
        return None
    return list(PARAPHRASE_PAIRS) if pairs == "builtin" else pairs  # type: ignore[return-value]


def _provenance_json(provenance: Any) -> dict[str, Any]:
    return provenance.to_dict() if hasattr(provenance, "to_dict") else dict(provenance)


def _write_json(path: str, payload: dict[str, Any]) -> None:
    from massact_lens._core.files import write_atomic

    write_atomic(path, json.dumps(payload, indent=1, default=str))
    print(f"\nwrote {path}")


def _print_table(table: Any) -> None:
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.round(2).to_string(index=False))
    print()


def markdown_table(frame: Any) -> str:
    """A DataFrame as a markdown table, floats to 4 decimals (1 from 10 up), NaN as n/a.

    >>> import pandas as pd
    >>> print(markdown_table(pd.DataFrame({"layer": [0], "ratio": [27.81]})))
    | layer | ratio |
    |---|---|
    | 0 | 27.8 |
    """

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "n/a" if math.isnan(value) else f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _chosen_pairs(pairs: Sequence[tuple[str, str]] | str | None) -> list[tuple[str, str]] | None:
    """``"builtin"``: :data:`massact_lens.examples.sentences.PARAPHRASE_PAIRS`; None: none; else the pairs as strings."""
    from massact_lens.examples.sentences import PARAPHRASE_PAIRS

    if pairs == "builtin":
        return list(PARAPHRASE_PAIRS)
    if pairs is None or isinstance(pairs, str):
        return None
    return [(str(a), str(b)) for a, b in pairs]


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string: wrap it in a list.")
    out = list(prompts)
    if not out:
        raise ValueError("No prompts: pass at least one string.")
    bad = [i for i, p in enumerate(out) if not isinstance(p, str) or not p]
    if bad:
        raise ValueError(f"Prompts {bad[:5]} are not non-empty strings: pass only non-empty strings.")
    return out
