"""Benchmark: eight ways to get the per-layer massive-activation statistics, side by side.

Run from the repository root, on a quiet machine (timings on a shared one are noise):

    python bench/bench_routes.py                         # MiniLM, 5 timing rounds + 1 memory round
    python bench/bench_routes.py --model smollm2         # SmolLM2-135M (30 layers)
    python bench/bench_routes.py --quick                 # a smoke run (~1.5 min): tiny sizes, one round
                                                         # under the memory settings for time and memory
    python bench/bench_routes.py --json out.json --threads 4
    python bench/bench_routes.py --setup-nnsight         # once: nnsight into bench/.nnsight-venv
    python bench/bench_routes.py --against ../v02         # adds route 7': the scan of another checkout

What every route computes (except 1 and 2): for each input and each hidden state the
scan reads, the top-k ``|x|`` entries (signed value, position, dim) and the exact lower
median ``|x|`` over the real (non-padding) positions, with the library's own arithmetic
(:func:`massact_lens._core.statistics.hidden_state_stats`; the HF routes load that file
directly so that their processes do not import TransformerLens). The hidden states:

* MiniLM (post-LN BERT): the 12 pre-LayerNorm sums ``blocks.{l}.ln1.hook_in`` and
  ``blocks.{l}.ln2.hook_in`` = in HuggingFace, the inputs of each layer's
  ``attention.output.LayerNorm`` and ``output.LayerNorm``.
* SmolLM2 (pre-norm LLaMA): the 30 block outputs ``blocks.{l}.hook_resid_post`` = the
  HuggingFace decoder layers' outputs = ``output_hidden_states[1:]`` except the last,
  which transformers replaces by the final RMSNorm's output (checked below).

Routes (HF = ``AutoModel`` from the same folder, i.e. no LM/MLM head; SDPA attention
everywhere unless ``--eager``, for HF routes and for the bridge routes, which run inside
:func:`massact_lens.models.load.fast_attention` like the scan does):

    1 hf              plain HF forward, no hidden states: the floor
    2 bridge          TransformerBridge forward stopped after the last block read, no statistics
                      (the pass scan makes: scan / bridge = the statistics' cost)
    3 hf_hidden       HF output_hidden_states=True + statistics   (n/a on MiniLM: BERT's
                      hidden_states are LayerNorm outputs, not the sums the scan reads)
    4 hf_hooks        HF forward hooks on the same points, statistics inside the hooks
    5 nnsight         nnsight trace saving the same points + statistics
    6 paper           Sun et al.'s way: each hidden state copied to the CPU as float64 (hooks
                      on the same points, like their monkey-patched layers), then statistics
    7 scan            massact_lens.scan: statistics inside the hooks, one call per group of
                      same-shaped hidden states (the statistics thread of 0.2 was removed)
    8 run_with_cache  bridge run_with_cache(names_filter=the points) + statistics. It runs the
                      whole model, head included: the bridge's stop_at_layer=n_layers still
                      runs the head, and the last block is read.
    7' against        with ``--against DIR``: ``massact_lens.scan`` imported from the checkout
                      in DIR (an older commit, in a git worktree), in the same interleaved
                      rounds, so that its paired ratio compares two versions of the scan on
                      one machine state. Checked like routes 3-8. It keeps its converted
                      models in a cache folder of its own (under the cache's ``against/``), and
                      ``--against-env NAME=VALUE`` sets a variable for it alone (for 0.2:
                      ``MASSACT_LENS_STATS_THREAD=0`` runs its statistics inline).

Everything runs on the CPU (models pinned to "cpu", also where a GPU exists), so RSS is
the memory that counts. Method: tokens are made once by the parent (see
bench/_harness.py for the texts: short = massact_lens.examples.sentences.SENTENCES, 10-25 tokens; long
= those sentences and the paraphrase pairs joined, cut to --long-tokens), at two corpus
sizes per length. Each route runs in its own fresh subprocess per round (one process per
route, running every (length, size) in turn); rounds are interleaved and the route order
rotates each round. In each process and for each (length, size): one warm-up batch, then
the whole corpus, timed. Memory rounds are separate fresh processes under
``MALLOC_MMAP_THRESHOLD_=65536`` (glibc returns large blocks on free, so RSS follows
live memory; that setting slows allocation, which is why timings come from processes
without it); the peak RSS above the warmed baseline is read exactly from the kernel's
high-water mark (VmHWM, reset through /proc/self/clear_refs). Reported: min and median
wall time over the timing rounds, the median process (CPU) time of every thread,
the median peak over the memory rounds, and the ratios ``scan / route`` (above 1: the
scan costs more than that route), on min time and as the median over rounds of the ratio
within each round (the two ran minutes apart at most, so a drift of the machine's load
between rounds cancels). The warm-up batch
doubles as a correctness check: routes 3, 4, 5, 6 and 8 must give the scan's medians and
top-1 values (relative difference below 1e-4: float32 rounding, which HF and the bridge
accumulate differently over the layers) and its top-1 positions and dims on the first
batch of every corpus, or the run says MISMATCH and exits 1.

nnsight is used only from this interpreter or from the throwaway venv
``bench/.nnsight-venv`` (made by ``--setup-nnsight``: a venv that sees this one's
packages through a .pth file and gets nnsight only if ``pip install --dry-run`` shows
torch and transformers stay as they are); otherwise the route is skipped, saying why.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
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
    ratio,
    rotated,
    run_child,
    summary,
    warn_if_busy,
)

ROUTES = ("hf", "bridge", "hf_hidden", "hf_hooks", "nnsight", "paper", "scan", "against", "run_with_cache")
LABELS = {
    "hf": "1 HF forward (floor)",
    "bridge": "2 bridge, stopped after last block",
    "hf_hidden": "3 HF output_hidden_states + stats",
    "hf_hooks": "4 HF forward hooks + stats",
    "nnsight": "5 nnsight trace + stats",
    "paper": "6 paper: float64 CPU copies + stats",
    "scan": "7 massact_lens.scan",
    "against": "7' the scan of --against",
    "run_with_cache": "8 run_with_cache + stats",
}
HF_ROUTES = {"hf", "hf_hidden", "hf_hooks", "nnsight", "paper"}
CHECKED = ("hf_hidden", "hf_hooks", "nnsight", "paper", "against", "run_with_cache")
NNSIGHT_VENV = ROOT / "bench" / ".nnsight-venv"
RTOL = 1e-4
MODEL_NAMES = {"minilm": "MiniLM (all-MiniLM-L6-v2, 6 layers, d_model 384)",
               "smollm2": "SmolLM2-135M-Instruct (30 layers, d_model 576)"}


# === child side: the routes ==========================================================
# Each route takes (context, batches, top_k) and returns None or the statistics as
# (values, positions, dims, medians), [inputs, hooks, k] and [inputs, hooks], on the CPU.

FIELDS = ("values", "positions", "dims", "medians")


def _statistics_module() -> Any:
    """massact_lens/_core/statistics.py itself, loaded without the package (and TransformerLens)."""
    spec = importlib.util.spec_from_file_location("_massact_statistics", ROOT / "massact_lens" / "_core" / "statistics.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stack(per_hook: list[Any]) -> tuple[Any, ...]:
    import torch

    return tuple(torch.stack([getattr(s, f) for s in per_hook], dim=1).cpu() for f in FIELDS)


def _concat(parts: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    import torch

    return tuple(torch.cat([p[i] for p in parts]) for i in range(len(FIELDS)))


class HFContext:
    """A HuggingFace AutoModel and the modules whose input (MiniLM) or output (SmolLM2)
    is each hidden state the scan reads, in forward order."""

    def __init__(self, kind: str, folder: str, attention: str, with_nnsight: bool) -> None:
        import torch
        from transformers import AutoModel

        self.kind = kind
        self.stats = _statistics_module().hidden_state_stats
        self.model = AutoModel.from_pretrained(folder, attn_implementation=attention, dtype=torch.float32).eval()
        if kind == "minilm":
            self.points = [m for layer in self.model.encoder.layer for m in (layer.attention.output.LayerNorm, layer.output.LayerNorm)]
            self.read = "input"
        else:
            self.points = list(self.model.layers)
            self.read = "output"
        self.envoys: list[Any] = []
        if with_nnsight:
            from nnsight import NNsight

            self.nn = NNsight(self.model)
            if kind == "minilm":
                # nnsight serves ``.output`` on every module, so a submodule named
                # "output" (BERT has two per layer) is reached as ``.E_output``.
                for layer in self.nn.encoder.layer:
                    self.envoys += [layer.attention.E_output.LayerNorm, layer.E_output.LayerNorm]
            else:
                self.envoys = list(self.nn.layers)

    @contextlib.contextmanager
    def hooked(self, fn: Callable[[int, Any], None]) -> Iterator[None]:
        """``fn(i, hidden_state)`` for each point ``i`` during the forward passes inside."""
        import torch

        handles = []
        for i, module in enumerate(self.points):
            if self.read == "input":
                handles.append(module.register_forward_pre_hook(lambda _m, args, i=i: fn(i, args[0])))
            else:
                handles.append(module.register_forward_hook(
                    lambda _m, _args, out, i=i: fn(i, out if isinstance(out, torch.Tensor) else out[0])))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def route_hf(ctx: HFContext, batches: list, top_k: int) -> None:  # noqa: ARG001
    import torch

    with torch.inference_mode():
        for tokens, mask in batches:
            ctx.model(input_ids=tokens, attention_mask=mask)


def route_hf_hidden(ctx: HFContext, batches: list, top_k: int) -> tuple:
    import torch

    parts = []
    with torch.inference_mode():
        for tokens, mask in batches:
            out = ctx.model(input_ids=tokens, attention_mask=mask, output_hidden_states=True)
            real = mask.bool()
            parts.append(_stack([ctx.stats(x, real, top_k) for x in out.hidden_states[1:]]))
    return _concat(parts)


def route_hf_hooks(ctx: HFContext, batches: list, top_k: int) -> tuple:
    import torch

    parts = []
    found: list[Any] = [None] * len(ctx.points)
    state: dict[str, Any] = {}

    def read(i: int, x: Any) -> None:
        found[i] = ctx.stats(x, state["real"], top_k)

    with torch.inference_mode(), ctx.hooked(read):
        for tokens, mask in batches:
            state["real"] = mask.bool()
            ctx.model(input_ids=tokens, attention_mask=mask)
            parts.append(_stack(found))
    return _concat(parts)


def route_paper(ctx: HFContext, batches: list, top_k: int) -> tuple:
    import torch

    parts = []
    copies: list[Any] = [None] * len(ctx.points)

    def copy(i: int, x: Any) -> None:
        copies[i] = x.detach().to("cpu", torch.float64, copy=True)

    with torch.inference_mode(), ctx.hooked(copy):
        for tokens, mask in batches:
            ctx.model(input_ids=tokens, attention_mask=mask)
            real = mask.bool()
            parts.append(_stack([ctx.stats(x, real, top_k) for x in copies]))
    return _concat(parts)


def route_nnsight(ctx: HFContext, batches: list, top_k: int) -> tuple:
    import torch

    parts = []
    attribute = "input" if ctx.read == "input" else "output"
    for tokens, mask in batches:
        saved = []
        with torch.inference_mode(), ctx.nn.trace(tokens, attention_mask=mask):
            for envoy in ctx.envoys:  # a plain loop: nnsight runs this block's source itself
                saved.append(getattr(envoy, attribute).save())
        real = mask.bool()
        parts.append(_stack([ctx.stats(x if isinstance(x, torch.Tensor) else x[0], real, top_k) for x in saved]))
    return _concat(parts)


class BridgeContext:
    """The library's TransformerBridge of the model and the hook names the scan reads."""

    def __init__(self, kind: str, root: str | None = None) -> None:
        sys.path.insert(0, root or str(ROOT))  # --against: another checkout's package
        import massact_lens as ml
        from massact_lens import examples

        self.ml = ml
        self.model = examples.minilm("cpu") if kind == "minilm" else examples.smollm2("cpu")
        if root is None:  # the routes other than the scan read this checkout's helpers
            from massact_lens._core.hook_names import residual_hook_names
            from massact_lens._core.statistics import hidden_state_stats

            self.names = residual_hook_names(self.model)
            self.stats = hidden_state_stats


