"""Benchmark: perplexity evaluation with the ablation hooks vs without, side by side.

Target: evaluation under ``ablation_hooks(profile, "zero" | "mean")`` takes at most
1.05x the time of the same evaluation without hooks.

The model is a TransformerLens-native LLaMA-like decoder (RMSNorm, rotary, SwiGLU,
GQA) with a massive activation planted on the start token
(:func:`massact_lens.models.planting.plant_massive_activation`), so the profile finds it
in every layer from ``--plant-layer`` on and the hook lists are the real ones.
Sized so one forward pass of a batch takes tens of milliseconds on a CPU core.
Settings are interleaved (none, zero, mean, none, ...) and the best of
``--repeats`` runs is compared, so load on the machine hits all of them alike.

    python bench/bench_ablation.py                 # default size
    python bench/bench_ablation.py --quick         # a few seconds, to check it runs
"""

from __future__ import annotations

import argparse
import time

import torch

from massact_lens.evaluate import perplexity
from massact_lens.examples import tiny_model
from massact_lens.find.profiles import profile
from massact_lens.interventions import ablation_hooks
from massact_lens.models.planting import plant_massive_activation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plant-layer", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.d_model, args.vocab, args.seq_len, args.sequences, args.repeats = 3, 64, 256, 32, 16, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = tiny_model("llama", n_layers=args.layers, d_model=args.d_model, n_heads=8, d_vocab=args.vocab, n_ctx=args.seq_len)
    plant_massive_activation(model, layer=args.plant_layer, dim=5, value=1000.0, token_id=0)
    corpus = torch.randint(1, args.vocab, (args.sequences, args.seq_len))
    corpus[:, 0] = 0  # the planted start token begins every sequence
    prof = profile(model, corpus[:16], progress=False)
    settings = {"none": [], "zero": ablation_hooks(model, prof, "zero"), "mean": ablation_hooks(model, prof, "mean")}
    edited = sum(1 for name, _ in settings["zero"] if name.startswith("blocks."))
    print(
        f"model: {args.layers} layers, d_model {args.d_model}, vocab {args.vocab}; {args.sequences} sequences "
        f"x {args.seq_len} tokens, batch {args.batch_size}, {args.threads} thread(s); "
        f"ablation edits {edited} hook points"
    )

    def run(hooks: list) -> tuple[float, float]:
        start = time.perf_counter()
        result = perplexity(model, corpus, fwd_hooks=hooks, batch_size=args.batch_size, progress=False)
        return time.perf_counter() - start, result.perplexity

    run([])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in settings}
    ppl: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, hooks in settings.items():
            seconds, ppl[name] = run(hooks)
            times[name].append(seconds)
    forwards = -(-args.sequences // args.batch_size)
    base = min(times["none"])
    print(f"{'setting':8} {'best s':>8} {'median s':>9} {'ms/forward':>11} {'ratio':>6} {'perplexity':>11}")
    for name, values in times.items():
        best, median = min(values), sorted(values)[len(values) // 2]
        print(f"{name:8} {best:8.3f} {median:9.3f} {1000 * best / forwards:11.1f} {best / base:6.3f} {ppl[name]:11.3f}")
    worst = max(min(times[n]) for n in ("zero", "mean")) / base
    print(f"ratio (hooks / none, best of {args.repeats}): {worst:.3f}  target <= 1.05: {'ok' if worst <= 1.05 else 'MISSED'}")


if __name__ == "__main__":
    main()
