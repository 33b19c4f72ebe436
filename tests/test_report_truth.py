"""Every sentence of the report's findings matches its numbers, on tiny random models of each family (issue 23).

The report is rendered (:func:`build_report`) on tiny random HuggingFace models of every
family the library claims (GPT-2, LLaMA, BERT, Gemma 2, Gemma 3: sliding windows, sandwich
norms) and on a LLaMA with a planted massive activation and a planted outlier channel. Each
finding must match one of the sentences below, and its numbers are recomputed here from a
direct measurement (the hidden states and attention patterns of one forward pass per
prompt, the criterion applied by hand, the visible keys counted by hand) or from the
results the report holds. A sentence no template knows fails the test: a new finding needs
a check here. A constancy sentence, whatever its token kind and with or without BOS, is
recomputed from the entries a profile follows (each (input, position, dim) massive on a few
tokens somewhere in its input, its kind from the tokenizer's text), and its row must be
the one the rule picks (most entries, then the largest |mean|, where the dim is massive on
that kind of token); so is every row of the constancy tables.

Also: the uniform baseline of attention_concentration counts only the keys a query can
see in a sliding-window layer (Mistral, Gemma 2/3), against a direct count.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict

import pytest
import torch

import massact_lens as ml
from massact_lens._core.batching import plan_batches
from massact_lens._core.hook_names import residual_hook_names
from massact_lens.attention._passes import allowed_keys, attention_windows
from massact_lens.cli.report import NO_BOS_SEQ_LEN, build_report
from massact_lens.examples import minilm_dir
from massact_lens.examples.sentences import SENTENCES
from massact_lens.models.load import load_model
from massact_lens.viz._labels import number_ranges
from massact_lens.viz._page import Collapsed

_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
#: Tiny random HuggingFace models: (config class, model class, config arguments).
FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _SMALL),
    "bert": ("BertConfig", "BertForMaskedLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=64, max_position_embeddings=64)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_SMALL, head_dim=8, sliding_window=4,
                                                        attn_logit_softcapping=0.5)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_SMALL, head_dim=8, sliding_window=4,
                                                            layer_types=["sliding_attention", "full_attention"])),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_SMALL, sliding_window=4)),
}
#: The planted LLaMA: a massive activation on the first token, an outlier channel on every other one.
PLANTED_DIM, CHANNEL = 5, 7
PROMPTS = list(SENTENCES[:12])  # enough text for three sequences of 32 tokens without BOS
TOP_K = 400  # every entry that passes is kept: the report's records are then all of them


def _hf_model(folder, family, planted=False):
    import transformers

    config_class, model_class, arguments = FAMILIES[family]
    config = getattr(transformers, config_class)(vocab_size=30522, **arguments)
    torch.manual_seed(0)
    hf = getattr(transformers, model_class)(config)
    with torch.no_grad():
        for name, parameter in hf.named_parameters():
            if parameter.dim() == 2 and "embed" not in name:
                parameter.mul_(8.0)
        if planted:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
            first = tokenizer.cls_token_id
            embed = hf.get_input_embeddings().weight
            embed[first, PLANTED_DIM] = 2000.0  # on the first token only: a massive activation
            embed[:, CHANNEL] += 300.0  # on every token: an outlier channel
            embed[first, CHANNEL] = 0.0
    hf.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(folder)
    return load_model(folder)


# ----------------------------------------------------------------------------- direct measurement


class Direct:
    """One forward pass per input (``rows``: the token ids of each, run alone): the residual states and
    attention patterns, and the criterion by hand."""

    def __init__(self, model, rows, hooks, min_value, min_ratio):
        self.model, self.hooks, self.min_value, self.min_ratio = model, hooks, min_value, min_ratio
        self.n_layers = int(model.cfg.n_layers)
        patterns = [f"blocks.{layer}.attn.hook_pattern" for layer in range(self.n_layers)]
        self.tokens, self.states, self.patterns = [], [], []
        for tokens in rows:
            _, cache = model.run_with_cache(tokens[None], names_filter=[*hooks, *patterns])
            self.tokens.append(tokens)
            self.states.append({h: cache[h][0].float() for h in hooks})
            self.patterns.append([cache[p][0].float() for p in patterns])

    @classmethod
    def of_prompts(cls, model, prompts, bos, hooks, min_value, min_ratio):
        plan = plan_batches(model, prompts, batch_size=1, prepend_bos=bos, by_length=False)
        rows = [batch.tokens[0][batch.attention_mask[0].bool()] for batch in plan.batches]
        return cls(model, rows, hooks, min_value, min_ratio)

    def kind(self, i, position):
        """The token kind of input ``i`` at ``position``, from the tokenizer's own text of the token."""
        return ml.find.token_kind(position, self.model.tokenizer.decode([int(self.tokens[i][position])]))

    def followed(self):
        """(dim, token kind) -> the (input, position) entries a profile follows: massive on a few tokens
        (not channel-wide) at some hook of that input."""
        out = defaultdict(set)
        for i, _, p, d, _, _, wide in self.entries():
            if not wide:
                out[(d, self.kind(i, p))].add((i, p))
        return out

    def massive_here(self):
        """The (hook, dim, token kind) where some entry is massive on a few tokens."""
        return {(h, d, self.kind(i, p)) for i, h, p, d, _, _, wide in self.entries() if not wide}

    def values(self, hook, dim, entries):
        """The signed values at ``hook``, ``dim`` of the (input, position) ``entries``, in float64."""
        return torch.tensor([float(self.states[i][hook][p, dim]) for i, p in sorted(entries)], dtype=torch.float64)

    def passes(self, i, hook):
        x = self.states[i][hook].abs()
        median = x.flatten().median()  # torch.median: the paper's lower median
        return (x > self.min_value) & (x >= self.min_ratio * median), median

    def entries(self):
        """(input, hook, position, dim, |x|, ratio, channel-wide) of every entry that passes."""
        out = []
        for i in range(len(self.states)):
            for hook in self.hooks:
                passing, median = self.passes(i, hook)
                n = passing.shape[0]
                wide = (passing.sum(0) > n / 2) & (n >= 2)
                for p, d in passing.nonzero().tolist():
                    value = float(self.states[i][hook][p, d])
                    out.append((i, hook, p, d, abs(value), abs(value) / float(median), bool(wide[d])))
        return out


