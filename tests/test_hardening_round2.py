"""Issue 24, round two: scans carry a weights fingerprint, an edit that selects nothing is
said, and every verb that needs a TransformerBridge refuses a plain HuggingFace model first.

Each test here failed before its fix: scans of other weights merged, records of other
weights were compared or traced in silence, an edit rule that matched no position changed
nothing without a word, and a plain HF model ended in ``AttributeError: ... 'cfg'``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from test_hardening_cli_viz import _forward_passes  # counts a model's forward passes

import massact_lens as ml
from massact_lens import interventions
from massact_lens._core._fingerprint import weights_fingerprint
from massact_lens.examples import tiny_model
from massact_lens.find import ScanResult, compare_precision
from massact_lens.interventions import edit_hooks, scale_hook, value_hook, zero_hook
from massact_lens.models.planting import plant_massive_activation


def _planted(seed: int = 0):
    return plant_massive_activation(
        tiny_model("llama", n_layers=3, seed=seed), layer=1, dim=5, value=1000.0
    )


def _tokens(n: int = 3, width: int = 6, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(1, 64, (n, width), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = 0
    return tokens


def _messages(caught) -> str:
    return " | ".join(str(w.message) for w in caught)


# ------------------------------------------------------------------- the weights fingerprint


def test_a_scan_records_the_weights_and_refuses_to_merge_with_other_weights():
    a, b = _planted(0), _planted(1)
    tokens = _tokens()
    parts = [ml.scan(a, tokens[:2], progress=False), ml.scan(b, tokens[2:], progress=False)]
    assert parts[0].weights == weights_fingerprint(a) != parts[1].weights
    assert parts[0].provenance == parts[1].provenance  # name and shape agree: only the weights tell
    with pytest.raises(ValueError, match="other weights .*same checkpoint"):
        ScanResult.merge(parts)
    same = ScanResult.merge([parts[0], ml.scan(a, tokens[2:], progress=False)])
    assert same.weights == parts[0].weights and same.n_inputs == 3
    empty = ScanResult.empty(same.provenance, same.hook_names, same.top_k, same.prepend_bos)
    assert (
        ScanResult.merge([empty, same]).weights == same.weights
    )  # an empty shard knows no weights


def test_compare_precision_refuses_records_of_other_weights_before_any_pass():
    tokens = _tokens(1)
    other = ml.find_massive(
        ml.scan(_planted(1), tokens, progress=False), min_value=100, min_ratio=10
    )
    assert len(other)
    reference, half = _planted(0), _planted(0).to(torch.bfloat16)
    with (
        _forward_passes(reference) as ref_calls,
        _forward_passes(half) as half_calls,
        pytest.raises(ValueError, match="other weights than the reference's .*massive=None"),
    ):
        compare_precision(reference, half, tokens, massive=other)
    assert ref_calls == half_calls == []


def test_records_and_profiles_of_other_weights_warn_in_lineage_ablation_and_key_sets():
    a, b = _planted(0), _planted(1)
    tokens = _tokens()
    records = ml.find_massive(ml.scan(b, tokens, progress=False), min_value=100, min_ratio=10)
    prof = ml.profile(b, tokens, min_value=100, min_ratio=10, progress=False)
    uses = {
        "lineage": lambda: ml.lineage(a, tokens, records, progress=False),
        "ablation (records)": lambda: ml.ablation_hooks(a, records),
        "ablation (profile)": lambda: ml.ablation_hooks(a, prof, "mean"),
        "key set": lambda: interventions.as_positions(a, prof),
    }
    for what, use in uses.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            use()
        assert "measured on other weights than this model's" in _messages(caught), what
    with warnings.catch_warnings(record=True) as caught:  # the same weights: no word
        warnings.simplefilter("always")
        ml.ablation_hooks(
            _planted(0),
            ml.find_massive(ml.scan(a, tokens, progress=False), min_value=100, min_ratio=10),
        )
    assert "other weights" not in _messages(caught)


# ------------------------------------------------------------------- an edit that selects nothing


def test_an_edit_that_selects_nothing_in_a_run_is_said_once():
    model = tiny_model("llama", n_layers=2)
    nowhere = edit_hooks(
        model, zero_hook(dims=[3], positions=[20]), layers=[0, 1]
    )  # the inputs have 6 tokens
    with pytest.warns(
        UserWarning, match=r"selected no entry in any input of the run: it changed nothing"
    ) as caught:
        ml.perplexity(model, _tokens(4), fwd_hooks=nowhere, batch_size=2, progress=False)
    assert (
        sum("selected no entry" in str(w.message) for w in caught) == 1
    )  # 2 batches x 2 layers: one warning
    with pytest.warns(UserWarning, match="selected no entry in this pass") as caught:
        model.run_with_hooks(_tokens(1), fwd_hooks=nowhere)
    assert sum("selected no entry" in str(w.message) for w in caught) == 1


def test_an_edit_that_selects_something_is_quiet():
    model = tiny_model("llama", n_layers=2)
    somewhere = edit_hooks(model, zero_hook(dims=[3], positions=[0]), layers=[0, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ml.perplexity(model, _tokens(4), fwd_hooks=somewhere, batch_size=2, progress=False)
        model.run_with_hooks(_tokens(1), fwd_hooks=somewhere)
    assert "selected no entry" not in _messages(caught)


# ------------------------------------------------------------------- a plain HuggingFace model

#: Run in a fresh interpreter: pytest type-checks every function of the package with beartype
#: (``--jaxtyping-packages``), which refuses the model before the verb's own message, while a
#: user's session has no such check. Each verb's exception, message and forward-pass count.
_PLAIN_HF_SCRIPT = """
import json, torch
from transformers import LlamaConfig, LlamaForCausalLM
import massact_lens as ml
from massact_lens import distributed, evaluate, interventions

