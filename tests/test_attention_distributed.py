"""Attention measurements on 2 gloo processes: the merged result is the single-process one."""

from __future__ import annotations

import pickle

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from massact_lens.attention import attention_concentration, implicit_bias, token_features
from massact_lens.distributed import run_distributed
from massact_lens.examples import tiny_model


def _tokens(n: int) -> torch.Tensor:
    return torch.randint(1, 64, (n, 9), generator=torch.Generator().manual_seed(n))


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    results: dict[str, object] = {}
    try:
        model = tiny_model("llama", n_layers=2)
        results["bias"] = run_distributed(implicit_bias, model, _tokens(5), [0, 2], keep=4, batch_size=2)  # 3 + 2 inputs
        results["one_input"] = run_distributed(implicit_bias, model, _tokens(1), "start")  # rank 1 has none
        results["sinks"] = run_distributed(attention_concentration, model, _tokens(5), "start", keep=2, batch_size=2)
        results["features"] = run_distributed(token_features, model, _tokens(5), "start", batch_size=2)
        for name, call in (("disagree", lambda: run_distributed(implicit_bias, model, _tokens(4), [rank])),
                           ("per_input", lambda: run_distributed(implicit_bias, model, _tokens(4), torch.ones(4, 9, dtype=torch.bool)))):
            try:
                call()
                results[name] = "no error"
            except (ValueError, TypeError) as error:
                results[name] = str(error)
    finally:
        dist.destroy_process_group()
    with open(f"{out}.{rank}", "wb") as handle:
        pickle.dump(results, handle)


@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_attention_results(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "result")
    mp.start_processes(_worker, args=(2, init, out), nprocs=2, start_method="spawn", join=True)
    ranks = []
    for rank in range(2):
        with open(f"{out}.{rank}", "rb") as handle:
            ranks.append(pickle.load(handle))
    assert all(ranks[1][k] is None for k in ("bias", "one_input", "sinks", "features"))
    model = tiny_model("llama", n_layers=2)
    # Rank 0's slice (3 inputs, batches of 2 + 1) is batched like the single run's first 4 inputs
    # only up to float32 rounding, hence the tolerances.
    single = implicit_bias(model, _tokens(5), [0, 2], keep=4, batch_size=2, progress=False)
    merged = ranks[0]["bias"]
    assert (merged.n_inputs, merged.n_kept) == (5, 4)
    torch.testing.assert_close(merged.bias_z, single.bias_z, rtol=1e-5, atol=1e-6)
    for name in single.sums:
        torch.testing.assert_close(merged.sums[name], single.sums[name], rtol=1e-5, atol=1e-8)
    pd.testing.assert_frame_equal(merged.to_dataframe(), single.to_dataframe(), rtol=1e-4)
    assert ranks[0]["one_input"].n_inputs == 1
    sinks = attention_concentration(model, _tokens(5), "start", keep=2, progress=False)
    pd.testing.assert_frame_equal(ranks[0]["sinks"].layer_mass(), sinks.layer_mass(), rtol=1e-5)
    assert ranks[0]["sinks"].n_kept == 2
    features = token_features(model, _tokens(5), "start", progress=False)
    torch.testing.assert_close(ranks[0]["features"].value_norm, features.value_norm, rtol=1e-5, atol=1e-6)
    for rank in range(2):  # both ranks refuse, before any forward pass
        assert "disagree on ['positions']" in ranks[rank]["disagree"]
        assert "tied to input indices" in ranks[rank]["per_input"]
