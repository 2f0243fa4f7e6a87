"""The real `fusionnet` CLI (a subprocess) on good and bad inputs.

Every bad-input case runs in a batch with a good image: the good one must still be matted, a bad one
must give `error: <path>: <problem>`, exit status 1 and no output files (not even temporaries).
Inputs the CLI must handle (16-bit, grayscale, RGBA, CMYK, EXIF-rotated, 1x1, 20000x20000) run next to
an 8-bit RGB file holding what the loader should have made of them: both mattes must be identical.

Each process imports torch (seconds on a loaded host), so cases share calls: every bad file goes into one
batch, every handled input into another (module-scoped runs that several tests read). Usage errors are
in tests/test_cli_usage.py.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112
SUMMARY = re.compile(r"matted (\d+) of (\d+) images \((\d+) failed\)")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


def cli_env(**extra: str) -> dict[str, str]:
    # One thread: several test processes share 2 cores, and oversubscribed OpenMP is ~10x slower.
    return {**os.environ, "OMP_NUM_THREADS": "1", "DO_NOT_TRACK": "true", **extra}


def run_cli(*args: str | os.PathLike, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fusionnet.cli.main", *map(str, args)],
        capture_output=True, text=True, timeout=600, env=env or cli_env(),
    )


def matte(checkpoint: Path, out: Path, *inputs: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return run_cli("matte", *inputs, "--model", checkpoint, "--out", out, "--save", "alpha", "trimap", *extra)


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_two_tone_png(path: Path, width: int, height: int, top: tuple[int, ...], bottom: tuple[int, ...]) -> None:
    """An RGB PNG, top half `top`, bottom half `bottom`, streamed without ever holding the pixels.

    Raw-deflate blocks ended by a full flush are independent, so one compressed block of identical
    scanlines can be repeated; the zlib checksum is accumulated over the (never stored) pixels.
    """

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    assert height % 2 == 0
    rows = max(r for r in range(1, 101) if (height // 2) % r == 0)
    blocks = []
    for rgb in (top, bottom):
        raw = (b"\x00" + bytes(rgb) * width) * rows  # filter type 0, then the scanline
        deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
        blocks.append((raw, deflate.compress(raw) + deflate.flush(zlib.Z_FULL_FLUSH)))
    adler = 1
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", b"\x78\xda"))
        for y in range(0, height, rows):
            raw, packed = blocks[y >= height // 2]
            adler = zlib.adler32(raw, adler)
            f.write(chunk(b"IDAT", packed))
        final = zlib.compressobj(9, zlib.DEFLATED, -15).flush() + struct.pack(">I", adler)
        f.write(chunk(b"IDAT", final) + chunk(b"IEND", b""))


def read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def make_good(directory: Path) -> Path:
    """`directory/good.png`, 48x64 RGB noise: the file every batch must still matte."""
    path = directory / "good.png"
    directory.mkdir(parents=True, exist_ok=True)
    Image.fromarray(random_rgb(48, 64, seed=1)).save(path)
    return path


@pytest.fixture
def good(tmp_path) -> Path:
    return make_good(tmp_path / "in")


# --------------------------------------------------------------------------------------------- bad inputs


def _bytes(im: Image.Image, fmt: str) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    im.save(buffer, format=fmt)
    return buffer.getvalue()


def make_bad(kind: str, directory: Path) -> Path:
    sample = Image.fromarray(random_rgb(40, 56, seed=2))
    if kind == "missing":
        return directory / "missing.png"
    if kind == "directory":
        (directory / "folder.png").mkdir()
        return directory / "folder.png"
    path = directory / (f"{kind}.jpg" if kind == "truncated_jpeg" else f"{kind}.png")  # one name each: they share a batch
    if kind == "not_an_image":
        path.write_text("hello, I am a text file\n" * 10)
    elif kind == "zero_byte":
        path.write_bytes(b"")
    elif kind == "truncated_png":
        data = _bytes(sample, "PNG")
        path.write_bytes(data[: len(data) * 2 // 3])
    elif kind == "truncated_jpeg":
        data = _bytes(sample, "JPEG")
        path.write_bytes(data[: len(data) // 2])
    elif kind == "bomb":
        write_two_tone_png(path, 30000, 30000, (1, 2, 3), (4, 5, 6))  # 900 Mpx in about 3 MB
    return path


BAD_CASES = {
    "missing": "no such file",
    "directory": "is a directory",
    "not_an_image": "not an image file",
    "zero_byte": r"empty file \(0 bytes\)",
    "truncated_png": "cannot decode image data, the file is truncated or corrupt",
    "truncated_jpeg": "cannot decode image data, the file is truncated or corrupt",
    "bomb": r"image is 30000x30000 = 900 megapixels, over the limit of 537 megapixels \(decompression-bomb guard\)",
}


@pytest.fixture(scope="module")
def bad_batch(checkpoint, tmp_path_factory) -> SimpleNamespace:
    """One call: good.png, every bad file, and blocked.png whose trimap cannot be written (a folder is there)."""
    root = tmp_path_factory.mktemp("bad")
    good = make_good(root / "in")
    bad = {kind: make_bad(kind, good.parent) for kind in sorted(BAD_CASES)}
    blocked = good.parent / "blocked.png"
    Image.fromarray(random_rgb(40, 40, seed=3)).save(blocked)
    out = root / "out"
    (out / "blocked_trimap.png").mkdir(parents=True)  # the second output cannot be renamed into place
    result = matte(checkpoint, out, blocked, good, *bad.values())
    return SimpleNamespace(result=result, out=out, bad=bad, blocked=blocked)


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_bad_input_names_its_file_and_problem(bad_batch, kind):
    path, stderr = bad_batch.bad[kind], bad_batch.result.stderr
    assert re.search(rf"^error: {re.escape(str(path))}: {BAD_CASES[kind]}", stderr, re.M), stderr


def test_bad_inputs_fail_alone_and_leave_nothing(bad_batch):
    result, out = bad_batch.result, bad_batch.out
    assert result.returncode == 1, result.stderr
    n = len(BAD_CASES) + 2
    assert SUMMARY.search(result.stdout).groups() == ("1", str(n), str(n - 1))
    assert len(re.findall(r"^error: ", result.stderr, re.M)) == n - 1  # one line per failed file
    # nothing for a bad file, no temporaries, and no blocked_alpha.png beside the folder in its way
    assert files_in(out) == ["blocked_trimap.png", "good_alpha.png", "good_trimap.png"]
    assert read(out / "good_alpha.png").shape == (48, 64)


def test_write_failure_is_a_failed_file(bad_batch):
    stderr = bad_batch.result.stderr
    assert re.search(rf"^error: {re.escape(str(bad_batch.blocked))}: cannot write outputs", stderr, re.M), stderr


def test_pixel_limit_option(checkpoint, tmp_path, good):
    big = good.parent / "big.png"
    write_two_tone_png(big, 4000, 3000, (200, 30, 30), (30, 30, 200))
    result = matte(checkpoint, tmp_path / "out", good, big, extra=("--max-pixels", "10000000"))
    assert result.returncode == 1
    assert f"error: {big}: image is 4000x3000 = 12 megapixels, over the limit of 10 megapixels" in result.stderr


# --------------------------------------------------------------------------------------------- handled inputs


def make_handled(kind: str, directory: Path) -> tuple[Path, Path, tuple[int, int]]:
    """(file, 8-bit RGB file with the pixels the loader should produce, expected output (h, w))."""
    rgb = random_rgb(40, 56, seed=4)
    path, reference = directory / f"{kind}.png", directory / f"{kind}_reference.png"
    size = (40, 56)
    if kind == "sixteen_bit":
        gray8 = rgb[:, :, 0]
        Image.fromarray(gray8.astype(np.uint16) * 257).save(path)  # v * 257 / 65535 == v / 255
        Image.fromarray(np.dstack([gray8] * 3)).save(reference)
        assert Image.open(path).mode == "I;16"
    elif kind == "grayscale":
        Image.fromarray(rgb[:, :, 1]).save(path)
        Image.fromarray(np.dstack([rgb[:, :, 1]] * 3)).save(reference)
    elif kind == "rgba":
        alpha = np.where(np.arange(56) % 3 == 0, 0, 255).astype(np.uint8)[None].repeat(40, 0)
        Image.fromarray(np.dstack([rgb, alpha])).save(path)
        Image.fromarray(rgb).save(reference)
    elif kind == "cmyk":
        path = directory / "cmyk.jpg"
        Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
        with Image.open(path) as im:
            assert im.mode == "CMYK"
            im.convert("RGB").save(reference)
    elif kind == "exif_rotated":
        path = directory / "rotated.jpg"
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = 6
        Image.fromarray(rgb).save(path, exif=exif, quality=95)
        with Image.open(path) as im:
            ImageOps.exif_transpose(im).save(reference)
        size = (56, 40)
    elif kind == "one_pixel":
        Image.new("RGB", (1, 1), (250, 10, 90)).save(path)
        Image.new("RGB", (1, 1), (250, 10, 90)).save(reference)
        size = (1, 1)
    elif kind == "huge":
        write_two_tone_png(path, 20000, 20000, (200, 30, 30), (30, 30, 200))
        half = np.zeros((64, 64, 3), np.uint8)
        half[:32], half[32:] = (200, 30, 30), (30, 30, 200)
        Image.fromarray(half).save(reference)  # what 20000x20000 shrinks to at --max-output-side 64
        size = (64, 64)
    return path, reference, size


HANDLED = ["sixteen_bit", "grayscale", "rgba", "cmyk", "exif_rotated", "one_pixel", "huge"]


def handled_run(checkpoint: Path, root: Path, kinds: list[str], extra: tuple[str, ...] = ()) -> SimpleNamespace:
    """One call: good.png, then each handled input next to its 8-bit RGB reference."""
    good = make_good(root / "in")
    files = {kind: make_handled(kind, good.parent) for kind in kinds}
    inputs = [good] + [p for kind in kinds for p in files[kind][:2]]
    out = root / "out"
    result = matte(checkpoint, out, *inputs, extra=("--max-output-side", "64", *extra))
    return SimpleNamespace(result=result, out=out, files=files, count=len(inputs))


@pytest.fixture(scope="module")
def handled_batch(checkpoint, tmp_path_factory) -> SimpleNamespace:
    """Every handled input but the 20000x20000 one, in one call with --progress forced."""
    kinds = [kind for kind in HANDLED if kind != "huge"]
    return handled_run(checkpoint, tmp_path_factory.mktemp("handled"), kinds, ("--progress",))


@pytest.fixture(scope="module")
def huge_batch(checkpoint, tmp_path_factory) -> SimpleNamespace:
    """The 20000x20000 input on its own: decoding it takes tens of seconds (a slow test)."""
    return handled_run(checkpoint, tmp_path_factory.mktemp("huge"), ["huge"])


BATCHES = [pytest.param("handled_batch", id="small"), pytest.param("huge_batch", id="huge", marks=pytest.mark.slow)]


@pytest.mark.parametrize("batch", BATCHES)
def test_handled_inputs_all_matte(request, batch):
    run = request.getfixturevalue(batch)
    result, n = run.result, str(run.count)
    assert result.returncode == 0, result.stderr
    assert "error:" not in result.stderr
    assert SUMMARY.search(result.stdout).groups() == (n, n, "0")
    assert read(run.out / "good_alpha.png").shape == (48, 64)


@pytest.mark.parametrize("kind", [*(k for k in HANDLED if k != "huge"), pytest.param("huge", marks=pytest.mark.slow)])
def test_handled_input_mattes_like_its_rgb_equivalent(request, kind):
    run = request.getfixturevalue("huge_batch" if kind == "huge" else "handled_batch")
    path, reference, size = run.files[kind]
    out, result = run.out, run.result
    assert result.returncode == 0, result.stderr
    alpha, expected = read(out / f"{path.stem}_alpha.png"), read(out / f"{reference.stem}_alpha.png")
    assert alpha.shape == size and read(out / f"{path.stem}_trimap.png").shape == size
    if kind == "huge":
        assert f"note: {path}: 20000x20000 is larger than --max-output-side; outputs are 64x64" in result.stderr
        # The shrunk image differs from the drawn reference only on the rows where the halves meet.
        assert np.abs(alpha[:30].astype(int) - expected[:30]).max() <= 1
        assert np.abs(alpha[34:].astype(int) - expected[34:]).max() <= 1
    else:
        np.testing.assert_array_equal(alpha, expected)


@pytest.mark.slow
def test_huge_image_decodes_within_a_memory_bound(checkpoint, tmp_path, good):
    """20000x20000 RGB: the 8-bit decode is 1.2 GB; a float32 copy alone would be 4.8 GB.

    The network runs at 64 px so that decoding, not the network's activations, sets the peak.
    """
    path, _, _ = make_handled("huge", good.parent)
    # The CLI process reports its own peak RSS: RUSAGE_CHILDREN would be the max over every
    # subprocess this pytest process ever waited for, including other tests' training runs.
    probe = (
        "import resource, sys; from fusionnet.cli.main import main; rc = main(sys.argv[1:]); "
        "sys.stderr.write('PEAK_RSS_KIB=%d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
    )
    args = ["matte", str(path), "--model", str(checkpoint), "--out", str(tmp_path / "out"),
            "--max-output-side", "800", "--max-side", "64", "--no-refine"]
    result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=600,
                            env=cli_env())
    assert result.returncode == 0, result.stderr
    assert read(tmp_path / "out" / "huge_alpha.png").shape == (800, 800)
    peak_kib = int(result.stderr.rsplit("PEAK_RSS_KIB=", 1)[1].split()[0])  # KiB on Linux
    peak_gib = peak_kib / 2**20
    assert peak_gib < 2.5, f"CLI peak RSS {peak_gib:.2f} GiB"


# --------------------------------------------------------------------------------------------- outputs


def test_all_output_kinds_and_colour_composite(checkpoint, tmp_path, good):
    out = tmp_path / "out"
    result = run_cli(
        "matte", good, "--model", checkpoint, "--out", out,
        "--save", "alpha", "rgba", "composite", "trimap", "--background", "#00ff00",
    )
    assert result.returncode == 0, result.stderr
    assert files_in(out) == ["good_alpha.png", "good_composite.png", "good_rgba.png", "good_trimap.png"]
    alpha, rgba, composite = read(out / "good_alpha.png"), read(out / "good_rgba.png"), read(out / "good_composite.png")
    assert rgba.shape == (48, 64, 4) and composite.shape == (48, 64, 3)
    np.testing.assert_array_equal(rgba[:, :, 3], alpha)
    a = alpha[..., None] / 255.0
    expected = a * rgba[:, :, :3] + (1 - a) * np.array([0, 255, 0])
    assert np.abs(composite - expected).max() <= 1.5  # I = alpha F + (1 - alpha) B, up to 8-bit rounding
    assert set(np.unique(read(out / "good_trimap.png"))) <= {0, 128, 255}


def bilinear_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`(h,w,C)` enlarged bilinearly with half-pixel centres and clamped edges (align_corners=False)."""

    def taps(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        low = np.floor(src).astype(int)
        return low, np.minimum(low + 1, n_in - 1), src - low

    y0, y1, wy = taps(image.shape[0], height)
    x0, x1, wx = taps(image.shape[1], width)
    rows = image[y0] * (1 - wy)[:, None, None] + image[y1] * wy[:, None, None]
    return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def structured_background(height: int, width: int) -> np.ndarray:
    """uint8 RGB: red by quadrant, green a ramp down the rows, blue a ramp across the columns."""
    yy, xx = np.mgrid[:height, :width]
    red = np.where(yy < height // 2, np.where(xx < width // 2, 250, 10), np.where(xx < width // 2, 120, 60))
    return np.dstack([red, yy * 255 // (height - 1), xx * 255 // (width - 1)]).astype(np.uint8)


def test_composite_over_an_image(checkpoint, tmp_path, good):
    # A portrait 30x20 background under a landscape 48x64 input: scaling to cover is set by the width
    # (x3.2 -> 96x64), and the centre crop keeps rows 24..71, across the quadrants' boundary.
    pixels = structured_background(30, 20)
    background = tmp_path / "bg.png"
    Image.fromarray(pixels).save(background)
    out = tmp_path / "out"
    result = run_cli(
        "matte", good, "--model", checkpoint, "--out", out, "--save", "rgba", "composite", "--background", background
    )
    assert result.returncode == 0, result.stderr
    rgba, composite = read(out / "good_rgba.png"), read(out / "good_composite.png").astype(float)
    a = rgba[:, :, 3:] / 255.0

    def over(bg: np.ndarray) -> np.ndarray:
        return a * rgba[:, :, :3] + (1 - a) * bg * 255

    cover = bilinear_resize(pixels / 255.0, 96, 64)
    assert np.abs(composite - over(cover[24:72])).max() <= 1.5  # I = alpha F + (1 - alpha) B, up to rounding
    # the check tells these apart: the top of the cover (no centre crop), the image stretched to 48x64
    for wrong in (cover[:48], bilinear_resize(pixels / 255.0, 48, 64)):
        assert np.abs(composite - over(wrong)).max() > 20


def test_same_stems_are_disambiguated(checkpoint, tmp_path, good):
    first, second = tmp_path / "a" / "cat.png", tmp_path / "b" / "Cat.jpg"
    for path, seed in ((first, 5), (second, 6)):
        path.parent.mkdir()
        Image.fromarray(random_rgb(32, 40, seed)).save(path)
    out = tmp_path / "out"
    result = matte(checkpoint, out, first, second, first)
    assert result.returncode == 0, result.stderr
    assert f"note: {second}: output name 'Cat' is taken by {first}; writing Cat-2_*.png" in result.stderr
    assert f"note: {first}: same file as {first}; matted once" in result.stderr
    assert files_in(out) == ["Cat-2_alpha.png", "Cat-2_trimap.png", "cat_alpha.png", "cat_trimap.png"]
    assert not np.array_equal(read(out / "cat_alpha.png"), read(out / "Cat-2_alpha.png"))
    assert SUMMARY.search(result.stdout).groups() == ("2", "2", "0")


def test_progress_bar_only_when_asked_or_on_a_terminal(bad_batch, handled_batch):
    quiet = bad_batch.result.stderr  # several inputs, stderr is a pipe: no bar by default
    assert "image/s" not in quiet and not re.search(r"\d+/\d+ \[", quiet)
    n = handled_batch.count  # --progress forces it
    assert handled_batch.result.returncode == 0 and f"{n}/{n} [" in handled_batch.result.stderr


def test_bf16_and_no_refine_run(checkpoint, tmp_path, good):
    result = matte(checkpoint, tmp_path / "out", good, extra=("--precision", "bf16", "--no-refine", "--max-side", "32"))
    assert result.returncode == 0, result.stderr
    assert read(tmp_path / "out" / "good_alpha.png").shape == (48, 64)
