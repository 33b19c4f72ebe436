"""Edit hooks, position rules, ablation and patching: exact effects, hygiene, composition."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import massact_lens as ml
from massact_lens import interventions as iv
from massact_lens._core.batching import BatchPlan, plan_batches
from massact_lens._core.loop import UserHooks, measure
from massact_lens.evaluate import (
    PatchHook,
    embedding_similarity,
    massive_patching,
    patching_hooks,
    sentence_embeddings,
)
from massact_lens.evaluate.patching import PatchRecorder
from massact_lens.examples import minilm_dir, tiny_model
from massact_lens.examples.sentences import SENTENCES

PLANT_DIM = 5  # conftest's planted models: 1000.0 at dim 5 on token 0, from block 1 on

def recorder(store: dict, key: str):
    def record(tensor, *, hook):
        store[key] = tensor.detach().clone()

    return record

def run_recording(model, tokens, hooks, point):
    """Run with ``hooks`` plus a reader placed after them on ``point``."""
    store: dict = {}
    model.run_with_hooks(tokens, fwd_hooks=list(hooks) + [(point, recorder(store, point))])
    return store[point]

# --------------------------------------------------------------------- exact edits, tiny models

def test_zero_hook_zeroes_the_planted_entry_and_nothing_else(planted, bos_tokens):
    point = "blocks.1.hook_resid_post"
    clean = run_recording(planted, bos_tokens, [], point)
    assert torch.allclose(clean[:, 0, PLANT_DIM], torch.tensor(1000.0), rtol=1e-3)
    hooks = ml.interventions.edit_hooks(planted, iv.zero_hook(dims=[PLANT_DIM], positions=iv.start_token()), hooks=point)
    edited = run_recording(planted, bos_tokens, hooks, point)
    assert torch.all(edited[:, 0, PLANT_DIM] == 0.0)
    changed = edited != clean
    expected = torch.zeros_like(changed)
    expected[:, 0, PLANT_DIM] = True
    assert torch.equal(changed, expected)

def test_mean_ablation_writes_the_profiled_mean_exactly(planted, bos_tokens):
    prof = ml.profile(planted, bos_tokens, progress=False)
    assert prof.massive_dims == (PLANT_DIM,)
    hooks = iv.ablation_hooks(planted, prof, "mean", layers=[2])
    point = "blocks.2.hook_resid_post"
    clean = run_recording(planted, bos_tokens, [], point)
    edited = run_recording(planted, bos_tokens, hooks, point)
    mean = prof.mean_value(point, PLANT_DIM, "start")
    assert torch.all(edited[:, 0, PLANT_DIM] == torch.tensor(mean, dtype=torch.float32))
    mask = torch.ones_like(clean, dtype=torch.bool)
    mask[:, 0, PLANT_DIM] = False
    assert torch.equal(edited[mask], clean[mask])

def test_zero_ablation_from_profile_covers_every_layer_it_found(planted, bos_tokens):
    prof = ml.profile(planted, bos_tokens, progress=False)
    hooks = iv.ablation_hooks(planted, prof, "zero")
    edited_points = [name for name, fn in hooks if isinstance(fn, iv.EditHook)]
    assert edited_points == [f"blocks.{layer}.hook_resid_post" for layer in (1, 2, 3)]
    with planted.hooks(fwd_hooks=hooks):
        _, cache = planted.run_with_cache(bos_tokens)
    for layer in (1, 2, 3):
        assert torch.all(cache[f"blocks.{layer}.hook_resid_post"][:, 0, PLANT_DIM] == 0.0)
    first = iv.ablation_hooks(planted, prof, "zero", layers="first")
    assert [n for n, fn in first if isinstance(fn, iv.EditHook)] == ["blocks.1.hook_resid_post"]

def test_value_and_scale_hooks_are_exact():
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    out = iv.value_hook([7.0, -1.0], dims=[1, 3], positions=iv.at_positions(2))(x.clone())
    expected = x.clone()
    expected[:, 2, 1], expected[:, 2, 3] = 7.0, -1.0
    assert torch.equal(out, expected)
    out = iv.scale_hook(0.5, dims=2, positions=iv.at_positions(-1))(x.clone())
    expected = x.clone()
    expected[:, 2, 2] *= 0.5
    assert torch.equal(out, expected)

def test_hook_clones_when_the_activation_requires_grad():
    x = torch.ones(1, 2, 3, requires_grad=True)
    out = iv.zero_hook(dims=[0])(x)
    assert out is not x and torch.equal(x.detach(), torch.ones(1, 2, 3))
    out.sum().backward()
    assert torch.equal(x.grad[0, :, 0], torch.zeros(2)) and torch.equal(x.grad[0, :, 1], torch.ones(2))
    y = torch.ones(1, 2, 3)
    assert iv.zero_hook(dims=[0])(y) is y  # no grad: edited in place

def test_delimiter_rule_edits_only_delimiter_tokens_never_the_start():
    model = tiny_model()
    tokens = torch.tensor([[7, 1, 7, 2, 7], [3, 7, 4, 5, 6]])
    rule = iv.delimiter_positions(model, token_ids=[7])
    hooks = iv.edit_hooks(model, iv.value_hook(42.0, dims=[0], positions=rule), hooks="blocks.0.hook_resid_post")
    out = run_recording(model, tokens, hooks, "blocks.0.hook_resid_post")
    hit = out[:, :, 0] == 42.0
    assert hit.tolist() == [[False, False, True, False, True], [False, True, False, False, False]]
    first = iv.edit_hooks(model, iv.value_hook(42.0, dims=[0], positions=iv.delimiter_positions(token_ids=[7], first_only=True)), hooks="blocks.0.hook_resid_post")
    out = run_recording(model, tokens, first, "blocks.0.hook_resid_post")
    assert (out[:, :, 0] == 42.0).tolist() == [[False, False, True, False, False], [False, True, False, False, False]]

def test_delimiter_rule_reads_the_tokenizer(minilm_model):
    rule = iv.delimiter_positions(minilm_model)
    period = minilm_model.tokenizer.convert_tokens_to_ids(".")
    comma = minilm_model.tokenizer.convert_tokens_to_ids(",")
    word = minilm_model.tokenizer.convert_tokens_to_ids("cat")
    assert {period, comma} <= rule.token_ids and word not in rule.token_ids

def test_where_massive_decides_per_input(planted):
    tokens = torch.randint(1, 64, (3, 8), generator=torch.Generator().manual_seed(1))
    tokens[0, 0] = 0  # only rows 0 and 2 start with the planted token
    tokens[2, 0] = 0
    point = "blocks.2.hook_resid_post"
    clean = run_recording(planted, tokens, [], point)
    hooks = iv.edit_hooks(planted, iv.zero_hook(positions=iv.where_massive(100, 100)), hooks=point)
    edited = run_recording(planted, tokens, hooks, point)
    changed = (edited != clean).nonzero().tolist()
    assert changed == [[0, 0, PLANT_DIM], [2, 0, PLANT_DIM]]

def test_rules_combine():
    ctx = iv.RunContext(torch.arange(5)[None], torch.tensor([[1, 9, 2, 9, 3]]))
    x = torch.zeros(1, 5, 2)
    delims = iv.delimiter_positions(token_ids=[9])
    assert (iv.start_token() | delims).select(x, None, ctx).tolist() == [[True, True, False, True, False]]
    assert (~(iv.start_token() | delims)).select(x, None, ctx).tolist() == [[False, False, True, False, True]]
    assert (delims & iv.at_positions(3)).select(x, None, ctx).tolist() == [[False, False, False, True, False]]

# --------------------------------------------------------------------- hygiene and composition

def test_composition_with_a_users_hook_on_the_same_point(planted, bos_tokens, no_leftover_hooks):
    no_leftover_hooks(planted)
    point = "blocks.1.hook_resid_post"
    seen: list[tuple[str, float]] = []

    def users_hook(tensor, *, hook):
        seen.append(("user", float(tensor[0, 0, PLANT_DIM].detach())))
        return tensor + 1.0

    ablation = iv.edit_hooks(planted, iv.zero_hook(dims=[PLANT_DIM], positions=iv.start_token()), hooks=point)
    after = run_recording(planted, bos_tokens[:1], ablation + [(point, users_hook)], point)
    assert seen == [("user", 0.0)] and float(after[0, 0, PLANT_DIM]) == 1.0
    seen.clear()
    after = run_recording(planted, bos_tokens[:1], [(point, users_hook)] + ablation, point)
    assert seen[0][1] == pytest.approx(1000.0, rel=1e-3) and float(after[0, 0, PLANT_DIM]) == 0.0
    assert float(after[0, 1, 0]) != 0.0
    no_leftover_hooks(planted)

def test_nothing_left_attached_also_after_an_exception(planted, bos_tokens, no_leftover_hooks):
    prof = ml.profile(planted, bos_tokens, progress=False)
    no_leftover_hooks(planted)

    def boom(tensor, *, hook):
        raise RuntimeError("boom")

    hooks = iv.ablation_hooks(planted, prof, "zero")
    with pytest.raises(RuntimeError, match="boom"):
        planted.run_with_hooks(bos_tokens, fwd_hooks=hooks + [("blocks.2.hook_resid_post", boom)])
    no_leftover_hooks(planted)
    with pytest.raises(RuntimeError, match="boom"), iv.ablated(planted, prof, "mean"):
        planted.run_with_hooks(bos_tokens, fwd_hooks=[("blocks.0.hook_resid_post", boom)])
    no_leftover_hooks(planted)
    too_far = iv.edit_hooks(planted, iv.zero_hook(dims=[1], positions=iv.at_positions(20)), layers=[0])
    with pytest.raises(ValueError, match="Position 20 does not exist"):
        planted.run_with_hooks(bos_tokens, fwd_hooks=too_far)
    no_leftover_hooks(planted)

def test_works_with_run_with_cache_nested_contexts_and_generation(planted, bos_tokens, no_leftover_hooks):
    prof = ml.profile(planted, bos_tokens, progress=False)
    no_leftover_hooks(planted)
    calls = []
    outer = [("blocks.0.hook_resid_post", lambda t, *, hook: calls.append(1))]
    with planted.hooks(fwd_hooks=outer):
        with iv.ablated(planted, prof, "zero"):
            _, cache = planted.run_with_cache(bos_tokens)
            out = planted.generate(bos_tokens[:2, :4], max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False)
        _, clean_cache = planted.run_with_cache(bos_tokens)
    assert torch.all(cache["blocks.3.hook_resid_post"][:, 0, PLANT_DIM] == 0.0)
    assert float(clean_cache["blocks.3.hook_resid_post"][0, 0, PLANT_DIM]) > 900  # gone after the context
    assert out.shape == (2, 7) and len(calls) == 2 + 3  # the outer hook ran in every pass
    no_leftover_hooks(planted)

@pytest.fixture(scope="module")
def hf_decoders(tmp_path_factory):
    """Tiny random HF decoders (learned positions; rotary) with MiniLM's tokenizer."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    models = {}
    configs = {
        "gpt2": transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2),
        "llama": transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64),
    }
    for name, config in configs.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(name)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        models[name] = ml.load_model(folder)
    return models

