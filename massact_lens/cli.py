"""The ``massact`` command: scan, ablate and report on massive activations from the shell.

With no ``--model`` it runs on the embedded default model, the real pretrained
all-MiniLM-L6-v2 bundled offline, with thresholds suited to a 384-dim encoder
(|x| > 50 and >= 200x the median); with ``--model`` (a hub name, a local
HuggingFace folder, or a folder written by :mod:`massact_lens.train`) the paper's
thresholds (100 and 1000x) apply unless given.

    massact scan                                  # MiniLM, built-in sentences
    massact scan --model ./my_llama --prompts prompts.txt --json scan.json
    massact ablate                                # the paper's Table 3: zero vs mean
    massact report                                # one offline HTML page: massact_report.html
    massact report --model massact_lens/checkpoints/bigram_backcopy/default --min-value 5 --min-ratio 20
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["main"]

DEFAULT_MODEL = "all-MiniLM-L6-v2 (bundled)"
#: Thresholds for the embedded default model (a 384-dim encoder) and for any other model.
DEFAULT_THRESHOLDS = {"default": (50.0, 200.0), "other": (100.0, 1000.0)}


def _is_train_checkpoint(path: Path) -> bool:
    """A folder written by massact_lens.train (its own config.json format, not HuggingFace's)."""
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        return str(json.loads(config.read_text(encoding="utf-8")).get("format", "")).startswith("massact_lens.train/")
    except (ValueError, OSError, AttributeError):
        return False


def _load(model_arg: str | None):  # noqa: ANN202
    from massact_lens.examples import minilm
    from massact_lens.models import load_model

    if model_arg is None:
        return minilm(), DEFAULT_THRESHOLDS["default"]
    path = Path(model_arg).expanduser()
    if _is_train_checkpoint(path):
        from massact_lens.train import load_checkpoint

        return load_checkpoint(path), DEFAULT_THRESHOLDS["other"]
    return load_model(model_arg), DEFAULT_THRESHOLDS["other"]


def _read_pairs(arg: str | None) -> list[tuple[str, str]] | str | None:
    """--pairs, read before any model is loaded: 'builtin' (not given), None ('none'), or the pairs of a file."""
    if arg is None:
        return "builtin"
    if arg.lower() == "none":
        return None
    file = Path(arg)
    if not file.is_file():
        raise SystemExit(f"massact: --pairs {arg!r} is not a file. Give a text file with one pair per line, "
                         "the two sentences separated by a tab, or 'none'.")
    pairs = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("\t")]
        if len(parts) != 2 or not all(parts):
            raise SystemExit(f"massact: {arg}:{number} is not two tab-separated sentences.")
        pairs.append((parts[0], parts[1]))
    if not pairs:
        raise SystemExit(f"massact: {arg!r} has no pairs.")
    return pairs


def _pairs_for(model: Any, pairs: list[tuple[str, str]] | str | None) -> list[tuple[str, str]] | None:
    """The paraphrase pairs an encoder is judged on; decoders are judged by perplexity instead."""
    from massact_lens.data import PARAPHRASE_PAIRS

    if _causal(model):
        if isinstance(pairs, list):
            raise SystemExit("massact: --pairs is for encoders; a causal model is judged by perplexity on the prompts.")
        return None
    return list(PARAPHRASE_PAIRS) if pairs == "builtin" else pairs  # type: ignore[return-value]


def _causal(model: Any) -> bool:
    return str(getattr(model.cfg, "attention_dir", "causal")) != "bidirectional"


def _write(path: str, text: str) -> None:
    from massact_lens.viz.report import write_atomic

    write_atomic(path, text)


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
    parser.add_argument("--model", help="hub name, local HuggingFace folder, or a folder written by "
                        "massact_lens.train (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--prompts", help="text file, one prompt per line (default: 40 built-in sentences)")
    parser.add_argument("--min-value", type=float, help="criterion: |x| above this (default 50 on MiniLM, else 100)")
    parser.add_argument("--min-ratio", type=float, help="criterion: |x| / median at least this (default 200 on MiniLM, else 1000)")
    parser.add_argument("--batch-size", type=int, default=16, help="inputs per forward pass (default 16)")
    parser.add_argument("--no-bos", action="store_true", help="do not prepend BOS / [CLS] to prompts")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _thresholds(args: argparse.Namespace, defaults: tuple[float, float]) -> tuple[float, float]:
    return (
        defaults[0] if args.min_value is None else args.min_value,
        defaults[1] if args.min_ratio is None else args.min_ratio,
    )


