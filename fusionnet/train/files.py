"""Atomic file writes for the trainer's outputs: a temp sibling, then os.replace.

A kill at any moment leaves either the previous file or the complete new one, never a torn file.
The temp file gets the usual permissions (0666 minus the umask), not mkstemp's private 0600.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from fusionnet.model.checkpoint import atomic_write_path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[Path], None], fsync: bool = False) -> Path:
    """Call `write(tmp)` for a temp sibling of `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_write_path(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