def _batch_size(batches: list) -> int:
    return max(int(tokens.shape[0]) for tokens, _ in batches)


def route_bridge(ctx: BridgeContext, batches: list, top_k: int) -> None:  # noqa: ARG001
    from massact_lens._core.batching import plan_batches
    from massact_lens._core.loop import UserHooks, last_block_hook, measure

    plan = plan_batches(ctx.model, list(batches), batch_size=_batch_size(batches))
    # A hook that does nothing at the last block read: the loop stops the pass there.
    measure(ctx.model, plan, UserHooks([(last_block_hook(ctx.names), _nothing)]), progress=False)


def _nothing(activation: Any, hook: Any = None) -> None:  # noqa: ARG001
    return None


def route_scan(ctx: BridgeContext, batches: list, top_k: int) -> tuple:
    result = ctx.ml.scan(ctx.model, list(batches), batch_size=_batch_size(batches), top_k=top_k, progress=False)
    return result.values, result.positions, result.dims, result.medians


def route_run_with_cache(ctx: BridgeContext, batches: list, top_k: int) -> tuple:
    import torch

    from massact_lens._core.fast_paths import fast_attention

    parts = []
    names = list(ctx.names)
    with fast_attention(ctx.model), torch.inference_mode():
        for tokens, mask in batches:
            _, cache = ctx.model.run_with_cache(tokens, attention_mask=mask, names_filter=names)
            real = mask.bool()
            parts.append(_stack([ctx.stats(cache[name], real, top_k) for name in names]))
            del cache
    return _concat(parts)


