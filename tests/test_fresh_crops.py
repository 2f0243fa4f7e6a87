"""Fresh crops every epoch (paper Sec. 4.1): determinism per (seed, epoch, index), workers, DDP, warm-up,
stratified validation, and the resume key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from fusionnet.data.crops import resize, warmup_image
from fusionnet.data.dataset import _TO_UNIT, ShardDataset
from fusionnet.data.sampling import SampledCrops, Sampling
from fusionnet.data.shards import row_arrays, write_shards
from fusionnet.train import data as tdata
from fusionnet.train.toy import write_toy_shards


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_shards(tmp_path_factory.mktemp("fresh") / "shards", n_train=6, n_val=3, size=32, composite_size=64)


def _sampled(toy, **kw) -> SampledCrops:
    sampling = Sampling(**{"sizes": (32, 48), "out_size": 32, "warmup_size": 40, "rotation_deg": 15.0, "flip": True, **kw})
    return SampledCrops(ShardDataset(toy / "train"), sampling, seed=7, warmup=True)


def test_samples_are_a_pure_function_of_seed_epoch_index(toy):
    a, b = _sampled(toy), _sampled(toy)
    assert len(a) == 12  # 6 crops + 6 warm-up images per epoch
    for index in range(len(a)):
        first = a[(3, index)]
        assert first["image"].shape == (3, 32, 32) and first["alpha"].shape == (1, 32, 32)
        assert first["image"].dtype == torch.float32 and 0 <= float(first["alpha"].min()) <= float(first["alpha"].max()) <= 1
        image_u8, alpha_u8 = a.arrays(3, index)  # the tensors are the arrays scaled as the shard reader scales
        assert np.array_equal(first["image"].numpy(), _TO_UNIT[image_u8].transpose(2, 0, 1))
        assert np.array_equal(first["alpha"][0].numpy(), _TO_UNIT[alpha_u8])
        again = b[(3, index)]  # another instance (another worker or a resumed process)
        assert torch.equal(first["image"], again["image"]) and torch.equal(first["alpha"], again["alpha"])
    # every epoch draws new crops: each composite differs between epochs 0 and 1 for most indices
    changed = sum(not torch.equal(a[(0, i)]["image"], a[(1, i)]["image"]) for i in range(len(a)))
    assert changed >= 10
    other_seed = SampledCrops(ShardDataset(toy / "train"), a.sampling, seed=8, warmup=True)
    assert sum(not torch.equal(a[(0, i)]["alpha"], other_seed[(0, i)]["alpha"]) for i in range(6)) >= 5


def test_warmup_images_are_the_whole_composite_resized_then_rotated_and_flipped(toy):
    plain = _sampled(toy, rotation_deg=0.0, flip=False)
    rows = ShardDataset(toy / "train")
    for i in range(3):
        image, alpha = rows.read_arrays(i)
        expected = warmup_image(image, alpha, 40)
        # unrotated and unflipped, the warm-up image is the composite resized 64 -> 40 (its antialiasing
        # differs from an area-averaging resize by a few levels at the matte's edge)
        diff = np.abs(expected[1].astype(int) - resize(alpha, 40, 40))
        assert expected[1].shape == (40, 40) and diff.max() <= 16 and diff.mean() <= 1.0
        # and the sample is the warm-up image resized to out_size
        assert np.array_equal(plain.arrays(0, 6 + i)[1], resize(expected[1], 32, 32))
    augmented = _sampled(toy, sizes=(32,), warmup_size=32)
    image, alpha = rows.read_arrays(0)
    straight = warmup_image(image, alpha, 32)[1]
    drawn = [augmented.arrays(e, 6)[1] for e in range(12)]
    assert any(np.array_equal(d, straight[:, ::-1]) or not np.array_equal(d, straight) for d in drawn)
    assert sum(not np.array_equal(d, straight) and not np.array_equal(d, straight[:, ::-1]) for d in drawn) >= 10  # rotated


def test_loader_workers_and_resume_see_the_same_samples(toy):
    dataset = _sampled(toy)
    order = tdata.epoch_order(len(dataset), seed=7, epoch=2)
    indices = lambda first: tdata.rank_indices(order, first, 6, 2, 1, 0, 1)  # noqa: E731
    batches = lambda workers, first: [b["image"] for b in tdata.epoch_loader(dataset, indices(first), 2, workers, 7, 2)]  # noqa: E731
    serial, parallel = batches(0, 0), batches(2, 0)
    assert len(serial) == 6 and all(torch.equal(s, p) for s, p in zip(serial, parallel))
    resumed = batches(0, 4)  # a step resumed after 4 batches of epoch 2 cuts the same crops
    assert all(torch.equal(s, r) for s, r in zip(serial[4:], resumed))


def test_epoch_order_is_distributed_samplers_permutation():
    sampler = DistributedSampler(range(13), num_replicas=1, rank=0, shuffle=True, seed=1)  # type: ignore[arg-type]
    sampler.set_epoch(5)
    assert tdata.epoch_order(13, seed=1, epoch=5) == list(sampler)  # single-process runs keep their order
    assert tdata.epoch_order(13, seed=1, epoch=5) != tdata.epoch_order(13, seed=1, epoch=6)


def test_ddp_ranks_draw_disjoint_samples_and_each_step_the_same_global_batch():
    order = tdata.epoch_order(26, seed=1, epoch=5)
    assert tdata.steps_in_epoch(26, 12, None) == 2 and tdata.steps_in_epoch(26, 12, 1) == 1  # drop_last, capped
    ranks = [tdata.rank_indices(order, 0, 2, 2, 1, r, 3) for r in range(3)]  # 3 processes x batch 2: G = 6
    flat = [i for r in ranks for i in r]
    assert len(flat) == len(set(flat)) == 12  # disjoint
    # a global batch of 4 per step, as 1 process x 2 micro-batches or 2 processes x 1, or 4 x 1
    one = tdata.rank_indices(order, 0, 3, 2, 2, 0, 1)
    two = [tdata.rank_indices(order, 0, 3, 2, 1, r, 2) for r in range(2)]
    four = [tdata.rank_indices(order, 0, 3, 1, 1, r, 4) for r in range(4)]
    for step in range(3):
        window = slice(4 * step, 4 * step + 4)
        per_rank = [r[2 * step : 2 * step + 2] for r in two]
        assert sorted(one[window]) == sorted(per_rank[0] + per_rank[1]) == sorted(r[step] for r in four)
        assert one[window] == order[window]
    # resuming at step 1 continues where an uninterrupted epoch would be
    assert tdata.rank_indices(order, 1, 3, 2, 2, 0, 1) == one[4:]


def test_validation_subset_is_spread_over_foregrounds(tmp_path):
    fg_ids = ["a"] * 10 + ["b"] * 10 + ["c"] * 10
    chosen = tdata.val_indices(fg_ids, 6)
    assert chosen == [0, 1, 10, 11, 20, 21]
    assert tdata.val_indices(fg_ids, None) == list(range(30))
    assert tdata.val_indices(["a", "b"], 10) == [0, 1]
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        alpha = rng.integers(0, 256, (32, 32), dtype=np.uint8)
        rows.append(dict(image=image.tobytes(), alpha=alpha.tobytes(), height=32, width=32, cid=f"c{i}",
                         fg_id=f"fg{i // 4}", bg_name="b", crop_y=0, crop_x=0, crop_size=32, angle=0.0,
                         flipped=False, kind="crop", src_height=32, src_width=32, src_scale=1.0, transition=b""))
    write_shards(rows, tmp_path / "val", shard_rows=5)
    loader = tdata.val_loader(ShardDataset(tmp_path / "val"), 2, 3)
    seen = [b["alpha"] for b in loader]
    expect = [np.frombuffer(rows[i]["alpha"], np.uint8).reshape(32, 32) for i in (0, 4, 8)]  # one per foreground
    got = torch.cat(seen)[:, 0].numpy()
    assert np.allclose(got, np.stack(expect) / 255.0, atol=1e-6)


def test_fixed_crop_rows_are_used_as_stored(tmp_path):
    shards = write_toy_shards(tmp_path / "s", n_train=3, n_val=1, size=32, fixed=True)
    dataset = tdata.training_set(shards, seed=0, warmup=False)
    rows = ShardDataset(shards / "train")
    for epoch in (0, 5):
        for i in range(3):
            assert np.array_equal(dataset.arrays(epoch, i)[1], rows.read_arrays(i)[1])


def test_training_set_needs_the_summary(tmp_path, toy):
    import shutil

    shutil.copytree(toy, tmp_path / "s")
    (tmp_path / "s" / "summary.json").unlink()
    with pytest.raises(FileNotFoundError, match="summary.json"):
        tdata.training_set(tmp_path / "s", seed=0, warmup=False)
    assert row_arrays  # imported for symmetry with test_shards
