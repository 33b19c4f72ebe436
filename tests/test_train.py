"""Training, checkpoints, snapshots, and the shipped Bigram-Backcopy models' results table."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from massact_lens import examples
from massact_lens.cli import main
from massact_lens.models.attention_variants import SoftmaxOffByOne, gate_component
from massact_lens.models.checkpoints import CHECKPOINTS, VARIANTS, load_checkpoint
from massact_lens.models.explicit_bias import ExplicitAttentionBias, SinkToken, prefix_component
from massact_lens.training import (
    BigramBackcopy,
    TextFile,
    TrainConfig,
    results_table,
    scan_snapshots,
    task_metrics,
    train,
)

SMALL = BigramBackcopy(seq_len=16)


def test_bigram_backcopy_sequences_follow_the_rule():
    task = BigramBackcopy()
    sequences = task.sample(np.random.default_rng(0), 200)
    triggers = sequences[:, :-2] < task.n_triggers
    assert triggers.mean() > 0.2  # copies are frequent
    # after a trigger the next token copies the token before the trigger
    previous = sequences[:, :-2]
    following = sequences[:, 2:]
    at_trigger = sequences[:, 1:-1] < task.n_triggers
    assert np.array_equal(following[at_trigger], previous[at_trigger])
    assert not (sequences[:, 0] < task.n_triggers).any()
    # the Bayes-optimal loss is zero exactly at copies, positive elsewhere
    nll = task.optimal_nll(sequences)
    assert np.all(nll[:, 2:][at_trigger] == 0) and np.all(nll[:, 2:][~at_trigger] > 0)
    assert 1.5 < nll.mean() < 1.9


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "explicit_bias"
    config = TrainConfig(steps=40, batch_size=8, snapshot_every=20, eval_sequences=32)
    return train(SMALL, "explicit_bias", folder, train_config=config, progress=False)


def test_a_short_training_run_learns_and_writes_a_checkpoint(short_run):
    folder = short_run.directory
    assert short_run.steps == 40 and short_run.tokens == 40 * 8 * 16
    assert short_run.tokens_per_second > 0 and short_run.cpu_seconds > 0
    evaluation = short_run.evaluation
    assert evaluation.loss < math.log(69) - 0.5  # far below a uniform guess
    with open(f"{folder}/config.json") as handle:
        config = json.load(handle)
    assert config["variant"] == "explicit_bias" and config["placeholder_token"] == "<slot>"
    assert config["metrics"]["loss"] == pytest.approx(evaluation.loss)
    weights = load_file(f"{folder}/model.safetensors")
    assert {"massact_prefix.k", "massact_prefix.v"} <= set(weights)
    assert len(short_run.snapshots) == 3


def test_save_load_round_trip_gives_identical_logits(short_run):
    first = load_checkpoint(short_run.directory)
    second = load_checkpoint(short_run.directory)
    assert isinstance(prefix_component(first), ExplicitAttentionBias)
    tokens = first.to_tokens(["w7 w9 T1 w9", "w3 w4"])
    assert tokens[:, :2].tolist() == [[4, 1], [4, 1]]
    assert torch.equal(first(tokens, return_type="logits"), second(tokens, return_type="logits"))
    assert torch.equal(prefix_component(first).k, prefix_component(second).k)


def test_training_is_seeded(tmp_path):
    config = TrainConfig(steps=3, batch_size=4, eval_sequences=4)
    for name in ("a", "b"):
        train(SMALL, "sink_token", tmp_path / name, train_config=config, progress=False)
    first, second = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert first.keys() == second.keys() and "massact_prefix.embedding" in first
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_scan_snapshots_follows_training(short_run):
    snapshots = scan_snapshots(short_run.directory, n_sequences=4, progress=False)
    assert snapshots.steps == (0, 20, 40)
    frame = snapshots.to_dataframe()
    assert list(frame["step"].unique()) == [0, 20, 40]
    assert set(frame["layer"]) == {0, 1, 2}
    assert {"ratio", "top1_dim", "top1_position", "top1_token"} <= set(frame.columns)


def test_text_file_task(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat.\nthe dog sat on the log.\n" * 20)
    result = train(TextFile(str(text), seq_len=16), "default", tmp_path / "run",
                   train_config=TrainConfig(steps=3, batch_size=4, eval_sequences=4), progress=False)
    model = load_checkpoint(result.directory)
    assert model.to_str_tokens("cat.\n") == ["<s>", "c", "a", "t", ".", "\n"]
    assert math.isnan(result.evaluation.copy_accuracy)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="variant must be one of"):
        train(SMALL, "registers", tmp_path / "x", progress=False)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="snapshot"):
        scan_snapshots(CHECKPOINTS / "default", progress=False)
    with pytest.raises((ValueError, TypeError)):  # TypeError: the suite's runtime type check
        examples.bigram_backcopy("registers")


def test_command_line_table(short_run, capsys):
    assert main(["train", "table", short_run.directory, "--n-sequences", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| checkpoint | variant | layer | loss |")
    assert len(out.strip().splitlines()) == 2 + 3  # header, rule, one row per layer


# ---------------------------------------------------------------- shipped models


@pytest.fixture(scope="module")
def table():
    return results_table(n_sequences=256).set_index(["variant", "layer"])


def test_shipped_models_load_with_a_tokenizer_and_back_copy():
    for variant in VARIANTS:
        model = examples.bigram_backcopy(variant)
        component = prefix_component(model)
        expected = {"default": type(None), "sink_token": SinkToken, "explicit_bias": ExplicitAttentionBias,
                    "softmax1": SoftmaxOffByOne, "gated": type(None)}[variant]
        assert expected is type(component)
        assert (gate_component(model) is not None) == (variant == "gated")
        logits = model("w7 w9 T1")
        assert model.to_string(logits[0, -1].argmax()) == "w9"


def test_shipped_table_reproduces_the_recorded_losses(table):
    for variant in VARIANTS:
        recorded = json.loads((CHECKPOINTS / variant / "config.json").read_text())["metrics"]
        assert table.loc[(variant, 0), "loss"] == pytest.approx(recorded["loss"], abs=1e-5)
        assert table.loc[(variant, 0), "copy_accuracy"] == pytest.approx(recorded["copy_accuracy"], abs=1e-9)


def test_default_model_has_a_bos_peak_and_a_bos_sink(table):
    """Issue 3: >= 25x at one fixed dim in >= 95% of sequences, and a BOS sink >= 0.9."""
    default = table.loc["default"]
    peaked = default[default["bos_peak_fraction"] >= 0.95]
    assert len(peaked) > 0 and (peaked["bos_peak_ratio"] >= 25).all()
    assert (default["attn_bos"] >= 0.9).any()


def test_explicit_bias_takes_the_sink(table):
    """Issue 3: the attention non-trigger queries paid to BOS goes to the slot (>= 0.9).

    Checked in the layers where the default model has its BOS sink (attn_bos >= 0.9).
    """
    sink_layers = table.loc["default"].index[table.loc["default"]["attn_bos"] >= 0.9]
    explicit = table.loc["explicit_bias"]
    assert len(sink_layers) > 0
    assert (explicit.loc[sink_layers, "attn_prefix"] >= 0.9).all()
    assert (explicit.loc[sink_layers, "attn_bos"] <= 0.05).all()


@pytest.mark.xfail(
    strict=True,
    reason="Measured on the shipped model: BOS peak 12.5x after layer 0 (dim 25; 8.5x and 8.7x "
    "after layers 1 and 2), down from 27.8x in the default model but above issue 3's 10x.",
)
def test_explicit_bias_keeps_the_bos_peak_at_most_10x(table):
    assert (table.loc["explicit_bias"]["bos_peak_ratio"] <= 10).all()


def _sink_layers(table):
    """The layers where the default model's non-trigger queries attend to BOS (>= 0.9)."""
    default = table.loc["default"]
    return default.index[default["attn_bos"] >= 0.9]


