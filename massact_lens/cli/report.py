"""The ``massact report`` page: the paper's story about one model, as one offline HTML file.

:func:`build_report` runs the measurements (where the massive activations are,
whether they are constant, what attention does with them, what ablating them does)
and lays out figures, views and tables in a :class:`Report`; ``report.save(path)``
writes one file that opens offline (:mod:`massact_lens.viz._page`). The sections
are described in docs and in each section's introduction on the page.

>>> from massact_lens.examples import minilm
>>> report = build_report(minilm(), ["The cat sat on the mat."], min_value=50, min_ratio=200,
...                       ablation=False, progress=False)
>>> report.title
'Massive activations in all-MiniLM-L6-v2 (bundled)'
>>> [s.title for s in report.sections]
['Where are the massive activations?', 'Are they the same for every input?', 'What does attention do with them?']
>>> report.settings["massive dims found"]
'99'
>>> report.save("report.html")          # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._core.options import tqdm
from massact_lens._core.types import Provenance, is_causal
from massact_lens.attention import attention_concentration, attention_logits, implicit_bias
from massact_lens.cli._args import _check_prompts, _chosen_pairs
from massact_lens.cli._findings import constancy_finding, dim_findings, sink_finding
from massact_lens.find.criterion import Criterion, MassiveActivations, find_massive
from massact_lens.find.profiles import MassiveProfile, profile
from massact_lens.find.scanner import ScanResult, scan
from massact_lens.viz import _labels as labels
from massact_lens.viz._document import Report, Section
from massact_lens.viz._labels import hook_ranges, model_short_name
from massact_lens.viz._page import Collapsed, Glossary, format_value, package_version
from massact_lens.viz._tables import (
    channel_wide_table,
    constancy_summary,
    constancy_table,
    glossary,
    layer_table,
    massive_dims_table,
    with_entry_counts,
)
from massact_lens.viz.figures import (
    ablation_figure,
    attention_logits_figure,
    attention_sink_figure,
    hidden_state_figure,
    implicit_bias_figure,
    layer_stats_figure,
)
from massact_lens.viz.hidden import hidden_states
from massact_lens.viz.widgets import (
    SCALE_QUANTILE,
    attention_heads_widget,
    tokens_by_activation_widget,
)

__all__ = ["Report", "Section", "build_report"]

#: Tokens per sequence, and at most this many sequences, when a decoder is measured without BOS.
NO_BOS_SEQ_LEN = 32
NO_BOS_ROWS = 8


def _metric(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) and abs(value) < 1000 else format_value(float(value))


def _guarded(section: Section, what: str, errors: list[str]) -> Any:
    """Context that turns a failing analysis into a visible note instead of no report."""

    class _Guard:
        def __enter__(self) -> None:
            return None

        def __exit__(self, kind: Any, error: Any, tb: Any) -> bool:
            if error is None or not isinstance(error, ValueError | RuntimeError | KeyError | TypeError):
                return False
            message = f"{what} failed on this model: {type(error).__name__}: {error}"
            section.notes.append(message)
            errors.append(message)
            warnings.warn(message, UserWarning, stacklevel=2)
            return True

    return _Guard()


@dataclass
class _Run:
    """What the sections share: the model, the inputs, the criterion, and the results so far."""

    model: TransformerLensModel
    prompts: list[str]
    example: int
    attention_inputs: list[str]
    criterion: Criterion
    prepend_bos: bool | None
    batch_size: int
    top_k: int
    progress: bool
    label: str
    causal: bool
    pairs: list[tuple[str, str]] | None
    errors: list[str] = field(default_factory=list)
    result: ScanResult | None = None
    found: MassiveActivations | None = None
    massive_profile: MassiveProfile | None = None
    no_bos: tuple[torch.Tensor, MassiveProfile] | None = None  # a decoder's sequences without BOS, profiled
    no_bos_skipped: str = "an analysis before them failed"  # why the decoder was not measured without BOS
    marks: dict[int, tuple[int, ...]] | None = None

    @property
    def figure_name(self) -> str:
        return model_short_name(self.label)


def build_report(
    model: TransformerLensModel,
    prompts: Sequence[str],
    *,
    model_label: str | None = None,
    min_value: float | int = 100.0,
    min_ratio: float | int = 1000.0,
    prepend_bos: bool | None = None,
    batch_size: int = 16,
    top_k: int = 10,
    example: int = 0,
    attention_prompts: int = 16,
    pairs: Sequence[tuple[str, str]] | Literal["builtin"] | None = "builtin",
    ablation: bool = True,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> Report:
    """Measure ``model`` on ``prompts`` and lay the paper's story out as a :class:`Report`.

    Args:
        model: a TransformerBridge with raw weights and eager attention
            (:func:`massact_lens.load_model`, :func:`massact_lens.examples.minilm`).
        prompts: the inputs (strings). All are scanned, profiled and (for the
            ablation) evaluated; the attention analyses use the first
            ``attention_prompts``; the single-input views use ``prompts[example]``.
        model_label: how the model is named in the report (default:
            :func:`massact_lens.viz._labels.model_label`: a bundled model by its label,
            a folder by its name, never the install path).
        min_value, min_ratio: the criterion (:func:`massact_lens.find_massive`).
            The paper's 100 / 1000 suit 4,096-dim LLMs; MiniLM needs 50 / 200.
        prepend_bos: put BOS / [CLS] first (None: the model's default).
        batch_size, top_k: as in :func:`massact_lens.scan`.
        pairs: paraphrase pairs for an encoder's ablation (``"builtin"``: the 20 of
            :data:`massact_lens.examples.sentences.PARAPHRASE_PAIRS`; None: none). A decoder is
            measured by perplexity on the prompts; when BOS is prepended and its
            massive activations sit only on BOS (whose state is the same for every
            input), it is also profiled and ablated as the paper did for LLaMA2:
            without BOS, on the prompts' text cut into sequences of
            :data:`NO_BOS_SEQ_LEN` tokens.
        ablation: run the zero / mean comparison.
        settings: extra rows for the settings table (e.g. the command line).
        progress: show progress bars.

    Raises:
        ValueError / TypeError: no prompts, non-strings, ``example`` out of range, a
            bad threshold: before any forward pass. An analysis that fails on an
            unusual model becomes a visible note in its section (and a warning).
    """
    prompts = _check_prompts(prompts)
    if isinstance(example, bool) or not 0 <= example < len(prompts):
        raise ValueError(f"example must index a prompt (0..{len(prompts) - 1}), not {example!r}.")
    if isinstance(attention_prompts, bool) or attention_prompts < 1:
        raise ValueError(f"attention_prompts must be a positive integer, not {attention_prompts!r}.")
    criterion = Criterion(min_value, min_ratio)  # the threshold check, before any forward pass
    provenance = Provenance.of(model)
    label = model_label or labels.model_label(provenance)
    run = _Run(model, prompts, example, prompts[:attention_prompts], criterion, prepend_bos, batch_size, top_k,
               progress, label, is_causal(model), _chosen_pairs(pairs))
    report = Report(
        title=f"Massive activations in {label}",
        summary=(
            "Sun et al. (2024) find a few hidden-state entries thousands of times larger than the median, "
            "at fixed dims on the first token and delimiters, nearly constant across inputs, acting as an "
            "attention bias. This page shows what this model does."
        ),
        prompts=tuple(prompts),
    )
    steps = tqdm(total=4 + int(ablation), desc="report", disable=not progress, leave=False)
    for part in (_where, _constant, _attention, *((_ablation,) if ablation else ())):
        steps.set_description(f"report: {part.__name__.strip('_')}")
        part(run, report)
        steps.update()
    steps.close()

    assert run.result is not None
    dims = "" if run.massive_profile is None else ", ".join(str(d) for d in run.massive_profile.massive_dims) or "none"
    report.settings = {
        "model": label,
        **{k: v for k, v in provenance.to_dict().items() if k != "model_name"},
        "attention": "causal" if run.causal else "bidirectional",
        "prompts": len(prompts),
        "example prompt": f"{example}: {prompts[example]}",
        "attention prompts": len(run.attention_inputs),
        "criterion": f"|x| > {min_value:g} and >= {min_ratio:g} x median",
        "massive dims found": dims,
        **({"outlier channels (listed apart)": ", ".join(str(d) for d in run.found.channel_wide_dims)}
           if run.found is not None and run.found.channel_wide else {}),
        "BOS prepended": run.result.prepend_bos,
        "top_k": top_k,
        "batch size": batch_size,
        "hook points": f"{hook_ranges(run.result.hook_names)} ({len(run.result.hook_names)})",
        "versions": {p: package_version(p) for p in ("massact_lens", "transformer-lens", "torch", "circuitsvis", "plotly")},
        "written": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **(settings or {}),
    }
    if run.errors:
        report.settings["analyses that failed"] = len(run.errors)
    return report


# ----------------------------------------------------------------------------- 1. where


def _where(run: _Run, report: Report) -> None:
    c = run.criterion
    where = report.section(
        "Where are the massive activations?",
        f"Per hidden state, the largest |activation| next to the median |activation|, averaged over the "
        f"{len(run.prompts)} prompts. Criterion: |x| > {c.min_value:g} and |x| >= {c.min_ratio:g} x the median of "
        "its hidden state.",
    )
    result = scan(run.model, run.prompts, top_k=run.top_k, batch_size=run.batch_size, prepend_bos=run.prepend_bos,
                  progress=run.progress)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*all top_k", category=UserWarning)  # a note says it instead
        found = find_massive(result, c.min_value, c.min_ratio)
    run.result, run.found = result, found
    stats = with_entry_counts(result.layer_stats(), found)
    report.layer_stats = layer_table(stats)
    where.add(layer_stats_figure(result, title=f"Largest |activation| vs median per hidden state ({run.figure_name})"),
              "Log scale. Error bars: std of the top-1 value across prompts.")
    where.add_table(report.layer_stats, "per hidden state, the numbers of the figure")
    where.add(Glossary(glossary("top1, top2, top3", "median", "ratio", "top1_std", "massive entries",
                                *(("channel-wide entries",) if found.channel_wide else ()))))
    _dims_findings(run, where, report, stats)
    with _guarded(where, "Reading one prompt's hidden states", run.errors):
        states = hidden_states(run.model, run.prompts[run.example], prepend_bos=run.prepend_bos)
        peak_hook = str(stats.loc[stats["top1"].idxmax(), "hook_name"])
        kept = set(found.massive_dims)  # outlier channels are not marked as massive tokens
        run.marks = {p: ds for p, dims in states.massive(c.min_value, c.min_ratio).items()
                     if (ds := tuple(d for d in dims if d in kept))}
        where.add(
            hidden_state_figure(states, peak_hook, min_ratio=c.min_ratio),
            f"Prompt {run.example}, at {peak_hook} (the hidden state with the largest mean top-1): |x| per token and "
            f"dim. Labelled: the dims whose peak is at least {c.min_ratio:g}x the median. Drag to rotate.",
        )
        view = tokens_by_activation_widget(states, min_value=c.min_value, min_ratio=c.min_ratio)
        where.add(
            view,
            f"Prompt {run.example}: each token coloured by its largest |activation|, on one colour scale for every "
            f"hidden state; it opens on {view.meta['opens_on']}"
            + (", the first where an entry is massive" if states.massive_hooks(c.min_value, c.min_ratio) else "")
            + ". Click another hidden state above the tokens; hover a token for its values.",
        )


def _dims_findings(run: _Run, where: Section, report: Report, stats: pd.DataFrame) -> None:
    """The massive dims (token-sparse) and the outlier channels (listed apart): tables, notes, findings."""
    assert run.found is not None
    found = run.found
    if len(found):
        where.add(massive_dims_table(found), "The massive dims: where they appear, on which tokens, and in how many "
                                             "prompts (counts are prompts, not hidden states).")
    if found.channel_wide:
        where.add(channel_wide_table(found), "Outlier channels, listed apart: dims that pass the criterion on more "
                                             "than half of the tokens of a hidden state (large on most tokens, as "
                                             "LLM.int8's outlier features, not on a few as massive activations).")
        where.add(Glossary(glossary("hidden states", "token median |x|")))
    report.findings.extend(dim_findings(found, len(run.prompts), stats))
    per_state = found.to_dataframe(include_channel_wide=True).groupby(["input_index", "hook_name"]).size().tolist()
    if per_state and max(per_state) >= run.top_k:
        where.notes.append(
            f"In some hidden states all top_k={run.top_k} kept entries pass the criterion: there may be more. "
            "Raise top_k (--top-k) to see them all."
        )
    if not len(found):
        where.notes.append(
            f"No entry passes the criterion on a few tokens (largest top-1/median ratio, averaged over the prompts, "
            f"{stats['ratio'].max():.0f}x). Lower the thresholds to look closer; the views below still show the "
            "largest entries."
        )


# ----------------------------------------------------------------------------- 2. constant


def _profile_from_scan(run: _Run, inputs: Any, result: ScanResult, prepend_bos: bool | None) -> MassiveProfile:
    """:func:`massact_lens.profile` over the scan the report already ran (one pass fewer)."""
    return profile(run.model, inputs, min_value=run.criterion.min_value, min_ratio=run.criterion.min_ratio,
                   batch_size=run.batch_size, prepend_bos=prepend_bos, progress=run.progress, scan_result=result)


def _no_bos_sequences(run: _Run) -> torch.Tensor | None:
    """The prompts' text as one token stream without BOS, cut into (at most :data:`NO_BOS_ROWS`) rows of
    :data:`NO_BOS_SEQ_LEN` tokens; None when the text gives fewer than two."""
    text = "\n\n".join(run.prompts)
    ids = run.model.to_tokens(text, prepend_bos=False, truncate=False)[0].cpu()  # type: ignore[operator]  # not cut at n_ctx
    seq_len = min(NO_BOS_SEQ_LEN, int(run.model.cfg.n_ctx))
    n_rows = min(len(ids) // seq_len, NO_BOS_ROWS)
    return ids[: n_rows * seq_len].reshape(n_rows, seq_len) if n_rows >= 2 else None


def _constant(run: _Run, report: Report) -> None:
    constant = report.section(
        "Are they the same for every input?",
        "Per hidden state, massive dim and token kind: the mean, std and coefficient of variation (cv = 100 x "
        "std / |mean|, in %) of the signed value across prompts. A small cv means the value acts as a fixed bias.",
    )
    assert run.result is not None and run.found is not None
    with _guarded(constant, "Profiling", run.errors), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*all top_k", category=UserWarning)
        run.massive_profile = _profile_from_scan(run, run.prompts, run.result, run.prepend_bos)
        table = constancy_table(run.massive_profile, run.found) if run.massive_profile.stats else None
        if table is not None:
            _constancy_tables(constant, table, "")
        else:
            constant.notes.append("No massive activations under this criterion with the prompts as given, so nothing "
                                  "to profile.")
        no_bos = _no_bos(run, constant)
        if table is not None or no_bos is not None:
            constant.add(Glossary(glossary("entries", "cv (%)", "cv (%) median, max", "mean, std", "massive here")))
        finding = constancy_finding(table, no_bos, run.causal and bool(run.result.prepend_bos), run.no_bos is not None,
                                    run.no_bos_skipped)
        if finding is not None:
            report.findings.append(finding)


def _no_bos(run: _Run, constant: Section) -> pd.DataFrame | None:
    """A causal model with BOS: the profile without BOS, as the paper ran LLaMA2 (its constancy table,
    or None with a note saying why there is none)."""
    assert run.result is not None
    if not (run.causal and run.result.prepend_bos):
        return None
    constant.notes.append(
        "In a causal model the BOS token's hidden states are the same for every input (it sees only itself), "
        "so a cv of 0% at BOS says nothing. Below: the same without BOS, as the paper ran LLaMA2."
    )
    rows = _no_bos_sequences(run)
    if rows is None:
        run.no_bos_skipped = (f"the prompts' text gives fewer than two sequences of "
                              f"{min(NO_BOS_SEQ_LEN, int(run.model.cfg.n_ctx))} tokens")
        constant.notes.append(f"The measurements without BOS were not run: {run.no_bos_skipped}.")
        return None
    result = scan(run.model, rows, top_k=run.top_k, batch_size=run.batch_size, progress=run.progress)
    run.no_bos = (rows, _profile_from_scan(run, rows, result, None))
    shape = f"{rows.shape[0]} sequences of {rows.shape[1]} tokens cut from the prompts' text"
    if not run.no_bos[1].stats:
        constant.notes.append(f"Without BOS ({shape}), nothing is massive under this criterion.")
        return None
    table = constancy_table(run.no_bos[1], run.criterion.find(result))  # "massive here" per (hook, dim, kind)
    constant.add(f"Without BOS, the first token of each of {shape} (a different token each time):")
    _constancy_tables(constant, table, f" without BOS ({shape})")
    return table


def _constancy_tables(section: Section, table: pd.DataFrame, where: str) -> None:
    """A line per (dim, token kind), then every row (folded): where it is massive, and where not."""
    here, elsewhere = table[table["massive here"] == "yes"], table[table["massive here"] == "no"]
    section.add(constancy_summary(table), f"Per massive dim and token kind{where}, over the hidden states where it is "
                                          "massive.")
    section.add(Collapsed(here.drop(columns=["massive here"]),
                          f"Show the {len(here)} rows where the dim is massive{where}, one per hidden state"))
    if len(elsewhere):
        section.add(Collapsed(elsewhere.drop(columns=["massive here"]),
                              f"Show the {len(elsewhere)} rows where the dim is not massive{where} (the same token "
                              "and dim in other hidden states)"))


# ----------------------------------------------------------------------------- 3. attention


def _attention(run: _Run, report: Report) -> None:
    mp = run.massive_profile
    has_dims = mp is not None and bool(mp.massive_dims)
    positions: Any = mp if has_dims else "start"
    c_name = "the massive tokens" if has_dims else "the first token (no massive tokens found)"
    subject = "them" if has_dims else "the first token"
    attention = report.section(
        "What does attention do with them?",
        f"C = {c_name}. The paper finds that from the layer where massive activations appear, attention "
        f"concentrates on them (an attention sink). Measured on the first {len(run.attention_inputs)} prompts.",
    )
    vacuous = False
    text = run.prompts[run.example]
    with _guarded(attention, "Attention concentration", run.errors):
        sinks = attention_concentration(run.model, run.attention_inputs, positions, batch_size=run.batch_size,
                                        prepend_bos=run.prepend_bos, progress=run.progress)
        attention.add(attention_sink_figure(sinks), "Mean attention probability on C, per layer and head.")
        layer_mass = sinks.layer_mass()
        attention.add_table(layer_mass.drop(columns=["positions"]), "attention on C per layer")
        attention.add(Glossary(glossary("mass", "max_head_mass, max_head", "uniform")))
        row = layer_mass.loc[layer_mass["mass"].idxmax()]
        sink_layer = int(row["layer"])
        finding, vacuous = sink_finding(subject, float(row["mass"]), float(row["max_head_mass"]), float(row["uniform"]),
                                        sink_layer)
        report.findings.append(finding)
        heat = attention_logits(run.model, text, layers=[sink_layer], prepend_bos=run.prepend_bos)
        attention.add(
            attention_heads_widget(heat, sink_layer, massive=run.marks, exclude_bos=True, causal=run.causal),
            f"Prompt {run.example}, layer {sink_layer} (the most concentrated): every head's attention pattern, query "
            "rows x key columns. Massive tokens are marked ★ with their dims. The colour scale's maximum is the "
            f"{SCALE_QUANTILE:.0%} quantile of the attention on the other keys (all heads), so the sink columns "
            "saturate and the rest stays visible. Click a head to enlarge it.",
        )
        attention.add(
            attention_logits_figure(heat, sink_layer),
            "Pre-softmax attention logits, mean over heads: a sink key gets a high logit from every query.",
        )
    with _guarded(attention, "The implicit-bias decomposition", run.errors):
        split = implicit_bias(run.model, run.attention_inputs, positions, batch_size=run.batch_size,
                              prepend_bos=run.prepend_bos, progress=run.progress)
        attention.add(
            implicit_bias_figure(split),
            "Attention output = sum over C of p·v (the bias term) + the rest. The paper finds the bias term varies "
            "much less across queries and inputs than the rest: an implicit attention bias.",
        )
        frame = split.to_dataframe()
        total = pd.DataFrame(frame[frame["head"] == -1])
        attention.add_table(total.drop(columns=["head", "positions"]), "the decomposition per layer (all heads)")
        attention.add(Glossary(glossary("c_mass", "bias_norm, rest_norm", "bias_cos, rest_cos",
                                        "bias_rel_variation, rest_rel_variation")))
        if vacuous:
            attention.notes.append("C holds most of the keys a query sees, so splitting the output into C and the "
                                   "rest says nothing about a bias: no finding is drawn from it.")
        elif len(total):
            b = statistics.median(total["bias_rel_variation"].tolist())
            r = statistics.median(total["rest_rel_variation"].tolist())
            report.findings.append(
                f"The part of the attention output that comes from {subject} varies {b:.2f} (std / mean norm, median "
                f"over layers) against {r:.2f} for the rest: {'an implicit attention bias' if 2 * b <= r else 'no clear bias'}."
            )


# ----------------------------------------------------------------------------- 4. ablation


def _ablation(run: _Run, report: Report) -> None:
    from massact_lens.evaluate import ablation_table

    no_bos = run.no_bos if run.no_bos is not None and run.no_bos[1].massive_dims else None
    if not run.causal:
        judged = "the cosine of each embedding to the original" + ("" if run.pairs is None else
                                                                    " and the cosine of paraphrase pairs")
    elif no_bos is not None:
        rows = no_bos[0]
        judged = (f"perplexity, as the paper did for LLaMA2: without BOS, on the prompts' text cut into {rows.shape[0]} "
                  f"sequences of {rows.shape[1]} tokens, so the first token (where they sit) differs between sequences "
                  "and 'set to mean' is a real test")
    else:
        judged = "perplexity on the prompts"
    ablate = report.section(
        "What does ablating them do?",
        f"The paper's Table 3: massive activations set to zero vs set to their mean over the inputs, judged by {judged}.",
    )
    mp = no_bos[1] if no_bos is not None else run.massive_profile
    if mp is None or not mp.massive_dims:
        ablate.notes.append("No massive activations under this criterion: nothing to ablate.")
        return
    with _guarded(ablate, "The ablation", run.errors):
        if not run.causal:
            table = ablation_table(run.model, mp, sentences=run.prompts, pairs=run.pairs, batch_size=run.batch_size,
                                   progress=run.progress)
        else:
            corpus: Any = no_bos[0] if no_bos is not None else run.prompts
            table = ablation_table(run.model, mp, corpus=corpus, batch_size=run.batch_size, progress=run.progress)
        ablate.add(ablation_figure(table, title=f"Massive activations set to zero vs set to their mean ({run.figure_name})"))
        first = table.metrics[0]
        values = {k: v[first] for k, v in table.values.items()}
        report.findings.append(
            f"Ablating them ({first}{', no BOS' if no_bos is not None else ''}): original {_metric(values['Original'])}, "
            f"set to zero {_metric(values['Set to zero'])}, set to their mean {_metric(values['Set to mean'])}."
        )
        ablate.add(table.to_dataframe().reset_index())
        edited = sorted({n for names in table.hook_names.values() for n in names})
        dims = mp.massive_dims
        ablate.add(f"Dim{'s' if len(dims) > 1 else ''} {', '.join(str(d) for d in dims)} edited at {hook_ranges(edited)}.")
        if run.causal and no_bos is None and run.result is not None and run.result.prepend_bos:
            why = (f"the measurements without BOS were not run: {run.no_bos_skipped}" if run.no_bos is None
                   else "here nothing is massive without BOS")
            ablate.notes.append("In a causal model the BOS state is the same for every input, so 'set to mean' at BOS is "
                                f"the identity (the paper ran LLaMA2 without BOS; {why}).")
