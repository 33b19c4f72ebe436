"""Benchmark: scan vs a bare forward pass vs run_with_cache + the same statistics.

Run from the repository root:

    python bench/bench_scan.py            # MiniLM, 128 inputs of ~100 tokens
    python bench/bench_scan.py --quick    # fewer inputs, for a smoke run
    python bench/bench_scan.py --micro    # only the selection microbenchmark and the statistics' share (seconds)

Time: the methods run interleaved in one process, ``--repeats`` rounds, and
the median wall time of each is reported with its ratio to the bare pass (ratios
side by side, because these machines are shared and noisy).

Peak memory: each method runs in a fresh subprocess that loads the model, warms
up on one batch, records its resident set size (RSS), runs the method over the
inputs while a thread samples RSS every millisecond, and reports the peak *above*
that baseline: the memory the method itself needed. CPU has no allocator counter
like ``torch.cuda.max_memory_allocated``; RSS sampling is the honest stand-in. The
children run with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves every large
tensor from mmap and returns it on free, so RSS follows live memory instead of
what the allocator keeps cached after a free (without it, allocator retention,
not the method, decides the numbers).

Retention: the bytes a ScanResult keeps, at two corpus sizes, per input.

Selection microbenchmark (``--micro`` runs only this): the lower median of each row of a
``[batch, pos x d_model]`` float32 magnitude matrix, as massact_lens._core.statistics finds it
on the CPU (inside a sampled bracket, ``_core/selection.py``) against a whole-row
``np.partition`` (what it did before), ``torch.kthvalue`` and ``torch.median``; and the
top 11 of each row, in blocks (``topk_in_blocks``) against ``torch.topk``. Best of several
calls, after checking that all agree. Then the scan of MiniLM on 256 short sentences and the
statistics' own share of its time.

The scan against seven other ways to the same statistics (HF forward, hooks,
output_hidden_states, nnsight, the paper's float64 copies, run_with_cache), one fresh
process per route and round: bench/bench_routes.py. Cost of each measurement in forward
passes: bench/bench_passes.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import massact_lens as ml  # noqa: E402
from massact_lens._core.batching import plan_batches  # noqa: E402
from massact_lens._core.hook_names import residual_hook_names  # noqa: E402
from massact_lens._core.loop import UserHooks, last_block_hook, measure  # noqa: E402
from massact_lens._core.selection import topk_in_blocks  # noqa: E402
from massact_lens._core.statistics import hidden_state_stats, lower_medians  # noqa: E402
from massact_lens.examples import minilm  # noqa: E402

WORDS = ["the", "model", "reads", "a", "long", "sentence", "about", "rivers", "and", "mountains", "while", "the", "night", "falls", "slowly", "over", "quiet", "towns", "where", "people", "sleep", "and", "dream", "of", "distant", "seas"]


def corpus(n: int, words: int) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(WORDS), (words,), generator=generator).tolist()
        out.append(" ".join(WORDS[i] for i in idx).capitalize() + ".")
    return out


def bare(model, texts, batch_size):
    plan = plan_batches(model, texts, batch_size=batch_size)
    measure(model, plan, UserHooks([]), progress=False)


def bare_to_last_block(model, texts, batch_size):
    """The same pass scan makes, without its statistics: stops after the last block read."""
    plan = plan_batches(model, texts, batch_size=batch_size)
    last = last_block_hook(residual_hook_names(model))
    measure(model, plan, UserHooks([(last, lambda activation, hook=None: None)]), progress=False)  # noqa: ARG005 (stops there)


def scanned(model, texts, batch_size):
    return ml.scan(model, texts, batch_size=batch_size, progress=False)


def cached(model, texts, batch_size):
    """A typical run_with_cache workflow: cache everything, then compute the same statistics
    (with the library's own arithmetic, massact_lens._core.statistics.hidden_state_stats)."""
    names = residual_hook_names(model)
    plan = plan_batches(model, texts, batch_size=batch_size)
    kept = []
    with torch.inference_mode():
        for batch in plan.batches:
            _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
            mask = batch.attention_mask.bool()
            kept.extend(hidden_state_stats(cache[name], mask, 10) for name in names)
            del cache
    return kept


METHODS = {
    "bare forward": bare,
    "bare, to last block": bare_to_last_block,
    "scan": scanned,
    "run_with_cache + stats": cached,
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def measure_memory(method: str, n: int, words: int, batch_size: int) -> int:
    """In a fresh process: peak RSS above the warmed-up baseline while ``method`` runs."""
    model = minilm()
    texts = corpus(n, words)
    METHODS[method](model, texts[:batch_size], batch_size)  # warm-up: allocator, kernels
    baseline = rss_bytes()
    peak = baseline
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    result = METHODS[method](model, texts, batch_size)
    done.set()
    sampler.join()
    del result
    return peak - baseline


def retained_bytes(result: ml.ScanResult) -> int:
    tensors = (result.values, result.positions, result.dims, result.token_ids, result.medians, result.lengths)
    strings = sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in result.tokens.items())
    return sum(t.numel() * t.element_size() for t in tensors) + strings


def median_micro(quick: bool) -> None:
    """Lower median and top 11 per row: the library's selection against numpy's and torch's own."""
    batch, d_model = 16, 384
    lengths = (16, 128) if quick else (16, 128, 512)
    repeats = 3 if quick else 7
    print(f"\nLower median and top 11 of each row of [{batch}, pos x {d_model}] float32 |x| "
          f"({torch.get_num_threads()} thread(s), best of {repeats}), ms:")
    header = ("pos", "library", "np.partition", "torch.kthvalue", "torch.median", "partition / library",
              "top-11 blocks", "torch.topk", "topk / blocks")
    print("".join(f"{h:>{max(len(h) + 2, 8)}}" for h in header))
    generator = torch.Generator().manual_seed(0)
    for pos in lengths:
        x = torch.randn(batch, pos * d_model, generator=generator).abs()
        n_real = torch.full((batch,), pos * d_model)
        k = (pos * d_model + 1) // 2

        def library(x=x, n_real=n_real):
            return lower_medians(x.clone(), n_real)

        def partition(x=x, k=k):
            rows = x.clone().numpy()
            rows.partition(k - 1, axis=1)
            return torch.from_numpy(rows[:, k - 1].copy())

        def kth(x=x, k=k):
            return x.kthvalue(k, dim=1).values

        def med(x=x):
            return x.median(dim=1).values

        def blocks(x=x):
            return topk_in_blocks(x[None], 11)[0][0]

        def topk(x=x):
            return x.topk(11, dim=1).values

        reference = med()
        for fn in (library, partition, kth):
            if not torch.equal(fn(), reference):
                raise AssertionError(f"{fn.__name__} disagrees with torch.median at pos {pos}")
        if not torch.equal(blocks(), topk()):
            raise AssertionError(f"the blocks' top 11 disagrees with torch.topk at pos {pos}")
        best = {}
        for fn in (library, partition, kth, med, blocks, topk):
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                runs.append(time.perf_counter() - start)
            best[fn.__name__] = min(runs) * 1e3
        cells = (pos, best["library"], best["partition"], best["kth"], best["med"], best["partition"] / best["library"],
                 best["blocks"], best["topk"], best["topk"] / best["blocks"])
        print("".join(f"{c:>{max(len(h) + 2, 8)}.2f}" if isinstance(c, float) else f"{c:>{max(len(h) + 2, 8)}}"
                      for c, h in zip(cells, header, strict=True)))


def scan_share(quick: bool) -> None:
    """The scan of MiniLM on 256 short sentences (bench_routes' short row): its wall time and
    the statistics' own (every ``grouped_stats`` call, timed inside the scan), in one process."""
    from massact_lens.examples.sentences import SENTENCES
    from massact_lens.find import _scan_stats

    model = minilm("cpu")
    texts = [SENTENCES[i % len(SENTENCES)] for i in range(64 if quick else 256)]
    grouped, spent = _scan_stats.grouped_stats, [0.0]

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = grouped(*args, **kwargs)
        spent[0] += time.perf_counter() - start
        return out

    _scan_stats.grouped_stats = timed
    runs = []
    try:
        ml.scan(model, texts[:16], progress=False)  # warm-up
        for _ in range(3 if quick else 7):
            spent[0], start = 0.0, time.perf_counter()
            ml.scan(model, texts, progress=False)
            runs.append((time.perf_counter() - start, spent[0]))
    finally:
        _scan_stats.grouped_stats = grouped
    wall, stats = (sorted(column) for column in zip(*runs, strict=True))
    middle = len(runs) // 2
    print(f"\nScan of MiniLM, {len(texts)} short sentences ({torch.get_num_threads()} thread(s), {len(runs)} runs), "
          f"min / median: scan {wall[0]:.3f} / {wall[middle]:.3f} s, its statistics {stats[0] * 1e3:.0f} / "
          f"{stats[middle] * 1e3:.0f} ms ({stats[middle] / wall[middle]:.1%} of the median scan)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=128)
    parser.add_argument("--words", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--micro", action="store_true", help="only the median microbenchmark")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.micro:
        median_micro(args.quick)
        scan_share(args.quick)
        return
    if args.quick:
        args.inputs, args.words, args.repeats = 32, 40, 2
    if args.memory_child:
        print(json.dumps(measure_memory(args.memory_child, args.inputs, args.words, args.batch_size)))
        return

    model = minilm()
    texts = corpus(args.inputs, args.words)
    n_tokens = sum(int(b.lengths.sum()) for b in plan_batches(model, texts).batches)
    print(f"MiniLM (6 layers, d_model 384), {args.inputs} inputs, {n_tokens} tokens, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved rounds")
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for fn in METHODS.values():
        fn(model, texts[: args.batch_size], args.batch_size)
    for _ in range(args.repeats):
        for name, fn in METHODS.items():
            start = time.perf_counter()
            fn(model, texts, args.batch_size)
            times[name].append(time.perf_counter() - start)

    memory = {}
    for name in METHODS:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", name, "--inputs", str(args.inputs),
             "--words", str(args.words), "--batch-size", str(args.batch_size)],
            capture_output=True, text=True, check=True,
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"},
        )
        memory[name] = json.loads(out.stdout.strip().splitlines()[-1])

    print("\nscan skips what follows the last block it reads (on MiniLM the 30,522-word MLM head);")
    print("'bare, to last block' is the same pass without statistics: scan / it = the statistics' cost.")
    base_t = statistics.median(times["bare forward"])
    base_m = max(memory["bare forward"], 1)
    print(f"\n{'method':<24}{'median s':>10}{'x bare':>8}{'peak MB above baseline':>26}{'x bare':>8}")
    for name in METHODS:
        t = statistics.median(times[name])
        m = memory[name]
        print(f"{name:<24}{t:>10.3f}{t / base_t:>8.2f}{m / 2**20:>26.1f}{m / base_m:>8.2f}")
    overhead = statistics.median(times["scan"]) / statistics.median(times["bare, to last block"])
    print(f"\nstatistics overhead: scan / 'bare, to last block' = {overhead:.2f}x")

    print("\nWhat a ScanResult retains (12 hooks, top_k=10):")
    small, large = 100, 1000
    sizes = {}
    for n in (small, large):
        result = ml.scan(model, corpus(n, 12), batch_size=64, progress=False)
        sizes[n] = retained_bytes(result)
        print(f"  {n:>5} inputs: {sizes[n] / 1024:8.1f} KiB = {sizes[n] / n:6.0f} bytes per input")
    per_input = (sizes[large] - sizes[small]) / (large - small)
    print(f"  growth: {per_input:.0f} bytes per added input "
          f"(12 hooks x 10 entries x 4 fields x 4 bytes + medians); 10,000 inputs ~ {per_input * 1e4 / 2**20:.1f} MB")
    median_micro(args.quick)


if __name__ == "__main__":
    main()