def _print_table(table: pd.DataFrame) -> None:
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.round(2).to_string(index=False))
    print()


def cmd_scan(args: argparse.Namespace) -> int:
    import massact_lens as ml

    prompts = _prompts(args.prompts)
    model, defaults = _load(args.model)
    min_value, min_ratio = _thresholds(args, defaults)
    result = ml.scan(
        model, prompts, top_k=args.top_k, batch_size=args.batch_size,
        prepend_bos=False if args.no_bos else None, progress=not args.quiet,
    )
    found = ml.find_massive(result, min_value, min_ratio)
    name = DEFAULT_MODEL if args.model is None else args.model
    print(f"massact scan: {name}, {result.n_inputs} prompts, BOS {'on' if result.prepend_bos else 'off'}, "
          f"criterion |x| > {min_value:g} and >= {min_ratio:g}x median\n")
    stats = result.layer_stats()
    counts: dict[str, int] = found.to_dataframe()["hook_name"].value_counts().to_dict()
    stats["massive"] = [int(counts.get(name, 0)) for name in stats["hook_name"]]
    _print_table(stats.drop(columns=["n_inputs"]))
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
        _write(args.json, json.dumps(payload, indent=1))
        print(f"\nwrote {args.json}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    import massact_lens as ml
    from massact_lens.evaluate import ablation_table

    prompts = _prompts(args.prompts)
    given_pairs = _read_pairs(args.pairs)
    model, defaults = _load(args.model)
    min_value, min_ratio = _thresholds(args, defaults)
    pairs = _pairs_for(model, given_pairs)
    causal = _causal(model)
    bos = False if args.no_bos else None
    found = ml.profile(model, prompts, min_value=min_value, min_ratio=min_ratio, batch_size=args.batch_size,
                       prepend_bos=bos, progress=not args.quiet)
    name = DEFAULT_MODEL if args.model is None else args.model
    print(f"massact ablate: {name}, {len(prompts)} prompts, criterion |x| > {min_value:g} and >= {min_ratio:g}x median")
    if not found.massive_dims:
        print("No massive activations under this criterion, so nothing to ablate. Lower --min-ratio / --min-value.")
        return 1
    layers = "first" if args.first_layer else None
    if causal:
        table = ablation_table(model, found, corpus=prompts, batch_size=args.batch_size, progress=not args.quiet,
                               layers=layers)
        judged = "perplexity on the prompts"
    else:
        table = ablation_table(model, found, sentences=prompts, pairs=pairs, batch_size=args.batch_size,
                               progress=not args.quiet, layers=layers)
        judged = "cosine of each prompt's sentence embedding to the original" + (
            f", and mean cosine of {len(pairs)} paraphrase pairs" if pairs else "")
    edited = sorted({n for names in table.hook_names.values() for n in names})
    print(f"massive dims {list(found.massive_dims)} set to zero / to their mean over the prompts at {', '.join(edited)}")
    print(f"judged by {judged}\n")
    print(table.to_markdown())
    if args.json:
        payload = {"model": table.model, "prompts": len(prompts), "min_value": min_value, "min_ratio": min_ratio,
                   "dims": list(found.massive_dims), "hook_names": table.hook_names, "metrics": list(table.metrics),
                   "values": table.values}
        _write(args.json, json.dumps(payload, indent=1, default=str))
        print(f"\nwrote {args.json}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from massact_lens.viz.report import build_report

    out = Path(args.out)
    if out.is_dir():
        raise SystemExit(f"massact: --out {args.out!r} is a folder; give a file name such as {out / 'report.html'}.")
    if not out.parent.is_dir():
        raise SystemExit(f"massact: folder {str(out.parent)!r} does not exist; create it or choose another --out.")
    prompts = _prompts(args.prompts)
    given_pairs = _read_pairs(args.pairs)
    if not 0 <= args.example < len(prompts):
        raise SystemExit(f"massact: --example must index a prompt (0..{len(prompts) - 1}), not {args.example}.")
    model, defaults = _load(args.model)
    min_value, min_ratio = _thresholds(args, defaults)
    pairs = _pairs_for(model, given_pairs)
    label = DEFAULT_MODEL if args.model is None else args.model
    argv = args.argv if args.argv is not None else sys.argv[1:]
    report = build_report(
        model, prompts, model_label=label, min_value=min_value, min_ratio=min_ratio,
        prepend_bos=False if args.no_bos else None, batch_size=args.batch_size, top_k=args.top_k,
        example=args.example, attention_prompts=args.attention_prompts, pairs=pairs,
        ablation=not args.no_ablation, progress=not args.quiet,
        settings={"command": "massact " + shlex.join(argv), "prompts file": args.prompts or "built-in (40 sentences)"},
    )
    path = report.save(out)
    size = path.stat().st_size / 1e6
    print(f"massact report: {label}, {len(prompts)} prompts, criterion |x| > {min_value:g} and >= {min_ratio:g}x median")
    if report.layer_stats is not None:
        print("\nPer hidden state: top-1/2/3 |x|, median |x| and top1/median, mean over prompts:")
        _print_table(report.layer_stats)
    for finding in report.findings:
        print(f"  - {finding}")
    print(f"wrote {path} ({size:.1f} MB): one self-contained page, open it in a browser; it needs no internet.")
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

    ablate = sub.add_parser(
        "ablate", help="the paper's Table 3: massive activations set to zero vs set to their mean",
        description="Profile the massive activations over the prompts, then compare the original model with "
        "the massive activations set to zero and set to their mean (Sun et al. 2024, Table 3). Encoders are "
        "judged by sentence-embedding cosines (each prompt to its original embedding, and paraphrase pairs); "
        "decoders by perplexity on the prompts.",
    )
    _common(ablate)
    ablate.add_argument("--pairs", metavar="FILE|none", help="paraphrase pairs for encoders: a text file, two "
                        "sentences per line separated by a tab, or 'none' (default: 20 built-in pairs)")
    ablate.add_argument("--first-layer", action="store_true",
                        help="edit each massive dim only at the first hidden state where it is massive (the paper's "
                        "LLaMA2 setting); default: everywhere it is massive")
    ablate.add_argument("--json", help="also write the table to this JSON file")
    ablate.set_defaults(func=cmd_ablate)

    report = sub.add_parser(
        "report", help="write ONE self-contained HTML page: figures, attention views, tables, settings",
        description="Measure the model on the prompts and write one HTML file that opens offline in any browser: "
        "where the massive activations are (layer-wise curves, 3D plot of a hidden state, tokens by magnitude), "
        "whether they are constant, what attention does with them (sinks, attention heads with the massive "
        "tokens marked, logits, the implicit-bias decomposition) and what ablating them does (zero vs mean). "
        "plotly.js and circuitsvis are inlined; nothing is loaded from the network.",
    )
    _common(report)
    report.add_argument("-o", "--out", default="massact_report.html",
                        help="the HTML file to write (default: massact_report.html); written atomically")
    report.add_argument("--example", type=int, default=0, help="index of the prompt drawn in the single-input views (default 0)")
    report.add_argument("--attention-prompts", type=int, default=16,
                        help="how many prompts (the first ones) the attention analyses use (default 16)")
    report.add_argument("--pairs", metavar="FILE|none", help="paraphrase pairs for an encoder's ablation: a text "
                        "file, two sentences per line separated by a tab, or 'none' (default: 20 built-in pairs)")
    report.add_argument("--no-ablation", action="store_true", help="leave out the zero / mean comparison")
    report.add_argument("--top-k", type=int, default=10, help="entries kept per hidden state (default 10)")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = None if argv is None else list(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, OSError, FileNotFoundError) as error:
        print(f"massact: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