model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2))
calls = []
model.register_forward_pre_hook(lambda *args: calls.append(1))
t = torch.zeros(1, 5, dtype=torch.long)

def enter(manager):
    with manager:
        pass

verbs = {
    "scan": lambda: ml.scan(model, t, progress=False),
    "lineage": lambda: ml.lineage(model, t, None, progress=False),
    "perplexity": lambda: ml.perplexity(model, t, progress=False),
    "sentence_embeddings": lambda: evaluate.sentence_embeddings(model, t),
    "embedding_similarity": lambda: evaluate.embedding_similarity(model, ["a"]),
    "ablation_table": lambda: ml.ablation_table(model, None),
    "massive_patching": lambda: evaluate.massive_patching(model, t, t, None),
    "patching_hooks": lambda: evaluate.patching_hooks(model, t, None),
    "ablation_hooks": lambda: ml.ablation_hooks(model, None, dims=[1]),
    "ablated": lambda: enter(ml.ablated(model, None, dims=[1])),
    "edit_hooks": lambda: interventions.edit_hooks(model, interventions.zero_hook(dims=1)),
    "intervention_hooks": lambda: interventions.intervention_hooks(model, [("x", print)]),
    "edited_weights": lambda: enter(ml.edited_weights(model, {(0, "mlp.out", 0, 0): 0.0})),
    "run_distributed": lambda: distributed.run_distributed(ml.scan, model, t),
    "profile": lambda: ml.profile(model, t, progress=False),
}
out = {}
for verb, call in verbs.items():
    try:
        call()
        out[verb] = ["no error", "", len(calls)]
    except Exception as error:
        out[verb] = [type(error).__name__, str(error), len(calls)]