@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_kv_cached_generation_edits_the_prompt_not_each_new_token(hf_decoders, kind):
    model = hf_decoders[kind]
    prompt = torch.tensor([[101, 2023, 2003, 1037, 3231]])
    point = "blocks.0.hook_resid_post"
    passes: list[torch.Tensor] = []

    def record(tensor, *, hook):
        passes.append(tensor.detach().clone())

    hooks = iv.edit_hooks(model, iv.value_hook(12345.0, positions=iv.start_token()), hooks=point)
    args = dict(max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False)
    with model.hooks(fwd_hooks=hooks + [(point, record)]):
        model.generate(prompt, use_past_kv_cache=True, **args)
    assert [p.shape[1] for p in passes] == [5, 1, 1]  # prompt, then one token per step
    assert torch.all(passes[0][0, 0] == 12345.0) and not torch.any(passes[0][0, 1:] == 12345.0)
    assert not any(torch.any(p == 12345.0) for p in passes[1:])
    passes.clear()
    with model.hooks(fwd_hooks=hooks + [(point, record)]):
        model.generate(prompt, use_past_kv_cache=False, **args)
    assert [p.shape[1] for p in passes] == [5, 6, 7]
    assert all(torch.all(p[0, 0] == 12345.0) and not torch.any(p[0, 1:] == 12345.0) for p in passes)


