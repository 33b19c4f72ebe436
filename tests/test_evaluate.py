"""Perplexity, embedding similarity and the Table-3 maker under hook lists."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import massact_lens as ml
from massact_lens import interventions as iv
from massact_lens.evaluate import (
    ablation_table,
    embedding_similarity,
    perplexity,
    sentence_embeddings,
)
from massact_lens.examples import minilm_dir, tiny_model
from massact_lens.examples.sentences import PARAPHRASE_PAIRS, SENTENCES

CORPUS = torch.randint(0, 64, (150,), generator=torch.Generator().manual_seed(0))


def manual_nll(model, stream, seq_len):
    """Mean next-token NLL over consecutive chunks, computed directly from the logits."""
    total, count = 0.0, 0
    for start in range(0, len(stream), seq_len):
        chunk = stream[start : start + seq_len][None]
        if chunk.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = model(chunk)
        total += float(F.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
    return total / count, count


def test_perplexity_matches_a_direct_computation_and_ignores_padding():
    model = tiny_model("llama")
    nll, count = manual_nll(model, CORPUS, 16)
    for batch_size in (1, 4):
        result = perplexity(model, CORPUS, seq_len=16, batch_size=batch_size, progress=False)
        assert result.n_tokens == count and result.n_chunks == 10  # 9 x 16 + one chunk of 6
        assert result.nll == pytest.approx(nll, rel=1e-5)
        assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    capped = perplexity(model, CORPUS, seq_len=16, max_tokens=40, progress=False)
    assert capped.n_tokens == 15 + 15 + 7
    assert result.provenance.model_name == model.cfg.model_name and result.provenance == ml.Provenance.of(model)  # (the 0.1 alias .model is gone)


def test_nan_and_infinite_perplexity_are_reported_not_raised(no_leftover_hooks):
    model = tiny_model()
    no_leftover_hooks(model)
    nan_hooks = [("blocks.0.hook_resid_post", lambda x, *, hook: x * float("nan"))]
    result = perplexity(model, CORPUS, seq_len=16, fwd_hooks=nan_hooks, progress=False)
    assert math.isnan(result.perplexity) and result.n_nonfinite == result.n_tokens and not result.finite
    huge = [("unembed.hook_out", lambda x, *, hook: x * 1e6)]
    result = perplexity(model, CORPUS, seq_len=16, fwd_hooks=huge, progress=False)
    assert result.perplexity == math.inf and result.n_nonfinite == 0 and math.isfinite(result.nll)
    no_leftover_hooks(model)


def test_planted_decoder_table_zero_changes_mean_is_exact(planted, bos_tokens):
    prof = ml.profile(planted, bos_tokens, progress=False)
    corpus = torch.randint(1, 64, (8, 11), generator=torch.Generator().manual_seed(3))
    corpus = torch.cat([torch.zeros(8, 1, dtype=torch.long), corpus], dim=1)  # planted token starts every chunk
    extra = {"scaled x2": iv.edit_hooks(planted, iv.scale_hook(2.0, dims=[5], positions=iv.start_token()), layers=[1])}
    table = ablation_table(planted, prof, corpus=corpus, seq_len=12, settings=extra, progress=False)
    frame = table.to_dataframe()
    assert list(frame.index) == ["Original", "Set to zero", "Set to mean", "scaled x2"]
    assert list(frame.columns) == ["perplexity"]
    values = frame["perplexity"]
    # in a causal model the start token's state is the same in every input: its mean is itself
    assert values["Set to mean"] == pytest.approx(values["Original"], rel=1e-5)
    assert abs(values["Set to zero"] - values["Original"]) > 1e-3
    assert table.hook_names["Set to zero"] == ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post", "blocks.3.hook_resid_post")
    assert table.to_markdown().splitlines()[0] == "| setting | perplexity |"


@pytest.fixture(scope="module")
def text_decoder(tmp_path_factory):
    """A tiny random HF GPT-2 with MiniLM's tokenizer (BOS = [CLS])."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return ml.load_model(folder)


def test_text_corpus_from_a_list_or_a_file_streams_the_same_tokens(text_decoder, tmp_path):
    texts = list(SENTENCES[:12])
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(texts), encoding="utf-8")
    from_list = perplexity(text_decoder, texts, seq_len=32, batch_size=3, progress=False)
    from_file = perplexity(text_decoder, path, seq_len=32, batch_size=3, progress=False)
    assert from_list.prepend_bos and from_list.n_tokens == from_file.n_tokens
    assert from_list.nll == pytest.approx(from_file.nll, rel=1e-6)
    ids = text_decoder.tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    full, rest = divmod(len(ids), 31)  # 31 corpus tokens + BOS per chunk
    assert from_list.n_chunks == full + (rest > 0)
    assert from_list.n_tokens == full * 31 + rest


