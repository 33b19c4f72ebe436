"""The per-hidden-state statistics: exact medians and top-k, padding, NaN, fast attention."""

from __future__ import annotations

import pytest
import torch

import massact_lens as ml
from massact_lens._core.fast_paths import attention_implementation
from massact_lens._core.statistics import hidden_state_medians, hidden_state_stats, lower_medians
from massact_lens.examples import tiny_model


def _reference(x: torch.Tensor, lengths: list[int], k: int):
    out = []
    for row, n in enumerate(lengths):
        real = x[row, :n].float()
        mags = real.abs().flatten()
        top = mags.topk(min(k, mags.numel()))
        out.append((real.flatten()[top.indices], top.indices // x.shape[-1], top.indices % x.shape[-1], mags.median()))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_stats_equal_torch_median_and_topk_with_uneven_padding(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, pos, d = 6, 7, 5
    x = torch.randn(batch, pos, d, generator=gen) * 3
    lengths = torch.randint(1, pos + 1, (batch,), generator=gen).tolist()
    real = torch.arange(pos)[None] < torch.tensor(lengths)[:, None]
    x[~real] = 1e6  # padding must never enter a statistic
    stats = hidden_state_stats(x, real, top_k=4)
    for row, (values, positions, dims, median) in enumerate(_reference(x, lengths, 4)):
        n = values.numel()
        torch.testing.assert_close(stats.values[row, :n], values)
        assert stats.positions[row, :n].tolist() == positions.tolist()
        assert stats.dims[row, :n].tolist() == dims.tolist()
        assert float(stats.medians[row]) == float(median)  # exact: the same lower median
    torch.testing.assert_close(hidden_state_medians(x, real), stats.medians)


def test_fewer_entries_than_top_k_are_nan_and_minus_one():
    x = torch.ones(2, 1, 2)
    stats = hidden_state_stats(x, torch.tensor([[True], [False]]), top_k=3)
    assert torch.isnan(stats.values[0, 2]) and stats.positions[0, 2] == -1 and stats.dims[0, 2] == -1
    assert torch.isnan(stats.values[1]).all() and torch.isnan(stats.medians[1])


def test_a_mask_that_is_not_right_padding_gives_the_same_numbers():
    x = torch.randn(2, 5, 3)
    left = torch.tensor([[False, True, True, True, True], [True, True, True, True, True]])
    shifted = torch.cat([x[:1, 1:], x[:1, :1]], dim=1)
    right = torch.tensor([[True, True, True, True, False]])
    a = hidden_state_stats(x, left, top_k=3)
    b = hidden_state_stats(shifted, right, top_k=3)
    assert float(a.medians[0]) == float(b.medians[0])
    torch.testing.assert_close(a.values[0], b.values[0])
    assert (a.positions[0] - 1).tolist() == b.positions[0].tolist()


def test_lower_medians_is_exact_for_even_and_odd_counts():
    m = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 0.0], [9.0, 8.0, 7.0, 6.0, 5.0, 0.0]])
    assert lower_medians(m.clone(), torch.tensor([4, 5])).tolist() == [2.0, 7.0]


def test_nan_in_a_hidden_state_is_flagged_and_warned():
    model = tiny_model()
    tokens = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(0))

    def poison(x, hook):
        x = x.clone()
        x[1, 2, 0] = float("nan")  # input 1 only, as an upstream user hook might
        return x

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", poison)]), pytest.warns(RuntimeWarning, match="input 1 at blocks.0"):
        result = ml.scan(model, tokens, progress=False)
    # the NaN flows on down input 1's residual stream; the other inputs stay clean
    assert result.nonfinite_states() == [(1, "blocks.0.hook_resid_post"), (1, "blocks.1.hook_resid_post")]
    assert torch.isnan(result.medians[1, 0]) and not torch.isnan(result.medians[0, 0])
    stats = result.layer_stats()
    assert stats.loc[0, "n_nonfinite"] == 1 and stats.loc[0, "n_inputs"] == 2
    assert all(stats[["top1", "median", "ratio"]].notna().all())
    with pytest.warns(RuntimeWarning, match="NaN or infinite"):
        ml.find_massive(result, 1.0, 2.0)