# --------------------------------------------------------------------- bad input

def test_bad_input_is_refused_before_running(planted, minilm_model, no_leftover_hooks):
    no_leftover_hooks(planted)
    with pytest.raises(ValueError, match="Layers \\[7\\] do not exist"):
        iv.edit_hooks(planted, iv.zero_hook(dims=[1]), layers=[7])
    with pytest.raises(ValueError, match="Dims \\[32\\] do not exist"):
        iv.edit_hooks(planted, iv.zero_hook(dims=[32]), layers=[0])
    with pytest.raises(ValueError, match="Positions \\[40\\] do not exist"):
        iv.edit_hooks(planted, iv.zero_hook(positions=iv.at_positions(40)), layers=[0])
    with pytest.raises(ValueError, match="no hook point"):
        iv.edit_hooks(planted, iv.zero_hook(), hooks="blocks.0.hook_nonsense")
    with pytest.raises(ValueError, match="needs a profile"):
        iv.ablation_hooks(planted, None, "mean")
    with pytest.raises(ValueError, match="no profile was given"):
        iv.mean_hook(None, "blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="mode must be"):
        iv.ablation_hooks(planted, None, "half")
    other = ml.profile(minilm_model, ["A sentence."], min_value=50, min_ratio=200, progress=False)
    with pytest.raises(ValueError, match="6 layers and d_model 384"):
        iv.ablation_hooks(planted, other, "zero")
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        iv.delimiter_positions(planted)
    with pytest.raises(RuntimeError, match="needs the batch's token ids"):
        planted.run_with_hooks(torch.zeros(1, 3, dtype=torch.long), fwd_hooks=[("blocks.0.hook_resid_post", iv.zero_hook(positions=iv.delimiter_positions(token_ids=[1])))])
    no_leftover_hooks(planted)

def test_profile_without_massive_activations_is_refused():
    model = tiny_model()
    empty = ml.profile(model, torch.randint(0, 64, (2, 6)), progress=False)
    with pytest.raises(ValueError, match="found no massive activations"):
        iv.ablation_hooks(model, empty, "zero")

# --------------------------------------------------------------------- patching

def test_patching_writes_the_source_values_into_the_target(planted):
    source = torch.tensor([[0, 5, 6, 7]])  # planted token first: 1000 at dim 5
    target = torch.tensor([[3, 5, 6, 7, 8]])  # no massive activation
    point = "blocks.1.hook_resid_post"
    recorder = PatchRecorder()
    hooks = patching_hooks(planted, source, dims=[PLANT_DIM], hooks=point, positions=iv.start_token(), recorder=recorder)
    src = run_recording(planted, source, [], point)
    clean = run_recording(planted, target, [], point)
    patched = run_recording(planted, target, hooks, point)
    assert float(patched[0, 0, PLANT_DIM]) == float(src[0, 0, PLANT_DIM])
    mask = torch.ones_like(clean, dtype=torch.bool)
    mask[0, 0, PLANT_DIM] = False
    assert torch.equal(patched[mask], clean[mask])
    # What the patch wrote went to the caller's recorder, not into the hook.
    written = recorder.to_dataframe()
    assert written[["hook_name", "target_row", "position", "dim"]].values.tolist() == [[point, 0, 0, PLANT_DIM]]
    assert written["after"].tolist() == [float(src[0, 0, PLANT_DIM])]
    assert written["before"].tolist() == [float(clean[0, 0, PLANT_DIM])]
    # run_with_hooks(remove_batch_dim=True) passes hook positionally, without the batch dim.
    squeezed = planted.run_with_hooks(target, fwd_hooks=hooks, remove_batch_dim=True)
    assert torch.equal(squeezed, planted.run_with_hooks(target, fwd_hooks=hooks))


def test_patching_more_targets_than_batch_size_counts_rows_in_the_stream(planted):
    generator = torch.Generator().manual_seed(4)
    sources = torch.randint(1, 64, (5, 6), generator=generator)
    targets = torch.randint(1, 64, (5, 7), generator=generator)
    point, dim = "blocks.1.hook_resid_post", 3
    src = run_recording(planted, sources, [], point)
    result = massive_patching(planted, sources, targets, dims=[dim], hooks=point, positions=iv.at_positions(1), batch_size=2)
    entries = result.to_dataframe()
    assert entries["target_row"].tolist() == [0, 1, 2, 3, 4]
    assert entries["after"].tolist() == pytest.approx(src[:, 1, dim].tolist())  # target i got source i
    assert result.provenance.n_layers == 4


def test_patching_counts_are_checked_before_any_forward_pass(planted):
    sources, targets = torch.randint(1, 64, (3, 6)), torch.randint(1, 64, (5, 6))
    calls: list[int] = []
    handle = planted.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match="3 inputs and there are 5 targets"):
            massive_patching(planted, sources, targets, dims=[3], hooks="blocks.1.hook_resid_post")
    finally:
        handle.remove()
    assert calls == []


