"""scan: recovery of planted massive activations, padding invariance, streaming, bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import massact_lens as ml
from massact_lens._core.batching import plan_batches
from massact_lens.examples import tiny_model


def test_planted_activation_is_recovered_exactly(planted, bos_tokens):
    result = ml.scan(planted, bos_tokens, progress=False)
    found = ml.find_massive(result)
    where = {(r.layer, r.position, r.dim) for r in found}
    assert where == {(1, 0, 5), (2, 0, 5), (3, 0, 5)}
    # every input, every layer from 1 on: one record each
    assert len(found) == bos_tokens.shape[0] * 3
    assert {r.input_index for r in found} == set(range(bos_tokens.shape[0]))
    layer1 = [r for r in found if r.layer == 1]
    assert all(abs(r.value - 1000.0) < 1e-2 for r in layer1)
    assert all(r.kind == "start" for r in found)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_clean_random_model_has_none(kind, bos_tokens):
    result = ml.scan(tiny_model(kind, n_layers=4), bos_tokens, progress=False)
    assert len(ml.find_massive(result)) == 0
    assert result.layer_stats()["ratio"].max() < 50


def test_topk_and_median_match_a_direct_computation(planted, bos_tokens):
    result = ml.scan(planted, bos_tokens[:3], top_k=4, progress=False)
    _, cache = planted.run_with_cache(bos_tokens[:3])
    for h, name in enumerate(result.hook_names):
        x = cache[name].float()
        for i in range(3):
            flat = x[i].flatten()
            expected = flat.abs().topk(4).values
            assert torch.allclose(result.values[i, h].abs(), expected, rtol=1e-5)
            assert torch.isclose(result.medians[i, h], flat.abs().median(), rtol=1e-5)
            # positions and dims point at the entries they claim
            for r in range(4):
                p, d = int(result.positions[i, h, r]), int(result.dims[i, h, r])
                assert float(x[i, p, d]) == pytest.approx(float(result.values[i, h, r]), rel=1e-6)
                assert int(result.token_ids[i, h, r]) == int(bos_tokens[i, p])


def test_padding_never_enters_a_statistic_tensor_input(planted):
    generator = torch.Generator().manual_seed(1)
    lengths = [12, 5, 9, 3]
    tokens = torch.randint(1, 64, (4, 12), generator=generator)
    tokens[:, 0] = 0
    mask = torch.zeros_like(tokens)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        tokens[i, n:] = 0  # padding with the BOS id: would be massive if it leaked in
    batched = ml.scan(planted, tokens, attention_mask=mask, progress=False)
    for i, n in enumerate(lengths):
        alone = ml.scan(planted, tokens[i : i + 1, :n], progress=False)
        assert torch.allclose(batched.values[i], alone.values[0], rtol=1e-4, atol=1e-5)
        assert torch.allclose(batched.medians[i], alone.medians[0], rtol=1e-4, atol=1e-6)
        assert torch.equal(batched.positions[i], alone.positions[0])
        assert int(batched.lengths[i]) == n
    assert int(batched.positions.max()) < max(lengths)
    found = ml.find_massive(batched)
    assert {r.position for r in found} == {0}


def test_padding_invariance_on_strings_real_model(minilm_model, sentences):
    texts = sentences[:6] + ["Hi.", "A much longer sentence that goes on and on for quite a while, then stops."]
    batched = ml.scan(minilm_model, texts, batch_size=8, progress=False)
    single = ml.scan(minilm_model, texts, batch_size=1, progress=False)
    assert torch.allclose(batched.values, single.values, rtol=1e-4, atol=1e-4)
    assert torch.allclose(batched.medians, single.medians, rtol=1e-4, atol=1e-5)
    assert torch.equal(batched.dims, single.dims)
    assert torch.equal(batched.lengths, single.lengths)


def test_streamed_batches_equal_a_list(minilm_model, sentences):
    whole = ml.scan(minilm_model, sentences, batch_size=4, progress=False)
    streamed = ml.scan(minilm_model, (sentences[i : i + 3] for i in range(0, 12, 3)), progress=False)
    assert streamed.n_inputs == 12
    assert torch.allclose(whole.values, streamed.values, rtol=1e-4, atol=1e-4)
    token_stream = ml.scan(minilm_model, iter([minilm_model.to_tokens(sentences[0])]), progress=False)
    assert token_stream.prepend_bos is None  # token tensors are used as given


def test_bos_is_explicit_and_recorded(minilm_model, sentences):
    with_bos = ml.scan(minilm_model, sentences[:3], prepend_bos=True, progress=False)
    without = ml.scan(minilm_model, sentences[:3], prepend_bos=False, progress=False)
    assert with_bos.prepend_bos is True and without.prepend_bos is False
    assert torch.equal(with_bos.lengths, without.lengths + 1)
    assert with_bos.token(int(with_bos.token_ids[0, 1, 0])) == "[CLS]"


def test_result_is_frozen_and_records_provenance(planted, bos_tokens):
    result = ml.scan(planted, bos_tokens, layers=[2, 3], progress=False)
    assert result.hook_names == ("blocks.2.hook_resid_post", "blocks.3.hook_resid_post")
    assert result.layers == (2, 3)
    assert result.provenance.n_layers == 4 and result.provenance.weights_processed is False
    assert result.provenance.dtype == "float32"
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.top_k = 3  # type: ignore[misc]


def test_what_is_kept_does_not_grow_with_sequence_length(planted):
    short = ml.scan(planted, torch.zeros(3, 4, dtype=torch.long), top_k=5, progress=False)
    long = ml.scan(planted, torch.zeros(3, 30, dtype=torch.long), top_k=5, progress=False)
    for field in ("values", "positions", "dims", "token_ids", "medians"):
        assert getattr(short, field).shape == getattr(long, field).shape


def test_layer_stats_are_means_over_inputs(planted, bos_tokens):
    result = ml.scan(planted, bos_tokens, progress=False)
    stats = result.layer_stats()
    assert list(stats["layer"]) == [0, 1, 2, 3]
    top1 = result.values[:, 1, 0].abs().mean()
    assert stats.loc[1, "top1"] == pytest.approx(float(top1), rel=1e-6)
    assert stats.loc[1, "median"] == pytest.approx(float(result.medians[:, 1].mean()), rel=1e-6)
    assert (stats["top1"] >= stats["top2"]).all() and (stats["top2"] >= stats["top3"]).all()
    table = result.to_dataframe()
    assert len(table) == 8 * 4 * 10


def test_custom_hooks_and_templates(planted, bos_tokens):
    result = ml.scan(planted, bos_tokens, hooks="blocks.{layer}.hook_resid_pre", progress=False)
    assert result.hook_names[0] == "blocks.0.hook_resid_pre"
    found = ml.find_massive(result)
    assert {r.layer for r in found} == {2, 3}  # resid_pre of block 2 = resid_post of block 1


def test_half_precision_statistics_are_float32(bos_tokens):
    model = tiny_model("gpt2", n_layers=2).to(torch.bfloat16)
    result = ml.scan(model, bos_tokens, progress=False)
    assert result.values.dtype == torch.float32 and result.medians.dtype == torch.float32
    assert result.provenance.dtype == "bfloat16"


class _ForwardCounter:
    def __init__(self, model):
        self.calls = 0
        self.handle = model.original_model.register_forward_pre_hook(self)

    def __call__(self, *args):
        self.calls += 1


@pytest.mark.parametrize(
    ("inputs", "kwargs", "message"),
    [
        ([], {}, "No inputs"),
        (torch.zeros(0, 5, dtype=torch.long), {}, "empty"),
        (torch.zeros(1, 40, dtype=torch.long), {}, "context of 32"),
        (torch.zeros(2, 4, dtype=torch.long), {"hooks": "blocks.0.hook_nope"}, "no hook point"),
        (torch.zeros(2, 4, dtype=torch.long), {"layers": [7]}, "do not exist"),
        (torch.zeros(2, 4, dtype=torch.long), {"top_k": 0}, "top_k"),
        (torch.full((2, 4), 99, dtype=torch.long), {}, "Token ids"),
        (["a string"], {}, "no tokenizer"),
        (torch.zeros(2, 4), {}, "integer ids"),
    ],
)
def test_bad_input_fails_before_any_forward_pass(inputs, kwargs, message, no_leftover_hooks):
    model = tiny_model("gpt2")
    no_leftover_hooks(model)
    counter = _ForwardCounter(model)
    with pytest.raises((ValueError, TypeError), match=message):
        ml.scan(model, inputs, progress=False, **kwargs)
    assert counter.calls == 0
    counter.handle.remove()
    no_leftover_hooks(model)


def test_no_hook_left_after_an_error_mid_scan(planted, bos_tokens, no_leftover_hooks):
    no_leftover_hooks(planted)

    def boom(activation, hook):
        raise RuntimeError("user hook failed")

    with pytest.raises(RuntimeError, match="user hook failed"), planted.hooks(fwd_hooks=[("blocks.2.hook_resid_post", boom)]):
        ml.scan(planted, bos_tokens, progress=False)
    no_leftover_hooks(planted)

    def batches():
        yield bos_tokens[:2]
        yield "not a batch of the right kind" if False else 42

    with pytest.raises(TypeError, match="Batch 2"):
        ml.scan(planted, batches(), progress=False)
    no_leftover_hooks(planted)


def test_scan_composes_with_a_users_own_hook(planted, bos_tokens):
    seen = []
    with planted.hooks(fwd_hooks=[("blocks.1.hook_resid_post", lambda x, hook: seen.append(x.shape))]):
        ml.scan(planted, bos_tokens, batch_size=4, progress=False)
    assert len(seen) == 2


def test_stopping_after_the_last_needed_layer_changes_nothing(minilm_model, sentences, no_leftover_hooks):
    no_leftover_hooks(minilm_model)
    full = ml.scan(minilm_model, sentences[:4], progress=False)
    early = ml.scan(minilm_model, sentences[:4], layers=[0, 1], progress=False)  # stops after block 1
    assert torch.equal(early.values, full.values[:, :4])
    assert torch.equal(early.medians, full.medians[:, :4])
    no_leftover_hooks(minilm_model)
    logits = minilm_model(minilm_model.to_tokens(sentences[0]))  # the model still runs whole afterwards
    assert logits.shape[-1] == minilm_model.cfg.d_vocab


def test_shapes_are_checked_at_run_time_in_the_suite():
    """pyproject's --jaxtyping-packages flag instruments massact_lens: a wrong shape is an error."""
    import jaxtyping

    from massact_lens._core.statistics import hidden_state_medians

    with pytest.raises(jaxtyping.TypeCheckError):
        hidden_state_medians(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool))  # needs [batch, pos, d_model]
    with pytest.raises(jaxtyping.TypeCheckError):
        hidden_state_medians(torch.ones(2, 3, 4), torch.ones(5, 3, dtype=torch.bool))  # batch sizes differ