def _layer(hook: str) -> int:
    return int(hook.split(".")[1])


def _close(stated: str, value: float, digits: int) -> bool:
    """``stated`` is ``value`` written with ``digits`` significant digits."""
    return math.isclose(float(stated), float(f"{value:.{digits}g}"), rel_tol=1e-3, abs_tol=10 ** -(digits + 1))


def _fixed(stated: str, value: float, decimals: int = 2) -> bool:
    """``stated`` is ``value`` written with ``decimals`` decimals (to float rounding of the last one)."""
    return abs(float(stated) - value) <= 0.5 * 10**-decimals + 1e-6


# ----------------------------------------------------------------------------- the sentences


DIM = re.compile(r"Dim (\d+) is massive in layers? ([\d, -]+), on ([a-z, ]+) tokens \((.*)\), up to \|x\| = (\S+), "
                 r"(\d+)x the median, in (\d+)% of the (\d+) prompts\.")
MORE = re.compile(r"\.\.\. and (\d+) more dims pass the criterion \(see the table\)\.")
WIDE = re.compile(r"Dim (\d+) is an outlier channel, not a massive activation: it passes the criterion on more than "
                  r"half of the tokens of (\d+) hidden states \(layers ([\d, -]+)\), in (\d+)% of the (\d+) prompts; "
                  r"it is listed apart and left out below\.")
NONE = re.compile(r"No massive activation under this criterion: the largest top-1 / median ratio, averaged over the "
                  r"(\d+) prompts, is (\d+)x, at (\S+?)( \(the entries that pass belong to outlier channels\))?\.")
CONSTANT = re.compile(r"They are (nearly the same for every input|not constant across inputs)( without BOS)?: (\S+) ± "
                      r"(\S+) \(cv ([\d.]+)%\) at dim (\d+) on the (\w+) token, (\S+), over (\d+) (prompts|sequences|"
                      r"\((?:prompt|sequence), position\) entries)\.")
SINGLE = re.compile(r"Their constancy( without BOS)? was not tested: each massive dim and token kind was followed at a "
                    r"single \((prompt|sequence), position\) entry\.")
BOS = re.compile(r"At BOS they are the same for every input by construction \(a causal model's BOS sees only itself\), "
                 r"so their constancy was not tested: (.*)\.")
