"""The report's findings ("In short"): each sentence made from the numbers it states, and none
stronger than its baseline allows.

* counts name their unit: prompts, sequences, hidden states, or (prompt, position) entries;
* the massive dims are the token-sparse ones; outlier channels (a dim that passes the
  criterion on more than half of the tokens of a hidden state) get a sentence of their own;
* constancy is never read off BOS in a causal model (its state is the same for every input
  by construction): from the measurements without BOS, or a sentence says why there are none;
* attention on C is a finding only against the uniform baseline of the keys each query sees
  (sliding windows included): when uniform attention would already put most of it on C, the
  sentence says that this tells nothing; the split of its output is called an implicit bias only
  when the term from C varies at most half as much as the rest;
* a constancy is never read off one (prompt, position) entry.

>>> sink_finding("them", 1.0, 1.0, 0.94, 3)
('C holds most of the keys a query sees: uniform attention would put 0.94 on it (layer 3), so the attention on it (1.00) says nothing about a sink.', True)
"""

from __future__ import annotations

import pandas as pd

from massact_lens.find.criterion import MassiveActivations
from massact_lens.viz._labels import number_ranges

__all__ = ["SINK_LIFT", "VACUOUS_UNIFORM", "constancy_finding", "dim_findings", "sink_finding"]

#: Uniform attention that puts at least this share on C makes a finding about C vacuous (C is most keys).
VACUOUS_UNIFORM = 0.5
#: Attention on C at least this many times the uniform share counts as concentrating on C.
SINK_LIFT = 2.0


def dim_findings(found: MassiveActivations, n_prompts: int, stats: pd.DataFrame, shown: int = 3) -> list[str]:
    """A sentence per massive dim (the ``shown`` most frequent), then per outlier channel; when
    no dim is massive on a few tokens, a sentence that says so (``stats``: the scan's layer table)."""
    out = [] if len(found) else [_no_massive_finding(stats, n_prompts, bool(found.channel_wide))]
    frame = found.to_dataframe()
    summaries = sorted(found.dim_summaries(), key=lambda d: (-d.input_fraction, -d.max_ratio))
    for d in summaries[:shown]:
        layers = frame.loc[frame["dim"] == d.dim, "layer"].tolist()
        out.append(
            f"Dim {d.dim} is massive in layer{'s' if len(set(layers)) > 1 else ''} {number_ranges(layers)}, on "
            f"{', '.join(d.kinds)} tokens ({', '.join(list(d.tokens)[:3])}), up to |x| = {d.max_abs_value:.4g}, "
            f"{d.max_ratio:.0f}x the median, in {d.input_fraction:.0%} of the {n_prompts} prompts."
        )
    if len(summaries) > shown:
        out.append(f"... and {len(summaries) - shown} more dims pass the criterion (see the table).")
    wide = found.to_dataframe(include_channel_wide=True)
    wide = wide[wide["channel_wide"].astype(bool)]
    for d in found.channel_wide_summaries()[:shown]:
        mine = wide[wide["dim"] == d.dim]
        n_states = len(set(zip(mine["input_index"], mine["hook_name"], strict=True)))
        out.append(
            f"Dim {d.dim} is an outlier channel, not a massive activation: it passes the criterion on more than half "
            f"of the tokens of {n_states} hidden states (layers {number_ranges(mine['layer'].tolist())}), in "
            f"{d.input_fraction:.0%} of the {n_prompts} prompts; it is listed apart and left out below."
        )
    return out


def _no_massive_finding(stats: pd.DataFrame, n_prompts: int, channel_wide: bool) -> str:
    """The sentence when no dim is massive on a few tokens (``stats``: the scan's layer table)."""
    top = stats.loc[stats["ratio"].idxmax()]
    return (f"No massive activation under this criterion: the largest top-1 / median ratio, averaged over the "
            f"{n_prompts} prompts, is {top['ratio']:.0f}x, at {top['hook_name']}"
            + (" (the entries that pass belong to outlier channels)." if channel_wide else "."))


def constancy_finding(
    table: pd.DataFrame | None, no_bos: pd.DataFrame | None, bos_fixed: bool, no_bos_ran: bool, skipped: str
) -> str | None:
    """The constancy sentence, from the table without BOS when there is one (``no_bos``), else from
    the prompts' table without its BOS rows when ``bos_fixed`` (a causal model with BOS: those
    are constant by construction). ``no_bos_ran``: the measurements without BOS ran;
    ``skipped``: why not. None: nothing to say."""
    rows, where, unit = None, "", "prompt"
    if no_bos is not None:
        rows, where, unit = no_bos[no_bos["massive here"] == "yes"], " without BOS", "sequence"
    elif table is not None:
        rows = table[(table["massive here"] == "yes") & ~((table["kind"] == "start") & bos_fixed)]
    if rows is None or (not len(rows) and not bos_fixed):
        return None
    if not len(rows):
        why = "without BOS nothing is massive" if no_bos_ran else f"the measurements without BOS were not run ({skipped})"
        return (f"At BOS they are the same for every input by construction (a causal model's BOS sees only itself), "
                f"so their constancy was not tested: {why}.")
    tested = rows[rows["entries"] >= 2]
    if not len(tested):
        return (f"Their constancy{where} was not tested: each massive dim and token kind was followed at a single "
                f"({unit}, position) entry.")
    top = tested.sort_values(by=["entries", "mean"], key=lambda s: s.abs(), ascending=False).iloc[0]
    cv = float(top["cv (%)"])
    verdict = "nearly the same for every input" if cv < 10 else "not constant across inputs"
    counted = f"{top['entries']} {unit}s" if top["kind"] == "start" else f"{top['entries']} ({unit}, position) entries"
    return (f"They are {verdict}{where}: {top['mean']:.4g} ± {top['std']:.2g} (cv {cv:.2f}%) at dim {top['dim']} "
            f"on the {top['kind']} token, {top['hook_name']}, over {counted}.")


def sink_finding(subject: str, mass: float, head: float, uniform: float, layer: int) -> tuple[str, bool]:
    """The attention sentence, stated only against a baseline that could have refuted it, and
    whether C is vacuous (most of the keys: then nothing about C is a finding)."""
    if uniform >= VACUOUS_UNIFORM:
        return (f"C holds most of the keys a query sees: uniform attention would put {uniform:.2f} on it (layer "
                f"{layer}), so the attention on it ({mass:.2f}) says nothing about a sink."), True
    if mass >= SINK_LIFT * uniform:
        return (f"Attention concentrates on {subject}: {mass:.2f} of each query's attention on average in layer "
                f"{layer} (its most concentrated head: {head:.2f}), where uniform attention would give "
                f"{uniform:.2f}."), False
    return (f"Attention does not concentrate on {subject}: at most {mass:.2f} of each query's attention on average "
            f"(layer {layer}), against {uniform:.2f} for uniform attention."), False
