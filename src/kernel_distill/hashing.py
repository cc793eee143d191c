"""File hashes: a low-level module (standard library only) that any module may import.

KIP records the sha256 of a warm-start file and checks it on resume; the zoo checks its sets' hashes; the
exporters record their source's. All use :func:`file_sha256` (the zoo still has its own copy of the name).
"""

from __future__ import annotations

import hashlib
import os

CHUNK_BYTES = 1 << 20  # read in 1 MiB pieces: a distilled set of any size hashes in constant memory


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of the file at ``path``, as 64 lowercase hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()
