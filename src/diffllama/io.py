"""File helpers shared by every layer that writes or reads files: atomic writes (a temp file, then a rename),
folders that vanish again when the write into them fails, the usual permissions for files made by ``tempfile``, and
reading a JSON object. Knows nothing about models or checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def new_folder(directory: str | os.PathLike) -> Iterator[Path]:
    """Create ``directory`` (and missing parents) and yield it, normalised ("a/../b" is "b"); if the body (or the
    creation) fails, remove the outermost folder this call created, so a failed write leaves no new folders."""
    directory = Path(os.path.abspath(directory))
    created = next((p for p in reversed([directory, *directory.parents]) if not p.exists()), None)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        yield directory
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def default_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain ``open()`` (a file) or ``mkdir()`` (a folder) would have given it: 0o666 or
    0o777 less the umask. Files and folders made by ``tempfile`` (and files written by safetensors) start as
    0o600 / 0o700, so a checkpoint moved into place from them would be unreadable to other users."""
    umask = os.umask(0)  # the only portable way to read the umask is to set it: put it straight back
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def read_json_object(path: Path) -> dict:
    """The JSON object (a dict) in the UTF-8 file ``path``.

    Raises:
        ValueError: naming the file, when it is not UTF-8, not valid JSON, or holds something else than an object.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object ({{...}}), got a {type(data).__name__}")
    return data


def atomic_write(path: Path, write) -> Path:
    """Create ``path`` whole or not at all: ``write(tmp)`` fills a temp file in the same folder, which an atomic
    rename then puts in place (a reader never sees a half-written file); the file gets the usual permissions
    (:func:`default_permissions`), not the temp file's 0o600. The temp file is removed if ``write`` fails."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """:func:`atomic_write` of ``text`` (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