SINK = re.compile(r"Attention concentrates on (them|the first token): ([\d.]+) of each query's attention on average in "
                  r"layer (\d+) \(its most concentrated head: ([\d.]+)\), where uniform attention would give ([\d.]+)\.")
NO_SINK = re.compile(r"Attention does not concentrate on (them|the first token): at most ([\d.]+) of each query's "
                     r"attention on average \(layer (\d+)\), against ([\d.]+) for uniform attention\.")
VACUOUS = re.compile(r"C holds most of the keys a query sees: uniform attention would put ([\d.]+) on it \(layer "
                     r"(\d+)\), so the attention on it \(([\d.]+)\) says nothing about a sink\.")
BIAS = re.compile(r"The part of the attention output that comes from (them|the first token) varies (\S+) \(std / mean "
                  r"norm, median over layers\) against (\S+) for the rest: (an implicit attention bias|no clear bias)\.")
ABLATION = re.compile(r"Ablating them \(([^,)]+)(, no BOS)?\): original (\S+), set to zero (\S+), set to their mean "
                      r"(\S+)\.")


class Checker:
    """Checks each finding of one report against a direct measurement."""

    def __init__(self, model, report, prompts, min_value, min_ratio, attention_prompts):
        self.model, self.report, self.prompts = model, report, prompts
        self.criterion = ml.find.Criterion(min_value, min_ratio)
        self.causal = report.settings["attention"] == "causal"
        self.bos = report.settings["BOS prepended"]
        self.hooks = residual_hook_names(model)
        self.direct = Direct.of_prompts(model, prompts, self.bos, self.hooks, min_value, min_ratio)
        self.entries = self.direct.entries()
        self.sparse = [e for e in self.entries if not e[6]]
        self.attention_prompts = prompts[:attention_prompts]
        self.checked: list[str] = []

    def check_all(self):
        for finding in self.report.findings:
            for pattern, check in ((DIM, self.dim), (MORE, self.more), (WIDE, self.wide), (NONE, self.none),
                                   (CONSTANT, self.constant), (SINGLE, self.single), (BOS, self.bos_only), (SINK, self.sink),
                                   (NO_SINK, self.no_sink), (VACUOUS, self.vacuous), (BIAS, self.bias),
                                   (ABLATION, self.ablation)):
                match = pattern.fullmatch(finding)
                if match:
                    check(*match.groups())
                    self.checked.append(pattern.pattern[:20])
                    break
            else:
                raise AssertionError(f"A finding no check knows: {finding!r}")
        self.no_bos_was_measured_or_said()
        self.constancy_tables()

    # -- where
    def dim(self, dim, layers, kinds, tokens, value, ratio, percent, n):
        dim = int(dim)
        mine = [e for e in self.sparse if e[3] == dim]
        assert mine, f"dim {dim} is not massive on a few tokens anywhere"
        assert layers == number_ranges([_layer(e[1]) for e in mine])
        assert _close(value, max(e[4] for e in mine), 4)
        assert int(ratio) == round(max(e[5] for e in mine))
        assert int(n) == len(self.prompts)
        assert int(percent) == round(100 * len({e[0] for e in mine}) / len(self.prompts))
        assert set(kinds.split(", ")) <= {"start", "delimiter", "other"}
        if kinds == "start":
            assert {e[2] for e in mine} == {0}

    def more(self, count):
        assert int(count) == len({e[3] for e in self.sparse}) - 3

    def wide(self, dim, n_states, layers, percent, n):
        dim = int(dim)
        mine = [e for e in self.entries if e[3] == dim and e[6]]
        assert mine, f"dim {dim} passes on more than half of the tokens nowhere"
        assert int(n_states) == len({(e[0], e[1]) for e in mine})
        assert layers == number_ranges([_layer(e[1]) for e in mine])
        assert int(percent) == round(100 * len({e[0] for e in mine}) / len(self.prompts))
        assert int(n) == len(self.prompts)

    def none(self, n, ratio, hook, wide):
        assert not self.sparse and int(n) == len(self.prompts)
        assert bool(wide) == any(e[6] for e in self.entries)
        mean_ratio = {}
        for h in self.hooks:
            ratios = [float(s[h].abs().max() / s[h].abs().flatten().median()) for s in self.direct.states]
            mean_ratio[h] = sum(ratios) / len(ratios)
        best = max(mean_ratio, key=mean_ratio.__getitem__)
        assert hook == best and int(ratio) == round(mean_ratio[best])

    # -- constant
    def _constancy_groups(self, without_bos):
        """The measurement a constancy sentence reads (the prompts, or the sequences without BOS), the
        entries followed per (dim, token kind), and the (hook, dim, kind) rows it may be read off, each
        with its number of entries: where the dim is massive on that kind of token, never at a causal
        model's BOS (the same state for every input)."""
        direct = self._no_bos_direct() if without_bos else self.direct
        groups = direct.followed()
        bos_fixed = self.causal and self.bos and not without_bos
        rows = {(h, d, k): len(groups[(d, k)]) for h, d, k in direct.massive_here() if not (bos_fixed and k == "start")}
        return direct, groups, rows

    def constant(self, verdict, without_bos, mean, std, cv, dim, kind, hook, count, unit):
        """Any token kind: the values at (hook, dim) of every entry of that kind followed, recomputed."""
        dim, count = int(dim), int(count)
        if without_bos:
            assert self.causal and self.bos
        assert not (self.causal and self.bos and kind == "start" and not without_bos), "constancy read off BOS"
        inputs = "sequence" if without_bos else "prompt"
        assert unit == (f"{inputs}s" if kind == "start" else f"({inputs}, position) entries")
        direct, groups, rows = self._constancy_groups(without_bos)
        tested = {key: n for key, n in rows.items() if n >= 2}
        assert (hook, dim, kind) in tested, f"{(hook, dim, kind)} is not a row to read constancy off: {tested}"
        # the row the sentence reads: the most entries, then the largest |mean|
        best = max(tested, key=lambda key: (tested[key], abs(float(direct.values(key[0], key[1], groups[key[1:]]).mean()))))
        assert best == (hook, dim, kind), (best, (hook, dim, kind))
        self._stats(verdict, mean, std, cv, direct.values(hook, dim, groups[(dim, kind)]), count)

    def single(self, without_bos, unit):
        """Every massive (dim, token kind) it could read was followed at one entry: counted by hand."""
        assert unit == ("sequence" if without_bos else "prompt")
        _, _, rows = self._constancy_groups(without_bos)
        assert rows and max(rows.values()) == 1

    def _stats(self, verdict, mean, std, cv, values, count):
        assert count >= 2, "a constancy read off one entry"
        assert count == len(values)
        m, s = float(values.mean()), float(values.std()) if len(values) > 1 else 0.0
        assert _close(mean, m, 4) and _close(std, s, 2)
        assert _fixed(cv, 100 * s / abs(m))
        assert (verdict == "nearly the same for every input") == (100 * s / abs(m) < 10)

    def _no_bos_direct(self):
        rows = self._no_bos_rows()
        assert rows is not None
        return Direct(self.model, list(rows), self.hooks, self.criterion.min_value, self.criterion.min_ratio)

    def _no_bos_rows(self):
        text = "\n\n".join(self.prompts)
        ids = self.model.to_tokens(text, prepend_bos=False, truncate=False)[0].cpu()
        seq_len = min(NO_BOS_SEQ_LEN, int(self.model.cfg.n_ctx))
        n_rows = min(len(ids) // seq_len, 8)
        return ids[: n_rows * seq_len].reshape(n_rows, seq_len) if n_rows >= 2 else None

    def bos_only(self, why):
        """Nothing to read constancy off with BOS but BOS itself, and without BOS not measured or nothing massive."""
        assert self.causal and self.bos
        assert not self._constancy_groups(False)[2]
        if "were not run" in why:
            assert self._no_bos_rows() is None and "fewer than two sequences" in why
        else:
            assert why == "without BOS nothing is massive" and self._no_bos_rows() is not None
            assert not self._no_bos_direct().followed()

    def constancy_tables(self):
        """Each row of the constancy tables (with BOS, and without): its entries counted by hand, and
        "massive here" where the dim is massive on that kind of token at that hook."""
        constant = next(s for s in self.report.sections if s.title.startswith("Are they"))
        for item in constant.items:
            if not isinstance(item, Collapsed):
                continue
            direct = self._no_bos_direct() if "without BOS" in item.summary else self.direct
            groups, here = direct.followed(), direct.massive_here()
            massive = "where the dim is massive" in item.summary
            for hook, dim, kind, entries in zip(item.item["hook_name"], item.item["dim"], item.item["kind"],
                                                item.item["entries"], strict=True):
                assert entries == len(groups[(dim, kind)]), (hook, dim, kind, entries)
                assert ((hook, dim, kind) in here) == massive, (item.summary, hook, dim, kind)

    def no_bos_was_measured_or_said(self):
        """A causal model with BOS: measured without BOS, or a note says why not."""
        if not (self.causal and self.bos):
            return
        constant = next(s for s in self.report.sections if s.title.startswith("Are they"))
        said = " ".join(constant.notes) + " ".join(str(i) for i in constant.items if isinstance(i, str))
        if self._no_bos_rows() is None:
            assert "were not run: the prompts' text gives fewer than two sequences" in said
        else:
            assert "Without BOS" in said

    # -- attention
    def _mass(self):
        """Per layer: the mean attention on C and the uniform baseline, by hand."""
        massive_dims = {e[3] for e in self.sparse}
        n = len(self.attention_prompts)
        mass, uniform, heads = [0.0] * self.direct.n_layers, [0.0] * self.direct.n_layers, [None] * self.direct.n_layers
        windows = attention_windows(self.model)
        for i in range(n):
            if massive_dims:
                c = torch.zeros(len(self.direct.tokens[i]), dtype=torch.bool)
                for h in self.hooks:
                    passing, _ = self.direct.passes(i, h)
                    c |= passing[:, sorted(massive_dims)].any(-1)
            else:
                c = torch.arange(len(self.direct.tokens[i])) == 0
            for layer in range(self.direct.n_layers):
                pattern = self.direct.patterns[i][layer]  # [head, q, k]
                per_head = pattern[:, :, c].sum(-1).mean(-1)
                heads[layer] = per_head / n if heads[layer] is None else heads[layer] + per_head / n
                mass[layer] += float(per_head.mean()) / n
                t = pattern.shape[1]
                q, k = torch.arange(t)[:, None], torch.arange(t)[None]
                seen = (k <= q) if self.causal else torch.ones(t, t, dtype=torch.bool)
                if windows[layer] is not None:
                    seen &= (k > q - windows[layer]) if self.causal else ((k - q).abs() < windows[layer])
                uniform[layer] += float((seen[:, c].sum(-1) / seen.sum(-1)).mean()) / n
        return mass, uniform, heads

    def sink(self, subject, mass, layer, head, uniform):
        masses, uniforms, heads = self._mass()
        layer = int(layer)
        assert layer == max(range(len(masses)), key=masses.__getitem__)
        assert _fixed(mass, masses[layer]) and _fixed(uniform, uniforms[layer])
        assert _fixed(head, float(heads[layer].max()))
        assert uniforms[layer] < 0.5 and masses[layer] >= 2 * uniforms[layer]

    def no_sink(self, subject, mass, layer, uniform):
        masses, uniforms, _ = self._mass()
        layer = int(layer)
        assert layer == max(range(len(masses)), key=masses.__getitem__)
        assert _fixed(mass, masses[layer]) and _fixed(uniform, uniforms[layer])
        assert uniforms[layer] < 0.5 and masses[layer] < 2 * uniforms[layer]

    def vacuous(self, uniform, layer, mass):
        masses, uniforms, _ = self._mass()
        layer = int(layer)
        assert _fixed(mass, masses[layer]) and _fixed(uniform, uniforms[layer]) and uniforms[layer] >= 0.5

    def bias(self, subject, b, r, verdict):
        masses, uniforms, _ = self._mass()
        assert uniforms[max(range(len(masses)), key=masses.__getitem__)] < 0.5  # not stated when C is most keys
        attention = next(s for s in self.report.sections if s.title.startswith("What does attention"))
        table = next(i for i in attention.items if hasattr(i, "columns") and "bias_rel_variation" in i.columns)
        assert _fixed(b, statistics.median(table["bias_rel_variation"].tolist()))
        assert _fixed(r, statistics.median(table["rest_rel_variation"].tolist()))
        assert (verdict == "an implicit attention bias") == (2 * float(b) <= float(r))

    # -- ablation
    def ablation(self, metric, no_bos, original, zero, mean):
        ablate = next(s for s in self.report.sections if s.title.startswith("What does ablating"))
        table = next(i for i in ablate.items if hasattr(i, "columns") and "setting" in i.columns)
        values = dict(zip(table["setting"], table[metric], strict=True))
        for stated, name in ((original, "Original"), (zero, "Set to zero"), (mean, "Set to mean")):
            assert stated == "inf" if math.isinf(values[name]) else math.isclose(float(stated), values[name], rel_tol=1e-3)
        assert bool(no_bos) == ("without BOS" in ablate.intro)
        if not no_bos and metric == "perplexity":
            assert math.isclose(float(original), ml.perplexity(self.model, self.prompts, progress=False).perplexity,
                                rel_tol=1e-3)


# ----------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {family: _hf_model(tmp_path_factory.mktemp(family), family) for family in FAMILIES if family != "mistral"}
    out["planted"] = _hf_model(tmp_path_factory.mktemp("planted"), "llama", planted=True)
    return out


@pytest.mark.parametrize(("family", "min_value", "min_ratio"), [
    ("gpt2", 5, 5), ("llama", 5, 5), ("bert", 2, 5), ("gemma2", 5, 5), ("gemma3", 5, 5), ("planted", 100, 100),
    ("gemma2", 4, 4)])  # without BOS: dim 28 is massive at block 1, but not on the delimiters it is massive on elsewhere
def test_every_finding_of_the_report_matches_its_numbers(models, family, min_value, min_ratio):
    model = models[family]
    report = build_report(model, PROMPTS, min_value=min_value, min_ratio=min_ratio, top_k=TOP_K,
                          attention_prompts=4, pairs=None, progress=False)
    assert not report.settings.get("analyses that failed"), [n for s in report.sections for n in s.notes]
    checker = Checker(model, report, PROMPTS, min_value, min_ratio, 4)
    checker.check_all()
    assert len(checker.checked) == len(report.findings) >= 3


def test_the_planted_outlier_channel_is_listed_apart_in_the_report(models):
    report = build_report(models["planted"], PROMPTS, min_value=100, min_ratio=100, top_k=TOP_K, attention_prompts=4,
                          pairs=None, ablation=False, progress=False)
    assert report.settings["massive dims found"] == str(PLANTED_DIM)  # before: "5, 7"
    assert report.settings["outlier channels (listed apart)"] == str(CHANNEL)
    assert any(f.startswith(f"Dim {CHANNEL} is an outlier channel") for f in report.findings)
    assert not any(f.startswith(f"Dim {CHANNEL} is massive") for f in report.findings)
    assert "channel-wide entries" in report.layer_stats.columns
    # the no-BOS measurements ran (the model is causal, BOS is on), whatever the kinds found with BOS
    assert any("Without BOS" in str(item) for s in report.sections for item in s.items) or any(
        "Without BOS" in n for s in report.sections for n in s.notes)


# ----------------------------------------------------------------------------- sliding windows


@pytest.mark.parametrize(("family", "windows"), [("mistral", (4, 4)), ("gemma3", (4, None)), ("gemma2", (4, None))])
def test_the_uniform_baseline_counts_only_the_keys_in_the_window(tmp_path, family, windows):
    model = _hf_model(tmp_path, family)
    assert attention_windows(model) == windows
    tokens = torch.randint(1000, 2000, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[1, 9:] = 0  # right padding: 9 real tokens
    sinks = ml.attention_concentration(model, tokens, "start", attention_mask=mask, progress=False)
    for row, length in enumerate((12, 9, 12)):
        for i, window in enumerate(windows):
            # a direct count: query q sees min(q + 1, window) keys; the first key while q < window
            want = sum((1.0 / min(q + 1, window or 10**9)) if q < (window or 10**9) else 0.0
                       for q in range(length)) / length
            assert float(sinks.layer_uniform_mass[row, i]) == pytest.approx(want, rel=1e-5)
    for i in range(len(windows)):
        assert sinks.layer_uniform(i) == pytest.approx(float(sinks.layer_uniform_mass[:, i].mean()), rel=1e-6)
    frame = sinks.layer_mass()
    assert frame["uniform"].tolist() == pytest.approx([sinks.layer_uniform(i) for i in range(len(windows))])
    # the window is HF's: the model's own attention puts nothing on the keys it says a query cannot see
    _, cache = model.run_with_cache(tokens[:1])
    for layer, window in enumerate(windows):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]
        seen = allowed_keys(torch.ones(1, 12, dtype=torch.bool), 12, True, window)[0]
        assert float(pattern[:, ~seen].abs().max()) == 0.0
        assert bool((pattern[:, seen] > 0).all())
