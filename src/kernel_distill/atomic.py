"""Atomic file writes: a reader never sees a half-written file, an interrupted write leaves the old one.

A low-level module (standard library and numpy only) so that every other module can write files without
importing the distilled-set format.
"""

from __future__ import annotations

import io as _io
import os
import pathlib
import tempfile

from typing import Any

import numpy as np


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename.

    A reader never sees a half-written file, and an interrupted write leaves the old file untouched.
    """
    path = pathlib.Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; a written file gets the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        pathlib.Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:  # name the file (no space)
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    return path


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_savez(path: str | os.PathLike, **arrays: Any) -> pathlib.Path:
    """``np.savez`` to ``path`` atomically (uncompressed: distilled sets are small)."""
    return _atomic_npz(np.savez, path, arrays)


def atomic_savez_compressed(path: str | os.PathLike, **arrays: Any) -> pathlib.Path:
    """``np.savez_compressed`` to ``path`` atomically: the zoo's files, where natural images (Label Solve
    supports, mostly background on MNIST) shrink several times; ``np.load`` reads both kinds alike."""
    return _atomic_npz(np.savez_compressed, path, arrays)


def _atomic_npz(writer: Any, path: str | os.PathLike, arrays: dict[str, Any]) -> pathlib.Path:
    buffer = _io.BytesIO()
    writer(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())
