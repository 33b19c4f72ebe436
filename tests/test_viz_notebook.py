"""Views in notebooks and browsers: each library once per session, a static fallback, inert token markup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _browser import Chromium

from massact_lens import scan
from massact_lens.viz import layer_stats_figure, save_html, tokens_by_activation
from massact_lens.viz._rendered import Widget

ROOT = Path(__file__).resolve().parent.parent
TEXT = "The cat slept on the warm windowsill all afternoon."
PWN = '<img/src="x"/onerror="document.body.dataset.pwned=1">'  # no space: circuitsvis turns spaces into &nbsp;
needs_chromium = pytest.mark.skipif(Chromium.find() is None, reason="Chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    if Chromium.find() is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    with Chromium(width=1000) as chromium:
        yield chromium


@pytest.fixture(scope="module")
def views(minilm_model, sentences):
    """Two figures and two widgets, as a notebook session would show them."""
    result = scan(minilm_model, sentences[:2], progress=False)
    return [layer_stats_figure(result), tokens_by_activation(minilm_model, TEXT),
            layer_stats_figure(result, title="again"), tokens_by_activation(minilm_model, sentences[0])]


def _outputs(views) -> list[str]:
    from massact_lens.viz._notebook import NotebookFigure, forget_shown_bundles

    forget_shown_bundles()
    return [v._repr_mimebundle_()["text/html"] if isinstance(v, NotebookFigure) else v._repr_html_() for v in views]


def test_a_notebook_gets_each_library_once_and_a_static_fallback_in_every_output(views):
    fig, widget, fig2, widget2 = _outputs(views)
    assert fig.count('id="massact-plotly-js"') == 1 and fig2.count('id="massact-plotly-js"') == 0
    assert widget.count("var CircuitsVis") == 1 and widget2.count("var CircuitsVis") == 0
    assert len(fig2) < 200_000 and len(widget2) < 200_000  # no library again
    for output in (fig, fig2):  # the numbers, readable where no script runs (GitHub, nbviewer)
        assert "<th>top 1</th>" in output and "<td>L0 ln2.hook_in</td>" in output
    assert "[CLS] the cat slept on the warm windowsill" in widget and "window.CircuitsVis === undefined" in widget2
    bundle = views[0]._repr_mimebundle_()
    assert bundle["application/vnd.plotly.v1+json"]["data"][0]["name"] == "top 1"  # JupyterLab, VS Code: native


@needs_chromium
def test_notebook_outputs_draw_one_after_another_and_show_their_summary_without_javascript(views, browser, tmp_path):
    page = tmp_path / "notebook.html"  # what nbconvert --to html writes: the outputs in order, in one document
    page.write_text("<!DOCTYPE html><html><body>" + "\n".join(_outputs(views)) + "</body></html>", encoding="utf-8")
    drawn = ("document.querySelectorAll('.main-svg').length >= 4 && "
             "Array.from(document.querySelectorAll('[id^=circuits-vis-]:not([id$=-static])')).every(d => d.children.length)")
    visit, session = browser.visit(page.as_uri(), wait_for=drawn, timeout=90)
    assert visit.network_requests() == [] and visit.console_errors == []
    hidden = browser.evaluate(session, "Array.from(document.querySelectorAll('[id$=-static]')).map(e => e.style.display)")
    assert hidden == ["none"] * 4  # each drawing replaced its summary
    static, session = browser.visit(page.as_uri(), scripts=False)
    text = browser.evaluate(session, "document.body.innerText")
    assert text.count("top 1") >= 2 and "windowsill" in text and "interactive" in text


@needs_chromium
def test_a_token_never_becomes_markup_in_a_coloured_tokens_view(browser, tmp_path):
    view = Widget("ColoredTokens", {"tokens": [PWN, " & more"], "values": [1.0, 2.0]})
    page = save_html(tmp_path / "tokens.html", view)
    visit, session = browser.visit(page.as_uri(), wait_for="document.querySelector('.colored-tokens')")
    assert browser.evaluate(session, "document.querySelectorAll('.colored-tokens img').length") == 0  # no element
    assert "data-pwned" not in visit.dom
    shown = browser.evaluate(session, "document.querySelector('.colored-tokens').innerText").replace("\u2060", "")
    assert PWN in shown  # the token, as text


@needs_chromium
def test_the_tokens_view_opens_on_the_first_massive_hidden_state_in_a_browser(minilm_model, browser, tmp_path):
    page = save_html(tmp_path / "open.html", tokens_by_activation(minilm_model, TEXT))
    selected = ("Array.from(document.querySelectorAll('.circuitsvis > div > div > div'))"
                ".filter(d => d.style.backgroundColor === 'black').map(d => d.innerText)")
    _, session = browser.visit(page.as_uri(), wait_for=f"{selected}.length === 1", quiet=2)
    assert browser.evaluate(session, selected) == ["L0 ln2.hook_in"]  # not L0 ln1.hook_in, where nothing is massive


@pytest.mark.slow
def test_a_real_notebook_session_inlines_each_library_once(tmp_path, browser):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    cells = [
        "from massact_lens import scan\nfrom massact_lens.examples import minilm\nfrom massact_lens import viz\n"
        "model = minilm()\nresult = scan(model, ['Rain fell.', 'The cat sat.'], progress=False)",
        "viz.layer_stats_figure(result)", "viz.tokens_by_activation(model, 'Rain fell.')",
        # a cell of the same source as the first would inline plotly again (nbclient sends no cell ids)
        "viz.layer_stats_figure(result, title='again')", "viz.tokens_by_activation(model, 'The cat sat.')",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3")
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    client.execute(env={**os.environ, "PYTHONPATH": pythonpath})
    html = [c.outputs[0]["data"]["text/html"] for c in notebook.cells[1:]]
    assert [h.count('id="massact-plotly-js"') for h in html] == [1, 0, 0, 0]
    assert [h.count("var CircuitsVis") for h in html] == [0, 1, 0, 0]
    assert "application/vnd.plotly.v1+json" in notebook.cells[1].outputs[0]["data"]
    page = tmp_path / "exported.html"
    page.write_text("<!DOCTYPE html><html><body>" + "\n".join(html) + "</body></html>", encoding="utf-8")
    drawn = ("document.querySelectorAll('.main-svg').length >= 4 && "
             "Array.from(document.querySelectorAll('[id^=circuits-vis-]:not([id$=-static])')).every(d => d.children.length)")
    visit, _ = browser.visit(page.as_uri(), wait_for=drawn, timeout=90)
    assert visit.network_requests() == []


@pytest.mark.slow
def test_a_saved_notebook_keeps_its_views_after_the_cells_that_held_the_libraries_run_again(tmp_path):
    """Re-running the cell whose output held plotly.js / circuitsvis replaces that output: the new one holds them."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    cells = [
        "from massact_lens import scan\nfrom massact_lens.examples import minilm\nfrom massact_lens import viz\n"
        "model = minilm()\nresult = scan(model, ['Rain fell.', 'The cat sat.'], progress=False)",
        "viz.layer_stats_figure(result)", "viz.tokens_by_activation(model, 'Rain fell.')",
        "viz.layer_stats_figure(result, title='again')", "viz.tokens_by_activation(model, 'The cat sat.')",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3")
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    with client.setup_kernel(env={**os.environ, "PYTHONPATH": pythonpath}):
        for index in [0, 1, 2, 3, 4, 1, 2, 3]:  # then the two cells that held the libraries, and one that did not
            client.execute_cell(notebook.cells[index], index)
    saved = tmp_path / "rerun.ipynb"
    nbformat.write(notebook, saved)
    html = [c.outputs[0]["data"]["text/html"] for c in nbformat.read(saved, as_version=4).cells[1:]]
    assert [h.count('id="massact-plotly-js"') for h in html] == [1, 0, 0, 0]
    assert [h.count("var CircuitsVis") for h in html] == [0, 1, 0, 0]
    if Chromium.find() is None:
        pytest.skip("Chromium is not installed (apt-get install chromium): the saved notebook was checked, not drawn")
    page = tmp_path / "rerun.html"
    page.write_text("<!DOCTYPE html><html><body>" + "\n".join(html) + "</body></html>", encoding="utf-8")
    drawn = ("document.querySelectorAll('.main-svg').length >= 4 && "
             "Array.from(document.querySelectorAll('[id^=circuits-vis-]:not([id$=-static])')).every(d => d.children.length)")
    with Chromium(width=1000) as browser:
        visit, _ = browser.visit(page.as_uri(), wait_for=drawn, timeout=90)
    assert visit.network_requests() == []
