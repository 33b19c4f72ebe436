"""The ``massact`` command: scan, ablate, report, and train small decoders, from the shell.

Without ``--model`` it runs on the bundled SmolLM2-135M-Instruct (a LLaMA-family
decoder; weights dequantised from Q4_1) with the paper's thresholds (100 and 1000x).
``--model`` takes a short name (``smollm2``, ``minilm``: 50 and 200x for that 384-dim
encoder, ``bigram_backcopy[:default|sink_token|explicit_bias|softmax1|gated]``), a hub name, a
HuggingFace folder, or a checkpoint folder. Arguments and files are checked before any
model is loaded. Under ``torchrun`` the scan is split across the ranks.

    massact scan --model ./my_llama --prompts prompts.txt --json scan.json
    torchrun --nproc-per-node 2 -m massact_lens scan --json scan.json
    massact ablate                                # the paper's Table 3: zero vs mean
    massact report                                # one offline HTML page: massact_report.html
    massact train bigram-backcopy --variant explicit_bias --out runs/eb --snapshot-every 500
    massact train bigram-backcopy --attention gated --out runs/gated   # or softmax1
    massact train table                           # the shipped decoders' results table

>>> build_parser().parse_args(["train", "table"]).train_command
'table'
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

__all__ = ["main"]

from massact_lens.cli._args import (
    _check_model,
    _check_out_folder,
    _check_output,
    _criterion,
    _describe,
    _index,
    _label,
    _load,
    _pairs_for,
    _positive_int,
    _print_table,
    _prompts,
    _provenance_json,
    _read_pairs,
    _write_json,
    markdown_table,
)

# ---------------------------------------------------------------- verbs


def _distributed() -> bool:
    """True under torchrun with more than one process; joins the process group once."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def cmd_scan(args: argparse.Namespace) -> int:
    _check_model(args.model)
    prompts = _prompts(args.prompts)
    criterion = _criterion(args)
    _check_output(args.json, "--json")
    from massact_lens.find.criterion import find_massive
    from massact_lens.find.scanner import scan

    model = _load(args.model)
    bos = False if args.no_bos else None
    if _distributed():
        from massact_lens.distributed import run_distributed

        result = run_distributed(scan, model, prompts, top_k=args.top_k, batch_size=args.batch_size, prepend_bos=bos)
        if result is None:  # not rank 0: rank 0 prints and writes
            return 0
    else:
        result = scan(model, prompts, top_k=args.top_k, batch_size=args.batch_size, prepend_bos=bos,
                      progress=not args.quiet)
    found = find_massive(result, criterion.min_value, criterion.min_ratio)
    name = _label(args.model)
    print(f"massact scan: {name}, {result.n_inputs} prompts, BOS {'on' if result.prepend_bos else 'off'}, "
          f"criterion {_describe(criterion)}\n")
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
        _write_json(args.json, {
            "model": _provenance_json(result.provenance), "prompts": len(prompts), "min_value": criterion.min_value,
            "min_ratio": criterion.min_ratio, "layer_stats": stats.to_dict(orient="records"),
            "massive": found.to_dataframe().to_dict(orient="records"),
        })
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    _check_model(args.model)
    prompts = _prompts(args.prompts)
    given_pairs = _read_pairs(args.pairs)
    criterion = _criterion(args)
    _check_output(args.json, "--json")
    from massact_lens._core.types import is_causal
    from massact_lens.evaluate import ablation_table
    from massact_lens.find.profiles import profile

    model = _load(args.model)
    pairs = _pairs_for(model, given_pairs)
    causal = is_causal(model)
    found = profile(model, prompts, min_value=criterion.min_value, min_ratio=criterion.min_ratio,
                    batch_size=args.batch_size, prepend_bos=False if args.no_bos else None, progress=not args.quiet)
    name = _label(args.model)
    print(f"massact ablate: {name}, {len(prompts)} prompts, criterion {_describe(criterion)}")
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
        _write_json(args.json, {
            "model": _provenance_json(table.provenance), "prompts": len(prompts), "min_value": criterion.min_value,
            "min_ratio": criterion.min_ratio, "dims": list(found.massive_dims), "hook_names": table.hook_names,
            "metrics": list(table.metrics), "values": table.values,
        })
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    _check_model(args.model)
    _check_output(args.out, "--out")
    prompts = _prompts(args.prompts)
    given_pairs = _read_pairs(args.pairs)
    if not 0 <= args.example < len(prompts):
        raise SystemExit(f"massact: --example must index a prompt: pass 0..{len(prompts) - 1}, not {args.example}.")
    criterion = _criterion(args)
    from massact_lens.cli.report import build_report

    model = _load(args.model)
    pairs = _pairs_for(model, given_pairs)
    label = _label(args.model)
    argv = args.argv if args.argv is not None else sys.argv[1:]
    report = build_report(
        model, prompts, model_label=label, min_value=criterion.min_value, min_ratio=criterion.min_ratio,
        prepend_bos=False if args.no_bos else None, batch_size=args.batch_size, top_k=args.top_k,
        example=args.example, attention_prompts=args.attention_prompts, pairs=pairs,
        ablation=not args.no_ablation, progress=not args.quiet,
        settings={"command": "massact " + shlex.join(argv), "prompts file": args.prompts or "built-in (40 sentences)"},
    )
    path = report.save(args.out)
    size = path.stat().st_size / 1e6
    print(f"massact report: {label}, {len(prompts)} prompts, criterion {_describe(criterion)}")
    if report.layer_stats is not None:
        print("\nPer hidden state: top-1/2/3 |x|, median |x| and top1/median, mean over prompts:")
        _print_table(report.layer_stats)
    for finding in report.findings:
        print(f"  - {finding}")
    print(f"wrote {path} ({size:.1f} MB): one self-contained page, open it in a browser; it needs no internet.")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"massact: --out {args.out!r} is a file; give a folder for the checkpoint.")
    _check_out_folder(args.out, "--out")
    if args.train_command == "text" and not Path(args.file).is_file():
        raise SystemExit(f"massact: --file {args.file!r} is not a file. Give a UTF-8 text file to train on.")
    from massact_lens.training import BigramBackcopy, ModelConfig, TextFile, TrainConfig, train

    task = (BigramBackcopy(seq_len=args.seq_len, seed=args.task_seed) if args.train_command == "bigram-backcopy"
            else TextFile(args.file, seq_len=args.seq_len))
    train_config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    model_config = ModelConfig(**{f.name: getattr(args, f.name) for f in fields(ModelConfig)})
    result = train(task, args.variant, out, model_config=model_config, train_config=train_config,
                   progress=not args.no_progress)
    evaluation = result.evaluation
    print(f"{result.variant}: {result.steps} steps, {result.tokens} tokens in {result.seconds:.1f} s "
          f"({result.tokens_per_second:,.0f} tokens/s, {result.cpu_seconds:.1f} s CPU); held-out loss "
          f"{evaluation.loss:.4f} (optimal {evaluation.optimal_loss:.4f}), back-copy accuracy "
          f"{evaluation.copy_accuracy:.4f} -> {result.directory}")
    return 0


