"""The ``massact`` command: scan, ablate and report on the embedded model, good help, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from massact_lens.cli import main

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "The cat slept on the warm windowsill all afternoon.",
    "She forgot her umbrella, so she got soaked on the way home.",
    "The library closes early on Sundays.",
]


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")
    return path


def test_the_console_script_explains_every_command(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for command in ("scan", "ablate", "report"):
        assert f"    {command} " in out
    script = Path(sys.executable).with_name("massact")
    assert script.exists(), "the massact console script is not installed (pip install -e .)"
    report_help = subprocess.run([str(script), "report", "--help"], capture_output=True, text=True, timeout=60,
                                 check=True).stdout
    for option in ("--model", "--prompts", "--out", "--min-value", "--pairs", "--quiet", "offline"):
        assert option in report_help
    assert "massact_report.html" in report_help


def test_scan_on_the_embedded_model_prints_the_table_and_the_massive_dim(prompts_file, capsys):
    assert main(["scan", "--model", "minilm", "--prompts", str(prompts_file), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("massact scan: all-MiniLM-L6-v2 (bundled), 3 prompts, BOS on, criterion |x| > 50 and >= 200x median")
    assert "blocks.0.ln2.hook_in" in out and "dim 99: layers 0-3" in out


def test_ablate_on_the_embedded_model_gives_the_zero_vs_mean_table(prompts_file, tmp_path, capsys):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("The film was boring.\tThe movie was dull.\nIt will rain.\tRain is coming.\n", encoding="utf-8")
    out_json = tmp_path / "ablate.json"
    code = main(["ablate", "--model", "minilm", "--prompts", str(prompts_file), "--pairs", str(pairs), "--quiet", "--json", str(out_json)])
    assert code == 0
    out = capsys.readouterr().out
    assert "massive dims [99]" in out and "| setting | cosine to original | paraphrase cosine |" in out
    result = json.loads(out_json.read_text())
    values = result["values"]
    assert set(values) == {"Original", "Set to zero", "Set to mean"}
    assert values["Set to mean"]["cosine to original"] == pytest.approx(1.0, abs=1e-3)
    assert values["Set to zero"]["cosine to original"] < 0.9  # the paper's zero-vs-mean contrast, on real weights
    assert values["Set to zero"]["paraphrase cosine"] < values["Original"]["paraphrase cosine"]
    assert result["dims"] == [99]


def test_bad_arguments_say_what_to_do(tmp_path, capsys):
    with pytest.raises(SystemExit, match="not a file"):
        main(["ablate", "--model", "minilm", "--prompts", str(tmp_path / "missing.txt")])
    bad_pairs = tmp_path / "bad.tsv"
    bad_pairs.write_text("only one sentence\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="tab-separated"):
        main(["ablate", "--model", "minilm", "--pairs", str(bad_pairs), "--quiet"])
    with pytest.raises(SystemExit, match="is a folder"):
        main(["report", "-o", str(tmp_path)])
    assert main(["scan", "--model", str(tmp_path / "no_such_model")]) == 2
    assert "No directory" in capsys.readouterr().err


def test_a_folder_written_by_massact_lens_train_is_a_model(tmp_path, capsys):
    from massact_lens.training import BigramBackcopy, TrainConfig, train

    run = train(BigramBackcopy(seq_len=16), "default", tmp_path / "bb",
                train_config=TrainConfig(steps=1, batch_size=2, eval_sequences=2), progress=False)
    prompts = tmp_path / "p.txt"
    prompts.write_text("w7 w9 T1 w3 w5\nw12 w4 T0 w6 w7\n", encoding="utf-8")
    assert main(["scan", "--model", str(run.directory), "--prompts", str(prompts), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "criterion |x| > 100 and >= 1000x median" in out and "blocks.2.hook_resid_post" in out
    assert main(["ablate", "--model", str(run.directory), "--prompts", str(prompts), "--quiet"]) == 1
    assert "nothing to ablate" in capsys.readouterr().out
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("a b\tc d\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="for encoders"):
        main(["ablate", "--model", str(run.directory), "--prompts", str(prompts), "--pairs", str(pairs), "--quiet"])


def test_train_is_a_verb_of_the_one_command(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "    train " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for verb in ("bigram-backcopy", "text", "table", "scan-snapshots"):
        assert f"    {verb}" in out
    with pytest.raises(SystemExit, match="not a file"):
        main(["train", "text", "--file", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="not checkpoint folders"):
        main(["train", "table", str(tmp_path)])
    with pytest.raises(SystemExit, match="no snapshots"):
        main(["train", "scan-snapshots", str(tmp_path)])
    done = subprocess.run([sys.executable, "-m", "massact_lens", "train", "table", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--csv" in done.stdout


def test_arguments_and_output_files_are_checked_before_the_model_loads(tmp_path, prompts_file):
    model = str(tmp_path / "no_such_model")  # loading it fails: an error about anything else came first
    with pytest.raises(SystemExit, match="min_value must be a positive finite number, not nan"):
        main(["scan", "--model", model, "--min-value", "nan"])
    with pytest.raises(SystemExit, match="min_ratio must be a positive finite number"):
        main(["ablate", "--model", model, "--min-ratio", "-5"])
    with pytest.raises(SystemExit, match="min_value"):
        main(["report", "--model", model, "--min-value", "inf", "-o", str(tmp_path / "r.html")])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["scan", "--model", model, "--json", str(tmp_path / "missing" / "scan.json")])
    with pytest.raises(SystemExit, match="is a folder"):
        main(["ablate", "--model", model, "--prompts", str(prompts_file), "--json", str(tmp_path)])


def test_truncated_weights_are_one_clear_line(tmp_path, capsys):
    import shutil

    from massact_lens.examples import minilm_dir
    from massact_lens.models.checkpoints import CHECKPOINTS, load_checkpoint

    folders = {"checkpoint": tmp_path / "bb", "huggingface": tmp_path / "hf"}
    shutil.copytree(CHECKPOINTS / "default", folders["checkpoint"])
    shutil.copytree(minilm_dir(), folders["huggingface"])
    for folder in folders.values():
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or damaged"):
        load_checkpoint(folders["checkpoint"])
    for folder in folders.values():
        assert main(["scan", "--model", str(folder), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("massact: ") and "truncated or damaged" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_the_default_model_is_smollm2_with_the_papers_criterion(prompts_file, capsys, smollm2_model):
    assert main(["scan", "--prompts", str(prompts_file), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("massact scan: SmolLM2-135M-Instruct (bundled; weights dequantised from Q4_1")
    assert "criterion |x| > 100 and >= 1000x median" in out
    assert "dim 507: layers 11-" in out


def test_short_model_names_are_checked(tmp_path):
    with pytest.raises(SystemExit, match="no variants"):
        main(["scan", "--model", "minilm:big", "--quiet"])


@pytest.mark.slow
def test_torchrun_splits_the_scan_and_rank_0_writes_the_result(tmp_path, prompts_file):
    import os

    out = tmp_path / "scan.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "massact_lens", "scan", "--model", "minilm", "--prompts", str(prompts_file), "--quiet",
         "--json", str(out)],
        check=True, capture_output=True, text=True, timeout=300, env=env,
    )
    single = tmp_path / "single.json"
    assert main(["scan", "--model", "minilm", "--prompts", str(prompts_file), "--quiet", "--json", str(single)]) == 0
    a, b = json.loads(out.read_text()), json.loads(single.read_text())
    assert a["prompts"] == b["prompts"] == 3 and len(a["massive"]) == len(b["massive"]) > 0
    for x, y in zip(a["massive"], b["massive"], strict=True):  # other padding: float32's last bits differ
        assert {k: v for k, v in x.items() if k not in ("value", "ratio")} == {k: v for k, v in y.items() if k not in ("value", "ratio")}
        assert x["value"] == pytest.approx(y["value"], rel=1e-5) and x["ratio"] == pytest.approx(y["ratio"], rel=1e-4)


def test_a_prompts_file_that_is_not_utf8_is_named(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(SystemExit, match="latin1.txt' is not UTF-8"):
        main(["scan", "--model", "minilm", "--prompts", str(bad), "--quiet"])


def test_a_line_separator_inside_a_prompt_does_not_split_it(tmp_path, capsys):
    from massact_lens.cli._args import _prompts

    path = tmp_path / "prompts.txt"
    path.write_text("first part\u2028second part\nnext prompt\r\n", encoding="utf-8")
    assert _prompts(str(path)) == ["first part\u2028second part", "next prompt"]
