"""Files written whole or not at all: the output path checked before any work, then an atomic write.

>>> import tempfile, os
>>> target = os.path.join(tempfile.mkdtemp(), "a.json")
>>> write_atomic(target, "{}").read_text()
'{}'
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["check_writable", "write_atomic"]


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Refuse, before any work, a file that cannot be written: a folder, or a folder missing or not writable.

    The folder is tried by creating (and removing) a temporary file in it, which
    also works where permission bits do not tell (root, read-only mounts).

    >>> check_writable("/no/such/folder/page.html")
    Traceback (most recent call last):
    ...
    FileNotFoundError: Folder /no/such/folder does not exist: create it first, or write elsewhere.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory: give a file name such as {target / 'report.html'}.")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"Folder {folder} does not exist: create it first, or write elsewhere.")
    try:
        with tempfile.NamedTemporaryFile(prefix=f".{target.name}.", suffix=".probe", dir=folder):
            pass
    except OSError as error:
        raise type(error)(
            f"cannot write in folder {folder} ({error.strerror or error}): choose a writable folder, e.g. "
            f"{Path(tempfile.gettempdir()) / target.name}."
        ) from None
    return target


def write_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder, then rename.

    A reader never sees a partial file, and an error leaves no file behind. The
    path is checked first (:func:`check_writable`).

    >>> import tempfile, os
    >>> target = os.path.join(tempfile.mkdtemp(), "a.html")
    >>> write_atomic(target, "<p>hi</p>").read_text()
    '<p>hi</p>'
    """
    target = check_writable(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
