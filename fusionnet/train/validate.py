"""Per-epoch validation: SAD and MSE of alpha in the transition band (paper "-25"), averaged over images.

Uses `fusionnet.metrics` (DIM's definitions). A val crop whose ground truth has no transition pixel
has an empty band and is left out of both averages (its SAD would be a meaningless 0).
Whole val composites (crops.val_whole, any size) are reflect-padded to the network's stride and the
maps cropped back, as inference does.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor
from torch.utils.data import DataLoader

from fusionnet.data.dataset import ShardDataset
from fusionnet.metrics import mse, sad, transition_band
from fusionnet.model import LateFusionNet
from fusionnet.model.geometry import pad_to_multiple
from fusionnet.train import data as tdata
from fusionnet.train.config import StepConfig
from fusionnet.train.distributed import DistContext, all_reduce_sum


@dataclass
class ValResult:
    val_sad: float
    val_mse: float
    val_images: int
    sad_sum: float = 0.0  # over the scored images, for averaging across DDP ranks
    mse_sum: float = 0.0
    # first crops for the PNG grid: name -> (K,H,W) float32 numpy in [0,1]
    visuals: dict[str, np.ndarray] = field(default_factory=dict)

    def scores(self) -> dict[str, float]:
        return {"val_sad": self.val_sad, "val_mse": self.val_mse, "val_images": self.val_images}


@torch.no_grad()
def validate(
    model: LateFusionNet,
    loader: DataLoader,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
    band_radius: int | Sequence[int] = 25,
    visual_count: int = 0,
    channels_last: bool = False,
) -> ValResult:
    """Score `model` (eval mode) on every batch of `loader`; restores the caller's train/eval mode.
    band_radius: one radius, or one per dataset row (batches then carry "index", see val_band_radii)."""
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    sads: list[float] = []
    mses: list[float] = []
    vis: dict[str, list[np.ndarray]] = {k: [] for k in ("image", "gt", "fg_prob", "one_minus_bg", "blend_weight", "alpha")}
    try:
        for batch in loader:
            image = batch["image"].to(device)
            height, width = image.shape[-2:]
            padded = pad_to_multiple(image, LateFusionNet.stride)
            if channels_last:
                padded = padded.contiguous(memory_format=torch.channels_last)
            with autocast():
                out = model(padded)
            if padded.shape[-2:] != image.shape[-2:]:
                out = _CroppedOutput(out, height, width)
            pred = out.alpha.float().clamp(0, 1).cpu().numpy()[:, 0]
            gt = batch["alpha"].numpy()[:, 0].astype(np.float64)
            indices = batch["index"].tolist() if "index" in batch else [None] * len(gt)
            for p, g, i in zip(pred, gt, indices):
                band = transition_band(g, band_radius if isinstance(band_radius, int) else band_radius[i])
                if band.any():
                    sads.append(sad(p.astype(np.float64), g, band))
                    mses.append(mse(p.astype(np.float64), g, band))
            take = visual_count - len(vis["image"])
            if take > 0:
                _collect(vis, batch["image"][:take], batch["alpha"][:take], out, take)
    finally:
        for m, mode in was_training.items():
            m.training = mode
    visuals = {k: np.stack(_same_size(v)) for k, v in vis.items() if v}
    return ValResult(
        val_sad=float(np.mean(sads)) if sads else math.nan,
        val_mse=float(np.nanmean(mses)) if mses else math.nan,
        val_images=len(sads),
        sad_sum=float(np.sum(sads)) if sads else 0.0,
        mse_sum=float(np.nansum(mses)) if mses else 0.0,
        visuals=visuals,
    )


def validate_shared(model: LateFusionNet, val_set: ShardDataset, band_radii: Sequence[int], cfg: StepConfig,
                    ctx: DistContext, autocast: Callable[[], AbstractContextManager],
                    visual_count: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The trainer's validation: each DDP rank scores every world_size-th chosen val row at
    val_batch_size (DataLoader workers on a GPU machine; on a CPU they would take the forward's cores)
    and the SAD/MSE sums are all-reduced, so every rank returns the same ({"val_sad", "val_mse",
    "val_images", "val_s"}, this rank's visuals). One process: the plain mean of `validate`."""
    t0 = time.perf_counter()
    workers = cfg.num_workers if ctx.device.type == "cuda" else 0
    loader = tdata.val_loader(val_set, cfg.val_batch_size or cfg.batch_size, cfg.val_max_images,
                              ctx.rank, ctx.world_size, workers)
    result = validate(model, loader, ctx.device, autocast, band_radii, visual_count, cfg.channels_last)
    scores: dict[str, float] = result.scores()
    if ctx.enabled:
        sums = all_reduce_sum(torch.tensor([result.sad_sum, result.mse_sum, result.val_images],
                                           dtype=torch.float64, device=ctx.device), ctx).tolist()
        n = int(sums[2])
        scores = {"val_sad": sums[0] / n if n else math.nan, "val_mse": sums[1] / n if n else math.nan, "val_images": n}
    scores["val_s"] = time.perf_counter() - t0
    return scores, result.visuals


def _collect(vis: dict[str, list[np.ndarray]], image: Tensor, gt: Tensor, out, take: int) -> None:
    maps = {
        "image": image.permute(0, 2, 3, 1),
        "gt": gt[:, 0],
        "fg_prob": out.fg_prob[:take, 0],
        "one_minus_bg": 1 - out.bg_prob[:take, 0],
        "blend_weight": out.blend_weight[:take, 0],
        "alpha": out.alpha[:take, 0],
    }
    for key, value in maps.items():
        vis[key].extend(value.float().cpu().numpy())


class _CroppedOutput:
    """The maps validation reads (alpha, fg_prob, bg_prob, blend_weight), cropped to (height, width)."""

    def __init__(self, out, height: int, width: int) -> None:
        for name in ("alpha", "fg_prob", "bg_prob", "blend_weight"):
            setattr(self, name, getattr(out, name)[..., :height, :width])


def _same_size(maps: list[np.ndarray]) -> list[np.ndarray]:
    """Whole val composites differ in size: bring the grid's maps to the first one's size."""
    shape = maps[0].shape[:2]
    out = []
    for m in maps:
        if m.shape[:2] != shape:
            t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))
            t = t.permute(2, 0, 1)[None] if t.ndim == 3 else t[None, None]
            t = nnf.interpolate(t, size=shape, mode="bilinear", align_corners=False)[0]
            m = (t.permute(1, 2, 0) if m.ndim == 3 else t[0]).numpy()
        out.append(m)
    return out
