"""Atomic file writes: a temporary sibling, then os.replace, so a reader or a kill at any moment sees
the previous file or the complete new one, never a torn one.

    write_atomic(path, lambda tmp: torch.save(obj, tmp))
    write_bytes_atomic(path, data); write_text_atomic(path, text)

The temp sibling lies in the same folder (os.replace is atomic only within a filesystem) and is hidden
(`.name.XXXX.tmp`); the written file gets the usual permissions (0666 minus the umask), not mkstemp's
private 0600. Folders that are replaced whole use `fusionnet.data.imagefiles.atomic_output_dir`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def temp_sibling(path: str | os.PathLike) -> Path:
    """A new, empty, hidden temporary file beside `path` (same filesystem)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object], *, fsync: bool = False) -> Path:
    """Call `write(tmp)` on a temp sibling of `path`, then rename it to `path`; returns `path`.

    Creates the parent folder. fsync: flush the file to disk before the rename (training states).
    On any error the temp file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
