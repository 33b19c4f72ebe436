"""bias_surgery: each head's term from C replaced by its mean, removed, or redistributed.

Checked against hand-written hooks (the term of the start token, ``p_q0 v_0``, computed
from the stored pattern and values) on tiny random LLaMA (rotary, GQA) and GPT-2 models;
what each mode writes at ``hook_z``; errors before any pass; no hook left behind.
"""

from __future__ import annotations

import pytest
import torch
from jaxtyping import TypeCheckError

from massact_lens.attention import BiasSurgery, bias_surgery
from massact_lens.evaluate import perplexity
from massact_lens.examples import tiny_model
from massact_lens.interventions import all_positions, where_massive

LAYER, HEAD = 1, 2


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return tiny_model(request.param, n_layers=3)


def _tokens(n: int = 4, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(seed))


def _kv_head(model, head: int) -> int:
    n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)
    return head // (int(model.cfg.n_heads) // n_kv)


def _hand_hooks(model, mode: str, mean: torch.Tensor | None = None):
    """Hand-written surgery of head HEAD of layer LAYER, C = {position 0}."""
    seen = {}

    def keep(name):
        def hook(t, hook):
            seen[name] = t.detach().clone()

        return hook

    def edit(z, hook):
        p0 = seen["pattern"][:, HEAD, :, 0]  # [b, q]
        v0 = seen["v"][:, 0, _kv_head(model, HEAD)]  # [b, d]
        term = p0[..., None] * v0[:, None, :]  # [b, q, d]
        z = z.clone()
        if mode == "zero":
            z[:, :, HEAD] = z[:, :, HEAD] - term
        elif mode == "mean":
            z[:, :, HEAD] = z[:, :, HEAD] - term + mean
        else:
            rest = (z[:, :, HEAD] - term) / (1 - p0)[..., None]
            rest[:, 0] = 0.0  # query 0 sees only key 0
            z[:, :, HEAD] = rest
        return z

    return [
        (f"blocks.{LAYER}.attn.hook_pattern", keep("pattern")),
        (f"blocks.{LAYER}.attn.hook_v", keep("v")),
        (f"blocks.{LAYER}.attn.hook_z", edit),
    ]


