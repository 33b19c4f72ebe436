"""Results as tables a reader can take in: the massive dims, their constancy, and what each column means.

The report (:mod:`massact_lens.cli.report`) shows these; each function takes a result
and returns a DataFrame whose column names say their unit, and :data:`GLOSSARY`
explains the columns that carry a library's short name (``c_mass``, ``bias_cos``, ...).

>>> from massact_lens import find_massive, scan
>>> from massact_lens.examples import minilm
>>> found = find_massive(scan(minilm(), ["Rain fell.", "The cat sat."], progress=False), 50, 200)
>>> massive_dims_table(found).loc[0, "tokens (prompts)"]
"'[CLS]' (2)"
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from massact_lens.find.criterion import MassiveActivations
from massact_lens.find.profiles import MassiveProfile
from massact_lens.viz._labels import hook_ranges, number_ranges

__all__ = [
    "GLOSSARY",
    "channel_wide_table",
    "constancy_summary",
    "constancy_table",
    "glossary",
    "layer_table",
    "massive_dims_table",
    "with_entry_counts",
]

#: What the columns of the report's tables mean.
GLOSSARY: dict[str, str] = {
    "top1, top2, top3": "the three largest |activation| of a hidden state (one prompt), averaged over the prompts",
    "median": "the median |activation| of the hidden state (all tokens and dims), averaged over the prompts",
    "ratio": "top1 / median, per prompt, averaged",
    "top1_std": "standard deviation of top1 across the prompts",
    "massive entries": "how many (prompt, token, dim) entries of this hidden state pass the criterion on a few "
                       "tokens (massive activations; outlier channels are counted apart)",
    "channel-wide entries": "how many (prompt, token, dim) entries of this hidden state pass the criterion in a "
                            "dim that passes on more than half of the prompt's tokens there (an outlier channel)",
    "entries": "the (prompt, position) pairs averaged: one per prompt for the start token, one per occurrence "
               "for a delimiter or another token",
    "hidden states": "the (prompt, hidden state) pairs where the dim passes on more than half of the tokens",
    "token median |x|": "the median |x| of the dim over the tokens of a hidden state (its largest over the hidden "
                        "states listed): above the criterion, the dim is large on most tokens, not a few",
    "mean, std": "of the signed value of this dim on this token kind, across the prompts where it was followed",
    "cv (%)": "coefficient of variation, 100 x std / |mean|: below 10% the value is nearly a constant",
    "cv (%) median, max": "the cv over the hidden states where the dim is massive: its median and its largest",
    "massive here": "whether the dim passes the criterion at this hidden state; where it does not, the row "
                    "shows the same dim and token on its way in or out",
    "mass": "mean attention probability on C (the massive tokens), over queries, heads and prompts",
    "max_head_mass, max_head": "the same for the most concentrated head, and which head it is",
    "uniform": "what mass would be if every query attended uniformly to the keys it can see",
    "c_mass": "attention on C, mean over queries and prompts (all heads)",
    "bias_norm, rest_norm": "mean norm of the attention output's two terms, written to the residual stream: "
                            "from C (the implicit bias) and from all other keys (the rest)",
    "bias_cos, rest_cos": "mean cosine of each term to its own mean over queries and prompts: near 1, "
                          "the term points the same way for every query",
    "bias_rel_variation, rest_rel_variation": "std of the term across queries and prompts / the norm of its mean: "
                                              "small, the term is nearly constant (a bias)",
}


def glossary(*terms: str) -> dict[str, str]:
    """The :data:`GLOSSARY` entries for ``terms`` (in that order).

    >>> list(glossary("c_mass", "cv (%)"))
    ['c_mass', 'cv (%)']
    """
    return {t: GLOSSARY[t] for t in terms}


def layer_table(stats: pd.DataFrame) -> pd.DataFrame:
    """The scan's layer-wise table without columns that say nothing (``n_nonfinite`` when all 0, ``n_inputs``).

    >>> layer_table(pd.DataFrame({"layer": [0], "n_inputs": [3], "n_nonfinite": [0]})).columns.tolist()
    ['layer']
    """
    drop = [c for c in ("n_inputs",) if c in stats]
    if "n_nonfinite" in stats and not stats["n_nonfinite"].any():
        drop.append("n_nonfinite")
    return stats.drop(columns=drop)


def with_entry_counts(stats: pd.DataFrame, found: MassiveActivations) -> pd.DataFrame:
    """The scan's layer table (:meth:`~massact_lens.ScanResult.layer_stats`) with, per hook, the
    ``massive entries`` that pass the criterion on a few tokens and (when there are any) the
    ``channel-wide entries`` of outlier channels, counted apart."""
    every = found.to_dataframe(include_channel_wide=True)
    wide = every["channel_wide"].astype(bool)
    for column, rows in (("massive entries", every[~wide]), ("channel-wide entries", every[wide])):
        if column == "massive entries" or len(rows):
            counts: dict[str, int] = rows["hook_name"].value_counts().to_dict()
            stats[column] = [int(counts.get(name, 0)) for name in stats["hook_name"]]
    return stats


def massive_dims_table(found: MassiveActivations) -> pd.DataFrame:
    """One row per massive dim: layers, hook points (as ranges), token kinds and tokens with their number of prompts.

    Counts are prompts (inputs), not entries: a token massive at 18 hidden states
    of 40 prompts counts 40.
    """
    frame = found.to_dataframe()
    rows = []
    for d in found.dim_summaries():
        mine = frame[frame["dim"] == d.dim]
        kinds = mine.groupby("kind")["input_index"].nunique().sort_values(ascending=False)
        tokens = mine.groupby("token")["input_index"].nunique().sort_values(ascending=False)
        shown = ", ".join(f"{t!r} ({n})" for t, n in list(tokens.items())[:4])
        rows.append(
            {
                "dim": d.dim,
                "layers": number_ranges(sorted({int(x) for x in mine["layer"]})),
                "hook points": hook_ranges(list(d.hook_names)),
                "token kinds (prompts)": ", ".join(f"{k} ({n})" for k, n in kinds.items()),
                "tokens (prompts)": shown + (f", ... {len(tokens) - 4} more" if len(tokens) > 4 else ""),
                "% of prompts": 100.0 * d.input_fraction,
                "max |x|": d.max_abs_value,
                "max ratio": d.max_ratio,
            }
        )
    return pd.DataFrame(rows)


def channel_wide_table(found: MassiveActivations) -> pd.DataFrame:
    """One row per outlier channel (``found.channel_wide``: a dim that passes the criterion on
    more than half of the tokens of a hidden state): layers, hook points, how many prompts
    and hidden states, its largest per-state median ``|x|`` over the tokens and its largest ``|x|``.

    >>> from massact_lens import find_massive, scan
    >>> from massact_lens.examples import minilm
    >>> channel_wide_table(find_massive(scan(minilm(), ["Rain fell."], progress=False), 50, 200)).empty
    True
    """
    if not found.channel_wide:
        return pd.DataFrame()
    frame = found.to_dataframe(include_channel_wide=True)
    frame = frame[frame["channel_wide"].astype(bool)]
    scan = found.scan
    hooks = {name: h for h, name in enumerate(scan.hook_names)}
    rows = []
    for d in found.channel_wide_summaries():
        mine = frame[frame["dim"] == d.dim]
        states = sorted(set(zip(mine["input_index"], mine["hook_name"], strict=True)))
        column = scan.column_medians
        token_median = max(
            float(column[i, hooks[h]][scan.dims[i, hooks[h]] == d.dim].max()) for i, h in states
        ) if column is not None else float("nan")
        rows.append(
            {
                "dim": d.dim,
                "layers": number_ranges(sorted({int(x) for x in mine["layer"]})),
                "hook points": hook_ranges(list(d.hook_names)),
                "% of prompts": 100.0 * d.input_fraction,
                "hidden states": len(states),
                "token median |x|": token_median,
                "max |x|": d.max_abs_value,
            }
        )
    return pd.DataFrame(rows)


def constancy_table(massive_profile: MassiveProfile, found: MassiveActivations | None = None) -> pd.DataFrame:
    """The profile's mean / std / cv per (hidden state, dim, token kind), cv in percent, and whether it is massive there.

    Columns: those of :meth:`~massact_lens.MassiveProfile.to_dataframe` with ``count``
    named ``entries`` ((prompt, position) pairs: a prompt counts once per occurrence of
    the token kind) and ``cv`` given as ``cv (%)``, and ``massive here``.

    ``found`` (the scan's :func:`~massact_lens.find_massive`) decides "massive
    here"; without it, the profile's own hook points per dim do.
    """
    table = massive_profile.to_dataframe()
    if found is not None and len(found):
        hits = found.to_dataframe()
        where: set[tuple[Any, ...]] = set(zip(hits["hook_name"], hits["dim"], hits["kind"], strict=True))
        here = [(h, d, k) in where for h, d, k in zip(table["hook_name"], table["dim"], table["kind"], strict=True)]
    else:
        hooks = {s.dim: set(s.hook_names) for s in massive_profile.dims}
        here = [h in hooks.get(d, set()) for h, d in zip(table["hook_name"], table["dim"], strict=True)]
    table["massive here"] = ["yes" if h else "no" for h in here]
    table["cv (%)"] = 100.0 * table["cv"]
    return table.drop(columns=["cv"]).rename(columns={"count": "entries"})


def constancy_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (dim, token kind) of a :func:`constancy_table`, over the hidden states where it is massive.

    The layers, the (prompt, position) entries, the largest ``|mean|`` and the median and
    largest cv: what a 30-layer table says, in a line per dim.

    >>> rows = pd.DataFrame({"layer": [1, 2, 3], "hook_name": ["a", "b", "c"], "dim": [7, 7, 7],
    ...     "kind": ["start"] * 3, "entries": [4, 4, 4], "mean": [900.0, -950.0, 10.0], "std": [9.0, 19.0, 1.0],
    ...     "massive here": ["yes", "yes", "no"], "cv (%)": [1.0, 2.0, 10.0]})
    >>> constancy_summary(rows).to_dict("records")[0]
    {'dim': 7, 'token kind': 'start', 'layers': '1-2', 'entries': 4, 'largest |mean|': -950.0, 'cv (%) median': 1.5, 'cv (%) max': 2.0}
    """
    here = table[table["massive here"] == "yes"]
    rows = []
    for (dim, kind), group in here.groupby(["dim", "kind"], sort=True):
        peak = group.loc[group["mean"].abs().idxmax()]
        rows.append(
            {
                "dim": int(dim),
                "token kind": kind,
                "layers": number_ranges([int(x) for x in group["layer"]]),
                "entries": int(group["entries"].max()),
                "largest |mean|": float(peak["mean"]),
                "cv (%) median": float(group["cv (%)"].median()),
                "cv (%) max": float(group["cv (%)"].max()),
            }
        )
    return pd.DataFrame(rows)