RUN = {
    "hf": route_hf,
    "bridge": route_bridge,
    "hf_hidden": route_hf_hidden,
    "hf_hooks": route_hf_hooks,
    "nnsight": route_nnsight,
    "paper": route_paper,
    "scan": route_scan,
    "against": route_scan,
    "run_with_cache": route_run_with_cache,
}


def _check_data(out: tuple | None) -> dict[str, list] | None:
    """What the parent compares: medians, top-1 values, positions and dims, [inputs, hooks]."""
    if out is None:
        return None
    values, positions, dims, medians = out
    return {"medians": medians.tolist(), "top1": values[:, :, 0].tolist(),
            "positions": positions[:, :, 0].tolist(), "dims": dims[:, :, 0].tolist()}


def child(spec: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    data = torch.load(spec["corpus"], weights_only=False)
    method = spec["method"]
    with quiet_stderr():
        if method in HF_ROUTES:
            ctx: Any = HFContext(spec["model"], spec["folder"], "eager" if spec["eager"] else "sdpa", method == "nnsight")
        else:
            if method == "against":  # its own model cache, and what --against-env sets
                os.environ.update(spec["against_env"])
            ctx = BridgeContext(spec["model"], spec.get("against") if method == "against" else None)
            if method == "against" and not str(Path(ctx.ml.__file__).resolve()).startswith(spec["against"]):
                raise SystemExit(f"--against: imported massact_lens from {ctx.ml.__file__}, not {spec['against']}")
    fn = RUN[method]
    results = []
    for config in data["configs"]:
        batches = config["batches"]
        first = fn(ctx, batches[:1], spec["top_k"])  # warm-up, and the correctness check
        check = _check_data(first) if spec["check"] else None
        del first
        gc.collect()
        with PeakMeter() as meter:
            start, cpu_start = time.perf_counter(), time.process_time()
            out = fn(ctx, batches, spec["top_k"])
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        n_out = None if out is None else int(out[0].shape[0])
        del out
        gc.collect()
        results.append({"seconds": seconds, "cpu_seconds": cpu, "peak_bytes": meter.peak, "peak_method": meter.method,
                        "n_inputs_out": n_out, "check": check})
    emit({"method": method, "configs": results})


# === parent side ======================================================================


def _versions(python: str) -> list[str] | None:
    code = "import json, torch, transformers, nnsight; print(json.dumps([torch.__version__, transformers.__version__, nnsight.__version__]))"
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def nnsight_python() -> tuple[str | None, str]:
    """The interpreter to run the nnsight route with, and a line saying which (or why not)."""
    import torch
    import transformers

    if importlib.util.find_spec("nnsight") is not None:
        return sys.executable, "nnsight: from this interpreter"
    python = NNSIGHT_VENV / "bin" / "python"
    if python.exists():
        found = _versions(str(python))
        if found is None:
            return None, f"nnsight: skipped ({NNSIGHT_VENV} does not import nnsight; delete it and rerun --setup-nnsight)"
        if found[:2] != [torch.__version__, transformers.__version__]:
            return None, "nnsight: skipped (would change torch/transformers)"
        return str(python), f"nnsight {found[2]}: from the throwaway venv bench/.nnsight-venv (same torch and transformers)"
    return None, ("nnsight: skipped (not installed; `python bench/bench_routes.py --setup-nnsight` puts it in the "
                  "throwaway venv bench/.nnsight-venv without touching this one)")


def setup_nnsight() -> None:
    """Make bench/.nnsight-venv: sees this venv's packages, gets nnsight only if that leaves
    torch and transformers as they are (``pip install --dry-run --report``)."""
    python = NNSIGHT_VENV / "bin" / "python"
    if python.exists():
        print(nnsight_python()[1])
        return
    subprocess.run([sys.executable, "-m", "venv", str(NNSIGHT_VENV)], check=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_main_venv.pth").write_text("\n".join(sorted(ours)) + "\n")
    report = subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", "nnsight"],
                            capture_output=True, text=True)
    if report.returncode != 0:
        shutil.rmtree(NNSIGHT_VENV)
        print(f"nnsight: skipped (pip could not resolve it: {report.stderr.strip()[-300:]})")
        return
    names = {item["metadata"]["name"].lower() for item in json.loads(report.stdout).get("install", [])}
    if names & {"torch", "transformers"}:
        shutil.rmtree(NNSIGHT_VENV)
        print("nnsight: skipped (would change torch/transformers)")
        return
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "nnsight"], check=True)
    print(f"installed into {NNSIGHT_VENV}: {', '.join(sorted(names))}")
    print(nnsight_python()[1])