def _hand_mean(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean of p_q0 v_0 of HEAD over every query of ``tokens`` (no padding)."""
    _, cache = model.run_with_cache(tokens)
    p0 = cache[f"blocks.{LAYER}.attn.hook_pattern"][:, HEAD, :, 0]
    v0 = cache[f"blocks.{LAYER}.attn.hook_v"][:, 0, _kv_head(model, HEAD)]
    return (p0[..., None] * v0[:, None, :]).reshape(-1, v0.shape[-1]).mean(0)


@pytest.mark.parametrize("mode", ["mean", "zero", "redistribute"])
def test_one_head_agrees_with_a_hand_written_hook(model, mode):
    tokens, reference = _tokens(), _tokens(3, 10, seed=1)
    r = bias_surgery(
        model,
        tokens,
        "start",
        mode=mode,
        layers=[LAYER],
        heads=[HEAD],
        levels=["head"],
        reference=reference if mode == "mean" else None,
        progress=False,
    )
    mean = _hand_mean(model, reference) if mode == "mean" else None
    if mean is not None:
        assert torch.allclose(r.mean_term[0, 0], mean, atol=1e-6)
    hand = perplexity(model, tokens, fwd_hooks=_hand_hooks(model, mode, mean), progress=False)
    clean = perplexity(model, tokens, progress=False)
    assert r.n_tokens == hand.n_tokens == 4 * 11
    assert r.baseline_nll == pytest.approx(clean.nll, rel=1e-6)
    assert float(r.head_nll[0, 0]) == pytest.approx(hand.nll, rel=1e-6)
    assert abs(float(r.head_nll[0, 0]) - clean.nll) > 1e-4  # the surgery changed something


def _z_after(model, hooks, tokens, layer):
    """hook_z of ``layer`` after ``hooks`` ran (a reader attached last)."""
    out = {}
    reader = (
        f"blocks.{layer}.attn.hook_z",
        lambda z, hook: out.__setitem__("z", z.detach().clone()),
    )
    with model.hooks(fwd_hooks=[*hooks, reader]):
        model(tokens)
    return out["z"]


def test_zero_with_every_key_in_c_leaves_nothing(model):
    tokens = _tokens(2, 9)
    r = bias_surgery(
        model,
        tokens,
        all_positions(),
        mode="zero",
        layers=[LAYER],
        heads=[0, HEAD],
        levels=["all"],
        progress=False,
    )
    clean = _z_after(model, [], tokens, LAYER)
    z = _z_after(model, r.hooks(model), tokens, LAYER)
    assert z[:, :, [0, HEAD]].abs().max() < 1e-5
    assert clean[:, :, [0, HEAD]].abs().max() > 1e-2
    others = [h for h in range(int(model.cfg.n_heads)) if h not in (0, HEAD)]
    assert torch.equal(z[:, :, others], clean[:, :, others])


def test_redistribute_with_empty_c_changes_nothing(model):
    tokens = _tokens()
    empty = [20]  # a key index past every input: C is empty
    with pytest.warns(UserWarning, match="selected no key"):
        r = bias_surgery(
            model, tokens, empty, mode="redistribute", levels=["all", "layer"], progress=False
        )
    assert r.all_nll == r.baseline_nll
    assert torch.all(r.layer_nll == r.baseline_nll)
    clean = _z_after(model, [], tokens, LAYER)
    assert torch.equal(_z_after(model, r.hooks(model), tokens, LAYER), clean)


def test_redistribute_renormalises_the_keys_outside_c(model):
    tokens = _tokens(2, 8)
    r = bias_surgery(
        model,
        tokens,
        "start",
        mode="redistribute",
        layers=[LAYER],
        heads=[HEAD],
        levels=["all"],
        progress=False,
    )
    _, cache = model.run_with_cache(tokens)
    p = cache[f"blocks.{LAYER}.attn.hook_pattern"][:, HEAD, :, 1:]  # keys outside C
    v = cache[f"blocks.{LAYER}.attn.hook_v"][:, 1:, _kv_head(model, HEAD)]
    expected = torch.einsum("bqk,bkd->bqd", p / p.sum(-1, keepdim=True).clamp_min(1e-30), v)
    z = _z_after(model, r.hooks(model), tokens, LAYER)[:, :, HEAD]
    assert torch.allclose(z[:, 1:], expected[:, 1:], atol=1e-5)
    assert torch.equal(z[:, 0], torch.zeros_like(z[:, 0]))  # no key left for query 0


def test_mean_writes_one_constant_for_the_term(model):
    tokens = _tokens(3, 10)
    r = bias_surgery(
        model,
        tokens,
        "start",
        mode="mean",
        layers=[LAYER],
        heads=[HEAD],
        levels=["all"],
        progress=False,
    )
    assert torch.allclose(r.mean_term[0, 0], _hand_mean(model, tokens), atol=1e-6)
    _, cache = model.run_with_cache(tokens)
    p0 = cache[f"blocks.{LAYER}.attn.hook_pattern"][:, HEAD, :, 0]
    v0 = cache[f"blocks.{LAYER}.attn.hook_v"][:, 0, _kv_head(model, HEAD)]
    z = _z_after(model, r.hooks(model), tokens, LAYER)[:, :, HEAD]
    expected = (
        cache[f"blocks.{LAYER}.attn.hook_z"][:, :, HEAD]
        - p0[..., None] * v0[:, None]
        + r.mean_term[0, 0]
    )
    assert torch.allclose(z, expected, atol=1e-5)


def test_levels_ranks_and_the_cost_in_passes():
    model = tiny_model("llama", n_layers=2)
    tokens = _tokens(3, 10)
    calls = []
    counter = ("blocks.0.hook_resid_pre", lambda x, hook: calls.append(1))
    r = bias_surgery(
        model,
        tokens,
        "start",
        mode="zero",
        heads=[1, 3],
        fwd_hooks=[counter],
        batch_size=2,
        progress=False,
    )
    # unedited 1 + all 1 + 2 layers + 2 x 2 heads = 8 runs of 2 batches each
    assert len(calls) == 8 * 2
    frame = r.to_dataframe()
    assert list(frame["level"]) == ["none", "all", "layer", "layer", "head", "head", "head", "head"]
    heads = r.ranked("head")
    assert list(heads["rank"]) == [1, 2, 3, 4]
    assert list(heads["delta_nll"]) == sorted(heads["delta_nll"], reverse=True)
    assert heads["perplexity"].iloc[0] == pytest.approx(
        float(torch.exp(r.head_nll.max())), rel=1e-9
    )
    assert r.c_mass.shape == (2, 2) and bool(((r.c_mass > 0) & (r.c_mass <= 1)).all())
    assert "BiasSurgery of tiny-llama" in repr(r) and len(repr(r)) < 1000
    assert "<table" in r._repr_html_()
    with pytest.raises(TypeError, match="do not merge"):
        BiasSurgery.merge([r, r])


def test_a_user_hook_on_hook_z_is_kept_by_the_edit():
    model = tiny_model("llama", n_layers=2)
    tokens = _tokens(2, 8)
    r = bias_surgery(
        model, tokens, "start", mode="zero", layers=[1], heads=[0], levels=["all"], progress=False
    )

    def plus_one(z, hook):
        return z + 1.0

    mine = ("blocks.1.attn.hook_z", plus_one)
    edited = _z_after(model, r.hooks(model), tokens, 1)
    both = _z_after(model, [mine, *r.hooks(model)], tokens, 1)
    assert torch.allclose(both, edited + 1.0, atol=1e-6)


def _counting(model):
    calls = []
    return calls, ("blocks.0.hook_resid_pre", lambda x, hook: calls.append(1))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"mode": "half"},
            (ValueError, TypeCheckError),
            None,
        ),  # beartype checks the Literal under pytest
        ({"layers": [7]}, ValueError, "do not exist"),
        ({"heads": [4]}, ValueError, "do not exist"),
        ({"levels": []}, ValueError, "levels must be"),
        ({"levels": ["head", "neuron"]}, (ValueError, TypeCheckError), None),
        ({"mode": "zero", "reference": ["x"]}, ValueError, "reference gives the means"),
        ({"keys": "nowhere"}, ValueError, "Unknown position rule"),
        ({"fwd_hooks": [("blocks.9.hook_resid_post", print)]}, ValueError, "no hook point"),
        ({"fwd_hooks": ["not a pair"]}, TypeError, "pairs"),
    ],
)
def test_bad_input_fails_before_any_pass(kwargs, error, match):
    model = tiny_model("llama")
    calls, counter = _counting(model)
    with model.hooks(fwd_hooks=[counter]), pytest.raises(error, match=match):
        bias_surgery(model, _tokens(), **kwargs, progress=False)
    assert calls == []


def test_corpus_and_key_sets_the_surgery_cannot_use():
    model = tiny_model("llama")
    calls, counter = _counting(model)
    with model.hooks(fwd_hooks=[counter]):
        with pytest.raises(TypeError, match="runs many times"):
            bias_surgery(model, (t for t in _tokens()), progress=False)
        with pytest.raises(ValueError, match="nothing to predict"):
            bias_surgery(model, _tokens(3, 1), progress=False)
        with pytest.raises(ValueError, match="reads the residual stream"):
            bias_surgery(
                model,
                _tokens(),
                where_massive(dims=[3], min_value=1.0, min_ratio=2.0),
                progress=False,
            )
        with pytest.raises(ValueError, match="per input"):
            bias_surgery(model, _tokens(), torch.ones(4, 12, dtype=torch.bool), progress=False)
    assert calls == []


def test_an_encoder_is_refused_with_what_to_do(minilm_model):
    with pytest.raises(ValueError, match="both directions"):
        bias_surgery(minilm_model, ["A short sentence."], progress=False)


def test_no_hook_is_left_attached_after_an_error(no_leftover_hooks):
    model = tiny_model("llama")
    no_leftover_hooks(model)
    calls = []

    def fails_later(x, hook):
        calls.append(1)
        if len(calls) == 3:  # in the second surgery run
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        bias_surgery(
            model,
            _tokens(),
            "start",
            mode="zero",
            fwd_hooks=[("blocks.1.hook_resid_pre", fails_later)],
            progress=False,
        )
    no_leftover_hooks(model)


def test_padding_changes_no_number():
    model = tiny_model("llama")
    tokens = _tokens(4, 12)
    mask = torch.ones_like(tokens)
    for row, length in enumerate((12, 5, 9, 2)):
        mask[row, length:] = 0
    runs = [
        bias_surgery(
            model,
            tokens,
            "start",
            mode=mode,
            layers=[1],
            heads=[0, 3],
            attention_mask=mask,
            batch_size=size,
            progress=False,
        )
        for mode in ("mean", "redistribute")
        for size in (1, 4)
    ]
    for one, batched in (runs[:2], runs[2:]):
        assert one.n_tokens == batched.n_tokens == 11 + 4 + 8 + 1
        assert torch.allclose(one.head_nll, batched.head_nll, rtol=1e-5)
        assert torch.allclose(one.mean_term, batched.mean_term, atol=1e-6)


def test_the_figure_carries_the_ratios():
    from massact_lens.viz import bias_surgery_figure

    r = bias_surgery(tiny_model("llama"), _tokens(3, 10), mode="zero", heads=[0, 3], progress=False)
    fig = bias_surgery_figure(r)
    assert list(fig.data[0].x) == [0, 1]
    assert fig.data[0].y[1] == pytest.approx(
        float(torch.exp(r.layer_nll[1] - r.baseline_nll)), rel=1e-9
    )
    assert fig.data[1].z[1][0] == pytest.approx(
        float(torch.exp(r.head_nll[1, 0] - r.baseline_nll)), rel=1e-9
    )
    assert list(fig.data[1].x) == ["H0", "H3"] and fig.layout.meta["mode"] == "zero"