def test_attention_implementation_is_restored_after_an_error(minilm_model):
    config = minilm_model.original_model.config
    with pytest.raises(RuntimeError), attention_implementation(minilm_model, "sdpa"):
        assert config._attn_implementation == "sdpa"
        raise RuntimeError("boom")
    assert config._attn_implementation == "eager"


def test_scan_with_fast_attention_matches_eager(minilm_model, monkeypatch):
    texts = ["The cat sat on the mat.", "Massive activations act as biases, and they are large."]
    fast = ml.scan(minilm_model, texts, progress=False)
    monkeypatch.setenv("MASSACT_LENS_EAGER", "1")
    eager = ml.scan(minilm_model, texts, progress=False)
    assert torch.equal(fast.positions, eager.positions) and torch.equal(fast.dims, eager.dims)
    torch.testing.assert_close(fast.values, eager.values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.medians, eager.medians, rtol=1e-4, atol=1e-5)


def test_float16_overflow_and_precision_are_reported():
    import warnings

    from massact_lens.find.precision import compare_precision
    from massact_lens.find.scan_result import check_range
    from massact_lens.models.planting import plant_massive_activation

    model = plant_massive_activation(tiny_model("llama", n_layers=3), layer=1, dim=5, value=20000.0)
    tokens = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 20,000 in float32: fits float16, no warning
        assert check_range(ml.scan(model, tokens, progress=False)) == pytest.approx(20000.0, rel=1e-3)
    big = plant_massive_activation(tiny_model("llama", n_layers=3), layer=1, dim=5, value=104000.0)
    with pytest.warns(RuntimeWarning, match="exceeds float16"):
        ml.scan(big, tokens, progress=False)
    half = plant_massive_activation(tiny_model("llama", n_layers=3), layer=1, dim=5, value=20000.0).to(torch.bfloat16)
    found = ml.find_massive(ml.scan(model, tokens, progress=False), 1000, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bfloat16 rounds 20,000 to a step of 128: under 1%
        frame = compare_precision(model, half, tokens, massive=found)
    assert set(frame.columns) >= {"float32", "bfloat16", "relative_difference"} and len(frame) == len(found)
    assert 0 < frame.relative_difference.max() < 0.01
    with pytest.warns(RuntimeWarning, match="moves by"):
        compare_precision(model, half, tokens, massive=found, tolerance=1e-6)


class _HostReads(torch.overrides.TorchFunctionMode):
    """Records every tensor -> Python read (each is a GPU synchronisation on a GPU)."""

    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_statistics_of_a_batch_read_nothing_back_per_hook(monkeypatch):
    """With the batch's layout made once on the host, a hook's statistics never read a
    tensor back (on a GPU: no synchronisation per hook). The device selection
    (kthvalue) runs on the CPU here in place of numpy's, and the device ranking (unique
    int64 keys) in place of the checked topk; both give the same numbers."""
    from massact_lens._core import statistics
    from massact_lens._core.selection import kth_on_device

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 9, 6, generator=gen)
    real = torch.arange(9)[None] < torch.tensor([9, 4, 7, 1, 9])[:, None]
    layout = statistics.RealLayout.of(real)
    on_host = hidden_state_stats(x, real, 4, layout)
    monkeypatch.setattr(statistics, "kth_smallest", kth_on_device)
    monkeypatch.setattr(statistics, "_canonical_topk", statistics._canonical_topk_on_device)
    monkeypatch.setattr(statistics, "_writable", lambda x: x)  # a device tensor's padding: torch's fill
    with _HostReads() as mode:
        on_device = hidden_state_stats(x, real, 4, layout)
    assert mode.reads == []
    for a, b in zip(on_host, on_device, strict=True):
        assert torch.equal(a, b) or torch.allclose(a, b, equal_nan=True)
    with _HostReads() as mode:
        hidden_state_stats(x, real, 4)  # without a layout it reads the mask
    assert mode.reads


