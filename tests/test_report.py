"""The HTML report: one self-contained file that draws offline, escapes every token, and never half-exists."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from _browser import Chromium

from massact_lens.cli import main
from massact_lens.cli.report import build_report
from massact_lens.models.planting import plant_massive_activation

PROMPTS = [
    "The cat slept on the warm windowsill all afternoon.",
    "<script>alert(1)</script> is a prompt, not markup.",
    "<img src=x onerror=\"document.body.dataset.pwned='yes'\"> & more.",
    "She forgot her umbrella, so she got soaked.",
    "Pneumonoultramicroscopicsilicovolcanoconiosis" * 6 + " is one long word.",
    "القطة نامت على حافة النافذة الدافئة طوال الظهيرة.",
]
RAW_MARKUP = ("<script>alert(1)</script>", "<img src=x onerror")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
BUNDLES = ("plotly-js", "circuitsvis-js")


class _Page(HTMLParser):
    """Elements with their attributes, and for each element with an id the tags inside it."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.inside: dict[str, list[str]] = {}
        self.stack: list[tuple[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attributes))
        for _, element_id in self.stack:
            if element_id is not None:
                self.inside[element_id].append(tag)
        if attributes.get("id"):
            self.inside.setdefault(attributes["id"], [])
        if tag not in VOID:
            self.stack.append((tag, attributes.get("id")))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID and self.stack and self.stack[-1][0] == tag:
            self.stack.pop()

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        if not self.stack or self.stack[-1][0] not in ("script", "style"):
            self.text.append(data)


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """``massact report`` on the embedded model, with a prompts file full of markup."""
    folder = tmp_path_factory.mktemp("report")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out = folder / "report.html"
    code = main(["report", "--model", "minilm", "--prompts", str(prompts), "--pairs", "none", "--example", "1",
                 "--attention-prompts", "3", "--quiet", "-o", str(out)])
    assert code == 0
    return out, out.read_text(encoding="utf-8")


def test_the_report_has_every_section_and_the_settings(report):
    _, text = report
    page = _parse(text)
    headings = [a.get("id") for tag, a in page.elements if tag == "h2"]
    assert headings == ["where-are-the-massive-activations", "are-they-the-same-for-every-input",
                        "what-does-attention-do-with-them", "what-does-ablating-them-do", "settings"]
    body = " ".join(page.text)
    assert "all-MiniLM-L6-v2 (bundled)" in body and "|x| > 50 and >= 200 x median" in body
    assert "site-packages" not in text and "/model" not in body  # the model's label, never its install path
    assert "massact report --model minilm --prompts" in body  # the command line that made it
    assert "Set to zero" in body and "Set to mean" in body  # the Table-3 rows
    assert "failed" not in body
    assert re.search(r"Dim 99 is massive in layers 0-\d, on start tokens \(\[CLS\]\)", body)  # "In short"
    assert "an implicit attention bias" in body
    plots = [a["id"] for tag, a in page.elements if tag == "div" and a.get("class") == "plot"]
    widgets = [a["id"] for tag, a in page.elements if tag == "div" and "circuitsvis" in a.get("class", "").split()]
    assert len(plots) == 6 and len(widgets) == 2
    scripts = [a.get("id") for tag, a in page.elements if tag == "script"]
    # each library once, then one small script per figure or widget: no script came from a prompt
    assert scripts.count("plotly-js") == 1 and scripts.count("circuitsvis-js") == 1
    assert len(scripts) == len(plots) + len(widgets) + 3


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r'<h2 id="([^"]+)">', text)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _headers(html_part: str) -> list[list[str]]:
    return [re.findall(r"<th>(.*?)</th>", table) for table in re.findall(r"<thead>(.*?)</thead>", html_part, re.S)]


def test_every_table_says_what_it_counts_and_explains_its_short_names(report):
    import html as html_module

    _, text = report
    sections = _sections(text)
    where, constant = sections["where-are-the-massive-activations"], sections["are-they-the-same-for-every-input"]
    n_prompts = len(PROMPTS)
    assert f"'[CLS]' ({n_prompts})" in html_module.unescape(where) and "tokens (prompts)" in where
    assert not re.search(r"\bx\d+\b", re.sub(r"<script.*?</script>", "", where, flags=re.S))  # no bare "x159"
    for name, part in sections.items():  # a column with a code-like name is explained in its section
        explained = {t.strip() for dt in re.findall(r"<dt>(.*?)</dt>", part) for t in dt.split(",")}
        for header in _headers(part):
            for column in header:
                if "_" in column and column not in ("hook_name",):
                    assert column in explained, f"{name}: column {column!r} is not explained"
    # cv: one unit everywhere, and the rows where a dim is not massive are apart and say so
    assert all("cv" not in h or h in ("cv (%)", "cv (%) median", "cv (%) max") for t in _headers(constant) for h in t)
    finding = re.search(r"\(cv ([0-9.]+)%\)", text)
    assert finding is not None
    assert "where the dim is not massive" in constant
    summary = _headers(constant)[0]
    assert summary[:3] == ["dim", "token kind", "layers"]