def _mixed_lengths(sentences: list[str]) -> list[str]:
    """Inputs whose lengths differ a lot, in an order that no length sort keeps."""
    long = "A much longer sentence that goes on and on for quite a while, then stops at last."
    return [sentences[0], "Hi.", long, sentences[1], "Yes.", long + " " + sentences[2], sentences[3], "No."]


def test_longest_first_batches_give_the_same_result_in_input_order(minilm_model, sentences):
    texts = _mixed_lengths(sentences)
    plan = plan_batches(minilm_model, texts, batch_size=3, by_length=True)
    order = [i for b in plan.batches for i in b.input_indices]
    assert sorted(order) == list(range(len(texts))) and order != sorted(order)  # really reordered
    widths = [b.tokens.shape[1] for b in plan.batches]
    assert widths == sorted(widths, reverse=True)
    padded = sum(b.tokens.numel() for b in plan.batches)
    as_given = sum(b.tokens.numel() for b in plan_batches(minilm_model, texts, batch_size=3).batches)
    assert padded < as_given

    by_length = ml.scan(minilm_model, texts, batch_size=3, progress=False)
    as_given = ml.scan(minilm_model, texts, batch_size=3, by_length=False, progress=False)
    alone = ml.scan(minilm_model, texts, batch_size=1, progress=False)
    for other in (as_given, alone):
        assert torch.equal(by_length.lengths, other.lengths)
        assert torch.equal(by_length.positions, other.positions)
        assert torch.equal(by_length.dims, other.dims)
        assert torch.equal(by_length.token_ids, other.token_ids)
        assert torch.allclose(by_length.values, other.values, rtol=1e-4, atol=1e-4)
        assert torch.allclose(by_length.medians, other.medians, rtol=1e-4, atol=1e-5)


