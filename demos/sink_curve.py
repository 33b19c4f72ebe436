"""The attention sink over SmolLM2's whole context: attention on the first token by query position.

    python demos/sink_curve.py                       # 8,192 tokens of Hamlet, all 30 layers
    python demos/sink_curve.py --tokens 2048 --figure sink_curve.html

One long text (the play from its start, no BOS: the first token is an ordinary word),
:func:`massact_lens.attention.sink_curve` with C = the first token, in the fused
attention kernel (one forward pass; no [query, key] tensor, so 8,192 tokens fit a
laptop). Prints, for a few query positions, the attention on the first token averaged
over heads: every layer's mean, the layers' range, and what uniform attention over the
query's keys would give (1 / (q + 1)); then per layer at the last query.
"""

from __future__ import annotations

import argparse

import torch

from massact_lens.attention import sink_curve
from massact_lens.examples import smollm2
from massact_lens.examples.corpora import shakespeare

POSITIONS = (1, 10, 100, 1000, 4000, 8191)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--figure", help="write the figure (HTML, draws offline) here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = smollm2()
    tokens = model.to_tokens(shakespeare("hamlet"), prepend_bos=False, truncate=False)[:, : args.tokens]
    curve = sink_curve(model, tokens, "start", progress=False)
    mass = curve.mass.mean(1)  # [layer, query]: mean over heads
    last = int(mass.shape[1]) - 1
    shown = [q for q in POSITIONS if q <= last]
    print(f"SmolLM2-135M, {last + 1} tokens of Hamlet (no BOS), C = the first token, route: {curve.route}")
    print("query position      " + "".join(f"{q:>9}" for q in shown))
    print("mean over layers    " + "".join(f"{float(mass[:, q].mean()):9.3f}" for q in shown))
    print("lowest layer        " + "".join(f"{float(mass[:, q].min()):9.3f}" for q in shown))
    print("highest layer       " + "".join(f"{float(mass[:, q].max()):9.3f}" for q in shown))
    print("uniform 1/(q+1)     " + "".join(f"{float(curve.uniform[0, q]):9.4f}" for q in shown))
    print(f"\nper layer at query {last}: " + " ".join(f"L{layer} {float(mass[i, last]):.2f}"
                                                  for i, layer in enumerate(curve.layers)))
    if args.figure:
        from massact_lens.viz import save_html, sink_curve_figure

        save_html(args.figure, sink_curve_figure(curve))
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
