"""Checksums of what a run reads: a dataset split as loaded, a distilled-set file.

A base module (standard library and numpy only): :mod:`kernel_distill.data` records its splits' checksums
without importing the results schema (and, through it, anything that computes), and the zoo and the
exports hash files without a download library.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np


def split_checksum(x: np.ndarray, y: np.ndarray) -> str:
    """``"sha256:<hex>"`` of a split's images and labels (shape, dtype and bytes), as loaded."""
    digest = hashlib.sha256()
    for array in (np.ascontiguousarray(x), np.ascontiguousarray(y)):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.data.cast("B"))  # the bytes in memory order, as a memoryview of the array
    return f"sha256:{digest.hexdigest()}"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
