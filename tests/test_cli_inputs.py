"""`fusionnet matte` over folders, globs, re-runs (--skip-existing), videos and a stdin -> stdout pipe.

Most checks call `fusionnet.cli.main.main` in this process (a subprocess would only add a torch import);
the pipe runs the real command in subprocesses, since stdin and stdout are what it is about.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fusionnet.cli.inputs import collect_inputs
from fusionnet.cli.main import main
from fusionnet.inference.loading import load_model
from fusionnet.inference.matter import Matter
from fusionnet.io.images import image_suffixes, to_uint8
from fusionnet.video import matte as video

SUMMARY = re.compile(r"matted (\d+) of (\d+) (?:images and videos|images|videos) \((\d+) failed(?:, (\d+) skipped: outputs exist)?\)")
PNG_END = b"IEND\xaeB`\x82"
# 40x56 images: the network sees them at their own size; fp32 pinned (auto times this CPU and may pick bf16/int8)
FAST = ("--max-side", "64", "--device", "cpu", "--precision", "fp32")


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 56)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def tree(root: Path) -> list[str]:
    """Every file and folder under `root`, relative, sorted (folders end in '/')."""
    return sorted(
        str(p.relative_to(root)) + ("/" if p.is_dir() else "") for p in root.rglob("*")
    ) if root.exists() else []


def read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def cli_env() -> dict[str, str]:
    # One thread: helpers share 2 cores and oversubscribed OpenMP is ~10x slower; no telemetry.
    return {**os.environ, "OMP_NUM_THREADS": "1", "DO_NOT_TRACK": "true"}


# --------------------------------------------------------------------------------------------- folders


def test_folders_and_files_mirror_the_layout_and_dispatch_videos(tiny_checkpoint, tmp_path, capfd, monkeypatch):
    photos, other, out = tmp_path / "photos", tmp_path / "other", tmp_path / "out"
    write_image(photos / "cat.png", 1)
    write_image(photos / "sub" / "CAT.bmp", 3)  # same stem as the top level, other output folder: kept
    write_image(photos / "sub" / "cat.JPG", 2)  # collides with sub/CAT.bmp (listed first) in out/sub
    write_image(photos / "sub" / "deeper" / "dog.webp", 4)
    write_image(photos / "sub" / "deeper" / "fox.TIFF", 5)
    write_image(photos / ".cache" / "hidden.png", 6)  # hidden folder
    write_image(photos / ".hidden.png", 7)  # hidden file
    (photos / "notes.txt").write_text("not an image, and not looked at\n")
    (photos / "clips").mkdir()
    (photos / "clips" / "clip.mp4").write_bytes(b"not really a video")
    explicit = write_image(other / "Cat.png", 8)  # a file next to the folder: out/, after photos/cat.png
    explicit_video = other / "TAKE.MOV"  # upper-case video suffix given as a file
    explicit_video.write_bytes(b"\x00" * 64)
    empty = tmp_path / "empty"  # a folder with nothing to matte fails like a bad file
    (empty / "sub").mkdir(parents=True)

    calls = []
    real_matte_video = video.matte_video

    def recording_matte_video(matter, path, out_dir, stem, kinds, background, options, progress):
        calls.append((path, out_dir, stem, list(kinds)))
        try:
            return real_matte_video(matter, path, out_dir, stem, kinds, background, options, progress)
        except video.VideoError as exc:
            calls[-1] += (exc.problem,)
            raise

    monkeypatch.setattr(video, "matte_video", recording_matte_video)
    code = main(["matte", str(photos), str(explicit), str(explicit_video), str(photos / "cat.png"), str(empty),
                 "--model", str(tiny_checkpoint), "--out", str(out), "--save", "alpha", "trimap", "--progress", *FAST])
    stdout, stderr = capfd.readouterr()

    assert code == 1, stderr  # the videos (stub, or garbage bytes) and the empty folder fail; every image is matted
    assert f"error: {empty}: is a directory with no image or video files\n" in stderr
    assert [call[:4] for call in calls] == [
        (photos / "clips" / "clip.mp4", out / "clips", "clip", ["alpha", "trimap"]),
        (explicit_video, out, "TAKE", ["alpha", "trimap"]),
    ]
    for path, *_, problem in calls:
        assert f"error: {path}: {problem}\n" in stderr
    assert "not an image file" not in stderr  # no video reached the image loader, nor notes.txt
    images = ["cat", "Cat-2", "sub/CAT", "sub/cat-2", "sub/deeper/dog", "sub/deeper/fox"]
    expected = {f"{stem}_{kind}.png" for stem in images for kind in ("alpha", "trimap")}
    assert tree(out) == sorted(expected | {"sub/", "sub/deeper/"})  # no clips/ left by the failed video
    assert f"note: {explicit}: output name 'Cat' is taken by {photos / 'cat.png'}; writing Cat-2_*.png" in stderr
    assert f"note: {photos / 'sub' / 'cat.JPG'}: output name 'cat' is taken by {photos / 'sub' / 'CAT.bmp'}" in stderr
    assert f"note: {photos / 'cat.png'}: same file as {photos / 'cat.png'}; matted once" in stderr
    assert SUMMARY.search(stdout).groups()[:3] == ("6", "9", "3") and "of 9 images and videos" in stdout
    assert "device: cpu (precision fp32)\n" in stderr

    # Progress bar on stderr: a count, elapsed<remaining and a rate in images per second.
    assert re.search(r"8/8 \[\d\d:\d\d<\d\d:\d\d, +\d+\.\d+image/s\]", stderr), stderr

    # Values: a mirrored output is the matte of its own image, at its own size.
    matter = Matter(load_model(tiny_checkpoint), device="cpu", max_side=64)
    rgb = np.asarray(Image.open(photos / "sub" / "CAT.bmp").convert("RGB"))
    np.testing.assert_array_equal(read(out / "sub" / "CAT_alpha.png"), to_uint8(matter(rgb).alpha))
    assert read(out / "sub" / "deeper" / "fox_trimap.png").shape == (40, 56)


def test_skip_existing_recomputes_only_missing_outputs(tiny_checkpoint, tmp_path, capfd):
    photos = tmp_path / "photos"
    for name, seed in (("a.png", 1), ("b.png", 2), ("nested/c.jpg", 3)):
        write_image(photos / name, seed)
    out = photos / "matted"  # inside the searched folder: its outputs must not become inputs
    argv = ["matte", str(photos), "--model", str(tiny_checkpoint), "--out", str(out), "--save", "alpha", "trimap", *FAST]
    assert main(argv) == 0
    first = capfd.readouterr()
    assert SUMMARY.search(first.out).groups()[:3] == ("3", "3", "0"), first.err

    sentinel = np.full((40, 56), 7, np.uint8)
    Image.fromarray(sentinel).save(out / "a_alpha.png")  # "done before": must be left alone
    (out / "b_trimap.png").unlink()  # half done: b is matted again
    before = (out / "nested" / "c_alpha.png").stat().st_mtime_ns
    assert main([*argv, "--skip-existing"]) == 0
    second = capfd.readouterr()
    assert SUMMARY.search(second.out).groups() == ("1", "3", "0", "2"), second.err
    np.testing.assert_array_equal(read(out / "a_alpha.png"), sentinel)
    assert (out / "b_trimap.png").is_file()
    assert (out / "nested" / "c_alpha.png").stat().st_mtime_ns == before
    assert tree(out) == ["a_alpha.png", "a_trimap.png", "b_alpha.png", "b_trimap.png",
                         "nested/", "nested/c_alpha.png", "nested/c_trimap.png"]

    # A subset of what is there: nothing to do (b, half done before, is complete now).
    assert main([*argv, "--skip-existing", "--save", "trimap"]) == 0
    assert SUMMARY.search(capfd.readouterr().out).groups() == ("0", "3", "0", "3")


def test_glob_filters_relative_to_each_folder(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "out"
    for name in ("top.jpg", "TOP2.JPEG", "x.png", "a/one.jpg", "a/b/two.JPG", "a/b/three.png", ".h/hid.jpg"):
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(b"x")  # never decoded: collect_inputs only looks at names

    def found(pattern: str | None) -> list[str]:
        collected = collect_inputs([photos], out, pattern)
        return [str(job.path.relative_to(photos)) for job in collected.jobs]

    assert found(None) == ["top.jpg", "TOP2.JPEG", "x.png", "a/one.jpg", "a/b/three.png", "a/b/two.JPG"]
    assert found("**/*.jpg") == ["top.jpg", "a/one.jpg", "a/b/two.JPG"]
    assert found("*.jpg") == ["top.jpg"]  # no '**': the folder's top level only, as pathlib's glob
    assert found("a/**/t*") == ["a/b/three.png", "a/b/two.JPG"]
    assert found("**/*.jp*g") == ["top.jpg", "TOP2.JPEG", "a/one.jpg", "a/b/two.JPG"]
    jobs = collect_inputs([photos], out, "**/two.jpg").jobs
    assert [(job.out_dir, job.stem) for job in jobs] == [(out / "a" / "b", "two")]
    assert collect_inputs([photos], out, "*.gif").errors == [
        (photos, "is a directory with no image or video files matching --glob '*.gif'")
    ]


def test_image_suffixes_are_what_pil_decodes():
    suffixes = image_suffixes()
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"} <= suffixes
    assert not suffixes & {".pdf", ".mpg", ".mpeg", ".txt", ""}  # save-only, header-only, not images


def test_bad_globs_are_usage_errors(tiny_checkpoint, tmp_path, capfd):
    good = write_image(tmp_path / "good.png", 1)
    for pattern, problem in (("/abs/*.jpg", "must be relative to each folder"), ("../*.jpg", "'..' cannot be")):
        argv = ["matte", str(good), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "out"), "--glob", pattern]
        assert main(argv) == 2
        assert f"error: --glob {pattern!r}: {problem}" in capfd.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- stdin -> stdout


@pytest.mark.parametrize(
    ("inputs", "options", "problem"),
    [
        (["-"], ["--save", "alpha", "trimap"], "with INPUT - one PNG goes to stdout, so --save takes exactly one kind, "
         "got alpha trimap"),
        (["-"], ["--out", "somewhere"], "--out and --skip-existing are not used with INPUT -"),
        (["-"], ["--skip-existing"], "--out and --skip-existing are not used with INPUT -"),
        (["-", "other.png"], [], "INPUT - (one image on stdin) cannot be combined with other inputs"),
    ],
)
def test_pipe_usage_errors(tiny_checkpoint, capfd, inputs, options, problem):
    assert main(["matte", *inputs, "--model", str(tiny_checkpoint), *options]) == 2
    assert f"error: {problem}" in capfd.readouterr().err


def test_out_is_required_unless_piping(tiny_checkpoint, tmp_path, capfd):
    assert main(["matte", str(write_image(tmp_path / "a.png", 1)), "--model", str(tiny_checkpoint)]) == 2
    assert "--out DIR is required (only INPUT - writes to stdout)" in capfd.readouterr().err


def test_stdin_to_stdout_matches_the_file_output(tiny_checkpoint, tmp_path, capfd):
    photo = write_image(tmp_path / "photo.png", 9)
    data = photo.read_bytes()
    command = [sys.executable, "-m", "fusionnet.cli.main", "matte", "-", "--model", str(tiny_checkpoint), "--max-side", "64",
               "--precision", "fp32"]
    # Both pipes at once: two cores, and each process spends most of its time importing torch.
    good = subprocess.Popen([*command, "--device", "cpu"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    bad = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env=cli_env())  # --device auto
    good_out, good_err = good.communicate(data, timeout=300)
    bad_out, bad_err = bad.communicate(data[: len(data) // 2], timeout=300)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the pipe (OMP_NUM_THREADS=1): the same float sums, the same bits
    try:
        assert main(["matte", str(photo), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "out"), *FAST]) == 0
    finally:
        torch.set_num_threads(threads)
    capfd.readouterr()
    assert good.returncode == 0, good_err.decode()
    assert good_out.startswith(b"\x89PNG\r\n\x1a\n") and good_out.endswith(PNG_END)  # one PNG, nothing else
    assert good_out.count(PNG_END) == 1
    piped = np.asarray(Image.open(BytesIO(good_out)))
    assert piped.shape == (40, 56)
    np.testing.assert_array_equal(piped, read(tmp_path / "out" / "photo_alpha.png"))
    assert good_err.decode().splitlines() == ["device: cpu (precision fp32)"]

    assert bad.returncode == 1 and bad_out == b""
    bad_err = bad_err.decode()
    assert "error: <stdin>: cannot decode image data, the file is truncated or corrupt" in bad_err
    device = r"cuda:\d+ .+" if torch.cuda.is_available() else "cpu"
    assert re.search(rf"^device: {device} \(precision fp32\)$", bad_err, re.M), bad_err
