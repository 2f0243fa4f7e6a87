"""Crop geometry: mirrored windows, centring on transition pixels, rotation, resize and flip against a
slow reference, antialiasing where a crop shrinks by more than 1.5x."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy import ndimage

from fusionnet.data.crops import (
    CropParams,
    CropSpec,
    fit_longer_side,
    sample_crop_specs,
    take_crop,
    transition_pixels,
    draw_crop_spec,
    warmup_image,
)
from fusionnet.data.dataset import ShardDataset
from fusionnet.data.sampling import SampledCrops, Sampling
from fusionnet.data.shards import build_shards, list_shards, read_shard, row_arrays


def soft_disc_alpha(h: int, w: int, cy: float, cx: float, radius: float, ramp: float = 6.0) -> np.ndarray:
    """(h,w) uint8 alpha: 255 inside a disc, 0 outside, a linear ramp of width `ramp` at its edge."""
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.hypot(yy - cy, xx - cx)
    return (np.clip((radius - dist) / ramp + 0.5, 0.0, 1.0) * 255).round().astype(np.uint8)


def make_composites_dir(
    root: Path, splits: dict[str, int] | None = None, size: tuple[int, int] = (48, 64), seed: int = 0
) -> Path:
    """A tiny data/composites tree following the data contract: image/, alpha/, trimap/, manifest.parquet."""
    splits = splits or {"train": 3, "val": 1, "test": 1}
    rng = np.random.default_rng(seed)
    h, w = size
    for sub in ("image", "alpha", "trimap"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    records = []
    for split, count in splits.items():
        for i in range(count):
            cid = f"{split}-fg{i:02d}-bg{i:02d}"
            alpha = soft_disc_alpha(h, w, rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, min(h, w) / 3)
            fg = np.broadcast_to(rng.integers(0, 256, 3), (h, w, 3)).astype(np.float64)
            bg = rng.integers(0, 256, (h, w, 3)).astype(np.float64)
            a = alpha[..., None] / 255.0
            image = (a * fg + (1 - a) * bg).round().astype(np.uint8)
            trimap = np.where(alpha == 0, 0, np.where(alpha == 255, 255, 128)).astype(np.uint8)
            Image.fromarray(image).save(root / "image" / f"{cid}.png")
            Image.fromarray(alpha).save(root / "alpha" / f"{cid}.png")
            Image.fromarray(trimap).save(root / "trimap" / f"{cid}.png")
            records.append(
                dict(cid=cid, split=split, fg_id=f"{split}-fg{i:02d}", bg_name=f"bg{i:02d}.jpg", width=w,
                     height=h, image_path=f"image/{cid}.png", alpha_path=f"alpha/{cid}.png",
                     trimap_path=f"trimap/{cid}.png")
            )
    pq.write_table(pa.Table.from_pylist(records), root / "manifest.parquet")
    return root


def mirrored_window(array: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """array[top:top+height, left:left+width], mirrored outside it as numpy "reflect" padding does
    (d c b | a b c d | c b a, repeated for windows wider than the array): the crops' border semantics."""
    h, w = array.shape[:2]
    pad_y, pad_x = max(0, -top, top + height - h), max(0, -left, left + width - w)
    padded = np.pad(array, ((pad_y, pad_y), (pad_x, pad_x)) + ((0, 0),) * (array.ndim - 2), mode="reflect")
    return padded[top + pad_y : top + pad_y + height, left + pad_x : left + pad_x + width]


def test_transition_pixels_and_fallbacks():
    alpha = np.zeros((4, 5), np.uint8)
    alpha[1, 2], alpha[3, 4], alpha[0, 0] = 1, 254, 255
    assert transition_pixels(alpha).tolist() == [1 * 5 + 2, 3 * 5 + 4]
    binary = np.zeros((4, 4), np.uint8)
    binary[:, 2:] = 255  # hard matte: the 0/255 boundary columns 1 and 2
    assert sorted(set(transition_pixels(binary) % 4)) == [1, 2]
    assert transition_pixels(np.full((3, 3), 255, np.uint8)).size == 9


