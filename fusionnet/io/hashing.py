"""sha256 of a file's bytes, read in 1 MiB blocks: the one helper behind every checksum we record
(init checkpoints in the resume key, the shards' data version, evaluation provenance)."""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of the file at `path`."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
