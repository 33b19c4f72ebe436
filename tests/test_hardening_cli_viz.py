"""Issue 24 for the CLI and the views: bad arguments are refused early, and every message says what to do."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from massact_lens import scan, viz
from massact_lens.cli import main
from massact_lens.viz import _page

NO_MODEL = "/no/such/model/folder"  # loading it fails: any other error came before the model


def _writable(folder: Path) -> bool:
    try:
        with tempfile.NamedTemporaryFile(dir=folder):
            return True
    except OSError:
        return False


@pytest.fixture
def unwritable(tmp_path):
    """A folder nobody can write in (as root, chmod is not enough: chattr +i)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if _writable(folder) and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    if _writable(folder):
        folder.chmod(0o755)
        pytest.skip("no way to make a folder unwritable here")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


@contextlib.contextmanager
def _forward_passes(model):
    """Count the model's forward passes (a plain torch pre-hook, removed after)."""
    calls = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


# ------------------------------------------------------------------- CLI


@pytest.mark.parametrize(("verb", "option", "value"), [
    ("scan", "--top-k", "abc"), ("scan", "--batch-size", "0"), ("report", "--attention-prompts", "x"),
    ("report", "--example", "first"),
])
def test_a_bad_number_says_what_to_pass_without_a_helper_name(verb, option, value, capsys):
    with pytest.raises(SystemExit) as done:
        main([verb, option, value])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and "integer" in err and repr(value) in err
    assert "_positive_int" not in err and "invalid" not in err


def test_an_empty_prompts_file_says_what_to_do(tmp_path):
    for text in ("", "\n  \n\t\n"):
        empty = tmp_path / "empty.txt"
        empty.write_text(text, encoding="utf-8")
        with pytest.raises(SystemExit, match=r"one prompt per line.*leave out --prompts"):
            main(["scan", "--model", NO_MODEL, "--prompts", str(empty)])


def test_short_model_names_with_a_bad_variant_say_what_to_pass(tmp_path):
    with pytest.raises(SystemExit, match=r"no variants.*--model minilm"):
        main(["scan", "--model", "minilm:foo", "--quiet", "--json", str(tmp_path / "s.json")])
    with pytest.raises(SystemExit, match=r"bigram_backcopy:default.*bigram_backcopy:sink_token"):
        main(["scan", "--model", "bigram_backcopy:nonsense", "--quiet"])
    assert not (tmp_path / "s.json").exists()


def test_malformed_pairs_say_how_to_write_them(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("good one\tgood two\nonly one sentence\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"bad.tsv:2 .*1 part.*one tab.*--pairs none"):
        main(["ablate", "--model", NO_MODEL, "--pairs", str(bad)])
    three = tmp_path / "three.tsv"
    three.write_text("a\tb\tc\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"3 parts"):
        main(["ablate", "--model", NO_MODEL, "--pairs", str(three)])
    blank = tmp_path / "blank.tsv"
    blank.write_text("\n\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"no pairs.*--pairs none"):
        main(["ablate", "--model", NO_MODEL, "--pairs", str(blank)])


@pytest.mark.parametrize("argv", [
    ["scan", "--json", "{}/scan.json"], ["ablate", "--json", "{}/ablate.json"], ["report", "-o", "{}/r.html"],
])
def test_an_unwritable_output_folder_is_refused_before_the_model_loads(argv, unwritable):
    argv = [a.format(unwritable) for a in argv]
    with pytest.raises(SystemExit, match=r"cannot write in folder .*locked.*choose a writable folder"):
        main([*argv, "--model", NO_MODEL, "--quiet"])
    assert list(unwritable.iterdir()) == []


def test_train_refuses_an_unwritable_out_folder_before_training(unwritable):
    with pytest.raises(SystemExit, match=r"--out .*cannot write in folder .*locked"):
        main(["train", "bigram-backcopy", "--out", str(unwritable / "run"), "--steps", "1"])
    assert list(unwritable.iterdir()) == []


# ------------------------------------------------------------------- views


def test_layer_stats_figure_takes_the_layer_stats_dataframe_too(minilm_model):
    result = scan(minilm_model, ["The cat sat on the mat."], progress=False)
    from_result = viz.layer_stats_figure(result)
    from_frame = viz.layer_stats_figure(result.layer_stats())
    assert [t.name for t in from_frame.data] == [t.name for t in from_result.data]
    for a, b in zip(from_frame.data, from_result.data, strict=True):
        assert list(a.x) == list(b.x) and list(a.y) == list(b.y)
    assert "1 inputs" in from_frame.layout.title.text
    with pytest.raises(ValueError, match=r"no column.*top1_std.*layer_stats\(\)"):
        viz.layer_stats_figure(result.layer_stats().drop(columns=["top1_std"]))
    with pytest.raises(TypeError, match=r"ScanResult.*DataFrame"):  # under pytest the type checker says it first
        viz.layer_stats_figure([1, 2, 3])


def test_a_layer_that_does_not_exist_is_refused_before_the_forward_pass(minilm_model):
    with _forward_passes(minilm_model) as calls, pytest.raises(ValueError, match=r"layer 99 .*6 layers.*layer=0\.\.5"):
        viz.attention_heads(minilm_model, "The cat sat.", layer=99)
    assert calls == []
    with _forward_passes(minilm_model) as calls, pytest.raises(ValueError, match="layer=0..5"):
        viz.attention_heads(minilm_model, "The cat sat.", layer=-1)
    assert calls == []
    with _forward_passes(minilm_model) as calls:  # the counter counts
        viz.attention_heads(minilm_model, "The cat sat.", layer=1)
    assert calls


def test_a_dim_that_does_not_exist_is_refused_before_the_forward_pass(minilm_model):
    with _forward_passes(minilm_model) as calls, pytest.raises(ValueError, match=r"dim 1000 .*dim=0\.\.383"):
        viz.tokens_by_activation(minilm_model, "The cat sat.", dim=1000)
    assert calls == []
    with _forward_passes(minilm_model) as calls, pytest.raises(ValueError, match=r"dim=0\.\.383"):
        viz.tokens_by_activation(minilm_model, "The cat sat.", dim=-3)
    assert calls == []


def test_save_html_into_an_unwritable_folder_fails_before_rendering(unwritable, monkeypatch):
    rendered = []
    real = _page.item_html
    monkeypatch.setattr(_page, "item_html", lambda *a: rendered.append(1) or real(*a))
    with pytest.raises(PermissionError, match=r"cannot write in folder .*locked.*choose a writable folder"):
        viz.save_html(unwritable / "view.html", "some text")
    assert rendered == [] and list(unwritable.iterdir()) == []
    with pytest.raises(OSError, match="cannot write in folder"):
        _page.write_atomic(unwritable / "x.html", "<p>hi</p>")


def test_a_report_into_an_unwritable_folder_fails_before_rendering(unwritable, monkeypatch):
    from massact_lens.viz._document import Report

    report = Report(title="t", summary="s", prompts=("a",))
    monkeypatch.setattr(Report, "to_html", lambda self: pytest.fail("rendered before the folder was checked"))
    with pytest.raises(PermissionError, match="cannot write in folder"):
        report.save(unwritable / "r.html")
