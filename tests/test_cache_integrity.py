"""The converted-model cache (massact_lens.models.cache) checks digests, not only sizes (issue 24).

Every folder here is a small fake one written through the module's own writing
function (``_write_manifest``), so no test rebuilds SmolLM2.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from massact_lens.models import cache as model_cache
from massact_lens.models.cache import MANIFEST_NAME, folder_problem, hf_folder_from_gguf

CONFIG = '{"model_type": "llama", "num_hidden_layers": 30}'


def _fake_folder(path, gguf_sha256="ab" * 32):
    path.mkdir(parents=True)
    (path / "config.json").write_text(CONFIG)
    (path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {f"t{i}": i for i in range(50)}}}))
    save_file({"w": torch.arange(4096.0).reshape(64, 64), "b": torch.ones(5)}, str(path / "model.safetensors"))
    gguf = path.parent / "source.gguf"
    if not gguf.exists():
        gguf.write_bytes(b"GGUF")
    model_cache._write_manifest(path, gguf_sha256, gguf)
    return path


def _edit_in_place(file, old: bytes, new: bytes, keep_mtime: bool = False):
    """Replace bytes without changing the size (optionally putting the mtime back)."""
    assert len(old) == len(new)
    before = file.stat()
    data = file.read_bytes()
    assert old in data
    file.write_bytes(data.replace(old, new, 1))
    if keep_mtime:
        os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert file.stat().st_size == before.st_size


def test_config_edited_in_place_with_the_same_size_is_refused(tmp_path):
    folder = _fake_folder(tmp_path / "f")
    _edit_in_place(folder / "config.json", b"30", b"29")
    problem = folder_problem(folder)
    assert problem is not None and "config.json" in problem
    assert "tokenizer.json" not in problem and "model.safetensors" not in problem


def test_a_damaged_tokenizer_is_named_and_not_called_a_weights_file(tmp_path):
    folder = _fake_folder(tmp_path / "f")
    _edit_in_place(folder / "tokenizer.json", b'"t1"', b'"x1"', keep_mtime=True)
    problem = folder_problem(folder)
    assert problem is not None and "tokenizer.json" in problem
    assert "weights" not in problem and "truncated" not in problem


def test_every_damaged_file_is_named(tmp_path):
    folder = _fake_folder(tmp_path / "f")
    _edit_in_place(folder / "config.json", b"30", b"29")
    _edit_in_place(folder / "tokenizer.json", b'"t1"', b'"x1"')
    problem = folder_problem(folder)
    assert "config.json" in problem and "tokenizer.json" in problem


def test_a_manifest_without_digests_is_not_trusted(tmp_path):
    folder = _fake_folder(tmp_path / "f")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest = {k: v for k, v in manifest.items() if k in ("format", "format_version", "source", "gguf_sha256",
                                                            "gguf_size", "dtype", "files")}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert "digest" in folder_problem(folder)


def test_large_weights_are_not_digested_at_every_load(tmp_path, monkeypatch):
    monkeypatch.setattr(model_cache, "_SMALL_BYTES", 1024)  # the fake weights count as large
    folder = _fake_folder(tmp_path / "f")
    digested = []
    real = model_cache.file_sha256
    monkeypatch.setattr(model_cache, "file_sha256", lambda path: digested.append(os.fspath(path)) or real(path))
    assert folder_problem(folder) is None
    assert not [p for p in digested if p.endswith("model.safetensors")]
    assert any(p.endswith("config.json") for p in digested)  # small files: every load


def test_large_weights_edited_in_place_are_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(model_cache, "_SMALL_BYTES", 1024)
    weights_bytes = torch.arange(4096.0).reshape(64, 64)[40, 7].numpy().tobytes()
    # a new mtime: the cheap check disagrees, the full digest decides
    folder = _fake_folder(tmp_path / "new_mtime")
    _edit_in_place(folder / "model.safetensors", weights_bytes, b"\0\0\0\0")
    assert "model.safetensors" in folder_problem(folder)
    # the mtime put back: the sampled blocks still differ
    folder = _fake_folder(tmp_path / "old_mtime")
    _edit_in_place(folder / "model.safetensors", weights_bytes, b"\0\0\0\0", keep_mtime=True)
    assert "model.safetensors" in folder_problem(folder)


def test_weights_only_touched_pass_and_the_next_check_is_cheap_again(tmp_path, monkeypatch):
    monkeypatch.setattr(model_cache, "_SMALL_BYTES", 1024)
    folder = _fake_folder(tmp_path / "f")
    os.utime(folder / "model.safetensors", ns=(1, 1_000_000_000))  # e.g. a copy without -p
    assert folder_problem(folder) is None  # the full digest agrees
    digested = []
    real = model_cache.file_sha256
    monkeypatch.setattr(model_cache, "file_sha256", lambda path: digested.append(os.fspath(path)) or real(path))
    assert folder_problem(folder) is None
    assert not [p for p in digested if p.endswith("model.safetensors")]


def test_a_damaged_folder_is_rebuilt_with_a_warning_that_names_the_file(tmp_path, monkeypatch):
    gguf = tmp_path / "source.gguf"
    gguf.write_bytes(b"GGUF")
    digest = hashlib.sha256(b"GGUF").hexdigest()
    folder = _fake_folder(tmp_path / "cache" / "model", gguf_sha256=digest)
    (tmp_path / "cache" / "source.gguf").unlink()
    assert hf_folder_from_gguf(gguf, folder, sha256=digest, reinstall="pip install x") == folder  # intact
    _edit_in_place(folder / "config.json", b"30", b"29")

    def stop(path):
        raise RuntimeError("conversion reached")

    monkeypatch.setattr(model_cache, "_dequantise", stop)
    with pytest.warns(UserWarning) as caught, pytest.raises(RuntimeError, match="conversion reached"):
        hf_folder_from_gguf(gguf, folder, sha256=digest, reinstall="pip install x")
    message = str(caught[0].message)
    assert "config.json" in message and "rebuilding" in message and "weights" not in message
    assert not folder.exists()  # the 29-layer folder is never loaded


@pytest.mark.slow
def test_the_real_smollm2_folder_records_digests_and_refuses_29_layers(tmp_path):
    """The small files of the real cached folder (its weights linked, not copied)."""
    import time

    from massact_lens.examples import SMOLLM2_GGUF_SHA256, smollm2_dir

    real = smollm2_dir()
    manifest = json.loads((real / MANIFEST_NAME).read_text())
    assert set(manifest["checks"]) == set(manifest["files"])
    assert {"mtime_ns", "sampled_sha256"} <= set(manifest["checks"]["model.safetensors"])
    assert "mtime_ns" not in manifest["checks"]["tokenizer.json"]  # 3.5 MB: digested in full at every load
    start = time.perf_counter()
    assert folder_problem(real, SMOLLM2_GGUF_SHA256) is None
    assert time.perf_counter() - start < 0.3
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in real.iterdir():
        if file.name == "model.safetensors":
            (copy / file.name).symlink_to(file)
        else:
            (copy / file.name).write_bytes(file.read_bytes())
    assert folder_problem(copy, SMOLLM2_GGUF_SHA256) is None
    _edit_in_place(copy / "config.json", b'"num_hidden_layers": 30', b'"num_hidden_layers": 29')
    assert folder_problem(copy, SMOLLM2_GGUF_SHA256).startswith("config.json was changed")
