"""Shared machinery of bench_routes.py and bench_passes.py (not a benchmark itself).

* Fresh child processes: the parent starts ``python <script> --child <json>`` once per
  (method, round); the child prints one line ``MARK + json`` with its measurements.
  Rounds are interleaved and the method order rotates each round, so load on a shared
  machine and ordering effects fall on every method alike.
* Peak memory: resident set size (RSS) above a warmed baseline. Linux keeps the peak
  RSS of a process (``VmHWM``); writing ``5`` to ``/proc/self/clear_refs`` resets it to
  the current RSS, so the peak of a run is read exactly, with no sampling thread
  competing for the GIL. Where that file cannot be written, a thread samples
  ``/proc/self/statm`` every millisecond instead (the method of bench_scan.py), and the
  result says which was used.
* Corpora: real text only, tokenised once by the parent with the library's own
  tokenisation (:func:`massact_lens._core.batching.plan_batches`) so that every method reads
  the same token ids. *Short*: the 40 sentences of :data:`massact_lens.examples.sentences.SENTENCES`
  (10-25 tokens each), cycled to the corpus size. *Long*: every sentence of
  ``SENTENCES`` and ``PARAPHRASE_PAIRS`` (80 sentences, ~1,000 tokens) joined with
  spaces, input ``i`` starting at sentence ``i`` (rotated), cut to ``--long-tokens``
  tokens: all inputs have the same length, so no padding.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MARK = "@@BENCH@@ "

# glibc then serves every block over 64 KiB from mmap and returns it on free, so RSS
# follows live memory rather than what the allocator keeps after a free.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


# --- memory -------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _hwm_bytes() <= rss_bytes() + (1 << 20)
    except OSError:
        return False


class PeakMeter:
    """``with PeakMeter() as meter: work()`` then ``meter.peak``: peak RSS above the RSS
    at entry, in bytes; ``meter.method`` is ``"VmHWM"`` or ``"sampled"``."""

    def __init__(self) -> None:
        self.baseline = 0
        self.peak = 0
        self.method = ""
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._max = 0

    def __enter__(self) -> PeakMeter:
        self.baseline = rss_bytes()
        if _reset_hwm():
            self.method = "VmHWM"
        else:
            self.method = "sampled"
            self._max = self.baseline
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self._max = max(self._max, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._done.set()
            self._thread.join()
            top = max(self._max, rss_bytes())
        else:
            top = _hwm_bytes()
        self.peak = max(0, top - self.baseline)


# --- child processes ----------------------------------------------------------------


def emit(payload: Any) -> None:
    """What a child prints last: the parent reads the line after MARK."""
    print(MARK + json.dumps(payload), flush=True)


def run_child(python: str, script: Path, spec: dict[str, Any], *, memory: bool, threads: int) -> Any:
    """Run ``script --child spec`` in a fresh process and return what it emitted."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    if memory:
        env.update(MEMORY_ENV)
    proc = subprocess.run(
        [python, str(script), "--child", json.dumps(spec)],
        capture_output=True, text=True, env=env, cwd=str(ROOT),
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
        raise RuntimeError(f"child {spec.get('method')!r} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len(MARK):])


def rotated(items: Sequence[str], shift: int) -> list[str]:
    """``items`` started at ``shift`` (round r runs the methods in a rotated order)."""
    shift %= max(len(items), 1)
    return [*items[shift:], *items[:shift]]


# --- corpora ------------------------------------------------------------------------


def short_texts(n: int) -> list[str]:
    from massact_lens.examples.sentences import SENTENCES

    return [SENTENCES[i % len(SENTENCES)] for i in range(n)]


def long_rows(model: Any, n: int, n_tokens: int) -> Any:
    """``[n, n_tokens]`` token ids of real text (see the module docstring)."""
    import torch

    from massact_lens.examples.sentences import PARAPHRASE_PAIRS, SENTENCES

    sentences = list(SENTENCES) + [s for pair in PARAPHRASE_PAIRS for s in pair]
    rows = []
    for i in range(n):
        start = i % len(sentences)
        text = " ".join(sentences[start:] + sentences[:start])
        tokens = model.to_tokens(text, truncate=False, move_to_device=False)[0]
        if tokens.shape[0] < n_tokens:
            raise ValueError(f"The joined text has {tokens.shape[0]} tokens, fewer than --long-tokens {n_tokens}.")
        rows.append(tokens[:n_tokens].cpu())
    return torch.stack(rows)


def token_batches(model: Any, inputs: Any, batch_size: int) -> list[tuple[Any, Any]]:
    """(tokens, attention_mask) per batch, as the library batches ``inputs``."""
    from massact_lens._core.batching import plan_batches

    return [(b.tokens, b.attention_mask) for b in plan_batches(model, inputs, batch_size=batch_size).batches]


def corpus(model: Any, length: str, n: int, batch_size: int, long_tokens: int) -> list[tuple[Any, Any]]:
    inputs = short_texts(n) if length == "short" else long_rows(model, n, long_tokens)
    return token_batches(model, inputs, batch_size)


# --- reporting ----------------------------------------------------------------------


def summary(values: Sequence[float]) -> tuple[float, float]:
    return min(values), statistics.median(values)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(a: float | None, b: float | None, floor: float = 0.0) -> str:
    if a is None or b is None or b <= floor:
        return "n/a"
    return f"{a / b:.2f}"


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence progress bars of model loading in the parent."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        yield


def warn_if_busy() -> None:
    """Say so on stderr when other work already loads the machine (timings are then noise)."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5:
        print(f"WARNING: load average {load:.1f} on {cores} core(s) before the benchmark starts: "
              "other processes are running, so the timings are noise (memory and checks are not).",
              file=sys.stderr)


def environment() -> dict[str, Any]:
    import platform

    import torch
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "load_average": os.getloadavg(),
    }