# --------------------------------------------------------------------- stateless hooks, the tracker

def test_edit_entries_is_a_pure_tensor_function():
    x = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)
    entries = torch.zeros(1, 3, 2, dtype=torch.bool)
    entries[0, 1, 1] = True  # position 1, second of dims [0, 3]
    out = iv.edit_entries(x.clone(), entries, torch.tensor([0, 3]), "scale", [10.0])
    expected = x.clone()
    expected[0, 1, 3] *= 10
    assert torch.equal(out, expected)
    out = iv.edit_entries(x.clone(), torch.tensor([[False, True, True]]), None, "set", [0.0])
    assert torch.equal(out[0, 0], x[0, 0]) and not out[0, 1:].any()


def test_hook_objects_keep_no_state():
    import dataclasses

    assert [f.name for f in dataclasses.fields(iv.EditHook)] == ["operation", "amount", "dims", "positions", "label", "tracker"]
    assert "written" not in {f.name for f in dataclasses.fields(PatchHook)}
    hook = iv.zero_hook(dims=[1], positions=iv.where_massive(1, 1))
    before = dict(vars(hook))
    hook(torch.ones(1, 2, 3))
    hook(torch.ones(2, 4, 3, dtype=torch.float64))
    assert dict(vars(hook)) == before


def test_an_announced_one_token_batch_is_a_fresh_sequence_not_a_continuation():
    model = tiny_model("llama")  # rotary: no position ids to read, the tracker decides
    assert "pos_embed.hook_in" not in model.hook_dict
    point = "blocks.0.hook_resid_post"
    hooks = iv.edit_hooks(model, iv.value_hook(123.0, dims=[0], positions=iv.start_token()), hooks=point)
    seen: list[float] = []

    def record(tensor, *, hook):
        seen.append(float(tensor[0, 0, 0].detach()))

    plan = plan_batches(model, torch.tensor([[5], [6], [7]]), batch_size=1)
    measure(model, plan, UserHooks(hooks + [(point, record)]), progress=False)
    assert seen == [123.0] * 3  # each announced batch starts a sequence
    # Not announced, one token, the batch size of the pass before: a decoding step (generate).
    model.run_with_hooks(torch.tensor([[8]]), fwd_hooks=hooks + [(point, record)])
    assert seen[-1] != 123.0