def against_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment of route 7': its own model cache (two checkouts whose cache formats
    differ would otherwise rebuild one folder in turn, a minute each, just before their
    timed runs), then what ``--against-env`` gives."""
    if args.against is None:
        return {}
    from massact_lens.models.cache import CACHE_ENV, cache_dir

    root = args.against.resolve()
    tag = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    env = {CACHE_ENV: str(cache_dir() / "against" / f"{root.name}-{tag}")}
    env.update(item.split("=", 1) for item in args.against_env)  # checked NAME=VALUE before any work
    return env


def compare(ref: dict[str, list], got: dict[str, list], hooks: slice) -> tuple[float, float, int]:
    """Max relative difference of medians and of top-1 values, and top-1 (position, dim) mismatches."""
    import torch

    def rel(key: str) -> float:
        a, b = torch.tensor(got[key])[:, hooks], torch.tensor(ref[key])[:, hooks]
        return float(((a - b).abs() / b.abs().clamp(min=1e-30)).max())

    where = sum(int((torch.tensor(got[k])[:, hooks] != torch.tensor(ref[k])[:, hooks]).sum()) for k in ("positions", "dims"))
    return rel("medians"), rel("top1"), where


def paired_ratio(scan: list[float], route: list[float]) -> float:
    """Median over rounds of ``scan[r] / route[r]``: both ran in round ``r`` (at most one
    round's processes apart), so a drift of the machine's load between rounds cancels.

    >>> paired_ratio([1.0, 2.0, 1.1], [1.0, 1.6, 1.0])
    1.1
    """
    return statistics.median(s / r for s, r in zip(scan, route, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--routes", default=",".join(ROUTES), help=f"comma-separated subset of {','.join(ROUTES)}")
    parser.add_argument("--lengths", default="short,long")
    parser.add_argument("--short-sizes", default="64,512", help="corpus sizes (inputs) of short inputs")
    parser.add_argument("--long-sizes", default=None, help="corpus sizes of long inputs (default 8,32; SmolLM2 4,16)")
    parser.add_argument("--long-tokens", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds")
    parser.add_argument("--memory-rounds", type=int, default=1,
                        help="0: peaks from the timing processes (default malloc: allocator retention counts)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every process")
    parser.add_argument("--eager", action="store_true", help="eager attention everywhere (default SDPA)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, one round under the memory settings giving both time and memory")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--against", type=Path, help="another checkout (a git worktree of an older commit): adds "
                        "route 7', its scan, to the same rounds")
    parser.add_argument("--against-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for route 7' only (repeatable), e.g. "
                        "MASSACT_LENS_STATS_THREAD=0 runs 0.2's statistics inline, in the forward's thread")
    parser.add_argument("--setup-nnsight", action="store_true", help="make bench/.nnsight-venv and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.setup_nnsight:
        setup_nnsight()
        return
    if args.quick:
        args.short_sizes, args.long_sizes, args.long_tokens = "4,8", "1,2", 128
        args.batch_size, args.rounds, args.memory_rounds = 4, 1, 0
    if args.long_sizes is None:
        args.long_sizes = "8,32" if args.model == "minilm" else "4,16"
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    unknown = set(routes) - set(ROUTES)
    if unknown:
        parser.error(f"unknown routes {sorted(unknown)}; choose from {','.join(ROUTES)}")
    if "scan" not in routes:
        routes.append("scan")  # the reference of every ratio and check
    if args.against is not None:
        routes = [r for r in routes if r != "against"]
        if not (args.against / "massact_lens" / "__init__.py").is_file():
            parser.error(f"--against {args.against}: no massact_lens package there (pass a checkout's root)")
        routes.append("against")
    elif "against" in routes or args.against_env:
        parser.error("route 'against' and --against-env need --against DIR (another checkout's root)")
    bad = [item for item in args.against_env if not item.partition("=")[0] or "=" not in item]
    if bad:
        parser.error(f"--against-env {bad[0]!r}: give NAME=VALUE")
    notes = []
    if args.model == "minilm" and "hf_hidden" in routes:
        routes.remove("hf_hidden")
        notes.append("3 HF output_hidden_states: n/a on MiniLM (BERT's hidden_states are LayerNorm outputs, not the "
                     "pre-LayerNorm sums where its massive activations live and the scan reads)")
    python = {r: sys.executable for r in routes}
    if "nnsight" in routes:
        found, line = nnsight_python()
        notes.append(line)
        if found is None:
            routes.remove("nnsight")
        else:
            python["nnsight"] = found

    import torch

    sys.path.insert(0, str(ROOT))
    import massact_lens
    from massact_lens import examples
    from massact_lens._core.hook_names import residual_hook_names

    torch.set_num_threads(args.threads)
    print(f"massact_lens from {Path(massact_lens.__file__).parent}", file=sys.stderr)
    warn_if_busy()
    with quiet_stderr():
        model = examples.minilm("cpu") if args.model == "minilm" else examples.smollm2("cpu")
        folder = str(examples.minilm_dir() if args.model == "minilm" else examples.smollm2_dir())
    sizes = {"short": [int(s) for s in args.short_sizes.split(",")], "long": [int(s) for s in args.long_sizes.split(",")]}
    configs = []
    for length in [x.strip() for x in args.lengths.split(",") if x.strip()]:
        for size in sizes[length]:
            batches = corpus(model, length, size, args.batch_size, args.long_tokens)
            n_tokens = sum(int(m.sum()) for _, m in batches)
            configs.append({"length": length, "size": size, "batches": batches, "n_tokens": n_tokens})
    n_hooks = len(residual_hook_names(model))
    del model
    gc.collect()

    workdir = Path(tempfile.mkdtemp(prefix="bench_routes_"))
    corpus_file = workdir / "corpus.pt"
    torch.save({"configs": [{"batches": c["batches"]} for c in configs]}, corpus_file)
    base_spec = {"model": args.model, "folder": folder, "corpus": str(corpus_file), "threads": args.threads,
                 "top_k": args.top_k, "eager": args.eager,
                 "against": None if args.against is None else str(args.against.resolve()),
                 "against_env": against_env(args)}
    env_eager = {"MASSACT_LENS_EAGER": "1"} if args.eager else {}
    os.environ.update(env_eager)

    n_runs = (args.rounds + args.memory_rounds) * len(routes)
    print(f"{len(routes)} routes x ({args.rounds} timing + {args.memory_rounds} memory rounds) = {n_runs} processes, "
          f"{len(configs)} corpora each", file=sys.stderr)
    times: dict[str, list[list[float]]] = {r: [[] for _ in configs] for r in routes}
    cpu: dict[str, list[list[float]]] = {r: [[] for _ in configs] for r in routes}
    peaks: dict[str, list[list[int]]] = {r: [[] for _ in configs] for r in routes}
    peaks_default: dict[str, list[list[int]]] = {r: [[] for _ in configs] for r in routes}
    checks: dict[str, list[Any]] = {}
    peak_methods = set()
    started = time.perf_counter()
    try:
        for kind, n_rounds in (("timing", args.rounds), ("memory", args.memory_rounds)):
            for r in range(n_rounds):
                for route in rotated(routes, r):
                    spec = {**base_spec, "method": route, "check": kind == "timing" and r == 0}
                    memory = kind == "memory" or args.quick  # quick: one round gives both
                    out = run_child(python[route], Path(__file__), spec, memory=memory, threads=args.threads)
                    for i, res in enumerate(out["configs"]):
                        peak_methods.add(res["peak_method"])
                        if kind == "timing":
                            times[route][i].append(res["seconds"])
                            cpu[route][i].append(res["cpu_seconds"])
                            peaks_default[route][i].append(res["peak_bytes"])
                        else:
                            peaks[route][i].append(res["peak_bytes"])
                    if spec["check"]:
                        checks[route] = [res["check"] for res in out["configs"]]
                    print(f"  {kind} round {r + 1}/{n_rounds}: {route:<15} "
                          + " ".join(f"{res['seconds']:.2f}s" for res in out["configs"])
                          + f"   [{time.perf_counter() - started:.0f}s]", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    # correctness: every statistics route against the scan, on the first batch of each corpus
    ok = True
    check_lines = []
    worst = [0.0, 0.0]
    compared = []
    for route in CHECKED:
        if route not in checks:
            continue
        hooks = slice(0, n_hooks - 1) if route == "hf_hidden" else slice(None)
        for i, c in enumerate(configs):
            med, top, where = compare(checks["scan"][i], checks[route][i], hooks)
            worst = [max(worst[0], med), max(worst[1], top)]
            if med > RTOL or top > RTOL or where:
                ok = False
                check_lines.append(f"MISMATCH: {LABELS[route]} on {c['length']}/{c['size']}: medians rel {med:.2e}, "
                                   f"top-1 rel {top:.2e}, {where} top-1 positions/dims differ")
        compared.append(route)
    numbers = ", ".join(LABELS[r].split()[0] for r in compared)
    if ok:
        check_lines.append(f"check: routes {numbers} give the scan's medians and top-1 values (max relative difference "
                           f"{worst[0]:.1e} and {worst[1]:.1e}) and its top-1 positions and dims, on the first batch of "
                           f"each of the {len(configs)} corpora"
                           + (f"; route 3 on {n_hooks - 1} of {n_hooks} states (transformers replaces the last hidden "
                              "state by the final norm's output)" if "hf_hidden" in compared else "") + ".")

    header = (f"{MODEL_NAMES[args.model]}; {args.threads} thread(s), batch {args.batch_size}, top_k {args.top_k}, "
              f"{'eager' if args.eager else 'SDPA'} attention, {args.rounds} timing round(s), {args.memory_rounds} "
              f"memory round(s); torch {torch.__version__}; peak RSS by {'/'.join(sorted(peak_methods))}")
    if args.memory_rounds == 0:
        peaks = peaks_default
        header += (" in the timing round, run under the memory settings (quick)" if args.quick
                   else " in the timing processes (default malloc, no memory round)")
    print(f"\n{header}")
    for line in notes + check_lines:
        print(line)
    tables = []
    for i, c in enumerate(configs):
        scan_t = min(times["scan"][i])
        scan_m = statistics.median(peaks["scan"][i]) if peaks["scan"][i] else None
        rows = []
        for route in ROUTES:
            if route not in routes:
                continue
            t_min, t_med = summary(times[route][i])
            m = statistics.median(peaks[route][i]) if peaks[route][i] else None
            rows.append([LABELS[route], f"{t_min:.3f}", f"{t_med:.3f}", f"{statistics.median(cpu[route][i]):.3f}",
                         ratio(scan_t, t_min), f"{paired_ratio(times['scan'][i], times[route][i]):.2f}",
                         "n/a" if m is None else f"{m / 2**20:.1f}", ratio(scan_m, m, floor=2**20)])
        title = (f"### {args.model}, {c['length']}: {c['size']} inputs, {c['n_tokens']:,} tokens "
                 f"({c['n_tokens'] / c['size']:.0f} per input)")
        table = markdown_table(["route", "min s", "median s", "CPU s (median)", "scan / route (min time)",
                                "scan / route (paired median)", "peak MiB above baseline", "scan / route (peak)"], rows)
        tables.append(f"{title}\n\n{table}")
        print(f"\n{title}\n\n{table}")
    print("\nratio above 1: the scan costs more than that route; paired median: the median over rounds of the scan's "
          "time over the route's in the same round (slow drifts of the machine's load cancel); CPU s: process time, "
          "every thread; n/a: a peak under 1 MiB.")

    if args.json:
        payload = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
            "environment": environment(),
            "header": header,
            "notes": notes,
            "check": {"ok": ok, "lines": check_lines},
            "configs": [
                {"length": c["length"], "size": c["size"], "n_tokens": c["n_tokens"],
                 "routes": {r: {"seconds": times[r][i], "cpu_seconds": cpu[r][i], "peak_bytes": peaks[r][i],
                                "peak_bytes_timing_processes": peaks_default[r][i]} for r in routes}}
                for i, c in enumerate(configs)
            ],
        }
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
