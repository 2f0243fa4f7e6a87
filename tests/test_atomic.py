"""fusionnet.io.atomic: the one atomic writer (temp sibling + os.replace) behind model files, training
states, reports, ONNX files, caches and the pipeline's JSON files."""

from __future__ import annotations

import os
import stat

import pytest

from fusionnet.io.atomic import write_atomic, write_bytes_atomic, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out" / "model.bin"
    write_bytes_atomic(target, b"old")

    def crash(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_atomic(target, crash)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.bin"]


def test_the_file_gets_the_umasks_permissions_not_mkstemps(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "new" / "a.json", "{}")
    finally:
        os.umask(old)
    assert path.read_text() == "{}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_fsync_path_writes_too(tmp_path):
    assert write_atomic(tmp_path / "s.pt", lambda tmp: tmp.write_bytes(b"x"), fsync=True).read_bytes() == b"x"