def test_a_bool_tensor_is_not_read_as_token_ids():
    tracker = iv.TokenTracker()
    tracker.on_tokens(torch.tensor([[True, False, True]]))
    assert tracker.tokens is None
    tracker.on_tokens(torch.tensor([[1, 0, 1]]))
    assert tracker.tokens.tolist() == [[1, 0, 1]]


def test_edit_hooks_work_under_remove_batch_dim(planted, bos_tokens):
    prof = ml.profile(planted, bos_tokens, progress=False)
    hooks = iv.ablation_hooks(planted, prof, "zero")
    one = bos_tokens[:1]
    expected = planted.run_with_hooks(one, fwd_hooks=hooks)
    assert not torch.allclose(expected, planted(one))
    assert torch.equal(planted.run_with_hooks(one, fwd_hooks=hooks, remove_batch_dim=True), expected)

# --------------------------------------------------------------------- MiniLM: the paper's result

@pytest.fixture(scope="module")
def minilm_profile(minilm_model):
    return ml.profile(minilm_model, list(SENTENCES[:12]), min_value=50, min_ratio=200, batch_size=40, progress=False)


@functools.cache
def _hf_minilm():
    import transformers

    folder = str(minilm_dir())
    return transformers.AutoTokenizer.from_pretrained(folder), transformers.AutoModel.from_pretrained(folder).eval()


def _hf_embeddings(texts, mode=None, means=None):
    """Plain HuggingFace: dim 99 at [CLS] edited in the pre-LN sums of layers 0-3."""
    tokenizer, model = _hf_minilm()
    handles = []
    for layer in range(4) if mode else ():
        def pre(module, args, layer=layer):
            x = args[0].clone()
            x[:, 0, 99] = 0.0 if mode == "zero" else means[layer]
            return (x, *args[1:])

        handles.append(model.encoder.layer[layer].output.LayerNorm.register_forward_pre_hook(pre))
    batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    for handle in handles:
        handle.remove()
    mask = batch["attention_mask"][..., None].float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

@pytest.mark.slow
def test_minilm_ablation_matches_plain_huggingface_hooks(minilm_model, minilm_profile, no_leftover_hooks):
    """The library's hooks do exactly what hand-written HF hooks do (dim 99, [CLS], layers 0-3)."""
    no_leftover_hooks(minilm_model)
    prof = minilm_profile
    assert prof.massive_dims == (99,)
    assert {n for d in prof.dims for n in d.hook_names} == {f"blocks.{i}.ln2.hook_in" for i in range(4)}
    sentences = list(SENTENCES[:12])
    clean = sentence_embeddings(minilm_model, sentences, batch_size=40)
    assert torch.allclose(clean, _hf_embeddings(sentences), atol=1e-5)  # sentence-transformers pooling
    means = [prof.mean_value(f"blocks.{layer}.ln2.hook_in", 99, "start") for layer in range(4)]
    cosines = {}
    for mode in ("zero", "mean"):
        edited = sentence_embeddings(minilm_model, sentences, fwd_hooks=iv.ablation_hooks(minilm_model, prof, mode), batch_size=40)
        assert torch.allclose(edited, _hf_embeddings(sentences, mode, means), atol=1e-5)
        cosines[mode] = float((edited * clean).sum(-1).mean())
    assert cosines["zero"] <= 0.8 and cosines["mean"] >= 0.99
    no_leftover_hooks(minilm_model)


