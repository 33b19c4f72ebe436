"""The attention side of the paper on all-MiniLM-L6-v2, C = [CLS], over the 40 built-in sentences.

    python demos/attention_table.py

Prints per layer: the attention on [CLS] (mean over heads, queries and sentences) and
the strongest head; the constancy of the implicit-bias term (the part of the attention
output that comes from [CLS], through W_O, all heads) against the rest term: cosine to
its mean and relative variation (std norm / mean norm) across queries and sentences;
and the value-vector norms of [CLS] against the other tokens.
"""

from __future__ import annotations

import pandas as pd

from massact_lens.attention import attention_concentration, implicit_bias, token_features
from massact_lens.examples import minilm
from massact_lens.examples.sentences import SENTENCES


def main() -> None:
    model = minilm()
    sentences = list(SENTENCES)
    sinks = attention_concentration(model, sentences, "start", progress=False).layer_mass()
    split = implicit_bias(model, sentences, "start", progress=False).to_dataframe().query("head == -1")
    values = token_features(model, sentences, "start", progress=False).to_dataframe().groupby("layer").mean(numeric_only=True)
    table = pd.DataFrame(
        {
            "attn on [CLS]": sinks["mass"].to_numpy(),
            "uniform": sinks["uniform"].to_numpy(),
            "top head": [f"H{h} {m:.2f}" for h, m in zip(sinks["max_head"], sinks["max_head_mass"], strict=True)],
            "bias cos": split["bias_cos"].to_numpy(),
            "rest cos": split["rest_cos"].to_numpy(),
            "bias rel.var": split["bias_rel_variation"].to_numpy(),
            "rest rel.var": split["rest_rel_variation"].to_numpy(),
            "v norm [CLS]": values["value_norm_c"].to_numpy(),
            "v norm others": values["value_norm_other"].to_numpy(),
        },
        index=pd.Index(sinks["layer"].to_numpy(), name="layer"),
    )
    rounded = table.round(2).reset_index()
    print("| " + " | ".join(rounded.columns) + " |")
    print("|" + "---|" * len(rounded.columns))
    for row in rounded.itertuples(index=False):
        print("| " + " | ".join(str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
