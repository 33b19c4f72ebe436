"""Benchmark: what each measurement costs, in forward passes' worth.

Run from the repository root, on a quiet machine (timings on a shared one are noise):

    python bench/bench_passes.py                     # MiniLM, 5 rounds
    python bench/bench_passes.py --model smollm2     # SmolLM2-135M
    python bench/bench_passes.py --quick             # tiny sizes, 1 round: a smoke run
    python bench/bench_passes.py --json out.json --threads 4

Measured, on the same token batches: ``massact_lens.scan``, ``massact_lens.profile``,
``massact_lens.implicit_bias``, ``massact_lens.attention_concentration`` (both with
``positions="start"``, all layers) and ``massact_lens.trace.writers.lineage`` (with a profile
of the same inputs made before the clock starts), each as

    forward passes' worth = its wall time / the wall time of a bare bridge forward

where the bare forward is ``model(tokens, attention_mask=mask)`` per batch on the
bridge as :func:`massact_lens.load_model` boots it (eager attention, the whole model
with its head, no hook). Only the public functions are called. A measurement below 1
is possible: scan and profile run SDPA attention and stop after the last block they
read. ``/ scan``: the time against the scan's (profile: one pass that also follows the
massive entries, plus one rerun of each batch where a new massive dim appears, which
is the first batch: about 1 + 1/n_batches scans).

On the CPU (models pinned to "cpu"). Method (as bench_routes.py, see bench/_harness.py): tokens made once by the parent
(short = massact_lens.examples.sentences.SENTENCES cycled; long = those sentences and the paraphrase
pairs joined and cut to --long-tokens); each measurement in its own fresh subprocess
per round, running every corpus in turn after one warm-up batch; rounds interleaved,
order rotated each round; min and median wall time. The ratio is taken on the min
times (and on the medians, for comparison). Profile thresholds: MiniLM
``min_value=50, min_ratio=200`` (its massive activation is ~220, ~500x the median, under
the library's defaults), SmolLM2 the library's defaults (100, 1000).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    ROOT,
    PeakMeter,
    corpus,
    emit,
    environment,
    markdown_table,
    quiet_stderr,
    rotated,
    run_child,
    summary,
    warn_if_busy,
)

METHODS = ("forward", "scan", "profile", "implicit_bias", "attention_concentration", "lineage")
LABELS = {
    "forward": "bare bridge forward (the unit)",
    "scan": "scan",
    "profile": "profile",
    "implicit_bias": "implicit_bias('start')",
    "attention_concentration": "attention_concentration('start')",
    "lineage": "lineage (given a profile)",
}
THRESHOLDS = {"minilm": {"min_value": 50.0, "min_ratio": 200.0}, "smollm2": {"min_value": 100.0, "min_ratio": 1000.0}}


# === child side =======================================================================


def _load(kind: str) -> Any:
    sys.path.insert(0, str(ROOT))
    from massact_lens import examples

    return examples.minilm("cpu") if kind == "minilm" else examples.smollm2("cpu")


def _size(batches: list) -> int:
    return max(int(tokens.shape[0]) for tokens, _ in batches)


def make_method(name: str, model: Any, kind: str) -> Any:
    """``fn(batches, state) -> result``; ``state`` holds what a method prepares untimed."""
    import massact_lens as ml
    from massact_lens._core.batching import plan_batches
    from massact_lens._core.loop import UserHooks, measure
    from massact_lens.trace.writers import lineage

    thresholds = THRESHOLDS[kind]
    if name == "forward":
        return lambda b, _s: measure(model, plan_batches(model, list(b), batch_size=_size(b)), UserHooks([]), progress=False)
    if name == "scan":
        return lambda b, _s: ml.scan(model, list(b), batch_size=_size(b), progress=False)
    if name == "profile":
        return lambda b, _s: ml.profile(model, list(b), batch_size=_size(b), progress=False, **thresholds)
    if name == "implicit_bias":
        return lambda b, _s: ml.implicit_bias(model, list(b), "start", batch_size=_size(b), progress=False)
    if name == "attention_concentration":
        return lambda b, _s: ml.attention_concentration(model, list(b), "start", batch_size=_size(b), progress=False)
    if name == "lineage":
        return lambda b, s: lineage(model, list(b), s["profile"], batch_size=_size(b), progress=False)
    raise ValueError(name)


def child(spec: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    data = torch.load(spec["corpus"], weights_only=False)
    with quiet_stderr():
        model = _load(spec["model"])
    import massact_lens as ml

    fn = make_method(spec["method"], model, spec["model"])
    results = []
    for config in data["configs"]:
        batches = config["batches"]
        state: dict[str, Any] = {}
        info = None
        if spec["method"] == "lineage":  # untimed: the massive set lineage traces
            state["profile"] = prof = ml.profile(model, list(batches), batch_size=_size(batches), progress=False,
                                                 **THRESHOLDS[spec["model"]])
            info = f"massive dims {list(prof.massive_dims)}"
        fn(batches[:1], state)  # warm-up
        gc.collect()
        with PeakMeter() as meter:
            start = time.perf_counter()
            out = fn(batches, state)
            seconds = time.perf_counter() - start
        del out
        gc.collect()
        results.append({"seconds": seconds, "peak_bytes": meter.peak, "peak_method": meter.method, "info": info})
    emit({"method": spec["method"], "configs": results})


# === parent side ======================================================================


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--lengths", default="short,long")
    parser.add_argument("--short-size", type=int, default=64, help="inputs of the short corpus")
    parser.add_argument("--long-size", type=int, default=8, help="inputs of the long corpus")
    parser.add_argument("--long-tokens", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every process")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round")
    parser.add_argument("--memory-settings", action="store_true",
                        help="run every process under the memory settings (MALLOC_MMAP_THRESHOLD_, as "
                             "bench_routes.py's memory rounds): exact peaks, slower times")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.quick:
        args.short_size, args.long_size, args.long_tokens, args.batch_size, args.rounds = 8, 2, 128, 4, 1
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {','.join(METHODS)}")
    if "forward" not in methods:
        methods.insert(0, "forward")  # the unit

    import torch

    sys.path.insert(0, str(ROOT))
    import massact_lens

    torch.set_num_threads(args.threads)
    print(f"massact_lens from {Path(massact_lens.__file__).parent}", file=sys.stderr)
    warn_if_busy()
    with quiet_stderr():
        model = _load(args.model)
    sizes = {"short": args.short_size, "long": args.long_size}
    configs = []
    for length in [x.strip() for x in args.lengths.split(",") if x.strip()]:
        batches = corpus(model, length, sizes[length], args.batch_size, args.long_tokens)
        configs.append({"length": length, "size": sizes[length], "batches": batches,
                        "n_tokens": sum(int(m.sum()) for _, m in batches)})
    del model
    gc.collect()

    workdir = Path(tempfile.mkdtemp(prefix="bench_passes_"))
    corpus_file = workdir / "corpus.pt"
    torch.save({"configs": [{"batches": c["batches"]} for c in configs]}, corpus_file)
    times: dict[str, list[list[float]]] = {m: [[] for _ in configs] for m in methods}
    peaks: dict[str, list[list[int]]] = {m: [[] for _ in configs] for m in methods}
    infos: dict[str, list[str | None]] = {m: [None for _ in configs] for m in methods}
    started = time.perf_counter()
    print(f"{len(methods)} measurements x {args.rounds} rounds = {len(methods) * args.rounds} processes", file=sys.stderr)
    try:
        for r in range(args.rounds):
            for method in rotated(methods, r):
                spec = {"method": method, "model": args.model, "corpus": str(corpus_file), "threads": args.threads}
                out = run_child(sys.executable, Path(__file__), spec, memory=args.memory_settings, threads=args.threads)
                for i, res in enumerate(out["configs"]):
                    times[method][i].append(res["seconds"])
                    peaks[method][i].append(res["peak_bytes"])
                    infos[method][i] = res.get("info")
                print(f"  round {r + 1}/{args.rounds}: {method:<24} "
                      + " ".join(f"{res['seconds']:.2f}s" for res in out["configs"])
                      + f"   [{time.perf_counter() - started:.0f}s]", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    header = (f"{args.model}; {args.threads} thread(s), batch {args.batch_size}, {args.rounds} round(s); "
              f"torch {torch.__version__}; unit: a bare bridge forward of the same batches")
    print(f"\n{header}")
    for i, c in enumerate(configs):
        unit_min, unit_med = summary(times["forward"][i])
        scan_min = summary(times["scan"][i])[0] if "scan" in times else None
        rows = []
        for method in methods:
            t_min, t_med = summary(times[method][i])
            rows.append([LABELS[method], f"{t_min:.3f}", f"{t_med:.3f}", f"{t_min / unit_min:.2f}", f"{t_med / unit_med:.2f}",
                         f"{t_min / scan_min:.2f}" if scan_min else "n/a",
                         f"{statistics.median(peaks[method][i]) / 2**20:.1f}"])
        title = (f"### {args.model}, {c['length']}: {c['size']} inputs, {c['n_tokens']:,} tokens "
                 f"({c['n_tokens'] / c['size']:.0f} per input)")
        malloc = "memory settings" if args.memory_settings else "default malloc"
        table = markdown_table(["measurement", "min s", "median s", "forward passes (min)", "forward passes (median)",
                                "/ scan (min)", f"peak MiB above baseline ({malloc})"], rows)
        print(f"\n{title}\n\n{table}")
        if infos.get("lineage", [None] * len(configs))[i]:
            print(f"\nlineage traced {infos['lineage'][i]} (profile of these inputs).")

    if args.json:
        payload = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
            "environment": environment(),
            "header": header,
            "configs": [
                {"length": c["length"], "size": c["size"], "n_tokens": c["n_tokens"],
                 "methods": {m: {"seconds": times[m][i], "peak_bytes_default_malloc": peaks[m][i], "info": infos[m][i]}
                             for m in methods}}
                for i, c in enumerate(configs)
            ],
        }
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