def test_gating_removes_the_bos_peak_and_the_sink(table):
    """Issue 27: the gated model has no BOS peak (< 10x everywhere, 27.8x in the default) and its
    back-copy head, dormant on non-trigger queries, closes its gate there instead of attending to BOS."""
    gated = table.loc["gated"]
    assert (gated["bos_peak_ratio"] < 10).all() and (gated["bos_peak_fraction"] == 0).all()
    sink_layers = _sink_layers(table)
    assert len(sink_layers) > 0 and (gated.loc[sink_layers, "attn_bos"] <= 0.1).all()
    copy_layers = gated.index[gated["attn_prev_trigger"] >= 0.9]
    assert len(copy_layers) > 0
    assert (gated.loc[copy_layers, "gate_plain"] <= 0.01).all() and (gated.loc[copy_layers, "gate_trigger"] >= 0.9).all()


def test_softmax1_keeps_the_bos_peak_and_the_sink(table):
    """Issue 27, measured: the extra zero logit takes the attention of layer 2 but not the sink of
    the back-copy head, and the BOS peak stays (>= 25x at one dim in every sequence)."""
    softmax1 = table.loc["softmax1"]
    assert ((softmax1["bos_peak_ratio"] >= 25) & (softmax1["bos_peak_fraction"] == 1)).any()
    assert (softmax1.loc[_sink_layers(table), "attn_bos"] >= 0.9).all()
    assert (softmax1["attn_prefix"] >= 0.9).any()  # some layer does attend to nothing


def test_variants_reach_equal_loss(table):
    losses = table.xs(0, level="layer")["loss"]
    assert float(losses.max() - losses.min()) <= 0.01


def test_evaluate_refuses_a_task_that_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        task_metrics(examples.bigram_backcopy(), BigramBackcopy(seq_len=200), n_sequences=2)


# ---------------------------------------------------------------- layout: old names, no trainer in analysis

ROOT = Path(__file__).resolve().parents[1]


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_loading_and_analysis_never_import_the_trainer():
    code = (
        "import sys, massact_lens, massact_lens.examples, massact_lens.viz, massact_lens.cli.report, massact_lens.cli\n"
        "massact_lens.examples.bigram_backcopy()\n"
        "assert not [m for m in sys.modules if m.startswith('massact_lens.training')], sorted(sys.modules)\n"
    )
    done = _python("-c", code)
    assert done.returncode == 0, done.stderr


