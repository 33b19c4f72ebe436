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
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(DEMOS / script), run_name="__main__")
    finally:
        sys.argv = argv
    assert done.value.code in (0, None)
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
