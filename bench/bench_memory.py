"""Benchmark: the memory of ``implicit_bias`` does not grow with the corpus.

Run from the repository root (a memory measurement: a busy machine changes nothing):

    python bench/bench_memory.py                  # MiniLM, 10 vs 1,000 inputs, 3 rounds, and keep="all" beside it
    python bench/bench_memory.py --quick          # a smoke run: 10 vs 300 inputs, 1 round, streaming only (~30 s)
    python bench/bench_memory.py --model tiny     # a 2-layer random llama: its per-batch peak (~0.2 MiB) is
                                                  # below the allocator's noise, so its ratio says little
    python bench/bench_memory.py --sizes 10,5000 --json out.json

What is measured: the peak resident memory of one call
``massact_lens.implicit_bias(model, tokens, "start", keep=8, batch_size=B)`` (all
layers, all heads) above a warmed baseline, over a corpus of ``n`` short inputs, for
each ``n`` in ``--sizes``; reported as the ratio ``peak(largest n) / peak(smallest
n)`` (the target: at most 1.2). With ``--keep-all`` (on by default outside
``--quick``) the same for ``keep="all"``, which keeps every input's tensors: the
memory the streaming summary saves.

Inputs: real text (massact_lens.examples.sentences.SENTENCES and PARAPHRASE_PAIRS joined, input
``i`` starting at sentence ``i``) cut to ``--tokens`` tokens each (default 16; seeded
random ids for the tiny model, which has no tokenizer), so every batch has the same
shape and the per-batch work is the same at every size. ``B`` (default 10) is at
most the smallest size, so the smallest corpus runs full batches too. The corpus is
fed as an iterable of token batches, the way a corpus streams (``--input tensor``:
one ``[n, tokens]`` tensor, which the library validates whole before the first pass:
a few transient copies of the ids, ~0.13 MiB each per 1,000 x 16, which on the tiny
model is most of the peak).

Method (see bench/_harness.py): one fresh subprocess per (size, keep, round), under
``MALLOC_MMAP_THRESHOLD_=65536`` so that RSS follows live memory. In it: load the
model, run the call once on one batch (warm-up: lazy imports, allocator, caches),
collect garbage, then read the peak RSS of the measured call above the RSS before it,
exactly, from the kernel's high-water mark (VmHWM, reset through
/proc/self/clear_refs; a 1 ms sampler where that file cannot be written). The median
over rounds is reported. On the CPU (the model pinned to "cpu").
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
    emit,
    environment,
    long_rows,
    markdown_table,
    quiet_stderr,
    run_child,
)

TARGET = 1.2


def _load(kind: str) -> Any:
    sys.path.insert(0, str(ROOT))
    from massact_lens import examples

    if kind == "minilm":
        return examples.minilm("cpu")
    return examples.tiny_model("llama", n_layers=2)


def _rows(model: Any, n: int, n_tokens: int) -> Any:
    """``[n, n_tokens]`` token ids: real text for a model with a tokenizer, seeded ids otherwise."""
    import torch

    if getattr(model, "tokenizer", None) is None:
        return torch.randint(1, int(model.cfg.d_vocab), (n, n_tokens), generator=torch.Generator().manual_seed(0))
    return long_rows(model, n, n_tokens)


def child(spec: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    with quiet_stderr():
        model = _load(spec["model"])
    import massact_lens as ml

    tokens = torch.load(spec["corpus"])[: spec["n"]]
    keep, size = spec["keep"], spec["batch_size"]

    def inputs(rows: torch.Tensor) -> Any:
        if spec["input"] == "tensor":
            return rows
        return (rows[i : i + size] for i in range(0, rows.shape[0], size))  # streamed, batch by batch

    ml.implicit_bias(model, inputs(tokens[:size]), "start", keep=keep, batch_size=size, progress=False)
    gc.collect()
    with PeakMeter() as meter:
        start = time.perf_counter()
        result = ml.implicit_bias(model, inputs(tokens), "start", keep=keep, batch_size=size, progress=False)
        seconds = time.perf_counter() - start
    assert result.n_inputs == spec["n"]
    emit({"peak_bytes": meter.peak, "method": meter.method, "seconds": seconds, "n_kept": result.n_kept,
          "z_error": float(result.z_error.max())})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("minilm", "tiny"), default="minilm")
    parser.add_argument("--sizes", default="10,1000", help="comma-separated corpus sizes; the ratio is largest / smallest")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per input")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--keep", type=int, default=8, help="inputs kept in full by the streaming call")
    parser.add_argument("--keep-all", action=argparse.BooleanOptionalAction, default=None,
                        help='also measure keep="all" (default: on, off with --quick)')
    parser.add_argument("--input", choices=("stream", "tensor"), default="stream",
                        help="the corpus as an iterable of token batches (default) or one token tensor")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="10 vs 300 inputs, 1 round, streaming only")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.quick:
        args.sizes, args.rounds = "10,300", 1
    keep_all = (not args.quick) if args.keep_all is None else args.keep_all
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if len(sizes) < 2 or sizes[0] < 1:
        parser.error("--sizes needs at least two positive sizes")
    batch_size = min(args.batch_size, sizes[0])

    import torch

    sys.path.insert(0, str(ROOT))
    import massact_lens

    print(f"massact_lens from {Path(massact_lens.__file__).parent}", file=sys.stderr)
    with quiet_stderr():
        model = _load(args.model)
    workdir = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    corpus_file = workdir / "tokens.pt"
    torch.save(_rows(model, sizes[-1], args.tokens), corpus_file)
    del model
    gc.collect()
    keeps: list[int | str] = [args.keep, *(["all"] if keep_all else [])]
    peaks: dict[str, dict[int, list[int]]] = {str(k): {n: [] for n in sizes} for k in keeps}
    details: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for r in range(args.rounds):
            for keep in keeps:
                for n in sizes:
                    spec = {"model": args.model, "corpus": str(corpus_file), "n": n, "keep": keep,
                            "batch_size": batch_size, "threads": args.threads, "input": args.input}
                    out = run_child(sys.executable, Path(__file__), spec, memory=True, threads=args.threads)
                    peaks[str(keep)][n].append(out["peak_bytes"])
                    details.append({"round": r, "keep": keep, "n": n, **out})
                    print(f"  round {r + 1}/{args.rounds}: keep={keep!s:<4} n={n:<6} peak {out['peak_bytes'] / 2**20:8.2f} MiB "
                          f"({out['method']}), {out['seconds']:.1f}s   [{time.perf_counter() - started:.0f}s]", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    header = (f"{args.model}; {args.tokens} tokens per input, batch {batch_size}, input {args.input}, {args.rounds} round(s), "
              f"{args.threads} thread(s); torch {torch.__version__}; peak RSS above a warmed baseline (median)")
    rows = []
    ratios: dict[str, float] = {}
    for keep in keeps:
        median = {n: statistics.median(peaks[str(keep)][n]) for n in sizes}
        ratios[str(keep)] = median[sizes[-1]] / max(median[sizes[0]], 1)
        rows.append([f"keep={keep}", *(f"{median[n] / 2**20:.2f}" for n in sizes), f"{ratios[str(keep)]:.2f}"])
    print(f"\n{header}\n")
    print(markdown_table(["implicit_bias", *(f"{n} inputs (MiB)" for n in sizes), f"ratio {sizes[-1]} / {sizes[0]}"], rows))
    streaming = ratios[str(args.keep)]
    verdict = "OK" if streaming <= TARGET else "ABOVE TARGET"
    print(f"\nratio {streaming:.2f} (streaming, keep={args.keep}; target <= {TARGET}): {verdict}")
    if args.json:
        payload = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
                   "environment": environment(), "header": header, "ratios": ratios, "runs": details}
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    if streaming > TARGET:
        sys.exit(1)


if __name__ == "__main__":
    main()