def test_prompts_and_tokens_take_their_direction_from_their_text(report):
    _, text = report
    assert text.count('<li dir="auto">القطة') == 1  # right to left in the prompts list
    assert '<td dir="auto">' in text


def test_the_report_names_no_network_address(report):
    _, text = report
    page = _parse(text)
    for tag, attributes in page.elements:
        for name in ("src", "href", "action", "data", "poster", "srcset", "xlink:href", "formaction"):
            value = attributes.get(name)
            if value is not None:
                assert value.startswith(("#", "data:", "blob:")), f"<{tag} {name}={value!r}>"
    assert not any(tag in ("link", "iframe", "object", "embed", "base") for tag, _ in page.elements)
    # Outside the two inlined libraries there is no URL at all ...
    ours = re.sub(r'<script id="(?:plotly-js|circuitsvis-js)">.*?</script>', "", text, flags=re.S)
    assert len(ours) < len(text) // 10
    assert not re.search(r"https?:|//[a-z0-9-]+\.[a-z]", ours, re.IGNORECASE)
    # ... and nothing in them that loads one: no static import, no import() or url() of a literal address
    for pattern in (r"""\bimport\s*\(\s*["'`](?:https?:)?//""", r"""\bfrom\s*["'`](?:https?:)?//""",
                    r"@import", r"""url\(\s*["']?(?:https?:)?//""", r"sourceMappingURL"):
        assert not re.search(pattern, text, re.IGNORECASE), pattern
    assert "default-src 'none'" in text  # the page forbids fetching anything, too


def test_prompt_and_token_text_is_escaped_everywhere(report):
    _, text = report
    for raw in RAW_MARKUP:
        assert raw not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; is a prompt" in text  # prompts list and settings
    page = _parse(text)
    assert not any("onerror" in attributes for _, attributes in page.elements)
    shown = " ".join(page.text)
    assert "<script>alert(1)</script> is a prompt, not markup." in shown  # shown as text, verbatim