@pytest.mark.parametrize("k", [2, 5])  # 2: ranked among the strongest positions; 5: every entry
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("left_padded", [False, True])
def test_grouped_stats_equal_one_call_per_hidden_state(left_padded, overwrite, k):
    """The statistics of several hooks' states in one call are those of one call each,
    to the bit: uneven and left padding, a NaN state, an empty row, top_k above the
    real entries of the shortest row; also when the call may overwrite the states
    (it then keeps only their signs: -0.0 and negative values come back as they were)."""
    from massact_lens._core.statistics import RealLayout, grouped_stats

    gen = torch.Generator().manual_seed(11)
    group, batch, pos, d = 4, 5, 6, 3
    states = torch.randn(group, batch, pos, d, generator=gen) * 5
    lengths = torch.tensor([6, 1, 4, 0, 3])
    real = torch.arange(pos)[None] < lengths[:, None]
    if left_padded:
        real = real.flip(1)
    states[2, 0, 1, 1] = float("nan")
    states[1, 1, -1 if left_padded else 0] = -0.0  # the one real position of input 1
    layout = RealLayout.of(real)
    together = grouped_stats(states.clone(), real, k, layout, overwrite=overwrite)
    for g in range(group):
        alone = hidden_state_stats(states[g].clone(), real, k)
        for a, b in zip(alone, (field[g] for field in together), strict=True):
            assert torch.equal(a.nan_to_num(-7.0) if a.is_floating_point() else a,
                               b.nan_to_num(-7.0) if b.is_floating_point() else b)
            if a.is_floating_point():  # the sign bit too (-0.0)
                assert torch.equal(torch.signbit(a.nan_to_num(-7.0)), torch.signbit(b.nan_to_num(-7.0)))
    assert together.nonfinite[2, 0] and torch.isnan(together.medians[:, 3]).all()
    assert (together.positions[:, 1, 3:] == -1).all()  # one real position of 3 dims: 3 entries
    assert (together.positions[:, 1, :1] == (5 if left_padded else 0)).all()


@pytest.mark.parametrize("k", [1, 5])
def test_a_strided_activation_gives_the_numbers_of_its_contiguous_copy(k):
    """A hook point whose tensor is a transposed view (a model working in [pos, batch, d]):
    the statistics read it as it is (they once failed on .view of a strided tensor)."""
    from massact_lens._core.statistics import grouped_stats

    gen = torch.Generator().manual_seed(5)
    strided = torch.randn(4, 3, 6, generator=gen).transpose(0, 1)  # [batch 3, pos 4, d 6]
    real = torch.arange(4)[None] < torch.tensor([4, 2, 3])[:, None]
    for got, want in zip(hidden_state_stats(strided, real, k), hidden_state_stats(strided.contiguous(), real, k),
                         strict=True):
        assert torch.equal(got, want)
    grouped = grouped_stats(strided[None], real, k)
    assert torch.equal(grouped.values[0], hidden_state_stats(strided.contiguous(), real, k).values)


