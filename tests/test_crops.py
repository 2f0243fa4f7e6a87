"""Crop geometry: mirrored windows, centring on transition pixels, rotation against a slow reference."""

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
    extract_window,
    fit_longer_side,
    reflect_indices,
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


def test_reflect_indices_match_numpy_reflect_padding():
    for n in (2, 3, 7):
        pad = 3 * n + 2  # wider than the axis: numpy reflects repeatedly
        reference = np.pad(np.arange(n), pad, mode="reflect")
        assert np.array_equal(reflect_indices(np.arange(-pad, n + pad), n), reference)
    assert np.array_equal(reflect_indices(np.array([-3, 0, 5]), 1), [0, 0, 0])


@pytest.mark.parametrize("top,left,height,width", [(2, 3, 5, 6), (-4, -2, 9, 5), (5, 7, 8, 9), (-20, -30, 50, 60)])
def test_extract_window_equals_padded_slice(top, left, height, width):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    pad = 64
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    reference = padded[top + pad : top + pad + height, left + pad : left + pad + width]
    assert np.array_equal(extract_window(image, top, left, height, width), reference)
    assert np.array_equal(extract_window(image[..., 0], top, left, height, width), reference[..., 0])


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
        assert np.array_equal(img, extract_window(image, top, left, size, size))
        assert np.array_equal(alp, extract_window(alpha, top, left, size, size))
        assert alp[size // 2, size // 2] == alpha[cy, cx] and np.array_equal(img[size // 2, size // 2], image[cy, cx])
    img, alp = take_crop(image, alpha, CropSpec(15, 20, 12, flipped=True), out_size=12)
    assert np.array_equal(alp, extract_window(alpha, 9, 14, 12, 12)[:, ::-1])


def rotated_crop_reference(array: np.ndarray, spec: CropSpec) -> np.ndarray:
    """Slow reference: bilinear sample of the mirrored image at the rotated offsets of every crop pixel."""
    theta = math.radians(spec.angle)
    offsets = np.arange(spec.size) - spec.size // 2
    oy, ox = np.meshgrid(offsets, offsets, indexing="ij")
    # content turns counter-clockwise as displayed (y down): output offset (ox, oy) reads source (dx, dy)
    dx = ox * math.cos(theta) - oy * math.sin(theta)
    dy = ox * math.sin(theta) + oy * math.cos(theta)
    coords = [spec.center_y + dy, spec.center_x + dx]
    channels = array[..., None] if array.ndim == 2 else array
    out = [ndimage.map_coordinates(channels[..., c].astype(float), coords, order=1, mode="mirror")
           for c in range(channels.shape[-1])]
    return np.stack(out, axis=-1).reshape(array.shape[:0] + (spec.size, spec.size) + array.shape[2:])


@pytest.mark.parametrize("angle", [-15.0, -4.5, 7.0, 15.0, 90.0])
@pytest.mark.parametrize("cy,cx,size", [(20, 25, 15), (20, 25, 16), (2, 45, 20)])
def test_rotated_crop_matches_slow_reference(angle, cy, cx, size):
    rng = np.random.default_rng(3)
    image = ndimage.uniform_filter(rng.integers(0, 256, (40, 50, 3)).astype(float), (3, 3, 1)).astype(np.uint8)
    alpha = soft_disc_alpha(40, 50, 20, 25, 12)
    spec = CropSpec(cy, cx, size, angle)
    img, alp = take_crop(image, alpha, spec, out_size=size)
    assert img.shape == (size, size, 3) and alp.shape == (size, size) and img.dtype == np.uint8
    assert np.abs(img.astype(float) - rotated_crop_reference(image, spec)).max() <= 1.01
    assert np.abs(alp.astype(float) - rotated_crop_reference(alpha, spec)).max() <= 1.01
    # rotation is about the centre pixel, which keeps its exact value
    assert alp[size // 2, size // 2] == alpha[cy, cx]


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
        window = extract_window(source, row["crop_y"], row["crop_x"], size, size)
        expected = np.asarray(Image.fromarray(window).resize((16, 16), Image.BILINEAR)) if size != 16 else window
        assert np.array_equal(row_arrays(row)[1], expected)
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