def test_longest_first_works_on_token_tensors_and_within_streamed_items(planted):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, planted.cfg.d_vocab, (7, 9), generator=gen)
    tokens[:, 0] = 0
    lengths = [3, 9, 5, 2, 9, 4, 7]
    mask = (torch.arange(9)[None] < torch.tensor(lengths)[:, None]).long()
    whole = ml.scan(planted, tokens, attention_mask=mask, batch_size=2, by_length=False, progress=False)
    for result in (
        ml.scan(planted, tokens, attention_mask=mask, batch_size=2, progress=False),
        ml.scan(planted, iter([(tokens[:4], mask[:4]), (tokens[4:], mask[4:])]), batch_size=2, progress=False),
    ):
        assert torch.equal(result.lengths, torch.tensor(lengths))
        assert torch.equal(result.positions, whole.positions) and torch.equal(result.dims, whole.dims)
        assert torch.allclose(result.values, whole.values, rtol=1e-5, atol=1e-4)
    streamed = plan_batches(planted, iter([(tokens[:4], mask[:4]), (tokens[4:], mask[4:])]), batch_size=2, by_length=True)
    assert [b.input_indices for b in streamed.batches] == [[1, 2], [0, 3], [4, 6], [5]]  # each item on its own


def test_longest_first_names_a_bad_input_by_its_own_index(minilm_model, sentences):
    texts = _mixed_lengths(sentences)
    texts[6] = " ".join(["word"] * 600)  # longer than MiniLM's 512 tokens, and the longest
    with pytest.raises(ValueError, match="Input 6 has"):
        ml.scan(minilm_model, texts, batch_size=3, progress=False)