def test_minilm_patching_another_inputs_massive_entries_changes_nothing(minilm_model, minilm_profile):
    targets = list(SENTENCES[1:5])
    result = massive_patching(minilm_model, SENTENCES[0], targets, minilm_profile)
    assert result.mean_output_cosine > 0.999
    entries = result.to_dataframe()
    assert set(entries["hook_name"]) == {f"blocks.{i}.ln2.hook_in" for i in range(4)}
    assert set(entries["position"]) == {0} and set(entries["dim"]) == {99}
    assert (entries["before"] - entries["after"]).abs().max() < 3.0  # same value in every input
    zeroed = embedding_similarity(minilm_model, targets, fwd_hooks=iv.ablation_hooks(minilm_model, minilm_profile, "zero"))
    assert zeroed.mean_cosine < result.mean_output_cosine - 0.1


def test_other_kind_on_a_vocabulary_without_delimiters():
    from massact_lens.examples import bigram_backcopy
    from massact_lens.interventions import kind_positions

    model = bigram_backcopy("default")
    assert kind_positions("other", model).describe() == "not start token"
    with pytest.raises(ValueError, match="delimiter"):
        kind_positions("delimiter", model)


# --------------------------------------------------------------------- one positions vocabulary


@pytest.mark.parametrize("name", ["start", "bos"])
def test_start_and_bos_are_the_start_token_for_edits(planted, bos_tokens, name):
    point = "blocks.1.hook_resid_post"
    by_rule = run_recording(planted, bos_tokens, iv.edit_hooks(planted, iv.zero_hook(dims=[PLANT_DIM], positions=iv.start_token()), hooks=point), point)
    by_name = run_recording(planted, bos_tokens, iv.edit_hooks(planted, iv.zero_hook(dims=[PLANT_DIM], positions=name), hooks=point), point)
    assert torch.equal(by_name, by_rule)
    assert torch.all(by_name[:, 0, PLANT_DIM] == 0.0) and torch.all(by_name[:, 1:, PLANT_DIM] != 0.0)
    ctx = iv.RunContext(torch.arange(5)[None])
    for rule in (iv.as_positions(planted, name), iv.zero_hook(positions=name).positions):
        assert rule.describe() == "start"
        assert torch.equal(rule.select(torch.zeros(2, 5, 3), None, ctx), iv.start_token().select(torch.zeros(2, 5, 3), None, ctx))
    value = iv.value_hook(7.0, dims=[0], positions=name)(torch.zeros(1, 3, 2))
    assert value[0, :, 0].tolist() == [7.0, 0.0, 0.0]
    prof = ml.profile(planted, bos_tokens, progress=False)
    by_kind = run_recording(planted, bos_tokens, iv.ablation_hooks(planted, prof, "mean", kinds=["start"]), point)
    by_name = run_recording(planted, bos_tokens, iv.ablation_hooks(planted, prof, "mean", kinds=["start"], positions=name), point)
    assert torch.equal(by_name, by_kind)


_TEXTS = ["The cat sat. It slept, then woke.", "Rain fell all day.", "Hi there, you."]
_MARK = 12345.0


def _edited_positions(model, plan, positions):
    """Where ``value_hook(positions=...)`` wrote, per batch of ``plan`` (real tokens only)."""
    point = "blocks.0.ln2.hook_in"
    seen: list[torch.Tensor] = []

    def record(tensor, *, hook):
        seen.append(tensor[..., 0].detach() == _MARK)

    hooks = iv.edit_hooks(model, iv.value_hook(_MARK, dims=[0], positions=positions), hooks=point)
    measure(model, plan, UserHooks(hooks + [(point, record)]), progress=False)
    return [mask & batch.attention_mask.bool() for mask, batch in zip(seen, plan.batches, strict=True)]


def test_the_edit_side_and_the_attention_side_read_positions_alike(minilm_model):
    from massact_lens.attention import as_rule, key_mask
    from massact_lens.find import find_massive, scan

    model = minilm_model
    first = plan_batches(model, _TEXTS, batch_size=2, by_length=True)
    plan = BatchPlan(list(first.batches), first.n_inputs, first.prepend_bos)
    width = max(int(b.tokens.shape[1]) for b in plan.batches)
    rows = torch.zeros(len(_TEXTS), width, dtype=torch.bool)
    rows[0, 3] = rows[1, 1] = rows[2, 2] = True
    period = model.tokenizer.convert_tokens_to_ids(".")
    records = find_massive(scan(model, _TEXTS, progress=False), 50, 200)
    assert len(records) > 0
    kinds = {
        "name": "start", "alias": "bos", "names": ["start", "delimiters"], "first delimiter": "first_delimiter",
        "int": 2, "ints": [0, 4], "mask": torch.tensor([False, True, False, True]), "masks": rows,
        "rule": iv.start_token() | iv.delimiter_positions(model), "callable": lambda batch: batch.tokens == period,
        "records": records,
    }
    for kind, positions in kinds.items():
        keys = [key_mask(as_rule(model, positions, plan), batch) for batch in plan.batches]
        edited = _edited_positions(model, plan, positions)
        assert all(torch.equal(k, e) for k, e in zip(keys, edited, strict=True)), kind
        assert any(bool(k.any()) for k in keys), kind
    assert [k[:, 0].all() for k in [key_mask(as_rule(model, records, plan), b) for b in plan.batches]] == [True, True]


