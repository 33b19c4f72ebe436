"""Benchmark: what batching the inputs longest first saves on a corpus of mixed lengths.

Run from the repository root, on a quiet machine (timings on a shared one are noise):

    python bench/bench_by_length.py                      # MiniLM, 128 inputs, 8 rounds
    python bench/bench_by_length.py --model smollm2      # SmolLM2-135M
    python bench/bench_by_length.py --quick              # a smoke run: 32 inputs, 1 round
    python bench/bench_by_length.py --attention          # also implicit_bias, both ways

``scan`` batches a list of strings (or a token tensor) longest first by default
(``by_length=True``: each batch holds inputs of similar length, so little padding is
computed; the result comes back in input order). This measures it against the same
scan with ``by_length=False`` (batches in the order given, as before) and against the
plain HuggingFace forward (``AutoModel`` from the same folder, SDPA attention, no
hidden states) over the same token batches in both orders: in the order given, the loop
a researcher writes, and longest first, the floor of a pass that sorts. With
``--attention``, also ``implicit_bias(model, inputs, "start")`` (every layer; eager
attention, since it reads the patterns) with ``by_length=False`` and by default.

Corpus: ``--inputs`` texts, each 1 to 8 consecutive sentences of
``massact_lens.examples.sentences`` (SENTENCES and the paraphrase pairs), the count drawn from a
long-tailed distribution with a fixed seed (most inputs short, a few long, as in real
corpora), tokenised once by the library (the same tokens for every route). Method:
all four routes in one process, one warm-up run each, then ``--rounds`` rounds with the
route order rotated; min and median wall time and the ratios on min time and as the
median over rounds of the ratio within a round (paired). Before timing, the two scans
are checked to give the same records (positions, dims, token ids and lengths equal,
values and medians within float32 rounding), or the run says MISMATCH and exits 1.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import ROOT, environment, markdown_table, quiet_stderr, rotated, warn_if_busy  # noqa: E402

ROUTES = ("hf_given", "hf_sorted", "scan_given", "scan")
ATTENTION_ROUTES = ("bias_given", "bias")
LABELS = {
    "hf_given": "HF forward, batches in the order given (floor)",
    "hf_sorted": "HF forward, batches longest first",
    "scan_given": "scan(by_length=False)",
    "scan": "scan (default: by_length=True)",
    "bias_given": 'implicit_bias(..., "start", by_length=False)',
    "bias": 'implicit_bias(..., "start") (default: longest first)',
}
#: Sentences joined per input, drawn uniformly from this list (a long tail).
SPANS = (1, 1, 1, 1, 2, 2, 3, 5, 8)


def mixed_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` texts of 1 to 8 consecutive sentences (see the module docstring)."""
    from massact_lens.examples.sentences import PARAPHRASE_PAIRS, SENTENCES

    sentences = list(SENTENCES) + [s for pair in PARAPHRASE_PAIRS for s in pair]
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        span, start = rng.choice(SPANS), rng.randrange(len(sentences))
        texts.append(" ".join((sentences[start:] + sentences[:start])[:span]))
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--inputs", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="32 inputs, one round: a smoke run")
    parser.add_argument("--attention", action="store_true", help="also time implicit_bias both ways")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    if args.quick:
        args.inputs, args.rounds = 32, 1
    if args.inputs < 1 or args.rounds < 1 or args.batch_size < 1 or args.threads < 1:
        parser.error("--inputs, --rounds, --batch-size and --threads must be positive.")
    warn_if_busy()

    import torch
    from transformers import AutoModel

    sys.path.insert(0, str(ROOT))
    import massact_lens as ml
    from massact_lens import examples
    from massact_lens._core.batching import plan_batches

    torch.set_num_threads(args.threads)
    with quiet_stderr():
        model = examples.minilm("cpu") if args.model == "minilm" else examples.smollm2("cpu")
        folder = examples.minilm_dir() if args.model == "minilm" else examples.smollm2_dir()
        hf = AutoModel.from_pretrained(str(folder), attn_implementation="sdpa", dtype=torch.float32).eval()
    texts = mixed_texts(args.inputs)
    given = plan_batches(model, texts, batch_size=args.batch_size).batches
    longest_first = plan_batches(model, texts, batch_size=args.batch_size, by_length=True).batches
    assert isinstance(given, list) and isinstance(longest_first, list)
    whole = plan_batches(model, texts, batch_size=len(texts)).batches[0]  # every input, right-padded
    tokens, mask = whole.tokens, whole.attention_mask
    real = int(mask.sum())
    padded = {"given": sum(b.tokens.numel() for b in given), "sorted": sum(b.tokens.numel() for b in longest_first)}

    def hf_pass(batches: list[Any]) -> None:
        with torch.inference_mode():
            for b in batches:
                hf(input_ids=b.tokens, attention_mask=b.attention_mask)

    def scan(by_length: bool) -> Any:
        return ml.scan(model, tokens, attention_mask=mask, batch_size=args.batch_size, by_length=by_length,
                       progress=False)

    run = {
        "hf_given": lambda: hf_pass(given),
        "hf_sorted": lambda: hf_pass(longest_first),
        "scan_given": lambda: scan(False),
        "scan": lambda: scan(True),
        "bias_given": lambda: ml.implicit_bias(model, tokens, "start", attention_mask=mask, batch_size=args.batch_size,
                                               by_length=False, progress=False),
        "bias": lambda: ml.implicit_bias(model, tokens, "start", attention_mask=mask, batch_size=args.batch_size,
                                         progress=False),
    }
    routes = ROUTES + (ATTENTION_ROUTES if args.attention else ())
    a, b = scan(False), scan(True)
    same = (
        all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("positions", "dims", "token_ids", "lengths"))
        and torch.allclose(a.values, b.values, rtol=1e-4, atol=1e-4)
        and torch.allclose(a.medians, b.medians, rtol=1e-4, atol=1e-5)
    )
    if not same:
        print("MISMATCH: scan(by_length=True) does not give scan(by_length=False)'s records.", file=sys.stderr)
        raise SystemExit(1)
    for route in routes:
        run[route]()
    times: dict[str, list[float]] = {r: [] for r in routes}
    for i in range(args.rounds):
        for route in rotated(list(routes), i):
            start = time.perf_counter()
            run[route]()
            times[route].append(time.perf_counter() - start)

    def paired(x: str, y: str) -> float:
        return statistics.median(p / q for p, q in zip(times[x], times[y], strict=True))

    name = {"minilm": "MiniLM (all-MiniLM-L6-v2)", "smollm2": "SmolLM2-135M-Instruct"}[args.model]
    print(f"{name}: {args.inputs} inputs, {real:,} tokens, batch {args.batch_size}; padded positions "
          f"computed: {padded['given']:,} in the order given, {padded['sorted']:,} longest first; "
          f"{args.rounds} rounds, {args.threads} thread(s). The two scans give the same records.\n")
    rows = []
    for route in routes:
        rows.append([LABELS[route], f"{min(times[route]):.3f}", f"{statistics.median(times[route]):.3f}",
                     f"{min(times[route]) / min(times['hf_given']):.2f}", f"{paired(route, 'hf_given'):.2f}",
                     f"{min(times[route]) / min(times['hf_sorted']):.2f}", f"{paired(route, 'hf_sorted'):.2f}"])
    print(markdown_table(["route", "min s", "median s", "/ HF given (min)", "/ HF given (paired)",
                          "/ HF longest first (min)", "/ HF longest first (paired)"], rows))
    print(f"\nscan / scan(by_length=False): {min(times['scan']) / min(times['scan_given']):.2f} on min time, "
          f"{paired('scan', 'scan_given'):.2f} paired")
    if args.attention:
        print(f"implicit_bias longest first / in the order given: {min(times['bias']) / min(times['bias_given']):.2f} "
              f"on min time, {paired('bias', 'bias_given'):.2f} paired")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "inputs": args.inputs, "tokens": real,
                                         "padded": padded, "rounds": args.rounds, "threads": args.threads,
                                         "times": times, "environment": environment()}, indent=1))


if __name__ == "__main__":
    main()
