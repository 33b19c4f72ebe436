"""The paper's Table 3 (original / set to zero / set to mean) on models that run offline.

    python demos/ablation_table.py                                  # all-MiniLM-L6-v2
    python demos/ablation_table.py --model bigram_backcopy          # the project's decoder

MiniLM: profile the 40 built-in sentences (|x| > 50 and >= 200x the median), then
edit every massive entry the profile found (dim 99 at [CLS] in the pre-LN sums of
layers 0-3) and compare sentence embeddings with the original model's and
paraphrase-pair cosines (:data:`massact_lens.examples.sentences.PARAPHRASE_PAIRS`).

Bigram-Backcopy decoder: perplexity on 256 held-out task sequences (BOS first),
the start token's massive entries set to zero or to their mean. In a causal model
the start token's state is the same for every input, so "set to mean" is the
identity there by construction.
"""

from __future__ import annotations

import argparse
import sys

import torch

from massact_lens.evaluate import ablation_table
from massact_lens.examples import minilm
from massact_lens.examples.sentences import PARAPHRASE_PAIRS, SENTENCES
from massact_lens.find.profiles import profile


def bigram_sequences(n: int) -> torch.Tensor:
    """Held-out Bigram-Backcopy sequences for the ``default`` variant: BOS, then task tokens."""
    from massact_lens.training.tasks import BigramBackcopy, held_out

    return held_out(BigramBackcopy(), "default", n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["minilm", "bigram_backcopy"], default="minilm")
    parser.add_argument("--variant", default="default", help="bigram_backcopy variant")
    parser.add_argument("--min-value", type=float, help="criterion (default 50 MiniLM, 10 decoder)")
    parser.add_argument("--min-ratio", type=float, help="criterion (default 200 MiniLM, 20 decoder)")
    parser.add_argument("--kinds", nargs="+", help="token kinds to ablate (default: MiniLM all, decoder start)")
    parser.add_argument("--layers", nargs="+", type=int, help="only these layers")
    parser.add_argument("--sequences", type=int, default=256, help="decoder: held-out sequences")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    if args.model == "minilm":
        model = minilm()
        inputs: list[str] | torch.Tensor = list(SENTENCES)
        thresholds = (args.min_value or 50.0, args.min_ratio or 200.0)
        kinds = args.kinds
    else:
        from massact_lens.examples import bigram_backcopy

        model = bigram_backcopy(args.variant)
        inputs = bigram_sequences(args.sequences)
        thresholds = (args.min_value or 10.0, args.min_ratio or 20.0)
        kinds = args.kinds or ["start"]
    prof = profile(model, inputs, min_value=thresholds[0], min_ratio=thresholds[1], progress=not args.quiet)
    if not prof.dims:
        print(f"No massive activations at |x| > {thresholds[0]:g} and >= {thresholds[1]:g}x the median: nothing to ablate.")
        return 1
    found = prof.dims_dataframe()[["dim", "first_layer", "last_layer", "kinds", "max_abs_value", "max_ratio"]]
    print(f"Massive activations of {prof.provenance.model_name} ({prof.n_inputs} inputs):")
    print(found.to_string(index=False))
    kwargs = {"kinds": kinds, "layers": args.layers}
    try:
        if args.model == "minilm":
            table = ablation_table(model, prof, sentences=list(SENTENCES), pairs=list(PARAPHRASE_PAIRS), progress=not args.quiet, **kwargs)
        else:
            table = ablation_table(model, prof, corpus=inputs, progress=not args.quiet, **kwargs)
    except ValueError as error:
        print(f"\nNo table: {error}")
        return 1
    print(f"\nedited token kinds: {', '.join(kinds) if kinds else 'every kind (the library default)'}"
          + ("  (the decoder demo's default: the BOS peak; pass --kinds to change)" if args.model != "minilm" and not args.kinds else ""))
    for setting, names in table.hook_names.items():
        if names:
            print(f"{setting}: {', '.join(names)}")
    print()
    print(table.to_markdown(digits=3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
