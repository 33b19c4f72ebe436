"""The ``massact report`` page: the paper's story about one model, as one offline HTML file.

:func:`build_report` runs the measurements (where the massive activations are,
whether they are constant, what attention does with them, what ablating them does)
and lays out figures, views and tables in a :class:`Report`; ``report.save(path)``
writes one file that opens offline (:mod:`massact_lens.viz.page`). The sections
are described in docs and in each section's introduction on the page.

>>> from massact_lens.examples import minilm
>>> report = build_report(minilm(), ["The cat sat on the mat."], min_value=50, min_ratio=200,
...                       ablation=False, progress=False)
>>> [s.title for s in report.sections]
['Where are the massive activations?', 'Are they the same for every input?', 'What does attention do with them?']
>>> report.settings["massive dims found"]
'99'
>>> report.save("report.html")          # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import html
import math
import os
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from tqdm.auto import tqdm
from transformer_lens.model_protocol import TransformerLensModel

from massact_lens._types import Provenance, is_causal
from massact_lens.attention import attention_concentration, attention_logits, implicit_bias
from massact_lens.massive import Criterion, find_massive
from massact_lens.profiles import profile
from massact_lens.scan import scan
from massact_lens.viz.figures import (
    ablation_figure,
    attention_logits_figure,
    attention_sink_figure,
    hidden_state_figure,
    implicit_bias_figure,
    layer_stats_figure,
)
from massact_lens.viz.hidden import hidden_states
from massact_lens.viz.page import (
    Item,
    anchor,
    format_value,
    html_document,
    item_html,
    package_version,
    write_atomic,
)
from massact_lens.viz.widgets import attention_heads_widget, tokens_by_activation_widget

__all__ = ["Report", "Section", "build_report"]


@dataclass
class Section:
    """One part of a report: a title, an introduction, and items in order.

    Items are plotly figures, circuitsvis views, DataFrames (drawn as tables) and
    strings (paragraphs, escaped); ``captions[i]`` is shown under item ``i``.

    >>> Section("Where?").add("A paragraph.", caption="under it").anchor
    'where'
    """

    title: str
    intro: str = ""
    items: list[Item] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, item: Item, caption: str = "") -> Section:
        self.items.append(item)
        self.captions.append(caption)
        return self

    @property
    def anchor(self) -> str:
        return anchor(self.title)


@dataclass
class Report:
    """A page of sections and the settings of the run that produced it.

    ``to_html()`` gives the self-contained document; ``save(path)`` writes it
    atomically; in a notebook the report shows itself (in an iframe). Build one
    with :func:`build_report`, or add your own sections.

    >>> report = Report("Mine")
    >>> _ = report.section("Notes").add("Dim 99 is massive.")
    >>> "Dim 99 is massive." in report.to_html(), report._repr_html_().startswith("<iframe")
    (True, True)
    """

    title: str
    settings: dict[str, Any] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)
    prompts: tuple[str, ...] = ()
    summary: str = ""
    findings: list[str] = field(default_factory=list)
    #: The layer-wise table of the scan (top-1/2/3, median, ratio, massive entries per hidden state).
    layer_stats: pd.DataFrame | None = None

    def section(self, title: str, intro: str = "") -> Section:
        """Append a new section and return it."""
        part = Section(title, intro)
        self.sections.append(part)
        return part

    def items(self) -> list[Item]:
        return [item for s in self.sections for item in s.items]

    def to_html(self) -> str:
        """The whole document: one string, every script inline, nothing loaded from a network."""
        out = [f"<h1>{html.escape(self.title)}</h1>"]
        if self.summary:
            out.append(f'<p class="lead">{html.escape(self.summary)}</p>')
        if self.findings:
            out.append('<div class="findings"><h3>In short</h3><ul>')
            out.extend(f"<li>{html.escape(f)}</li>" for f in self.findings)
            out.append("</ul></div>")
        if len(self.sections) > 1:
            links = " ".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in self.sections)
            out.append(f"<nav>{links}</nav>")
        counter = 0
        for section in self.sections:
            out.append(f'<h2 id="{section.anchor}">{html.escape(section.title)}</h2>')
            if section.intro:
                out.append(f"<p>{html.escape(section.intro)}</p>")
            for note in section.notes:
                out.append(f'<p class="note">{html.escape(note)}</p>')
            for item, caption in zip(section.items, section.captions, strict=True):
                counter += 1
                out.append(item_html(item, f"item-{counter}"))
                if caption:
                    out.append(f'<p class="caption">{html.escape(caption)}</p>')
        if self.settings:
            out.append('<h2 id="settings">Settings of this run</h2>')
            rows = "".join(
                f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(format_value(v))}</td></tr>"
                for k, v in self.settings.items()
            )
            out.append(f'<table class="data settings">{rows}</table>')
        if self.prompts:
            out.append(f"<details><summary>The {len(self.prompts)} prompts</summary><ol class=\"prompts\" start=\"0\">")
            out.extend(f"<li>{html.escape(p)}</li>" for p in self.prompts)
            out.append("</ol></details>")
        return html_document(self.title, out, self.items())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_html` to ``path`` (temp name, then rename); returns the path."""
        return write_atomic(path, self.to_html())

    def _repr_html_(self) -> str:
        """The page in an iframe, so its styles and scripts stay apart from the notebook's."""
        return (
            f'<iframe srcdoc="{html.escape(self.to_html(), quote=True)}" title="{html.escape(self.title)}" '
            'style="width: 100%; height: 820px; border: 1px solid #ddd;"></iframe>'
        )


