"""find_massive and profile: the criterion, records, cross-input profiles, JSON."""

from __future__ import annotations

import math

import pytest

import massact_lens as ml
from massact_lens.find.criterion import DELIMITERS, token_kind


def test_thresholds_are_applied_both_ways(planted, bos_tokens):
    result = ml.scan(planted, bos_tokens, progress=False)
    assert len(ml.find_massive(result, min_value=2000.0)) == 0  # value ~1000 < 2000
    ratio = min(r.ratio for r in ml.find_massive(result))
    assert len(ml.find_massive(result, min_ratio=ratio * 1.01)) < len(ml.find_massive(result))
    loose = ml.find_massive(result, min_value=0.5, min_ratio=2)
    assert len(loose) > len(ml.find_massive(result))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_thresholds_must_be_positive(planted, bos_tokens, bad):
    result = ml.scan(planted, bos_tokens[:1], progress=False)
    with pytest.raises(ValueError, match="positive finite"):
        ml.find_massive(result, min_value=bad)
    with pytest.raises(ValueError, match="positive finite"):
        ml.find_massive(result, min_ratio=bad)
    with pytest.raises(ValueError, match="positive finite"):
        ml.profile(planted, bos_tokens[:1], min_ratio=bad, progress=False)


def test_warns_when_every_kept_entry_is_massive(planted, bos_tokens):
    result = ml.scan(planted, bos_tokens, top_k=1, progress=False)
    with pytest.warns(UserWarning, match="larger top_k"):
        ml.find_massive(result)


def test_records_and_table(planted, bos_tokens):
    found = ml.find_massive(ml.scan(planted, bos_tokens, progress=False))
    table = found.to_dataframe()
    assert list(table.columns) == ["layer", "hook_name", "input_index", "position", "token", "dim", "value", "ratio", "kind",
                                   "channel_wide"]
    assert not table["channel_wide"].any() and found.channel_wide == ()  # a planted BOS activation: token-sparse
    assert found.massive_dims == (5,)
    record = found[0]
    assert record.hook_name == f"blocks.{record.layer}.hook_resid_post"
    assert record.token == "0"  # no tokenizer: the id as text
    assert record.ratio == pytest.approx(abs(record.value) / float(found.scan.medians[record.input_index, record.layer]))


def test_token_kinds():
    assert token_kind(0, "anything") == "start"
    for delimiter in (".", " .", "\n", "Ċ\n".strip("Ċ"), ",", "\n\n"):
        assert token_kind(3, delimiter) == "delimiter", delimiter
    for other in (" and", " of", "[SEP]", " "):
        assert token_kind(3, other) == "other", other
    assert token_kind(3, "--", delimiters=DELIMITERS | {"--"}) == "delimiter"


def test_profile_of_a_planted_activation(planted, bos_tokens):
    prof = ml.profile(planted, bos_tokens, progress=False)
    assert prof.massive_dims == (5,)
    (dim,) = prof.dims
    assert (dim.first_layer, dim.last_layer) == (1, 3)
    assert dim.kinds == {"start": 3 * 8}
    assert dim.input_fraction == 1.0
    stats = prof.to_dataframe().set_index("layer")
    assert stats.loc[1, "mean"] == pytest.approx(1000.0, abs=1e-2)
    # causal model: the BOS state is the same for every input, so its spread is ~0
    assert stats.loc[1, "cv"] < 1e-5
    assert set(stats.index) == {0, 1, 2, 3}  # followed at every scanned hook
    assert stats.loc[0, "mean"] == pytest.approx(0.0, abs=5.0)
    assert prof.mean_value("blocks.2.hook_resid_post", 5, "start") == pytest.approx(stats.loc[2, "mean"])
    with pytest.raises(KeyError):
        prof.mean_value("blocks.2.hook_resid_post", 6, "start")


def test_profile_json_round_trip(planted, bos_tokens, tmp_path):
    prof = ml.profile(planted, bos_tokens, progress=False)
    path = tmp_path / "profile.json"
    prof.save(path)
    again = ml.MassiveProfile.load(path)
    assert again == prof
    assert not (tmp_path / "profile.json.tmp").exists()
    (tmp_path / "bad.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="Not a massact_lens profile"):
        ml.MassiveProfile.load(tmp_path / "bad.json")


def test_profile_reads_a_one_shot_iterator(planted, bos_tokens):
    """One pass: a stream of batches is enough (0.1 needed the inputs twice)."""
    streamed = ml.profile(planted, iter([bos_tokens[:3], bos_tokens[3:]]), min_value=50, min_ratio=100, progress=False)
    listed = ml.profile(planted, bos_tokens, min_value=50, min_ratio=100, progress=False)
    assert streamed.stats == listed.stats and streamed.dims == listed.dims


def test_profile_without_massive_activations_is_empty(bos_tokens):
    from massact_lens.examples import tiny_model

    prof = ml.profile(tiny_model(), bos_tokens, progress=False)
    assert prof.dims == () and prof.stats == ()
    assert math.isclose(prof.n_inputs, 8)
