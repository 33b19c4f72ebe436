"""Merging results, and data-parallel scans on 2 gloo processes: identical to one process."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import massact_lens as ml
from massact_lens.distributed import run_distributed, shard
from massact_lens.examples import minilm, tiny_model
from massact_lens.find.profiles import MassiveProfile
from massact_lens.find.scanner import ScanResult
from massact_lens.models.planting import plant_massive_activation


def _planted(seed: int = 0):
    return plant_massive_activation(tiny_model("llama", n_layers=3, seed=seed), layer=1, dim=5, value=1000.0)


def _tokens(n: int) -> torch.Tensor:
    tokens = torch.randint(1, 64, (n, 9), generator=torch.Generator().manual_seed(n))
    tokens[:, 0] = 0
    return tokens


def _assert_same_scan(a: ScanResult, b: ScanResult) -> None:
    for name in ("values", "positions", "dims", "token_ids", "medians", "lengths", "nonfinite"):
        assert torch.equal(getattr(a, name), getattr(b, name)) or torch.allclose(
            getattr(a, name), getattr(b, name), equal_nan=True, rtol=0, atol=0
        ), name
    assert a.hook_names == b.hook_names and a.provenance == b.provenance and a.tokens == b.tokens


def _assert_same_profile(a: MassiveProfile, b: MassiveProfile) -> None:
    assert a.n_inputs == b.n_inputs and a.hook_names == b.hook_names
    assert [(d.dim, d.hook_names, d.kinds, d.tokens, d.input_fraction) for d in a.dims] == [
        (d.dim, d.hook_names, d.kinds, d.tokens, d.input_fraction) for d in b.dims
    ]
    for x, y in zip(a.dims, b.dims, strict=True):
        assert x.max_abs_value == pytest.approx(y.max_abs_value, rel=1e-6) and x.max_ratio == pytest.approx(y.max_ratio, rel=1e-5)
    assert [(s.hook_name, s.dim, s.kind, s.count) for s in a.stats] == [(s.hook_name, s.dim, s.kind, s.count) for s in b.stats]
    # The merge itself is exact; the values differ in float32's last bits because another
    # batch composition pads to other lengths inside the forward pass.
    for x, y in zip(a.stats, b.stats, strict=True):
        assert x.mean == pytest.approx(y.mean, rel=1e-6) and x.std == pytest.approx(y.std, rel=1e-4, abs=1e-6)


def test_merge_of_slices_equals_one_scan():
    model, tokens = _planted(), _tokens(7)
    whole = ml.scan(model, tokens, progress=False)
    parts = [ml.scan(model, tokens[s.start : s.stop], progress=False) for s in (range(0, 3), range(3, 7))]
    empty = ScanResult.empty(whole.provenance, whole.hook_names, whole.top_k, whole.prepend_bos)
    _assert_same_scan(ScanResult.merge([parts[0], empty, parts[1]]), whole)


def test_merge_refuses_mismatched_parts():
    model, tokens = _planted(), _tokens(4)
    a = ml.scan(model, tokens, progress=False)
    with pytest.raises(ValueError, match="top_k"):
        ScanResult.merge([a, ml.scan(model, tokens, top_k=3, progress=False)])
    with pytest.raises(ValueError, match="hook_names"):
        ScanResult.merge([a, ml.scan(model, tokens, layers=[0], progress=False)])
    with pytest.raises(ValueError, match="different models"):
        ScanResult.merge([a, ml.scan(tiny_model("gpt2", n_layers=3), tokens, progress=False)])
    with pytest.raises(ValueError, match="at least one"):
        ScanResult.merge([])


def test_profile_merge_equals_one_profile(minilm_model, sentences):
    kwargs = dict(min_value=50, min_ratio=200, progress=False)
    whole = ml.profile(minilm_model, sentences, **kwargs)
    merged = MassiveProfile.merge([ml.profile(minilm_model, sentences[:5], **kwargs), ml.profile(minilm_model, sentences[5:], **kwargs)])
    _assert_same_profile(merged, whole)
    with pytest.raises(ValueError, match="min_ratio"):
        MassiveProfile.merge([whole, ml.profile(minilm_model, sentences[:2], min_value=50, min_ratio=100, progress=False)])


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    results: dict[str, object] = {}
    try:
        model = _planted()
        results["uneven"] = run_distributed(ml.scan, model, _tokens(5), top_k=4)  # 3 + 2 inputs
        results["one_input"] = run_distributed(ml.scan, model, _tokens(1), top_k=4)  # rank 1 has none
        results["profile"] = run_distributed(ml.profile, minilm(), [
            "The cat sat on the mat.", "Paris is the capital of France.", "Please close the door.",
        ], min_value=50, min_ratio=200)
        try:
            run_distributed(ml.scan, _planted(seed=rank), _tokens(4))  # ranks load different weights
            results["disagree"] = "no error"
        except ValueError as error:
            results["disagree"] = str(error)
    finally:
        dist.destroy_process_group()
    with open(f"{out}.{rank}", "wb") as handle:
        pickle.dump(results, handle)


@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_result(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "result")
    mp.start_processes(_worker, args=(2, init, out), nprocs=2, start_method="spawn", join=True)
    ranks = []
    for rank in range(2):
        with open(f"{out}.{rank}", "rb") as handle:
            ranks.append(pickle.load(handle))
    assert ranks[1]["uneven"] is None and ranks[1]["profile"] is None  # only dst gets the result
    model = _planted()
    _assert_same_scan(ranks[0]["uneven"], ml.scan(model, _tokens(5), top_k=4, progress=False))
    _assert_same_scan(ranks[0]["one_input"], ml.scan(model, _tokens(1), top_k=4, progress=False))
    single = ml.profile(minilm(), ["The cat sat on the mat.", "Paris is the capital of France.", "Please close the door."],
                        min_value=50, min_ratio=200, progress=False)
    _assert_same_profile(ranks[0]["profile"], single)
    for rank in range(2):  # both ranks refuse, before scanning
        assert "disagree on ['weights']" in ranks[rank]["disagree"]


def test_shard_covers_the_corpus_once():
    for n in range(0, 9):
        for world in range(1, 5):
            covered = [i for r in range(world) for i in shard(n, r, world)]
            assert covered == list(range(n))


def test_distributed_scan_without_a_process_group_says_what_to_do():
    assert not (dist.is_available() and dist.is_initialized())
    with pytest.raises(RuntimeError, match="torchrun"):
        run_distributed(ml.scan, tiny_model(), _tokens(2))
    assert os.environ.get("RANK") is None
