"""That training can learn: fp32 heads under autocast, the sparsity gradient, the resume key, and the
three steps overfitting a handful of fixed crops (paper Sec. 3.4)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from fusionnet import model as fmodel
from fusionnet.losses import sparsity_loss
from fusionnet.model import LateFusionNet, blend
from fusionnet.train.config import StepConfig
from fusionnet.train.loop import run_step
from fusionnet.train.toy import write_toy_shards


def test_maps_are_float32_under_bf16_autocast_and_eq2_holds():
    torch.manual_seed(0)
    net = LateFusionNet("densenet121", fpn_width=16, fusion_widths=(16, 8)).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    for name in ("alpha", "fg_prob", "bg_prob", "blend_weight"):
        assert getattr(out, name).dtype == torch.float32, name
    assert all(t.dtype == torch.float32 for t in out.fg_side_logits + out.bg_side_logits + out.fg_sides + out.bg_sides)
    assert torch.allclose(out.alpha, blend(out.blend_weight, out.fg_prob, out.bg_prob), atol=1e-6, rtol=0)
    assert torch.equal(out.fg_prob, torch.sigmoid(out.fg_side_logits[-1]))


def test_sparsity_gradient_is_finite_and_nonzero_at_0_and_1():
    alpha = torch.tensor([0.0, 1.0, 0.5], requires_grad=True)
    sparsity_loss(alpha, 0.9).backward()
    grad = alpha.grad
    assert torch.isfinite(grad).all()
    assert grad[0] > 0 and grad[1] < 0  # pushes 0 and 1 further to the ends... the loss is lowest at 0/1
    assert abs(float(grad[2])) < 1e-6  # symmetric at 0.5


def _cfg(step: str, **kw) -> StepConfig:
    base = dict(seed=0, backbone="densenet121", pretrained=False, fpn_width=16, fusion_widths=(32, 16, 16, 8, 32),
                device="cpu", precision="fp32", channels_last=False, threads=1, batch_size=4, num_workers=0,
                optimizer="adam", momentum=0.9, weight_decay=0.0, grad_clip=5.0, checkpoint_every=1000,
                val_max_images=None, visual_count=0, warmup_epochs=0)
    return StepConfig(step=step, **{**base, **kw})


def test_resume_key_has_the_init_checkpoint_and_the_data(tmp_path):
    shards = write_toy_shards(tmp_path / "s", n_train=4, n_val=1, size=32, fixed=True)
    cfg = _cfg("fusion", epochs=1, max_iters_per_epoch=1, base_lr=1e-4, max_lr=1e-4)
    torch.manual_seed(1)
    init_a, init_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    fmodel.save(LateFusionNet("densenet121", fpn_width=16, fusion_widths=(32, 16, 16, 8, 32)), init_a)
    fmodel.save(LateFusionNet("densenet121", fpn_width=16, fusion_widths=(32, 16, 16, 8, 32)), init_b)
    first = run_step("fusion", cfg, shards, tmp_path / "out", init_checkpoint=init_a)
    weights_a = fmodel.load(first.model_path).state_dict()
    again = run_step("fusion", cfg, shards, tmp_path / "out", init_checkpoint=init_a)
    assert again.train_s == first.train_s  # the finished state came back, nothing retrained
    other = run_step("fusion", cfg, shards, tmp_path / "out", init_checkpoint=init_b)
    weights_b = fmodel.load(other.model_path).state_dict()
    assert not torch.equal(weights_a["encoder.stem.0.weight"], weights_b["encoder.stem.0.weight"])
    assert torch.equal(weights_b["encoder.stem.0.weight"], fmodel.load(init_b).state_dict()["encoder.stem.0.weight"])
    # new data (another data version) is never answered with the old finished state
    write_toy_shards(tmp_path / "s", n_train=4, n_val=1, size=32, fixed=True, seed=5)
    newer = run_step("fusion", cfg, shards, tmp_path / "out", init_checkpoint=init_b)
    assert newer.train_s != other.train_s


def _fixed_crop_shards(root, n: int, size: int, repeat: int):
    """n distinct toy crops, each stored `repeat` times in train/ (one epoch = n * repeat samples), once in val/."""
    import json

    from fusionnet.data.shards import shards_digest, write_shards
    from fusionnet.train.toy import _row, toy_sample

    rng = np.random.default_rng(2)
    crops = [toy_sample(rng, size) for _ in range(n)]
    write_shards([_row(*crops[i % n], i, "crop") for i in range(n * repeat)], root / "train", shard_rows=64)
    write_shards([_row(*c, i, "crop") for i, c in enumerate(crops)], root / "val", shard_rows=64)
    summary = {"sampling": {"sizes": [size], "out_size": size, "warmup_size": size, "rotation_deg": 0, "flip": False}}
    summary["data_version"] = shards_digest(root)
    (root / "summary.json").write_text(json.dumps(summary))
    return root


@pytest.mark.slow  # 60 training iterations at 64 px: ~25 s on a 2-core host
def test_three_steps_overfit_a_handful_of_fixed_crops(tmp_path):
    """Validation on the very crops it trains on: mean |alpha - gt| falls far below the untrained value."""
    shards = _fixed_crop_shards(tmp_path / "s", n=4, size=64, repeat=12)
    start = time.perf_counter()
    seg = run_step("segmentation", _cfg("segmentation", epochs=3, base_lr=1e-3, max_lr=3e-3, half_cycle_epochs=1.5),
                   shards, tmp_path / "seg")
    fus = run_step("fusion", _cfg("fusion", epochs=1, base_lr=1e-3, max_lr=3e-3, half_cycle_epochs=0.5),
                   shards, tmp_path / "fus", init_checkpoint=seg.model_path)
    joint = run_step("joint", _cfg("joint", epochs=1, base_lr=3e-4, max_lr=1e-3, half_cycle_epochs=0.5),
                     shards, tmp_path / "joint", init_checkpoint=fus.model_path)
    elapsed = time.perf_counter() - start
    from fusionnet.data.dataset import ShardDataset

    val = ShardDataset(shards / "val")
    image = torch.stack([val[i]["image"] for i in range(len(val))])
    gt = torch.stack([val[i]["alpha"] for i in range(len(val))])
    torch.manual_seed(0)
    untrained = LateFusionNet("densenet121", fpn_width=16, fusion_widths=(32, 16, 16, 8, 32)).eval()
    with torch.no_grad():
        err = {name: float((fmodel.load(r.model_path).eval()(image).alpha - gt).abs().mean())
               for name, r in (("segmentation", seg), ("fusion", fus), ("joint", joint))}
        err0 = float((untrained(image).alpha - gt).abs().mean())
    print(f"overfit: mean |alpha - gt| {err0:.3f} untrained -> {err} in {elapsed:.0f} s; val SAD "
          f"{seg.initial_val['val_sad']:.3f} -> {seg.history[-1]['val_sad']:.3f} -> "
          f"{fus.history[-1]['val_sad']:.3f} -> {joint.history[-1]['val_sad']:.3f}")
    assert err["joint"] < 0.05 and err["joint"] < 0.2 * err0
    assert joint.history[-1]["val_sad"] < 0.3 * seg.initial_val["val_sad"]