def test_no_partial_report_is_left_on_error(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("One prompt.\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="example"):
        main(["report", "--model", "minilm", "--prompts", str(prompts), "--example", "4", "--quiet", "-o", str(tmp_path / "r.html")])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["report", "--model", "minilm", "--quiet", "-o", str(tmp_path / "missing" / "r.html")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]


def _decoder_with_tokenizer(tmp_path: Path):
    """A tiny LLaMA-like decoder with a word-level tokenizer and 900.0 planted at dim 7 on BOS."""
    from transformers import AutoTokenizer

    from massact_lens.examples import tiny_model
    from massact_lens.training import BigramBackcopy, TrainConfig, train

    run = train(BigramBackcopy(seq_len=16), "default", tmp_path / "bb",
                train_config=TrainConfig(steps=1, batch_size=2, eval_sequences=2), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(run.directory)  # w3 .. w63, T0 .. T2, BOS <s>
    model = tiny_model("llama", n_layers=3, d_vocab=len(tokenizer), n_ctx=32)
    plant_massive_activation(model, layer=1, dim=7, value=900.0, token_id=tokenizer.bos_token_id)
    tokenizer.padding_side = "right"
    model.tokenizer = tokenizer
    model.cfg.tokenizer_prepends_bos = False
    model.cfg.default_prepend_bos = True
    return model


def test_a_decoder_report_masks_causally_and_ablates_by_perplexity(tmp_path):
    model = _decoder_with_tokenizer(tmp_path)
    prompts = ["w7 w9 T1 w3 w5 w8", "w12 w4 T0 w6 w7 w20 w9", "w3 w5 w10 w11 T2 w4"]
    report = build_report(model, prompts, min_value=100, min_ratio=100, progress=False)
    text = report.save(tmp_path / "bb.html").read_text(encoding="utf-8")
    assert report.settings["attention"] == "causal" and report.settings["massive dims found"] == "7"
    assert '"maskUpperTri": true' in text
    ablation = next(s for s in report.sections if s.title.startswith("What does ablating"))
    table = next(item for item in ablation.items if hasattr(item, "columns") and "perplexity" in item.columns)
    ppl = dict(zip(table["setting"], table["perplexity"], strict=True))
    assert ppl["Set to mean"] == pytest.approx(ppl["Original"], rel=1e-4)  # BOS is constant: mean is the identity
    assert ppl["Set to zero"] != pytest.approx(ppl["Original"], rel=1e-3)
    assert any("identity" in note for note in ablation.notes)


# ----------------------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def browser():
    if Chromium.find() is None:
        pytest.skip("Chromium is not installed (scripts/test.sh installs it: apt-get install chromium)")
    with Chromium(width=1000, height=1200) as chromium:
        yield chromium


def _asked(visit) -> list[str]:
    """What the page itself asked for: requests to anything but itself or inline data, and blocked attempts."""
    return visit.network_requests() + visit.csp_violations


def test_the_browser_check_flags_a_page_that_asks_the_network(browser, tmp_path):
    """The check below can fail: a page's own request is seen even when its policy blocks it."""
    image = tmp_path / "image.html"
    image.write_text('<p>probe</p><img src="http://example.invalid/x.png">', encoding="utf-8")
    visit, _ = browser.visit(image.as_uri())
    assert "http://example.invalid/x.png" in _asked(visit)
    blocked = tmp_path / "blocked.html"
    blocked.write_text("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; script-src 'unsafe-inline'\">"
                       '<script>fetch("https://example.invalid/data.json").catch(() => 0)</script>', encoding="utf-8")
    visit, _ = browser.visit(blocked.as_uri(), quiet=1.5)
    assert any("example.invalid" in url for url in _asked(visit))
    clean = tmp_path / "clean.html"
    clean.write_text('<p>clean</p><img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=">', encoding="utf-8")
    visit, _ = browser.visit(clean.as_uri())
    assert _asked(visit) == []


READY = ("Array.from(document.querySelectorAll('div.plot')).every(d => d.querySelector('.main-svg')) && "
         "Array.from(document.querySelectorAll('div.circuitsvis')).every(d => d.children.length > 0)")


def test_the_report_draws_offline_in_headless_chromium(report, browser):
    path, text = report
    visit, _ = browser.visit(path.as_uri(), wait_for=READY, timeout=120, quiet=2)
    assert _asked(visit) == [], f"the report asked the network for {_asked(visit)}"
    assert visit.console_errors == []
    source, drawn = _parse(text), _parse(visit.dom)
    plots = [a["id"] for tag, a in source.elements if tag == "div" and a.get("class") == "plot"]
    widgets = [a["id"] for tag, a in source.elements if tag == "div" and "circuitsvis" in a.get("class", "").split()]
    for plot in plots:  # plotly drew each figure: its SVG layers, and WebGL canvas for the 3D surface
        assert drawn.inside[plot].count("svg") >= 2, plot
    assert sum("canvas" in drawn.inside[p] for p in plots) == 1  # the 3D surface
    for widget in widgets:  # React rendered each circuitsvis view into its div
        assert len(drawn.inside[widget]) > 20, widget
    assert max(drawn.inside[w].count("canvas") for w in widgets) >= 4  # attention heads: one canvas per head, at least
    body = [a for tag, a in drawn.elements if tag == "body"][0]
    assert "data-pwned" not in body, "markup from a prompt ran"
    shown = " ".join(drawn.text)
    assert "<script>alert(1)</script> is a prompt, not markup." in shown
    assert re.search(r"L\dH0", shown)  # head names drawn by the attention widget


_BOXES = """Array.from(document.querySelectorAll('div.plot')).map(plot => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  return {id: plot.id, width: plot.getBoundingClientRect().width,
          legend: Array.from(plot.querySelectorAll('.legend')).map(box),
          labels: Array.from(plot.querySelectorAll('.xtick text, .ytick text, .g-xtitle text, .g-ytitle text, '
                                                   + '.g-x2title text, .g-x3title text, .annotation-text')).map(box),
          title: Array.from(plot.querySelectorAll('.gtitle')).map(box)};
})"""


def _overlap(a: list[float], b: list[float]) -> bool:
    return a[0] < b[2] - 1 and b[0] < a[2] - 1 and a[1] < b[3] - 1 and b[1] < a[3] - 1


@pytest.mark.parametrize("width", [1000, 1600])
def test_the_report_reads_at_1000_and_1600_pixels(report, browser, width):
    """No legend on a tick label or axis title, no title cut off, nothing wider than the window."""
    path, _ = report
    _, session = browser.visit(path.as_uri(), wait_for=READY, timeout=120, quiet=1.5, width=width)
    for plot in browser.evaluate(session, _BOXES):
        for legend in plot["legend"]:
            hits = [label for label in plot["labels"] if _overlap(legend, label)]
            assert not hits, f"{plot['id']}: the legend covers {len(hits)} labels at {width} px"
        for title in plot["title"]:
            assert title[2] <= plot["width"] + 40, f"{plot['id']}: the title runs out of the figure at {width} px"
    browser.evaluate(session, "document.querySelectorAll('details').forEach(d => { d.open = true; }) || true")
    sizes = browser.evaluate(session, "[document.documentElement.scrollWidth, window.innerWidth]")
    assert sizes[0] <= sizes[1], f"the page is {sizes[0]} px wide in a {sizes[1]} px window (a long word?)"
    opened = browser.evaluate(session, "Array.from(document.querySelectorAll('.circuitsvis-ColoredTokensMulti > div > div "
                                       "> div')).filter(d => d.style.backgroundColor === 'black').map(d => d.innerText)")
    assert opened == ["L0 ln2.hook_in"]  # the tokens view opens where [CLS] is massive


def test_a_report_shows_itself_in_a_notebook():
    import html

    from massact_lens.cli.report import Report

    report = Report("A <b>title</b>")
    report.section("Notes").add("Dim 99 is massive.")
    shown = report._repr_html_()
    assert shown.startswith("<iframe ") and shown.endswith("</iframe>")
    srcdoc = re.search(r'srcdoc="([^"]*)"', shown)
    assert srcdoc is not None and html.unescape(srcdoc.group(1)) == report.to_html()


@pytest.mark.slow
def test_a_smollm2_report_ablates_without_bos_as_the_paper_did(smollm2_model):
    """SmolLM2's dim 507 sits on BOS, whose state is the same for every input: the report measures without BOS too."""
    from massact_lens.examples.sentences import SENTENCES

    report = build_report(smollm2_model, list(SENTENCES[:12]), attention_prompts=3, progress=False)
    assert report.title == ("Massive activations in SmolLM2-135M-Instruct (bundled; weights dequantised from Q4_1, "
                            "not the original bf16)")
    assert report.settings["massive dims found"].split(", ").count("507") == 1
    constant = next(s for s in report.sections if s.title.startswith("Are they"))
    assert any("says nothing" in note for note in constant.notes)  # cv 0% at BOS is by construction
    assert any("without BOS" in f and "dim 507" in f for f in report.findings)
    ablate = next(s for s in report.sections if s.title.startswith("What does ablating"))
    assert "without BOS" in ablate.intro and not ablate.notes
    table = next(item for item in ablate.items if hasattr(item, "columns") and "perplexity" in item.columns)
    ppl = dict(zip(table["setting"], table["perplexity"], strict=True))
    assert ppl["Set to zero"] > 100 * ppl["Original"]  # zero breaks the model
    assert ppl["Set to mean"] == pytest.approx(ppl["Original"], rel=0.05)  # the mean of varying first tokens does not
    ours = re.sub(r"<script.*?</script>", "", report.to_html(), flags=re.S)
    assert "site-packages" not in ours and "/.cache/" not in ours  # the label, not the install path


def test_the_reports_profile_from_its_scan_is_the_librarys_profile(minilm_model, sentences):
    """The report reuses its scan for the profile (one pass fewer); it must give what profile() gives."""
    from massact_lens import profile, scan
    from massact_lens.cli.report import _profile_from_scan, _Run
    from massact_lens.find.criterion import Criterion

    prompts = sentences[:4]
    run = _Run(minilm_model, prompts, 0, prompts, Criterion(50, 200), None, 16, 10, False, "m", False, None)
    result = scan(minilm_model, prompts, progress=False)
    mine = _profile_from_scan(run, prompts, result, None)
    theirs = profile(minilm_model, prompts, min_value=50, min_ratio=200, progress=False)
    assert mine.to_dataframe().equals(theirs.to_dataframe()) and mine.dims == theirs.dims
    assert (mine.hook_names, mine.prepend_bos, mine.n_inputs, mine.delimiters) == (
        theirs.hook_names, theirs.prepend_bos, theirs.n_inputs, theirs.delimiters)


def test_the_report_names_the_bundled_models_as_the_command_does():
    from massact_lens.cli._args import BUNDLED
    from massact_lens.viz._labels import BUNDLED_LABELS

    assert set(BUNDLED_LABELS.values()) <= set(BUNDLED.values())  # one wording; the labels live in two places