def test_unrotated_crop_is_the_exact_window_centred_on_the_pixel():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    for cy, cx, size in [(15, 20, 11), (15, 20, 12), (0, 0, 16), (29, 39, 9), (3, 37, 64)]:
        img, alp = take_crop(image, alpha, CropSpec(cy, cx, size), out_size=size)
        top, left = CropSpec(cy, cx, size).top_left
        assert (top, left) == (cy - size // 2, cx - size // 2)
        assert np.array_equal(img, mirrored_window(image, top, left, size, size))
        assert np.array_equal(alp, mirrored_window(alpha, top, left, size, size))
        assert alp[size // 2, size // 2] == alpha[cy, cx] and np.array_equal(img[size // 2, size // 2], image[cy, cx])
    # inside the image: the plain array slice, bit for bit
    img, alp = take_crop(image, alpha, CropSpec(14, 19, 10), out_size=10)
    assert np.array_equal(img, image[9:19, 14:24]) and np.array_equal(alp, alpha[9:19, 14:24])
    img, alp = take_crop(image, alpha, CropSpec(15, 20, 12, flipped=True), out_size=12)
    assert np.array_equal(alp, mirrored_window(alpha, 9, 14, 12, 12)[:, ::-1])
    assert np.array_equal(img, image[9:21, 14:26][:, ::-1])


def crop_reference(array: np.ndarray, spec: CropSpec, out_size: int | None = None) -> np.ndarray:
    """Slow reference: bilinear sample of the mirrored image at the rotated offsets of every crop pixel,
    resized to out_size (output pixel centres onto crop pixel centres) and flipped left-right."""
    n = out_size or spec.size
    theta = math.radians(spec.angle)
    cols = np.arange(n)[::-1] if spec.flipped else np.arange(n)
    offsets = (np.arange(n) + 0.5) * spec.size / n - 0.5 - spec.size // 2  # crop pixels from the centre pixel
    oy, ox = np.meshgrid(offsets, offsets[cols], indexing="ij")
    # content turns counter-clockwise as displayed (y down): output offset (ox, oy) reads source (dx, dy)
    dx = ox * math.cos(theta) - oy * math.sin(theta)
    dy = ox * math.sin(theta) + oy * math.cos(theta)
    coords = [spec.center_y + dy, spec.center_x + dx]
    channels = array[..., None] if array.ndim == 2 else array
    out = [ndimage.map_coordinates(channels[..., c].astype(float), coords, order=1, mode="mirror")
           for c in range(channels.shape[-1])]
    return np.stack(out, axis=-1).reshape((n, n) + array.shape[2:])


@pytest.mark.parametrize("angle", [-15.0, -4.5, 7.0, 15.0, 90.0])
@pytest.mark.parametrize("cy,cx,size", [(20, 25, 15), (20, 25, 16), (2, 45, 20)])
def test_rotated_crop_matches_slow_reference(angle, cy, cx, size):
    rng = np.random.default_rng(3)
    image = ndimage.uniform_filter(rng.integers(0, 256, (40, 50, 3)).astype(float), (3, 3, 1)).astype(np.uint8)
    alpha = soft_disc_alpha(40, 50, 20, 25, 12)
    spec = CropSpec(cy, cx, size, angle)
    img, alp = take_crop(image, alpha, spec, out_size=size)
    assert img.shape == (size, size, 3) and alp.shape == (size, size) and img.dtype == np.uint8
    assert np.abs(img.astype(float) - crop_reference(image, spec)).max() <= 1.01
    assert np.abs(alp.astype(float) - crop_reference(alpha, spec)).max() <= 1.01
    # rotation is about the centre pixel, which keeps its exact value
    assert alp[size // 2, size // 2] == alpha[cy, cx]


@pytest.mark.parametrize("size,out_size", [(24, 16), (12, 16), (17, 16), (20, 20)])
@pytest.mark.parametrize("angle,flipped", [(0.0, True), (-9.0, False), (12.5, True)])
def test_resized_flipped_crop_matches_slow_reference(size, out_size, angle, flipped):
    """Rotation, resize (shrinking at most 1.5x: one bilinear warp) and flip are one map, as the reference."""
    rng = np.random.default_rng(6)
    image = ndimage.uniform_filter(rng.integers(0, 256, (40, 50, 3)).astype(float), (3, 3, 1)).astype(np.uint8)
    alpha = soft_disc_alpha(40, 50, 18, 22, 12)
    for cy, cx in [(18, 22), (3, 46)]:  # inside, and leaving the image (mirrored)
        spec = CropSpec(cy, cx, size, angle, flipped)
        img, alp = take_crop(image, alpha, spec, out_size)
        assert img.shape == (out_size, out_size, 3) and alp.shape == (out_size, out_size)
        assert np.abs(img.astype(float) - crop_reference(image, spec, out_size)).max() <= 1.01
        assert np.abs(alp.astype(float) - crop_reference(alpha, spec, out_size)).max() <= 1.01


@pytest.mark.parametrize("size", [15, 16])
@pytest.mark.parametrize("angle", [-13.0, 3.0, 11.0])
def test_rotating_a_symmetric_pattern_about_its_centre_pixel_keeps_it(size, angle):
    """A cone centred on a pixel is unchanged by a small rotation about that pixel (up to bilinear error),
    and its tip keeps its exact value; rotating about a point half a pixel off lowers the tip to 251-254."""
    yy, xx = np.mgrid[0:41, 0:41]
    cone = np.clip(255 - 20 * np.hypot(yy - 20.0, xx - 20.0), 0, 255).round().astype(np.uint8)
    image = np.repeat(cone[..., None], 3, axis=2)
    straight = take_crop(image, cone, CropSpec(20, 20, size), size)[1]
    img, alp = take_crop(image, cone, CropSpec(20, 20, size, angle), size)
    assert alp[size // 2, size // 2] == 255 and np.array_equal(img[..., 0], alp)
    assert np.abs(alp.astype(int) - straight.astype(int)).max() <= 2
    # enlarged 2x, the centre pixel's centre lands at 2 (s//2) + 0.5: pixels c and c + 1 on either side
    moved = take_crop(image, cone, CropSpec(20, 20, size, angle), size * 2)[1].astype(int)
    c = 2 * (size // 2)
    assert abs(moved[c, c] - moved[c + 1, c + 1]) <= 1 and abs(moved[c, c + 1] - moved[c + 1, c]) <= 1
    assert moved[c, c] > moved[c - 1, c - 1] and moved[c + 1, c + 1] > moved[c + 2, c + 2]


def test_crop_shrunk_more_than_1_5x_is_antialiased_and_still_mirrored():
    """A 1-px checkerboard shrunk 3x averages to grey (a bare bilinear warp would sample single pixels);
    the blur before the warp keeps the border semantics: a crop leaving the image equals the same crop
    of the explicitly mirror-padded image."""
    board = ((np.indices((60, 60)).sum(axis=0) % 2) * 255).astype(np.uint8)
    image = np.repeat(board[..., None], 3, axis=2)
    for spec in (CropSpec(30, 30, 24), CropSpec(29, 31, 24, 10.0, True), CropSpec(2, 57, 24, -7.0)):
        img, alp = take_crop(image, board, spec, 8)
        assert np.abs(alp.astype(int) - 128).max() <= 20, alp
        assert np.array_equal(img[..., 1], alp)
    rng = np.random.default_rng(8)
    image = ndimage.uniform_filter(rng.integers(0, 256, (40, 50, 3)).astype(float), (3, 3, 1)).astype(np.uint8)
    alpha = soft_disc_alpha(40, 50, 5, 45, 12)
    pad = 40
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect"), np.pad(alpha, pad, mode="reflect")
    for cy, cx, size, angle in [(5, 45, 40, 12.0), (0, 0, 32, -15.0), (39, 10, 48, 0.0)]:
        img, alp = take_crop(image, alpha, CropSpec(cy, cx, size, angle, True), 16)
        ref_img, ref_alp = take_crop(*padded, CropSpec(cy + pad, cx + pad, size, angle, True), 16)
        assert np.abs(img.astype(int) - ref_img).max() <= 1 and np.abs(alp.astype(int) - ref_alp).max() <= 1


def test_resize_to_out_size_and_warmup():
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    alpha = soft_disc_alpha(30, 50, 15, 25, 10)
    img, alp = take_crop(image, alpha, CropSpec(15, 25, 24, 5.0), out_size=16)
    assert img.shape == (16, 16, 3) and alp.shape == (16, 16)
    img, alp = warmup_image(image, alpha, 20, flipped=True)
    assert img.shape == (20, 20, 3) and alp.shape == (20, 20)
    unflipped = warmup_image(image, alpha, 20)[1]
    assert np.array_equal(alp, unflipped[:, ::-1])
    big_img, big_alpha, scale = fit_longer_side(image, alpha, 25)
    assert big_alpha.shape == (15, 25) and big_img.shape == (15, 25, 3) and scale == pytest.approx(0.5)
    same = fit_longer_side(image, alpha, 50)
    assert same[0] is image and same[2] == 1.0


def test_sample_crop_specs_draws_from_transition_pixels_deterministically():
    alpha = soft_disc_alpha(60, 80, 30, 40, 20)
    draw = lambda seed: sample_crop_specs(alpha, 50, (8, 16, 32), 15.0, True, np.random.default_rng(seed))
    specs = draw(5)
    assert specs == draw(5) and specs != draw(6)
    for spec in specs:
        assert 0 < alpha[spec.center_y, spec.center_x] < 255
        assert spec.size in (8, 16, 32) and -15.0 <= spec.angle <= 15.0
    assert len({s.size for s in specs}) == 3 and len({s.flipped for s in specs}) == 2
    plain = sample_crop_specs(alpha, 10, (8,), 0.0, False, np.random.default_rng(0))
    assert all(s.angle == 0.0 and not s.flipped for s in plain)


def test_crop_params_validation():
    assert CropParams.from_dict({"sizes": [160], "out_size": 160}).sizes == (160,)
    with pytest.raises(ValueError, match="unknown key.*'size'"):
        CropParams.from_dict({"size": [160]})
    with pytest.raises(ValueError, match="sizes"):
        CropParams(sizes=())
    with pytest.raises(ValueError, match="rotation_deg"):
        CropParams(rotation_deg=-1)
    with pytest.raises(ValueError, match="compression"):
        CropParams(compression="rar")


def test_sharded_and_sampled_crops_are_centred_on_transition_pixels(tmp_path):
    composites = make_composites_dir(tmp_path / "composites", {"train": 3, "val": 2, "test": 1})
    params = CropParams(sizes=(16, 24), out_size=16, per_image=6, warmup_size=20, rotation_deg=15.0, shard_rows=5)
    build_shards(composites, tmp_path / "shards", params, seed=0, workers=1)
    alphas = {p.stem: np.asarray(Image.open(p)) for p in (composites / "alpha").glob("*.png")}
    rows = [r for path in list_shards(tmp_path / "shards" / "val") for r in read_shard(path).to_pylist()]
    for row in rows:  # val crops are plain: the exact window, resized
        source = alphas[row["cid"]]
        size = row["crop_size"]
        cy, cx = row["crop_y"] + size // 2, row["crop_x"] + size // 2
        assert 0 < source[cy, cx] < 255, row["cid"]
        assert row["kind"] == "crop" and row["src_scale"] == 1.0
        assert row["angle"] == 0.0 and not row["flipped"]
        if size == 16:
            assert np.array_equal(row_arrays(row)[1], mirrored_window(source, row["crop_y"], row["crop_x"], 16, 16))
        else:  # resized 24 -> 16
            expected = crop_reference(source, CropSpec(cy, cx, size), out_size=16)
            assert np.abs(row_arrays(row)[1] - expected).max() <= 1.01
    assert len(rows) == 12
    # train crops are drawn at read time: every drawn 16 px crop keeps its transition centre value
    sampled = SampledCrops(ShardDataset(tmp_path / "shards" / "train"), Sampling(sizes=(16,), out_size=16,
                           warmup_size=20, rotation_deg=15.0, flip=True), seed=0)
    train_alphas = [alphas[r["cid"]] for p in list_shards(tmp_path / "shards" / "train") for r in read_shard(p).to_pylist()]
    centres = 0
    for epoch in range(4):
        for index in range(len(sampled)):
            rng = sampled.rng(epoch, index)
            candidates = np.flatnonzero((train_alphas[index] > 0) & (train_alphas[index] < 255)).astype(np.uint32)
            spec = draw_crop_spec(candidates, train_alphas[index].shape[1], (16,), 15.0, True, rng)
            _, alpha = sampled.arrays(epoch, index)
            col = 16 - 1 - 8 if spec.flipped else 8
            assert alpha[8, col] == train_alphas[index][spec.center_y, spec.center_x]
            assert 0 < alpha[8, col] < 255
            centres += 1
    assert centres == 12