class _Recorder:
    """A measurement riding on the scan's pass that notes which inputs each batch held."""

    needs_output = False
    reads_input_index = False

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def hooks(self, batch):
        return []

    def update(self, batch, output) -> None:
        self.seen.append(batch.input_indices)

    def result(self):
        return self.seen


class _IndexReader(_Recorder):
    reads_input_index = True


def test_a_rider_sees_inputs_in_order_unless_it_reads_input_index(minilm_model, sentences):
    from massact_lens._core.loop import measure, reads_input_index
    from massact_lens.find._scan_stats import scan_plan

    texts = _mixed_lengths(sentences)
    plain, reader = _Recorder(), _IndexReader()
    for rider in (plain, reader):
        statistics, plan = scan_plan(minilm_model, texts, batch_size=3, by_length=reads_input_index(rider))
        measure(minilm_model, plan, statistics, rider, progress=False)
        assert torch.equal(statistics.result().lengths, ml.scan(minilm_model, texts, progress=False).lengths)
    assert plain.seen == [[0, 1, 2], [3, 4, 5], [6, 7]]  # batch.start + r stays right for it
    order = [i for rows in reader.seen for i in rows]
    assert sorted(order) == list(range(len(texts))) and order != sorted(order)


def test_hooks_of_different_widths_in_one_scan_equal_scans_of_each(bos_tokens):
    """A scan groups same-shaped hidden states for its statistics: a hook of another
    width (the MLP's d_mlp) between them splits the group, and nothing changes."""
    from massact_lens.examples import tiny_model

    model = tiny_model()
    names = ["blocks.0.hook_resid_post", "blocks.1.mlp.in.hook_out", "blocks.1.hook_resid_post"]
    together = ml.scan(model, bos_tokens, hooks=names, batch_size=3, progress=False)
    for h, name in enumerate(names):
        alone = ml.scan(model, bos_tokens, hooks=[name], batch_size=3, progress=False)
        for field in ("values", "positions", "dims", "medians"):
            assert torch.equal(getattr(together, field)[:, h].nan_to_num(-1), getattr(alone, field)[:, 0].nan_to_num(-1))


def test_the_statistics_read_a_copy_taken_when_the_hook_fired():
    """A layer or hook writing into the hidden state in place after the reader returned
    changes nothing: a group's statistics run after its last member fired, on copies."""
    from massact_lens._core.batching import Batch
    from massact_lens.examples import tiny_model
    from massact_lens.find._scan_stats import ScanStatistics

    statistics = ScanStatistics(tiny_model(), ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], 2, None)
    batch = Batch(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long), 0)
    first, second = (fn for _, fn in statistics.hooks(batch))
    x = torch.tensor([[[1.0, -9.0], [3.0, 2.0]]])
    first(x)
    x.mul_(100.0)
    second(x.clone())
    statistics.update(batch, None)
    assert statistics.batch_stats[0][:, 0].tolist() == [[-9.0, 3.0]]


def test_a_hook_firing_twice_in_one_pass_is_an_error():
    from massact_lens._core.batching import Batch
    from massact_lens.examples import tiny_model
    from massact_lens.find._scan_stats import ScanStatistics

    statistics = ScanStatistics(tiny_model(), ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], 2, None)
    read, _ = (fn for _, fn in statistics.hooks(Batch(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long), 0)))
    read(torch.ones(1, 2, 3))
    with pytest.raises(RuntimeError, match="fired twice"):
        read(torch.ones(1, 2, 3))