def test_a_profile_is_one_rule_for_edits_and_key_sets(minilm_model, minilm_profile):
    from massact_lens.attention import MassiveTokens, as_rule

    key_set = as_rule(minilm_model, minilm_profile, None)
    hooks = iv.edit_hooks(minilm_model, iv.zero_hook(dims=[99], positions=minilm_profile), hooks="blocks.0.ln2.hook_in")
    assert isinstance(key_set, MassiveTokens) and hooks[-1][1].positions == key_set
    assert iv.as_positions(minilm_model, "massive") == MassiveTokens()
    with pytest.raises(ValueError, match="6 layers and d_model 384"):
        iv.edit_hooks(tiny_model(), iv.zero_hook(positions=minilm_profile), layers=[0])
    records = ml.find_massive(ml.scan(minilm_model, ["Rain fell."], progress=False), 50, 200)
    with pytest.raises(ValueError, match="6 layers and d_model 384"):
        iv.check_profile_matches(tiny_model(), records)
    with pytest.raises(TypeError):
        iv.check_profile_matches(tiny_model(), [1, 2])


def test_positions_that_need_the_model_wait_for_the_hook_list(minilm_model):
    hook = iv.zero_hook(dims=[0], positions="delimiters")
    with pytest.raises(RuntimeError, match="needs the batch's token ids"):
        hook(torch.ones(1, 3, 4))
    with pytest.raises(ValueError, match="tokenizer"):
        iv.edit_hooks(tiny_model(), hook, layers=[0])
    bound = iv.edit_hooks(minilm_model, hook, hooks="blocks.0.ln2.hook_in")[-1][1]
    assert bound.positions.describe() == "delimiters" and bound.positions.needs_tokens
    tokens = minilm_model.to_tokens("One, two.")
    store: dict = {}
    minilm_model.run_with_hooks(tokens, fwd_hooks=iv.edit_hooks(minilm_model, hook, hooks="blocks.0.ln2.hook_in")
                                + [("blocks.0.ln2.hook_in", recorder(store, "x"))])
    zeroed = (store["x"][0, :, 0] == 0.0).tolist()
    words = minilm_model.to_str_tokens(tokens)
    assert [w for w, z in zip(words, zeroed, strict=True) if z] == [",", "."]


def test_bad_positions_and_modes_are_named():
    model = tiny_model()
    with pytest.raises(ValueError, match="Unknown position rule"):
        iv.zero_hook(positions="eos")
    with pytest.raises(ValueError, match="negative"):
        iv.zero_hook(positions=[-1])
    with pytest.raises(ValueError, match=r"\[40\] do not exist"):
        iv.edit_hooks(model, iv.zero_hook(positions=[40]), layers=[0])
    with pytest.raises(TypeError):
        iv.zero_hook(positions=1.5)
    with pytest.raises(RuntimeError, match="per input"):
        iv.zero_hook(positions=lambda batch: batch.tokens > 0)(torch.ones(1, 3, 4))
    with pytest.raises(ValueError, match="kind must be 'start', 'delimiter' or 'other'"):
        iv.kind_positions("word", model)
    with pytest.raises(ValueError, match="operation must be 'set' or 'scale'"):
        iv.EditHook("add", (1.0,), None, iv.all_positions())



