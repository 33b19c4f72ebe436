"""Benchmark: the attention analyses at long context, against the scan, in one run (issue 26).

Run from the repository root, on a quiet machine:

    python bench/bench_attention.py                                  # SmolLM2, 500 / 2,000 / 8,192 tokens
    python bench/bench_attention.py --lengths 500,2000 --eager       # also the eager-pattern route
    python bench/bench_attention.py --quick                          # 256 tokens, a smoke run

One input of real text per length (the sentences and paraphrase pairs of
:mod:`massact_lens.examples.sentences` joined, repeated and cut to the length; SmolLM2's
context is 8,192 tokens), ``positions="start"``, all layers, one thread. Each
(method, length) runs in a fresh process (bench/_harness.py): the model is loaded,
one warm-up call on the first 64 tokens, then the timed call. Times come from children
under the default allocator (what a user's process runs with); peak memory, the peak
resident set above the loaded, warmed model (``VmHWM``), from one more child per (method,
length) under ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0``, so that freed memory
goes back and the peak is what was in use (those settings fault every large allocation
afresh, which would charge allocation-heavy code in time: hence the separate runs). Methods, all public calls:
``forward`` (a bare bridge forward, the unit), ``scan``, ``attention_concentration``,
``implicit_bias`` (default ``keep=0``: the statistics only), ``implicit_bias_keep8``
(``keep=8``: the one input's per-query terms are also kept in full), ``sink_curve``, and with
``--eager`` the first two attention analyses on the eager-pattern route
(``MASSACT_LENS_EAGER=1``, what every attention analysis ran before issue 26).
Rounds interleave the methods in a rotated order; the table gives min times, and each
method's time and peak against the scan's of the same length.
"""

from __future__ import annotations

import argparse
import gc
import os
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
    markdown_table,
    quiet_stderr,
    ratio,
    rotated,
    run_child,
    warn_if_busy,
)

METHODS = ("forward", "scan", "attention_concentration", "implicit_bias", "implicit_bias_keep8", "sink_curve")
EAGER = ("attention_concentration_eager", "implicit_bias_eager")


def _text_tokens(model: Any, n_tokens: int) -> Any:
    from massact_lens.examples.sentences import PARAPHRASE_PAIRS, SENTENCES

    text = " ".join(list(SENTENCES) + [s for pair in PARAPHRASE_PAIRS for s in pair])
    tokens = model.to_tokens(" ".join([text] * (1 + n_tokens // 900)), prepend_bos=False, truncate=False,
                             move_to_device=False)
    return tokens[:, :n_tokens].cpu()


def _call(method: str, model: Any, tokens: Any) -> Any:
    import massact_lens as ml
    from massact_lens._core.batching import plan_batches
    from massact_lens._core.loop import UserHooks, measure
    from massact_lens.attention import sink_curve

    name = method.removesuffix("_eager")
    if name == "forward":
        return measure(model, plan_batches(model, tokens, batch_size=1), UserHooks([]), progress=False)
    if name == "scan":
        return ml.scan(model, tokens, batch_size=1, progress=False)
    if name == "attention_concentration":
        return ml.attention_concentration(model, tokens, "start", batch_size=1, progress=False)
    if name == "implicit_bias":
        return ml.implicit_bias(model, tokens, "start", batch_size=1, progress=False)
    if name == "implicit_bias_keep8":
        return ml.implicit_bias(model, tokens, "start", batch_size=1, keep=8, progress=False)
    if name == "sink_curve":
        return sink_curve(model, tokens, "start", progress=False)
    raise ValueError(method)


def child(spec: dict[str, Any]) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    if spec["method"].endswith("_eager"):
        os.environ["MASSACT_LENS_EAGER"] = "1"
    torch.set_num_threads(1)
    with quiet_stderr():
        from massact_lens import examples

        model = examples.smollm2("cpu")
    tokens = torch.load(spec["corpus"])
    _call(spec["method"], model, tokens[:, :64])  # warm-up
    gc.collect()
    with PeakMeter() as meter:
        start = time.perf_counter()
        out = _call(spec["method"], model, tokens)
        seconds = time.perf_counter() - start
    route = getattr(out, "hook_names", None) or getattr(out, "route", None)
    emit({"seconds": seconds, "peak_bytes": meter.peak, "peak_method": meter.method,
          "route": (route[0] if isinstance(route, tuple) else route)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="500,2000,8192")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--eager", action="store_true", help="also the eager-pattern route (slow, memory ~ length^2)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import json

        child(json.loads(args.child))
        return
    sys.path.insert(0, str(ROOT))
    import torch

    warn_if_busy()
    lengths = [256] if args.quick else [int(x) for x in args.lengths.split(",")]
    methods = args.methods.split(",") + (list(EAGER) if args.eager else [])
    with quiet_stderr():
        from massact_lens import examples

        model = examples.smollm2("cpu")
    times: dict[tuple[str, int], list[float]] = {}
    peaks: dict[tuple[str, int], list[int]] = {}
    routes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as folder:
        for n in lengths:
            path = Path(folder) / f"tokens_{n}.pt"
            torch.save(_text_tokens(model, n), path)
            for r in range(args.rounds + 1):  # the last round: the memory children
                memory = r == args.rounds
                for method in rotated(methods, r):
                    out = run_child(sys.executable, Path(__file__), {"method": method, "corpus": str(path)},
                                    memory=memory, threads=1)
                    if memory:
                        peaks.setdefault((method, n), []).append(out["peak_bytes"])
                    else:
                        times.setdefault((method, n), []).append(out["seconds"])
                    routes[method] = str(out["route"])
                    what = f"{out['peak_bytes'] / 2**20:8.0f} MiB (memory run)" if memory else f"{out['seconds']:8.2f} s"
                    print(f"  {n:>5} tokens, round {r + 1}: {method:<30} {what}", file=sys.stderr, flush=True)
    env = environment()
    print(f"\nSmolLM2-135M, one input, one thread; torch {env['torch']}, transformers {env['transformers']}; "
          f"load average at the end {env['load_average'][0]:.1f} on {env['cpu_count']} cores\n")
    rows = []
    for n in lengths:
        scan_t, scan_p = min(times[("scan", n)]), min(peaks[("scan", n)])
        for method in methods:
            t, p = min(times[(method, n)]), min(peaks[(method, n)])
            rows.append([f"{n}", method, f"{t:.2f}", ratio(t, scan_t), f"{p / 2**20:.0f}", ratio(p, scan_p, 2**20),
                         routes.get(method, "")])
    print(markdown_table(["tokens", "method", "s (min)", "/ scan", "peak MiB above model", "/ scan peak", "route"],
                         rows))


if __name__ == "__main__":
    main()