print(json.dumps(out))
"""


def test_a_plain_hf_model_gets_the_clear_message_before_any_pass():
    done = subprocess.run(
        [sys.executable, "-c", _PLAIN_HF_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 15
    for verb, (kind, message, passes) in results.items():
        assert kind == "TypeError" and message.startswith(f"{verb} takes a TransformerBridge"), (
            verb,
            kind,
            message,
        )
        assert "massact_lens.load_model(hf_model)" in message, verb
        assert passes == 0, verb


# ------------------------------------------------------------------- the adversarial run's findings

#: Bad arguments a user may pass, each with the start of the message it must get. Run in a fresh
#: interpreter for the reason above (beartype would refuse most of them first under pytest).
_BAD_ARGUMENTS_SCRIPT = """
import json, torch
import massact_lens as ml
from massact_lens import distributed, interventions
from massact_lens.examples import minilm_dir, tiny_model

model = tiny_model("llama", n_layers=2)
calls = []
model.blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
t = torch.zeros(2, 5, dtype=torch.long)
prof = ml.profile(model, t, min_value=0.001, min_ratio=1.0, progress=False)
calls.clear()
cases = {
    "layers=5": lambda: ml.scan(model, t, layers=5, progress=False),
    "prepend_bos='yes'": lambda: ml.scan(model, t, prepend_bos="yes", progress=False),
    "dims=1.5": lambda: interventions.zero_hook(dims=1.5),
    "scale '2'": lambda: interventions.scale_hook("2", dims=1),
    "ablation of a table": lambda: ml.ablation_hooks(model, prof.to_dataframe()),
    "modes=[]": lambda: ml.ablation_table(model, prof, modes=[], corpus=t, progress=False),
    "shard(-1)": lambda: distributed.shard(-1, 0, 1),
    "distributed generator": lambda: distributed.run_distributed(ml.scan, model, (x for x in t)),
    "distributed topk=": lambda: distributed.run_distributed(ml.scan, model, t, topk=3),
    "dtype='float16'": lambda: ml.load_model(minilm_dir(), dtype="float16"),
    "device='tpu'": lambda: ml.load_model(minilm_dir(), device="tpu"),
}
out = {}
for name, call in cases.items():
    try:
        call()
        out[name] = ["no error", "", len(calls)]
    except Exception as error:
        out[name] = [type(error).__name__, str(error), len(calls)]
