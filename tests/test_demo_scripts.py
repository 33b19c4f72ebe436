"""The scripts that print README's tables run and print what README says they print."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

DEMOS = Path(__file__).resolve().parents[1] / "demos"


def _run(script: str, *args: str, capsys) -> str:
    argv = sys.argv
    sys.argv = [script, *args]
    code = None
    try:
        runpy.run_path(str(DEMOS / script), run_name="__main__")
    except SystemExit as done:  # a demo may end with sys.exit(main()) or just return
        code = done.code
    finally:
        sys.argv = argv
    assert code in (0, None)
    return capsys.readouterr().out


@pytest.mark.slow
def test_attention_table_shows_the_cls_sink(capsys):
    argv = sys.argv
    sys.argv = ["attention_table.py"]
    try:
        runpy.run_path(str(DEMOS / "attention_table.py"), run_name="__main__")
    finally:
        sys.argv = argv
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 6
    mass = [float(row.split("|")[2]) for row in rows]
    assert all(m > 0.5 for m in mass[1:5])  # layers 1-4: most attention on [CLS]


@pytest.mark.slow
def test_decoder_ablation_table(capsys):
    out = _run("ablation_table.py", "--model", "bigram_backcopy", "--sequences", "64", "--quiet", capsys=capsys)
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in out.splitlines()
            if line.startswith("| ") and line.split("|")[2].strip()[:1].isdigit()}
    assert rows["Set to mean"] == rows["Original"]  # BOS is identical for every input: mean = identity
    assert rows["Set to zero"] > rows["Original"]


def test_the_sink_curve_demo_prints_its_table_and_writes_its_figure(capsys, tmp_path):
    figure = tmp_path / "sink.html"
    out = _run("sink_curve.py", "--tokens", "120", "--figure", str(figure), capsys=capsys)
    assert "route: fused kernel" in out
    mean = [float(x) for x in next(line for line in out.splitlines() if line.startswith("mean over layers")).split()[3:]]
    uniform = [float(x) for x in next(line for line in out.splitlines() if line.startswith("uniform")).split()[2:]]
    assert len(mean) == len(uniform) == 3  # queries 1, 10, 100
    assert all(m > u for m, u in zip(mean[1:], uniform[1:], strict=True))  # far above uniform: a sink
    assert figure.stat().st_size > 0
