"""The ``massact`` command: scan a model for massive activations from the shell.

With no ``--model`` it runs on the embedded default model, the real pretrained
all-MiniLM-L6-v2 bundled offline, with thresholds suited to a 384-dim encoder
(|x| > 50 and >= 200x the median); with ``--model`` (a hub name or a local
folder) the paper's thresholds (100 and 1000x) apply unless given.

    massact scan                                  # MiniLM, built-in sentences
    massact scan --model ./my_llama --prompts prompts.txt --json scan.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

__all__ = ["main"]

DEFAULT_MODEL = "all-MiniLM-L6-v2 (bundled)"
#: Thresholds for the embedded default model (a 384-dim encoder) and for any other model.
DEFAULT_THRESHOLDS = {"default": (50.0, 200.0), "other": (100.0, 1000.0)}


def _load(model_arg: str | None):  # noqa: ANN202
    from massact_lens.examples import minilm
    from massact_lens.models import load_model

    if model_arg is None:
        return minilm(), DEFAULT_THRESHOLDS["default"]
    return load_model(model_arg), DEFAULT_THRESHOLDS["other"]


def _prompts(path: str | None) -> list[str]:
    from massact_lens.data import SENTENCES

    if path is None:
        return list(SENTENCES)
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"massact: --prompts {path!r} is not a file. Give a text file with one prompt per line.")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise SystemExit(f"massact: {path!r} has no non-empty lines.")
    return prompts


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub name or local folder (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--prompts", help="text file, one prompt per line (default: 40 built-in sentences)")
    parser.add_argument("--min-value", type=float, help="criterion: |x| above this (default 50 on MiniLM, else 100)")
    parser.add_argument("--min-ratio", type=float, help="criterion: |x| / median at least this (default 200 on MiniLM, else 1000)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-bos", action="store_true", help="do not prepend BOS / [CLS] to prompts")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _thresholds(args: argparse.Namespace, defaults: tuple[float, float]) -> tuple[float, float]:
    return (
        defaults[0] if args.min_value is None else args.min_value,
        defaults[1] if args.min_ratio is None else args.min_ratio,
    )


def cmd_scan(args: argparse.Namespace) -> int:
    import massact_lens as ml

    model, defaults = _load(args.model)
    min_value, min_ratio = _thresholds(args, defaults)
    prompts = _prompts(args.prompts)
    result = ml.scan(
        model, prompts, top_k=args.top_k, batch_size=args.batch_size,
        prepend_bos=False if args.no_bos else None, progress=not args.quiet,
    )
    found = ml.find_massive(result, min_value, min_ratio)
    name = DEFAULT_MODEL if args.model is None else args.model
    print(f"massact scan: {name}, {result.n_inputs} prompts, BOS {'on' if result.prepend_bos else 'off'}, "
          f"criterion |x| > {min_value:g} and >= {min_ratio:g}x median\n")
    stats = result.layer_stats()
    counts = found.to_dataframe().groupby("hook_name").size()
    stats["massive"] = stats["hook_name"].map(counts).fillna(0).astype(int)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(stats.drop(columns=["n_inputs"]).round(2).to_string(index=False))
    print()
    if len(found) == 0:
        print("No massive activations under this criterion. The largest top1/median ratio was "
              f"{stats['ratio'].max():.0f}x; lower --min-ratio / --min-value to look closer.")
    else:
        print("Massive dims (where, on which tokens, in how many prompts):")
        for dim in found.dim_summaries():
            tokens = ", ".join(f"{t!r} x{n}" for t, n in list(dim.tokens.items())[:4])
            print(f"  dim {dim.dim}: layers {dim.first_layer}-{dim.last_layer}, up to {dim.max_abs_value:.1f} "
                  f"({dim.max_ratio:.0f}x median), kinds {dim.kinds}, {100 * dim.input_fraction:.0f}% of prompts; {tokens}")
    if args.json:
        payload = {"model": result.model, "prompts": len(prompts), "min_value": min_value, "min_ratio": min_ratio,
                   "layer_stats": stats.to_dict(orient="records"), "massive": found.to_dataframe().to_dict(orient="records")}
        Path(args.json).write_text(json.dumps(payload, indent=1), encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="massact",
        description="Find, measure, ablate and look at massive activations (Sun et al. 2024) "
        "in TransformerLens models. Without --model: the bundled all-MiniLM-L6-v2, offline.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    scan = sub.add_parser("scan", help="per-layer top-1/2/3 vs median, and the massive activations found",
                          description="One streaming pass: per layer the top-1/2/3 |activation| and the median "
                          "(the paper's layer-wise plot data), then the massive dims.")
    _common(scan)
    scan.add_argument("--top-k", type=int, default=10, help="entries kept per hidden state (default 10)")
    scan.add_argument("--json", help="also write the table and the records to this JSON file")
    scan.set_defaults(func=cmd_scan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, OSError, FileNotFoundError) as error:
        print(f"massact: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