def _metric(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) and abs(value) < 1000 else format_value(float(value))


def _dims_table(found: Any) -> pd.DataFrame:
    rows = []
    for d in found.dim_summaries():
        rows.append(
            {
                "dim": d.dim,
                "layers": f"{d.first_layer}-{d.last_layer}" if d.first_layer != d.last_layer else str(d.first_layer),
                "hook points": ", ".join(d.hook_names),
                "token kinds": ", ".join(f"{k} x{n}" for k, n in d.kinds.items()),
                "tokens": ", ".join(f"{t!r} x{n}" for t, n in list(d.tokens.items())[:4]),
                "% of prompts": 100.0 * d.input_fraction,
                "max |x|": d.max_abs_value,
                "max ratio": d.max_ratio,
            }
        )
    return pd.DataFrame(rows)


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
        model_label: how the model is named in the report (default its cfg name).
        min_value, min_ratio: the criterion (:func:`massact_lens.find_massive`).
            The paper's 100 / 1000 suit 4,096-dim LLMs; MiniLM needs 50 / 200.
        prepend_bos: put BOS / [CLS] first (None: the model's default).
        batch_size, top_k: as in :func:`massact_lens.scan`.
        pairs: paraphrase pairs for an encoder's ablation (``"builtin"``: the 20 of
            :data:`massact_lens.data.PARAPHRASE_PAIRS`; None: none). Decoders are
            measured by perplexity on the prompts.
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
    Criterion(min_value, min_ratio)  # the threshold check, before any forward pass
    causal = is_causal(model)
    provenance = Provenance.of(model)
    label = model_label or provenance.model_name
    text = prompts[example]
    attention_inputs = prompts[:attention_prompts]
    report = Report(
        title=f"Massive activations in {label}",
        summary=(
            "Sun et al. (2024) find a few hidden-state entries thousands of times larger than the median, "
            "at fixed dims on the first token and delimiters, nearly constant across inputs, acting as an "
            "attention bias. This page shows what this model does."
        ),
        prompts=tuple(prompts),
    )
    errors: list[str] = []
    steps = tqdm(total=6, desc="report", disable=not progress, leave=False)

    # 1. Where ------------------------------------------------------------------------
    where = report.section(
        "Where are the massive activations?",
        f"Per hidden state, the largest |activation| next to the median |activation|, averaged over the "
        f"{len(prompts)} prompts. Criterion: |x| > {min_value:g} and |x| >= {min_ratio:g} x the median of its "
        "hidden state.",
    )
    steps.set_description("report: scan")
    result = scan(model, prompts, top_k=top_k, batch_size=batch_size, prepend_bos=prepend_bos, progress=progress)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*all top_k", category=UserWarning)  # a note says it instead
        found = find_massive(result, min_value, min_ratio)
    stats = result.layer_stats()
    counts: dict[str, int] = found.to_dataframe()["hook_name"].value_counts().to_dict()
    stats["massive entries"] = [int(counts.get(name, 0)) for name in stats["hook_name"]]
    where.add(layer_stats_figure(result, title=f"Largest |activation| vs median per hidden state ({label})"),
              "Log scale. Error bars: std of the top-1 value across prompts.")
    where.add(stats.drop(columns=["n_inputs"]))
    report.layer_stats = stats.drop(columns=["n_inputs"])
    if len(found):
        where.add(_dims_table(found), "The massive dims: where they appear, on which tokens, in how many prompts.")
        summaries = sorted(found.dim_summaries(), key=lambda d: (-d.input_fraction, -d.max_ratio))
        for d in summaries[:3]:
            layers = f"layers {d.first_layer}-{d.last_layer}" if d.first_layer != d.last_layer else f"layer {d.first_layer}"
            tokens = ", ".join(list(d.tokens)[:3])
            report.findings.append(
                f"Dim {d.dim} is massive in {layers}, on {', '.join(d.kinds)} tokens ({tokens}), up to |x| = "
                f"{d.max_abs_value:.4g}, {d.max_ratio:.0f}x the median, in {d.input_fraction:.0%} of the prompts."
            )
        if len(summaries) > 3:
            report.findings.append(f"... and {len(summaries) - 3} more dims pass the criterion (see the table).")
        per_state = found.to_dataframe().groupby(["input_index", "hook_name"]).size().tolist()
        if per_state and max(per_state) >= top_k:
            where.notes.append(
                f"In some hidden states all top_k={top_k} kept entries pass the criterion: there may be more. "
                "Raise top_k (--top-k) to see them all."
            )
    else:
        where.notes.append(
            f"No entry passes the criterion (largest top-1/median ratio {stats['ratio'].max():.0f}x). "
            "Lower the thresholds to look closer; the views below still show the largest entries."
        )
        report.findings.append(
            f"No massive activation under this criterion: the largest top-1 / median ratio is "
            f"{stats['ratio'].max():.0f}x, at {stats.loc[stats['ratio'].idxmax(), 'hook_name']}."
        )
    steps.update()
    marks: dict[int, tuple[int, ...]] | None = None
    with _guarded(where, "Reading one prompt's hidden states", errors):
        states = hidden_states(model, text, prepend_bos=prepend_bos)
        peak_hook = str(stats.loc[stats["top1"].idxmax(), "hook_name"])
        marks = states.massive(min_value, min_ratio)
        where.add(
            hidden_state_figure(states, peak_hook, min_ratio=min(float(min_ratio), 100.0)),
            f"Prompt {example}, at {peak_hook} (the hidden state with the largest mean top-1): |x| per token and "
            "dim. Labelled dims: those whose peak is at least 100x (or the criterion's ratio, if lower) the median. "
            "Drag to rotate.",
        )
        where.add(
            tokens_by_activation_widget(states),
            f"Prompt {example}: each token coloured by its largest |activation|; pick a hidden state above the "
            "tokens, hover a token for its values.",
        )
    steps.update()

    # 2. Constant ---------------------------------------------------------------------------
    constant = report.section(
        "Are they the same for every input?",
        "Per hidden state, massive dim and token kind: the mean, std and coefficient of variation (std/|mean|) of "
        "the signed value across prompts. A small cv means the value acts as a fixed bias.",
    )
    steps.set_description("report: profile")
    massive_profile = None
    with _guarded(constant, "Profiling", errors), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*all top_k", category=UserWarning)
        massive_profile = profile(
            model, prompts, min_value=min_value, min_ratio=min_ratio, top_k=top_k, batch_size=batch_size,
            prepend_bos=prepend_bos, progress=progress,
        )
        table = massive_profile.to_dataframe()
        if len(table):
            constant.add(table)
            top = max(massive_profile.stats, key=lambda st: (st.count, abs(st.mean)))
            if top.count >= 2:
                verdict = "nearly the same for every input" if top.cv < 0.1 else "not constant across inputs"
                report.findings.append(
                    f"They are {verdict}: {top.mean:.4g} ± {top.std:.2g} (cv {top.cv:.2%}) at dim {top.dim} on the "
                    f"{top.kind} token, {top.hook_name}, over {top.count} prompts."
                )
        else:
            constant.notes.append("No massive activations under this criterion, so nothing to profile.")
    steps.update()

    # 3. Attention ----------------------------------------------------------------------------
    has_dims = massive_profile is not None and bool(massive_profile.massive_dims)
    positions: Any = massive_profile if has_dims else "start"
    c_name = "the massive tokens" if has_dims else "the first token (no massive tokens found)"
    attention = report.section(
        "What does attention do with them?",
        f"C = {c_name}. From the layer where massive activations appear, attention concentrates on them (an "
        f"attention sink). Measured on the first {len(attention_inputs)} prompts.",
    )
    steps.set_description("report: attention")
    with _guarded(attention, "Attention concentration", errors):
        sinks = attention_concentration(
            model, attention_inputs, positions, batch_size=batch_size, prepend_bos=prepend_bos, progress=progress
        )
        attention.add(attention_sink_figure(sinks), "Mean attention probability on C, per layer and head.")
        layer_mass = sinks.layer_mass()
        attention.add(layer_mass.drop(columns=["positions"]))
        sink_layer = int(layer_mass.loc[layer_mass["mass"].idxmax(), "layer"])
        report.findings.append(
            f"Attention concentrates on them: {layer_mass['mass'].max():.2f} of each query's attention on average in "
            f"layer {sink_layer} (its most concentrated head: "
            f"{float(layer_mass.loc[layer_mass['mass'].idxmax(), 'max_head_mass']):.2f}), where uniform attention "
            f"would give {layer_mass['uniform'].iloc[0]:.2f}."
        )
        heat = attention_logits(model, text, layers=[sink_layer], prepend_bos=prepend_bos)
        attention.add(
            attention_heads_widget(heat, sink_layer, massive=marks, exclude_bos=True, causal=causal),
            f"Prompt {example}, layer {sink_layer} (the most concentrated): every head's attention pattern, query "
            "rows x key columns. Massive tokens are marked ★ with their dims. The colour scale leaves the sink "
            "keys out, so they saturate and the rest stays visible. Click a head to enlarge it.",
        )
        attention.add(
            attention_logits_figure(heat, sink_layer),
            "Pre-softmax attention logits, mean over heads: a sink key gets a high logit from every query.",
        )
    steps.update()
    steps.set_description("report: implicit bias")
    with _guarded(attention, "The implicit-bias decomposition", errors):
        split = implicit_bias(
            model, attention_inputs, positions, batch_size=batch_size, prepend_bos=prepend_bos, progress=progress
        )
        attention.add(
            implicit_bias_figure(split),
            "Attention output = sum over C of p·v (the bias term) + the rest. The bias term varies much less "
            "across queries and inputs than the rest: an implicit attention bias.",
        )
        frame = split.to_dataframe()
        total = pd.DataFrame(frame[frame["head"] == -1])
        attention.add(total.drop(columns=["head", "positions"]))
        if len(total):
            b = statistics.median(total["bias_rel_variation"].tolist())
            r = statistics.median(total["rest_rel_variation"].tolist())
            report.findings.append(
                f"The part of the attention output that comes from them varies {b:.2f} (std / mean norm, median over "
                f"layers) against {r:.2f} for the rest: {'an implicit attention bias' if b < r else 'no clear bias'}."
            )
    steps.update()

    # 4. Ablation -------------------------------------------------------------------------------
    if ablation:
        metric = "perplexity on the prompts" if causal else "the cosine of each embedding to the original"
        ablate = report.section(
            "What does ablating them do?",
            f"The paper's Table 3: massive activations set to zero vs set to their mean over the prompts, judged "
            f"by {metric}" + ("" if causal or pairs is None else " and the cosine of paraphrase pairs") + ".",
        )
        steps.set_description("report: ablation")
        if not has_dims:
            ablate.notes.append("No massive activations under this criterion: nothing to ablate.")
        else:
            with _guarded(ablate, "The ablation", errors):
                table = _ablation(model, massive_profile, prompts, causal, pairs, batch_size, progress)
                ablate.add(ablation_figure(table, title=f"Massive activations set to zero vs set to their mean ({label})"))
                first = table.metrics[0]
                values = {k: v[first] for k, v in table.values.items()}
                report.findings.append(
                    f"Ablating them ({first}): original {_metric(values['Original'])}, set to zero "
                    f"{_metric(values['Set to zero'])}, set to their mean {_metric(values['Set to mean'])}."
                )
                ablate.add(table.to_dataframe().reset_index())
                edited = sorted({n for names in table.hook_names.values() for n in names})
                ablate.add(f"Hook points edited: {', '.join(edited)}.")
                if causal and bool(model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos):
                    ablate.notes.append(
                        "In a causal model the BOS state is the same for every input, so 'set to mean' at BOS "
                        "is the identity (the paper ran LLaMA2 without BOS)."
                    )
    steps.update()
    steps.close()

    n_c = "" if massive_profile is None else ", ".join(str(d) for d in massive_profile.massive_dims) or "none"
    report.settings = {
        "model": label,
        **{k: v for k, v in provenance.to_dict().items() if k != "model_name"},
        "model name (cfg)": provenance.model_name,
        "attention": "causal" if causal else "bidirectional",
        "prompts": len(prompts),
        "example prompt": f"{example}: {text}",
        "attention prompts": len(attention_inputs),
        "criterion": f"|x| > {min_value:g} and >= {min_ratio:g} x median",
        "massive dims found": n_c,
        "BOS prepended": result.prepend_bos,
        "top_k": top_k,
        "batch size": batch_size,
        "hook points": f"{result.hook_names[0]} ... {result.hook_names[-1]} ({len(result.hook_names)})",
        "versions": {p: package_version(p) for p in ("massact_lens", "transformer-lens", "torch", "circuitsvis", "plotly")},
        "written": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **(settings or {}),
    }
    if errors:
        report.settings["analyses that failed"] = len(errors)
    return report


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string: wrap it in a list.")
    out = list(prompts)
    if not out:
        raise ValueError("No prompts: pass at least one string.")
    bad = [i for i, p in enumerate(out) if not isinstance(p, str) or not p]
    if bad:
        raise ValueError(f"Prompts {bad[:5]} are not non-empty strings.")
    return out


def _ablation(
    model: TransformerLensModel,
    massive_profile: Any,
    prompts: list[str],
    causal: bool,
    pairs: Sequence[tuple[str, str]] | str | None,
    batch_size: int,
    progress: bool,
) -> Any:
    from massact_lens.data import PARAPHRASE_PAIRS
    from massact_lens.evaluate import ablation_table

    if causal:
        return ablation_table(model, massive_profile, corpus=prompts, batch_size=batch_size, progress=progress)
    chosen: list[tuple[str, str]] | None = None
    if pairs == "builtin":
        chosen = list(PARAPHRASE_PAIRS)
    elif pairs is not None and not isinstance(pairs, str):
        chosen = [(str(a), str(b)) for a, b in pairs]
    return ablation_table(model, massive_profile, sentences=prompts, pairs=chosen, batch_size=batch_size, progress=progress)