@pytest.mark.parametrize(("pos", "d"), [(13, 384), (12, 576), (1, 384), (40, 576), (500, 64)])
@pytest.mark.parametrize("left_padded", [False, True])
@pytest.mark.parametrize("batch", [5, 40])
def test_top_entries_are_those_of_ranking_every_entry_at_real_widths(pos, d, left_padded, batch):
    """At MiniLM's and SmolLM2's widths, short and long states, one hook's rows and a
    group's: the k first entries in the canonical order are those that ranking every
    entry's unique key gives, with a massive entry, ties in |x| across positions, a dim
    equal across positions and uneven padding."""
    from massact_lens._core import statistics

    gen = torch.Generator().manual_seed(pos * d)
    k = 10
    x = torch.randn(batch, pos, d, generator=gen)
    x[:, 0, 7] = 900.0  # a massive entry on the first token
    x[1, -1, 3] = x[1, 0, 5] = -4.5  # ties in |x| at two positions
    x[2, :, 100 % d] = 6.0  # a dim equal across positions
    lengths = torch.tensor([pos, max(1, pos // 2), pos, 1, max(1, pos - 3)]).repeat(batch // 5)
    real = torch.arange(pos)[None] < lengths[:, None]
    if left_padded:
        real = real.flip(1)
    got = hidden_state_stats(x, real, k)
    magnitude = x.abs().masked_fill(~real[..., None], -1.0).reshape(batch, pos * d)
    index = statistics._order_keys(magnitude, torch.arange(pos * d), pos * d).topk(min(k, pos * d), dim=1).indices
    assert torch.equal(got.positions.long(), index // d)
    assert torch.equal(got.dims.long(), index % d)
    assert torch.equal(got.values, x.reshape(batch, -1).gather(1, index))


def _canonical_reference(x: torch.Tensor, real: torch.Tensor, k: int) -> tuple[list, list]:
    """Per state: the k first entries as (position, dim) in descending |x|, equal
    magnitudes by position then dim, NaN as +inf; and their signed values."""
    where, values = [], []
    for i in range(x.shape[0]):
        entries = [
            (p, j) for p in range(x.shape[1]) if bool(real[i, p]) for j in range(x.shape[2])
        ]

        def key(e, row=x[i]):
            m = abs(float(row[e[0], e[1]]))
            return (-(float("inf") if m != m else m), e[0], e[1])

        first = sorted(entries, key=key)[:k]
        where.append(first)
        values.append([float(x[i, p, j]) for p, j in first])
    return where, values


@pytest.mark.parametrize("k", [3, 12])  # 3: ranked among the 3 strongest positions; 12: every entry ranked
@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("left_padded", [False, True])
def test_equal_magnitudes_come_in_position_then_dim_order(monkeypatch, left_padded, on_device, k):
    """Ties in |x| (common in bfloat16) are recorded in one canonical order, the lower
    position then the lower dim first, whatever torch.topk would pick: checked against
    a sort of every entry, with signs, zeros of both signs, an infinity, a NaN, an
    empty state and k above a short state's entries; the same with the device ranking."""
    from massact_lens._core import statistics

    if on_device:
        monkeypatch.setattr(statistics, "_canonical_topk", statistics._canonical_topk_on_device)
    gen = torch.Generator().manual_seed(2)
    batch, pos, d = 6, 9, 7
    levels = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.0, -3.0, 3.0])
    x = levels[torch.randint(0, len(levels), (batch, pos, d), generator=gen)]
    x[1, 2, 3], x[1, 5, 0] = float("inf"), float("-inf")
    x[4, 3, 6] = float("nan")
    lengths = torch.tensor([9, 6, 1, 0, 9, 4])
    real = torch.arange(pos)[None] < lengths[:, None]
    if left_padded:
        real = real.flip(1)
    stats = hidden_state_stats(x, real, k)
    where, values = _canonical_reference(x, real, k)
    for i in range(batch):
        n = len(where[i])
        assert [(int(p), int(j)) for p, j in zip(stats.positions[i, :n], stats.dims[i, :n], strict=True)] == where[i]
        got = stats.values[i, :n]
        want = torch.tensor(values[i])
        assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))
        assert torch.equal(torch.signbit(got), torch.signbit(want))  # -0.0 kept
        assert (stats.positions[i, n:] == -1).all() and torch.isnan(stats.values[i, n:]).all()
    assert stats.nonfinite.tolist() == [False, True, False, False, True, False]


@pytest.mark.parametrize("k", [2, 3, 10])  # 3: every entry ranked alone, only 3 positions' in the wide batch
def test_records_do_not_depend_on_the_batch_they_were_padded_in(k):
    """The same state gives the same records alone and in a wider batch (more padding,
    another batch shape), with ties among its largest entries."""
    gen = torch.Generator().manual_seed(4)
    state = torch.randint(-2, 3, (5, 8), generator=gen).float() * 10
    alone = hidden_state_stats(state[None], torch.ones(1, 5, dtype=torch.bool), k)
    wide = torch.randn(3, 11, 8, generator=gen) * 10
    wide[1, :5] = state
    real = torch.arange(11)[None] < torch.tensor([11, 5, 7])[:, None]
    padded = hidden_state_stats(wide, real, k)
    for a, b in zip(alone, padded, strict=True):
        assert torch.equal(a[0], b[1])


def test_an_expanded_state_and_top_k_zero():
    """An expanded (overlapping) state with overwrite=True is not written in place;
    top_k=0 is refused (it once returned a finite median for a state holding inf)."""
    from massact_lens._core.statistics import grouped_stats

    expanded = torch.randn(1, 2, 1, 4, generator=torch.Generator().manual_seed(1)).expand(1, 2, 3, 4)
    got = grouped_stats(expanded, torch.ones(2, 3, dtype=torch.bool), 3, overwrite=True)
    want = grouped_stats(expanded.contiguous(), torch.ones(2, 3, dtype=torch.bool), 3)
    assert torch.equal(got.values, want.values) and torch.equal(got.medians, want.medians)
    with pytest.raises(ValueError, match="top_k"):
        hidden_state_stats(torch.tensor([[[1.0, float("inf")], [2.0, 3.0]]]), torch.ones(1, 2, dtype=torch.bool), 0)