def test_bad_input_is_refused_before_running(minilm_model, text_decoder, tmp_path):
    with pytest.raises(ValueError, match="causal"):
        perplexity(minilm_model, ["A sentence."], progress=False)
    with pytest.raises(ValueError, match="seq_len must be"):
        perplexity(text_decoder, ["A sentence."], seq_len=65, progress=False)
    with pytest.raises(ValueError, match="no hook point"):
        perplexity(text_decoder, ["A sentence."], fwd_hooks=[("blocks.9.hook_resid_post", lambda x, *, hook: x)], progress=False)
    with pytest.raises(FileNotFoundError, match="No corpus file"):
        perplexity(text_decoder, str(tmp_path / "missing.txt"), progress=False)
    with pytest.raises(ValueError, match="cannot read text|fewer than 2 tokens|unreachable|failed"):
        perplexity(text_decoder, "surely_not_a_dataset_name_xyz", progress=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        perplexity(tiny_model(), ["text"], progress=False)
    with pytest.raises(ValueError, match="integer ids"):
        perplexity(tiny_model(), torch.ones(50, dtype=torch.bool), progress=False)
    with pytest.raises(ValueError, match="needs a profile"):
        ablation_table(minilm_model, None, modes=("mean",), progress=False)
    with pytest.raises(ValueError, match="corpus"):
        ablation_table(text_decoder, None, modes=(), progress=False)
    with pytest.raises(ValueError, match="Perplexity needs a causal LM"):
        ablation_table(minilm_model, None, corpus=["x"], modes=(), progress=False)


def test_embedding_similarity_without_hooks_is_one(minilm_model):
    result = embedding_similarity(minilm_model, list(SENTENCES[:5]), pairs=list(PARAPHRASE_PAIRS[:3]))
    assert result.mean_cosine == pytest.approx(1.0, abs=1e-6)
    assert result.pair_cosines == pytest.approx(result.pair_cosines_original, abs=1e-6)
    assert 0.3 < result.pair_cosine < 1.0
    assert len(result.to_dataframe()) == 5


@pytest.mark.slow
def test_minilm_table_reproduces_zero_vs_mean(minilm_model):
    """The README's table: 40 sentences, 20 paraphrase pairs (the defaults for an encoder)."""
    prof = ml.profile(minilm_model, list(SENTENCES), min_value=50, min_ratio=200, batch_size=40, progress=False)
    table = ablation_table(minilm_model, prof, batch_size=40, progress=False)
    frame = table.to_dataframe()
    assert list(frame.columns) == ["cosine to original", "paraphrase cosine"]
    assert frame.loc["Original", "cosine to original"] == pytest.approx(1.0, abs=1e-6)
    assert frame.loc["Set to zero", "cosine to original"] <= 0.8
    assert frame.loc["Set to mean", "cosine to original"] >= 0.99
    original_pairs = frame.loc["Original", "paraphrase cosine"]
    assert frame.loc["Set to zero", "paraphrase cosine"] < original_pairs - 0.05
    assert frame.loc["Set to mean", "paraphrase cosine"] == pytest.approx(original_pairs, abs=1e-3)
    emb = sentence_embeddings(minilm_model, ["One.", "Two words."])
    assert emb.shape == (2, 384)


def test_text_given_as_a_string_is_refused_with_what_to_do():
    from massact_lens.examples import bigram_backcopy

    model = bigram_backcopy("default")
    with pytest.raises(ValueError, match=r"list of strings: perplexity\(model, \[text\]\)"):
        perplexity(model, "It was the best of times, it was the worst of times. " * 20, progress=False)


def test_ablation_table_passes_prepend_bos_to_perplexity():
    from massact_lens.evaluate import ablation_table
    from massact_lens.examples import bigram_backcopy

    model = bigram_backcopy("default")
    text = ["w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12"]
    counts = {}
    for bos in (True, False):
        table = ablation_table(model, None, corpus=text, modes=(), settings={"No edit": []}, prepend_bos=bos, seq_len=32, progress=False)
        counts[bos] = table.details["Original"]["perplexity"].n_tokens
    assert counts[True] == counts[False] + 1  # the start token adds one predicted position


def test_first_layer_means_where_most_inputs_have_it():
    from massact_lens.find.criterion import DimSummary

    summary = DimSummary(dim=5, first_layer=2, last_layer=9, hook_names=("b2", "b5", "b9"), kinds={"start": 12},
                         tokens={"<s>": 12}, input_fraction=1.0, max_abs_value=1e4, max_ratio=1e4,
                         hook_inputs={"b2": 2, "b5": 10, "b9": 10})
    assert summary.first_hook(10) == "b5"  # a build-up in 2 of 10 inputs at b2 is not where it appears
    assert dataclasses.replace(summary, hook_inputs={}).first_hook(10) == "b2"  # profiles from 0.1