@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_position_edits_on_per_head_hooks_edit_every_head_at_those_positions(arch):
    """hook_k is [batch, pos, head, d_head]. A position mask used to broadcast one axis off:
    with as many positions as heads (tiny GPT-2: 4 and 4) it zeroed head 0 at every position,
    silently; otherwise a shape error. Now a position edit takes every head and d_head entry
    there (``dims``: d_head entries)."""
    model = tiny_model(arch)
    tokens = torch.tensor([[5, 6, 7, 8]])
    for dims in (None, [1, 3]):
        seen = {}

        def keep(x, hook, seen=seen):  # noqa: ARG001
            seen["k"] = x.clone()

        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_k", iv.zero_hook(dims=dims, positions="start")),
                                                ("blocks.0.attn.hook_k", keep)])
        k = seen["k"]
        assert k.ndim == 4
        edited = k[:, 0] if dims is None else k[:, 0, :, dims]
        assert (edited == 0).all()
        assert (k[:, 1:] != 0).all()  # the other positions, every head
        if dims is not None:
            assert (k[:, 0, :, [0, 2]] != 0).all()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_position_edits_on_per_head_hooks_survive_remove_batch_dim(arch):
    """run_with_hooks(remove_batch_dim=True) hands a batch of one per head as [pos, head,
    d_head]. The edit once read that as [batch, pos, d_model]: "start" zeroed head 0 at
    every position (5 positions, 4 heads: no error). It reads the point's layout from
    hook.name now, so the edit is the batched one."""
    model = tiny_model(arch)
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    runs = []
    for squeeze in (False, True):
        seen = {}

        def keep(x, hook, seen=seen):  # noqa: ARG001
            seen["k"] = x.clone()

        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_k", iv.zero_hook(dims=[1, 3], positions="start")),
                                                ("blocks.0.attn.hook_k", keep)], remove_batch_dim=squeeze)
        runs.append(seen["k"] if seen["k"].ndim == 4 else seen["k"][None])
    batched, squeezed = runs
    assert torch.equal(batched, squeezed)
    assert (squeezed[0, 0, :, [1, 3]] == 0).all() and (squeezed[0, 1:] != 0).all()


@pytest.mark.parametrize("name", ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_attn_scores"])
def test_edits_refuse_attention_patterns(name):
    """A pattern is [batch, head, query, key]: an edit's positions would pick heads (it once
    zeroed head 0's whole pattern for "start"). Refused before any pass in a hook list,
    and when called bare, with nothing left attached."""
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="pick heads"):
        iv.edit_hooks(model, iv.zero_hook(positions="start"), hooks=name)
    with pytest.raises(ValueError, match="pick heads"):
        model.run_with_hooks(torch.tensor([[5, 6, 7]]), fwd_hooks=[(name, iv.zero_hook(positions="start"))])
    assert not any(p.has_hooks() for p in model.hook_dict.values())


def test_patches_refuse_per_head_points_before_running():
    """A patch writes d_model-wide entries: on hook_k its dims once picked heads (dims=[1]
    copied head 1's whole key). Refused before the source is run."""
    from massact_lens.evaluate import patching_hooks

    model = tiny_model("llama")
    for name, why in (("blocks.0.attn.hook_k", "per head"), ("blocks.0.attn.hook_z", "per head"),
                      ("blocks.0.hook_q_input", "per head"), ("blocks.0.attn.hook_pattern", "pick heads")):
        with pytest.raises(ValueError, match=why):
            patching_hooks(model, torch.tensor([[5, 6, 7, 8]]), dims=[1], hooks=name)


def test_layouts_are_read_through_aliases_and_pos_dim():
    """A block-level alias of a per-head point (blocks.0.hook_q_input is attn.hook_q_input)
    counts as per head before any pass; a pattern anywhere (cross-attention too) is a
    pattern; a point whose positions TransformerLens marks on another axis (pos_dim 2,
    Gemma 3's [batch, head, pos, d_head] q/k norms) is refused, not edited along heads."""
    from transformer_lens.hook_points import HookPoint

    from massact_lens._core.hook_names import check_edit_point, point_layout, point_names

    model = tiny_model("llama")
    names = point_names(model, "blocks.0.hook_q_input")
    assert [point_layout(n) for n, _ in names] == ["head", "head"]
    with pytest.raises(ValueError, match="per head"):
        for name, pos_dim in names:
            check_edit_point(name, "A patch", per_head=False, pos_dim=pos_dim)
    assert point_layout("blocks.0.cross_attn.hook_pattern") == "pattern"
    hook = HookPoint()
    hook.name, hook.pos_dim = "blocks.0.attn.hook_q_normed", 2
    with pytest.raises(ValueError, match="axis 2"):
        iv.zero_hook(positions="start")(torch.ones(1, 4, 3, 8), hook=hook)
    # A per-head point that fires flat ([batch, pos, heads x d_head], by keyword) stays a
    # batch: position 0 of both inputs, nothing else.
    hook.name, hook.pos_dim = "blocks.0.attn.q.hook_out", None
    flat = iv.zero_hook(positions="start")(torch.ones(2, 3, 8), hook=hook)
    assert (flat[:, 0] == 0).all() and (flat[:, 1:] == 1).all()


def test_rules_that_read_hidden_states_refuse_per_head_hooks():
    model = tiny_model("llama")
    hook = iv.zero_hook(positions=iv.where_massive(min_value=1.0, min_ratio=2.0))
    with pytest.raises(ValueError, match="per head"):
        model.run_with_hooks(torch.tensor([[5, 6, 7, 8]]), fwd_hooks=[("blocks.0.attn.hook_q", hook)])
    assert not any(p.has_hooks() for p in model.hook_dict.values())  # nothing left attached