print(json.dumps(out))
"""

_EXPECTED = {
    "layers=5": ("TypeError", "layers must be a list of layer indices"),
    "prepend_bos='yes'": ("TypeError", "prepend_bos must be True, False or None"),
    "dims=1.5": ("TypeError", "dims must be a dim index or a list of them"),
    "scale '2'": ("TypeError", "Values must be numbers"),
    "ablation of a table": ("TypeError", "profile must be a MassiveProfile"),
    "modes=[]": ("ValueError", "modes must be a non-empty list"),
    "shard(-1)": ("ValueError", "n_inputs must be a count"),
    "distributed generator": ("TypeError", "run_distributed splits the inputs by index"),
    "distributed topk=": ("TypeError", "scan(model, inputs, ...) does not take these arguments"),
    "dtype='float16'": ("TypeError", "dtype must be a torch dtype"),
    "device='tpu'": ("ValueError", "device 'tpu' is not a device torch knows"),
}


def test_bad_arguments_get_their_own_message_before_any_pass():
    done = subprocess.run(
        [sys.executable, "-c", _BAD_ARGUMENTS_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for case, (kind, start) in _EXPECTED.items():
        got_kind, message, passes = results[case]
        assert (got_kind, message[: len(start)]) == (kind, start), (case, got_kind, message)
        assert passes == 0, case


def test_edit_values_may_be_numpy_or_tensor_scalars():
    import numpy as np

    assert value_hook(np.float32(2.0), dims=1).amount == (2.0,)
    assert scale_hook(torch.tensor(0.5), dims=[1, 2]).amount == (0.5,)


def test_a_hook_point_named_twice_is_read_once():
    model = tiny_model("llama", n_layers=2)
    result = ml.scan(model, _tokens(), hooks=["blocks.0.hook_resid_post"] * 2, progress=False)
    assert result.hook_names == ("blocks.0.hook_resid_post",)
    assert tuple(result.values.shape[:2]) == (3, 1)


def test_the_cli_without_a_command_says_which_to_name():
    from massact_lens.cli import main

    with pytest.raises(SystemExit, match="name a command: massact scan, ablate, report or train"):
        main([])


# ------------------------------------------------------------------- profile(..., scan_result=...)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("fewer inputs", r"other inputs \(2 inputs here, 3 scanned\).*leave scan_result=None"),
        ("other tokens", r"other inputs \(input 0 has other tokens .*pass the inputs"),
        ("longer inputs", r"other inputs \(input 0 has 7 tokens here, 6 in the scan\)"),
        ("other weights", r"other weights than the model's .*leave scan_result=None"),
        ("another model", r"come from different models \(n_layers: 3 != 4\).*measure again"),
    ],
)
def test_profile_refuses_a_scan_of_other_inputs_weights_or_model_before_any_pass(case, message):
    earlier = ml.scan(_planted(0), _tokens(), progress=False)
    model, tokens = {
        "fewer inputs": (_planted(0), _tokens(2)),
        "other tokens": (_planted(0), _tokens(seed=1)),
        "longer inputs": (_planted(0), _tokens(width=7)),
        "other weights": (_planted(1), _tokens()),
        "another model": (
            plant_massive_activation(tiny_model("llama", n_layers=4), layer=1, dim=5, value=1000.0),
            _tokens(),
        ),
    }[case]
    with _forward_passes(model) as calls, pytest.raises(ValueError, match=message):
        ml.profile(model, tokens, min_value=50, min_ratio=100, scan_result=earlier, progress=False)
    assert calls == []


def test_profile_checks_a_stream_of_other_inputs_against_the_scan_too():
    model, tokens = _planted(0), _tokens()
    earlier = ml.scan(model, tokens, progress=False)
    same = ml.profile(model, iter([tokens[:2], tokens[2:]]), min_value=50, min_ratio=100,
                      scan_result=earlier, progress=False)
    assert same.massive_dims == (5,) and same.n_inputs == 3
    other = iter([tokens[:2], _tokens(seed=1)[2:]])
    with pytest.raises(ValueError, match=r"input 2 has other tokens than the scanned one"):
        ml.profile(model, other, min_value=50, min_ratio=100, scan_result=earlier, progress=False)
    with pytest.raises(ValueError, match=r"2 inputs here, 3 scanned"):
        ml.profile(model, iter([tokens[:2]]), min_value=50, min_ratio=100, scan_result=earlier, progress=False)


def test_profile_reads_a_scan_without_bos_without_bos(minilm_model, sentences):
    """prepend_bos=None takes the scan's BOS setting (the docstring's promise); the pass used
    the model's default before, reading the values one token off."""
    earlier = ml.scan(minilm_model, sentences[:2], prepend_bos=False, progress=False)
    one = ml.profile(minilm_model, sentences[:2], min_value=50, min_ratio=200, prepend_bos=False, progress=False)
    two = ml.profile(minilm_model, sentences[:2], min_value=50, min_ratio=200, scan_result=earlier, progress=False)
    assert one.massive_dims and two.dims == one.dims
    assert [round(s.mean, 3) for s in two.stats] == [round(s.mean, 3) for s in one.stats]
    with pytest.raises(ValueError, match=r"prepend_bos True here, False in the scan"):
        ml.profile(minilm_model, sentences[:2], min_value=50, min_ratio=200, scan_result=earlier,
                   prepend_bos=True, progress=False)


def test_mean_value_of_an_unknown_hook_or_kind_says_what_the_profile_has():
    prof = ml.profile(_planted(0), _tokens(), min_value=50, min_ratio=100, progress=False)
    hooks = r"\['blocks.0.hook_resid_post', 'blocks.1.hook_resid_post', 'blocks.2.hook_resid_post'\]"
    with pytest.raises(ValueError, match=rf"no value for hook 'blocks.9.hook_resid_post': pass one of its hooks {hooks}"):
        prof.mean_value("blocks.9.hook_resid_post", 5, "start")
    for kind in ("bos", "delimiter"):
        with pytest.raises(ValueError, match=rf"token kind '{kind}'.*token kinds it has values of \['start'\]"):
            prof.mean_value("blocks.1.hook_resid_post", 5, kind)
    with pytest.raises(KeyError, match=r"pass one of its dims \[5\]"):  # a dim never massive: a lookup miss
        prof.mean_value("blocks.1.hook_resid_post", 6, "start")
    assert prof.mean_value("blocks.1.hook_resid_post", 5, "start") == pytest.approx(1000.0, abs=1e-2)


