"""fusionnet.io.images: every input quirk loads as the right RGB values, or fails with a clear error."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image, ImageOps

from fusionnet.io.images import (
    EXIF_ORIENTATION_TAG,
    ImageLoadError,
    fit_within,
    load_image,
    load_image_bytes,
    to_uint8,
    write_pngs_atomic,
)


@pytest.fixture
def rgb_u8() -> np.ndarray:
    """A 24x36 random RGB image with distinct rows/columns, so any flip or rotation shows."""
    return np.random.default_rng(0).integers(0, 256, (24, 36, 3), dtype=np.uint8)


def save(tmp_path, name: str, im: Image.Image, **kwargs) -> str:
    path = tmp_path / name
    im.save(path, **kwargs)
    return str(path)


# --------------------------------------------------------------------------------------------- modes


def test_rgb_png_values_exact(tmp_path, rgb_u8):
    loaded = load_image(save(tmp_path, "x.png", Image.fromarray(rgb_u8)))
    assert loaded.rgb.dtype == np.float32 and loaded.rgb.shape == (24, 36, 3)
    np.testing.assert_array_equal(loaded.rgb, rgb_u8.astype(np.float32) / 255)
    assert loaded.original_size == (24, 36) and not loaded.downscaled and loaded.source_mode == "RGB"


def test_grayscale_is_replicated(tmp_path, rgb_u8):
    gray = rgb_u8[:, :, 0]
    loaded = load_image(save(tmp_path, "g.png", Image.fromarray(gray, mode="L")))
    for c in range(3):
        np.testing.assert_array_equal(loaded.rgb[:, :, c], gray / np.float32(255))


def test_16bit_gray_scaled_by_65535(tmp_path):
    values = np.array([[0, 1, 257, 32768], [40000, 65534, 65535, 12345]], dtype=np.uint16)
    path = save(tmp_path, "g16.png", Image.fromarray(values))
    assert Image.open(path).mode.startswith("I")  # really stored as 16-bit
    loaded = load_image(path)
    np.testing.assert_allclose(loaded.rgb[:, :, 1], values / 65535.0, atol=1e-7)
    assert loaded.rgb[1, 2, 0] == 1.0 and loaded.rgb[0, 0, 2] == 0.0


def test_16bit_gray_downscaled_keeps_scale(tmp_path):
    values = np.full((64, 48), 52428, dtype=np.uint16)  # 0.8 of full scale
    loaded = load_image(save(tmp_path, "g16.png", Image.fromarray(values)), max_side=16)
    assert loaded.size == (16, 12)
    np.testing.assert_allclose(loaded.rgb, 0.8, atol=1e-4)


def test_rgba_alpha_is_ignored(tmp_path, rgb_u8):
    alpha = np.zeros(rgb_u8.shape[:2], np.uint8)
    alpha[:, ::2] = 255  # half the pixels fully transparent: their stored colour must survive
    rgba = np.dstack([rgb_u8, alpha])
    loaded = load_image(save(tmp_path, "a.png", Image.fromarray(rgba, mode="RGBA")))
    np.testing.assert_array_equal(loaded.rgb, rgb_u8 / np.float32(255))


def test_gray_with_alpha_is_ignored(tmp_path, rgb_u8):
    la = np.dstack([rgb_u8[:, :, 1], np.zeros(rgb_u8.shape[:2], np.uint8)])
    loaded = load_image(save(tmp_path, "la.png", Image.fromarray(la, mode="LA")))
    np.testing.assert_array_equal(loaded.rgb[:, :, 2], rgb_u8[:, :, 1] / np.float32(255))


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (8, 6), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    im.info["transparency"] = 1
    loaded = load_image(save(tmp_path, "p.png", im, transparency=1))
    np.testing.assert_allclose(loaded.rgb[3, 4], np.array([10, 200, 30]) / 255, atol=1e-7)


def test_cmyk_jpeg_converted(tmp_path):
    path = save(tmp_path, "c.jpg", Image.new("CMYK", (40, 30), (0, 255, 255, 0)), quality=95)  # pure red
    assert Image.open(path).mode == "CMYK"
    loaded = load_image(path)
    reference = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255
    np.testing.assert_allclose(loaded.rgb, reference, atol=1e-7)
    np.testing.assert_allclose(loaded.rgb.mean(axis=(0, 1)), [1.0, 0.0, 0.0], atol=0.03)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil_exif_transpose(tmp_path, rgb_u8, orientation):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    path = save(tmp_path, "o.png", Image.fromarray(rgb_u8), exif=exif)
    loaded = load_image(path)
    reference = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"), np.float32) / 255
    np.testing.assert_array_equal(loaded.rgb, reference)
    assert loaded.orientation == orientation
    assert loaded.original_size == ((36, 24) if orientation >= 5 else (24, 36))


def test_exif_rotation_with_downscale(tmp_path):
    # Top third bright in the stored pixels; orientation 6 (rotate 90 CW to view) puts it on the right.
    stored = np.zeros((300, 200, 3), np.uint8)
    stored[:100] = 255
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6
    loaded = load_image(save(tmp_path, "r.jpg", Image.fromarray(stored), exif=exif, quality=95), max_side=60)
    assert loaded.original_size == (200, 300) and loaded.size == (40, 60) and loaded.downscaled
    assert loaded.rgb[:, -15:].mean() > 0.95 and loaded.rgb[:, :35].mean() < 0.05


def test_one_by_one(tmp_path):
    loaded = load_image(save(tmp_path, "1.png", Image.new("RGB", (1, 1), (255, 0, 51))))
    np.testing.assert_allclose(loaded.rgb, [[[1.0, 0.0, 0.2]]])


# --------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [((100, 50), 800, (100, 50)), ((1600, 800), 800, (800, 400)), ((799, 1601), 800, (399, 800)),
     ((1, 5000), 100, (1, 100)), ((3, 3), None, (3, 3))],
)
def test_fit_within(size, max_side, expected):
    assert fit_within(size, max_side) == expected


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_max_side_downscales_like_a_full_resize(tmp_path, fmt):
    yy, xx = np.mgrid[0:480, 0:640]
    smooth = np.dstack([xx / 640 * 255, yy / 480 * 255, (xx + yy) / 1120 * 255]).astype(np.uint8)
    path = save(tmp_path, f"s.{fmt}", Image.fromarray(smooth))
    loaded = load_image(path, max_side=80)  # JPEG: DCT draft 1/4, then resize; PNG: reduce + resize
    assert loaded.size == (60, 80) and loaded.original_size == (480, 640)
    reference = np.asarray(Image.open(path).convert("RGB").resize((80, 60), Image.Resampling.BILINEAR)) / 255
    assert np.abs(loaded.rgb - reference).mean() < 0.01


def test_max_side_never_enlarges(tmp_path, rgb_u8):
    assert load_image(save(tmp_path, "x.png", Image.fromarray(rgb_u8)), max_side=1000).size == (24, 36)


def test_over_max_pixels_is_refused_and_pil_limit_restored(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    path = save(tmp_path, "big.png", Image.new("L", (3000, 2000)))
    with pytest.raises(ImageLoadError, match=r"3000x2000 = 6 megapixels, over the limit of 5 megapixels"):
        load_image(path, max_pixels=5_000_000)
    assert Image.MAX_IMAGE_PIXELS == before
    assert load_image(path, max_pixels=6_000_000, max_side=30).size == (20, 30)  # at the limit: fine


def test_image_over_pils_own_bomb_limit_loads_within_ours(tmp_path):
    # 2 x PIL's default limit would raise DecompressionBombError in a plain Image.open.
    path = save(tmp_path, "wide.png", Image.new("L", (int(2 * Image.MAX_IMAGE_PIXELS) // 8 + 8, 8), 77))
    loaded = load_image(path, max_side=64)
    assert loaded.size[1] == 64 and np.allclose(loaded.rgb, 77 / 255, atol=1e-6)


# --------------------------------------------------------------------------------------------- errors


def _bytes_of(im: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("empty.png", b"", r"empty file \(0 bytes\)"),
        ("notes.png", b"this is not an image\n" * 20, "not an image file"),
        ("half.png", "png-half", "truncated or corrupt"),
        ("head.png", "png-head", "not an image file"),
        ("half.jpg", "jpeg-half", "truncated or corrupt"),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path, rgb_u8, name, content, problem):
    if isinstance(content, str):
        fmt, cut = content.split("-")
        data = _bytes_of(Image.fromarray(rgb_u8), "PNG" if fmt == "png" else "JPEG")
        content = data[: len(data) // 2] if cut == "half" else data[:30]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=problem) as info:
        load_image(path)
    assert str(info.value).startswith(f"{path}: ")
    assert info.value.path == path


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)


# --------------------------------------------------------------------------------------------- writing


def test_to_uint8_rounds_and_clips():
    x = np.array([-0.5, 0.0, 0.5 / 255, 0.49 / 255, 0.5, 1.0, 1.5], np.float32)
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 1, 0, 128, 255, 255])


def test_write_pngs_atomic_round_trip(tmp_path, rgb_u8):
    gray = rgb_u8[:, :, 0]
    rgba = np.dstack([rgb_u8, gray])
    written = write_pngs_atomic({tmp_path / "g.png": gray, tmp_path / "c.png": rgb_u8, tmp_path / "a.png": rgba})
    assert [p.name for p in written] == ["g.png", "c.png", "a.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g.png")), gray)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "c.png")), rgb_u8)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), rgba)
    mode = (tmp_path / "g.png").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "c.png", "g.png"]


def test_write_pngs_atomic_all_or_nothing(tmp_path, rgb_u8):
    old = tmp_path / "first.png"
    old.write_bytes(b"previous content")
    with pytest.raises(TypeError, match="uint8"):
        write_pngs_atomic({old: rgb_u8, tmp_path / "second.png": rgb_u8.astype(np.float32)})
    assert old.read_bytes() == b"previous content"  # the first file was not replaced either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.png"]  # and no temporary left


def test_write_pngs_atomic_rename_failure_removes_what_it_placed(tmp_path, rgb_u8):
    (tmp_path / "second.png").mkdir()  # cannot be replaced by a file
    with pytest.raises(IsADirectoryError, match="second.png: output path is a directory"):
        write_pngs_atomic({tmp_path / "first.png": rgb_u8, tmp_path / "second.png": rgb_u8})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["second.png"]


# --------------------------------------------------------------------------------------------- bytes


def test_bytes_decode_like_files(tmp_path, rgb_u8):
    path = save(tmp_path, "x.png", Image.fromarray(rgb_u8))
    from_bytes = load_image_bytes(open(path, "rb").read(), "upload.png", max_side=18)
    from_file = load_image(path, max_side=18)
    assert from_bytes.size == (12, 18)
    np.testing.assert_array_equal(from_bytes.rgb, from_file.rgb)


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"", "empty file (0 bytes)"),
        (b"this is not an image", "not an image file PIL can read"),
        ("text", "expected the bytes of an image file, got str"),
    ],
)
def test_bad_bytes_name_the_source(data, problem):
    with pytest.raises(ImageLoadError) as info:
        load_image_bytes(data, "<stdin>")
    assert str(info.value).startswith("<stdin>: ") and problem in info.value.problem


def test_truncated_bytes_and_pixel_limit(rgb_u8):
    buffer = io.BytesIO()
    Image.fromarray(np.tile(rgb_u8, (8, 8, 1))).save(buffer, format="PNG")
    data = buffer.getvalue()
    with pytest.raises(ImageLoadError, match="truncated or corrupt"):
        load_image_bytes(data[: len(data) // 2], "body")
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image_bytes(data, "body", max_pixels=50_000)
