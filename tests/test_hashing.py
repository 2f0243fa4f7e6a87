"""The checksums we record, against values computed here independently (hashlib over known bytes,
DVC's directory md5 spelled out): file_sha256, the shards' data version, the content hash of a
directory outside DVC, and DVC's md5 of a directory."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fusionnet.data.shards import shards_digest
from fusionnet.io.hashing import file_sha256
from pipeline.tracking.provenance import content_sha256

ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2 example "abc"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
ABC_MD5 = "900150983cd24fb0d6963f7d28e17f72"  # RFC 1321 test suite


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dvc_dir_md5_by_hand(directory: Path) -> str:
    """DVC's directory md5 written out: md5 of the JSON listing (sorted keys) of {md5, relpath} of every
    file, sorted by path parts, + ".dir" (dvc_data's Tree.as_bytes)."""
    files = sorted((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.relative_to(directory).parts)
    listing = [{"md5": hashlib.md5(p.read_bytes()).hexdigest(), "relpath": p.relative_to(directory).as_posix()}
               for p in files]
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"


def content_sha256_by_hand(directory: Path) -> str:
    """content_sha256's definition spelled out: sha256 of "relpath\\0sha256(bytes)\\n" lines, sorted by path."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    lines = "".join(f"{p.relative_to(directory).as_posix()}\0{sha(p.read_bytes())}\n" for p in files)
    return sha(lines.encode())


@pytest.fixture
def tree(tmp_path) -> Path:
    """A small directory: two files at the top, one in a subfolder, one empty."""
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"abc")
    (root / "b.bin").write_bytes(bytes(range(256)) * 3)
    (root / "sub" / "c.txt").write_bytes(b"")
    return root


def test_file_sha256_of_known_bytes(tmp_path):
    (tmp_path / "abc").write_bytes(b"abc")
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "abc") == ABC_SHA256
    assert file_sha256(str(tmp_path / "empty")) == EMPTY_SHA256


def test_file_sha256_reads_past_its_block_size(tmp_path):
    """3 MiB + 5 bytes: several 1 MiB blocks and a short last one, all hashed, in order."""
    data = bytes(range(251)) * ((3 * (1 << 20) + 5) // 251) + b"tail!"
    (tmp_path / "big").write_bytes(data)
    assert file_sha256(tmp_path / "big") == sha(data)
    (tmp_path / "swapped").write_bytes(data[1 << 20:2 << 20] + data[:1 << 20] + data[2 << 20:])
    assert file_sha256(tmp_path / "swapped") != sha(data)


def test_content_sha256_is_the_sorted_path_and_content_listing(tree):
    by_hand = sha(
        f"a.txt\0{ABC_SHA256}\n"
        f"b.bin\0{sha(bytes(range(256)) * 3)}\n"
        f"sub/c.txt\0{EMPTY_SHA256}\n".encode()
    )
    assert content_sha256(tree) == by_hand == content_sha256_by_hand(tree)


def test_content_sha256_changes_with_a_byte_or_a_name_and_not_with_a_file_time(tree):
    before = content_sha256(tree)
    (tree / "a.txt").write_bytes(b"abd")
    assert content_sha256(tree) != before
    (tree / "a.txt").write_bytes(b"abc")
    assert content_sha256(tree) == before  # rewritten with the same bytes: same version
    (tree / "a.txt").rename(tree / "z.txt")
    assert content_sha256(tree) != before
    assert content_sha256(tree) == content_sha256_by_hand(tree)


def test_shards_digest_is_the_split_name_and_sha256_of_each_shard(tmp_path):
    out = tmp_path / "shards"
    for split, name, data in [("train", "shard-00000.parquet", b"t0"), ("train", "shard-00001.parquet", b"t1"),
                              ("val", "shard-00000.parquet", b"v0")]:
        (out / split).mkdir(parents=True, exist_ok=True)
        (out / split / name).write_bytes(data)
    (out / "summary.json").write_text("{}")  # not data: the summary itself records the digest
    (out / "train" / "notes.txt").write_text("not a shard")
    by_hand = sha(
        f"train/shard-00000.parquet:{sha(b't0')}\n"
        f"train/shard-00001.parquet:{sha(b't1')}\n"
        f"val/shard-00000.parquet:{sha(b'v0')}\n".encode()
    )
    assert shards_digest(out) == by_hand
    (out / "val" / "shard-00000.parquet").rename(out / "train" / "shard-00002.parquet")
    assert shards_digest(out) != by_hand  # the same bytes in the other split: another data version


def test_dvc_dir_md5_is_dvcs_listing_md5(tree):
    from pipeline.tracking.runs import dvc_dir_md5

    listing = [{"md5": ABC_MD5, "relpath": "a.txt"},
               {"md5": hashlib.md5(bytes(range(256)) * 3).hexdigest(), "relpath": "b.bin"},
               {"md5": "d41d8cd98f00b204e9800998ecf8427e", "relpath": "sub/c.txt"}]  # md5 of b""
    by_hand = hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"
    assert dvc_dir_md5(tree) == by_hand == dvc_dir_md5_by_hand(tree)
    (tree / "sub" / "c.txt").write_bytes(b"abc")
    assert dvc_dir_md5(tree) == dvc_dir_md5_by_hand(tree) != by_hand