# ------------------------------------------------------------------- viz: the wrong result


#: Each view given another result (or None), in a fresh interpreter: under pytest the type
#: checker refuses it first, a user's session has no such check and crashed inside the view.
_VIEWS_SCRIPT = """
import json, torch
import massact_lens as ml
from massact_lens import attention, viz

model = ml.examples.tiny_model("llama", n_layers=2)
t = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
result = ml.scan(model, t, progress=False)
concentration = attention.attention_concentration(model, t, progress=False)
cases = {
    "attention_sink_figure": lambda: viz.attention_sink_figure(result),
    "ablation_figure": lambda: viz.ablation_figure(None),
    "implicit_bias_figure": lambda: viz.implicit_bias_figure(concentration),
    "hidden_state_figure": lambda: viz.hidden_state_figure(result, 0),
    "attention_logits_figure": lambda: viz.attention_logits_figure(concentration, 0),
    "attention_heads_widget": lambda: viz.attention_heads_widget(result, 0),
    "tokens_by_activation_widget": lambda: viz.tokens_by_activation_widget(None),
}
out = {}
for name, call in cases.items():
    try:
        call()
        out[name] = ["no error", ""]
    except Exception as error:
        out[name] = [type(error).__name__, str(error)]
print(json.dumps(out))
"""

_VIEWS_EXPECTED = {
    "attention_sink_figure": "draws an AttentionConcentration (its concentration argument), not a ScanResult: "
    "make one with massact_lens.attention.attention_concentration(model, inputs)",
    "ablation_figure": "draws an AblationTable (its table argument), not None: make one with massact_lens.ablation_table(",
    "implicit_bias_figure": "draws an ImplicitBias (its decomposition argument), not an AttentionConcentration: "
    "make one with massact_lens.attention.implicit_bias(model, inputs)",
    "hidden_state_figure": "draws a HiddenStates (its states argument), not a ScanResult: make one with "
    "massact_lens.viz.hidden_states(model, text)",
    "attention_logits_figure": "draws an AttentionLogits (its logits argument), not an AttentionConcentration: "
    "make one with massact_lens.attention.attention_logits(",
    "attention_heads_widget": "draws an AttentionLogits (its logits argument), not a ScanResult",
    "tokens_by_activation_widget": "draws a HiddenStates (its states argument), not None",
}


def test_every_view_given_another_result_says_what_it_needs():
    done = subprocess.run([sys.executable, "-c", _VIEWS_SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for view, expected in _VIEWS_EXPECTED.items():
        kind, message = results[view]
        assert kind == "TypeError" and message.startswith(f"{view} {expected}"), (view, kind, message)


def test_a_layer_not_read_says_what_to_do():
    from massact_lens import viz

    model = tiny_model("llama", n_layers=3)
    states = viz.hidden_states(model, _tokens(1)[0], layers=[0])
    with pytest.raises(ValueError, match=r"Layer 2 was not read; .*\[0\]\. Pass one of them \(or read that layer "
                                         r"first: hidden_states\(model, text, layers=\[2\]\)\)"):
        viz.hidden_state_figure(states, 2)
    with pytest.raises(ValueError, match=r"Layer 99 was not read.*the model has no layer 99 \(its layers are 0\.\.2\)"):
        viz.hidden_state_figure(states, 99)
    with pytest.raises(ValueError, match=r"Hook 'x' was not read.*Pass one of them, or read it first"):
        viz.hidden_state_figure(states, "x")
