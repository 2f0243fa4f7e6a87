"""ShardDataset and make_loader: values, augmentation, exactly-once epochs, shuffling, DDP sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fusionnet.data.dataset import ShardDataset, make_loader, set_epoch
from fusionnet.data.shards import write_shards
from tests.test_shards import random_row


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """30 rows of 8x8 samples in 4 shards (8, 8, 8, 6 rows)."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    write_shards((random_row(rng, i, h=8, w=8) for i in range(30)), root, shard_rows=8)
    (root / ".shard-00004.parquet.tmp-1234").write_bytes(b"PAR1 half a shard")  # a killed writer's leftover
    return root


def test_samples_have_contract_shapes_dtypes_and_values(shard_dir):
    dataset = ShardDataset(shard_dir)
    assert len(dataset) == 30 and len(dataset.shards) == 4
    for index in (0, 7, 8, 29, -1):
        sample = dataset[index]
        assert set(sample) == {"image", "alpha"}
        image, alpha = sample["image"], sample["alpha"]
        assert image.shape == (3, 8, 8) and alpha.shape == (1, 8, 8)
        assert image.dtype == alpha.dtype == torch.float32
        stored_image, stored_alpha = dataset.read_arrays(index)
        assert torch.equal(image, torch.from_numpy(stored_image.astype(np.float32) / 255).permute(2, 0, 1))
        assert torch.equal(alpha[0], torch.from_numpy(stored_alpha.astype(np.float32) / 255))
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    with pytest.raises(IndexError):
        dataset[30]


def test_errors_name_the_problem(tmp_path, shard_dir):
    with pytest.raises(FileNotFoundError, match="no .parquet shards"):
        ShardDataset(tmp_path)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="broken.parquet"):
        ShardDataset([shard_dir, tmp_path / "broken.parquet"])
    with pytest.raises(ValueError, match="color_jitter"):
        ShardDataset(shard_dir, color_jitter=1.5)


def test_augmentation_flips_pairs_together_and_jitter_keeps_alpha(shard_dir):
    plain = ShardDataset(shard_dir)
    augmented = ShardDataset(shard_dir, augment=True, seed=1)
    flips = 0
    for index in range(len(plain)):
        reference, sample = plain[index], augmented[index]
        if torch.equal(sample["alpha"], reference["alpha"]):
            assert torch.equal(sample["image"], reference["image"])
        else:
            assert torch.equal(sample["alpha"], reference["alpha"].flip(-1))
            assert torch.equal(sample["image"], reference["image"].flip(-1))
            flips += 1
    assert 5 <= flips <= 25
    jittered = ShardDataset(shard_dir, augment=True, seed=1, color_jitter=0.3)
    changed = 0
    for index in range(len(plain)):
        reference, sample = plain[index], jittered[index]
        assert torch.equal(sample["alpha"], reference["alpha"]) or torch.equal(sample["alpha"], reference["alpha"].flip(-1))
        assert 0.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
        changed += not (torch.equal(sample["image"], reference["image"]) or torch.equal(sample["image"], reference["image"].flip(-1)))
    assert changed == len(plain)


def epoch_indices(loader) -> list[int]:
    return [int(i) for batch in loader for i in batch["index"]]


def test_multi_worker_loader_yields_every_sample_once_per_epoch(shard_dir):
    dataset = ShardDataset(shard_dir, return_index=True)
    dataset[3]  # the parent opens a shard before forking: workers must open their own
    loader = make_loader(dataset, batch_size=4, num_workers=2, shuffle=True, seed=0)
    epochs = []
    for _ in range(2):
        seen, images = [], {}
        for batch in loader:
            assert batch["image"].shape[1:] == (3, 8, 8) and batch["alpha"].shape[1:] == (1, 8, 8)
            for i, image in zip(batch["index"].tolist(), batch["image"]):
                seen.append(i)
                images[i] = image
        assert sorted(seen) == list(range(30))
        for i in (0, 13, 29):  # the content really is sample i
            assert torch.equal(images[i], dataset[i]["image"])
        epochs.append(seen)
    assert epochs[0] != epochs[1], "the order changes between epochs"
    assert epochs[0] != sorted(epochs[0]), "the order is shuffled"


def test_shuffle_is_reproducible_per_seed_and_differs_between_seeds(shard_dir):
    dataset = ShardDataset(shard_dir, return_index=True)
    run = lambda seed: [epoch_indices(loader) for loader in [make_loader(dataset, 5, seed=seed)] for _ in range(2)]
    assert run(0) == run(0)
    assert run(0) != run(1)
    # shuffled across shards: the first batch is not all from one shard (rows 0-7, 8-15, ...)
    first = epoch_indices(make_loader(dataset, 30, seed=0))[:8]
    assert len({i // 8 for i in first}) > 1
    ordered = epoch_indices(make_loader(dataset, 7, shuffle=False))
    assert ordered == list(range(30))
    assert len(list(make_loader(dataset, 7, drop_last=True))) == 4


def test_distributed_sampler_splits_the_data_between_ranks(shard_dir):
    dataset = ShardDataset(shard_dir, return_index=True)
    loaders = [make_loader(dataset, 3, seed=0, rank=r, world_size=2) for r in range(2)]
    first = [epoch_indices(loader) for loader in loaders]
    assert len(first[0]) == len(first[1]) == 15
    assert sorted(first[0] + first[1]) == list(range(30))
    for loader in loaders:
        set_epoch(loader, 1)
    second = [epoch_indices(loader) for loader in loaders]
    assert sorted(second[0] + second[1]) == list(range(30)) and second != first
    with pytest.raises(ValueError, match="rank"):
        make_loader(dataset, 3, rank=2, world_size=2)


def test_augmented_loader_is_reproducible_per_seed_and_varies_per_epoch(shard_dir):
    def alphas_by_index(seed: int, epochs: int) -> list[dict[int, torch.Tensor]]:
        dataset = ShardDataset(shard_dir, augment=True, seed=0, return_index=True)
        loader = make_loader(dataset, 6, num_workers=2, seed=seed)
        out = []
        for _ in range(epochs):
            out.append({int(i): a for batch in loader for i, a in zip(batch["index"], batch["alpha"])})
        return out

    first, again = alphas_by_index(0, 2), alphas_by_index(0, 1)
    assert all(torch.equal(first[0][i], again[0][i]) for i in range(30))
    assert any(not torch.equal(first[0][i], first[1][i]) for i in range(30)), "flips change between epochs"