def cmd_train_table(args: argparse.Namespace) -> int:
    from massact_lens.models.checkpoints import is_checkpoint

    bad = [d for d in args.directories if not is_checkpoint(d)]
    if bad:
        raise SystemExit(f"massact: {bad} are not checkpoint folders (config.json of massact_lens.training). Pass "
                         "folders written by massact train, or none for the shipped decoders.")
    from massact_lens.training import results_table

    frame = results_table(args.directories or None, n_sequences=args.n_sequences)
    print(frame.to_csv(index=False) if args.csv else markdown_table(frame))
    return 0


def cmd_train_snapshots(args: argparse.Namespace) -> int:
    if not Path(args.run_dir, "snapshots").is_dir():
        raise SystemExit(f"massact: {args.run_dir!r} has no snapshots/ folder: train with --snapshot-every N.")
    from massact_lens.training import scan_snapshots

    frame = scan_snapshots(args.run_dir, n_sequences=args.n_sequences, progress=not args.quiet).to_dataframe()
    print(frame.to_csv(index=False) if args.csv else markdown_table(frame))
    return 0


# ---------------------------------------------------------------- parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="smollm2 (default), minilm, bigram_backcopy[:variant], a hub name, a local "
                        "HuggingFace folder, or a checkpoint folder written by massact train")
    parser.add_argument("--prompts", help="text file, one prompt per line (default: 40 built-in sentences)")
    parser.add_argument("--min-value", type=float, help="criterion: |x| above this (default 100; 50 on MiniLM, 10 on "
                        "the Bigram-Backcopy decoders)")
    parser.add_argument("--min-ratio", type=float, help="criterion: |x| / median at least this (default 1000; 200 on "
                        "MiniLM, 20 on the Bigram-Backcopy decoders)")
    parser.add_argument("--batch-size", type=_positive_int, default=16, help="inputs per forward pass (default 16)")
    parser.add_argument("--no-bos", action="store_true", help="do not prepend BOS / [CLS] to prompts")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _training_arguments(parser: argparse.ArgumentParser) -> None:
    from massact_lens.models.checkpoints import VARIANTS
    from massact_lens.training import ModelConfig, TrainConfig

    parser.add_argument("--variant", "--attention", dest="variant", choices=VARIANTS, default="default",
                        help="the attention variant (--attention is the same flag): " + ", ".join(VARIANTS))
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    for config in (TrainConfig(), ModelConfig()):
        for item in fields(config):
            default = getattr(config, item.name)
            parser.add_argument(f"--{item.name.replace('_', '-')}", type=type(default), default=default,
                                help=f"default {default}")
    parser.add_argument("--seq-len", type=int, default=64, help="task tokens per sequence (default 64)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=cmd_train)


def _train_parser(sub: Any) -> None:
    train = sub.add_parser("train", help="train small decoders (Bigram-Backcopy, a text file) and measure them",
                           description="Train small decoders on CPU and measure them: the recipe and the shipped "
                           "models' results are in docs/training.md.")
    verbs = train.add_subparsers(dest="train_command", required=True, metavar="VERB")
    bb = verbs.add_parser("bigram-backcopy", help="train on the Bigram-Backcopy task")
    _training_arguments(bb)
    bb.add_argument("--task-seed", type=int, default=0, help="seed of the bigram matrix")
    text = verbs.add_parser("text", help="train a character-level model on a text file")
    _training_arguments(text)
    text.add_argument("--file", required=True)
    table = verbs.add_parser("table", help="the results table of checkpoints (default: the shipped ones)")
    table.add_argument("directories", nargs="*")
    table.add_argument("--n-sequences", type=_positive_int, default=256)
    table.add_argument("--csv", action="store_true", help="CSV instead of markdown")
    table.set_defaults(func=cmd_train_table)
    snaps = verbs.add_parser("scan-snapshots", help="scan every snapshot of a run (emergence over training)")
    snaps.add_argument("run_dir")
    snaps.add_argument("--n-sequences", type=_positive_int, default=32)
    snaps.add_argument("--csv", action="store_true")
    snaps.add_argument("--quiet", action="store_true", help="no progress bar")
    snaps.set_defaults(func=cmd_train_snapshots)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``massact`` and its verbs."""
    parser = argparse.ArgumentParser(
        prog="massact",
        description="Find, measure, ablate and look at massive activations (Sun et al. 2024) "
        "in TransformerLens models. Without --model: the bundled SmolLM2-135M-Instruct, offline.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    scan = sub.add_parser("scan", help="per-layer top-1/2/3 vs median, and the massive activations found",
                          description="One streaming pass: per layer the top-1/2/3 |activation| and the median "
                          "(the paper's layer-wise plot data), then the massive dims.")
    _common(scan)
    scan.add_argument("--top-k", type=_positive_int, default=10, help="entries kept per hidden state (default 10)")
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
    report.add_argument("--example", type=_index, default=0, help="index of the prompt drawn in the single-input views (default 0)")
    report.add_argument("--attention-prompts", type=_positive_int, default=16,
                        help="how many prompts (the first ones) the attention analyses use (default 16)")
    report.add_argument("--pairs", metavar="FILE|none", help="paraphrase pairs for an encoder's ablation: a text "
                        "file, two sentences per line separated by a tab, or 'none' (default: 20 built-in pairs)")
    report.add_argument("--no-ablation", action="store_true", help="leave out the zero / mean comparison")
    report.add_argument("--top-k", type=_positive_int, default=10, help="entries kept per hidden state (default 10)")
    report.set_defaults(func=cmd_report)

    _train_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``massact ARGS``.

    A bad argument or input file stops it before any model loads, with one line on stderr
    (``SystemExit``: status 2 from argument parsing, 1 from the checks after it); an error
    while measuring prints one line and returns 2.

    >>> main(["scan", "--min-value", "nan"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    SystemExit: massact: --min-value / --min-ratio: min_value must be a positive finite number, not nan...
    """
    from safetensors import SafetensorError

    given = sys.argv[1:] if argv is None else list(argv)
    if not given:
        raise SystemExit("massact: name a command: massact scan, ablate, report or train (massact --help lists them).")
    args = build_parser().parse_args(argv)
    args.argv = None if argv is None else list(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, OSError) as error:
        print(f"massact: {error}", file=sys.stderr)
        return 2
    except SafetensorError as error:  # a HuggingFace folder's weights (checkpoints say so themselves)
        model = getattr(args, "model", None) or "the model"
        print(f"massact: the weights of {model} are truncated or damaged ({error}); copy or download them "
              "again.", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
