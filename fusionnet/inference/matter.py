"""Matting one image of any size with a trained LateFusionNet, and batches of image files.

Per image (paper Sec. 4: the longer side is kept at most 800 px at inference, as in training):

1. resize so the longer side is at most `max_side` (bilinear, antialiased; never enlarged);
2. pad bottom/right to a multiple of the network stride 32 by reflection, as the authors' code does
   (numpy "reflect" semantics, so even a 1x1 image works: it is repeated); with compile, to a bucket
   size (`fusionnet.inference.network`: a bounded number of compiled graphs);
3. run the network; crop the padding off alpha, fg_prob and bg_prob;
4. upsample them bilinearly to the image's own size (on the device), then copy the three maps to the
   host in one transfer (`_to_host`);
5. optionally refine alpha with the guided filter at full resolution (the paper's "Ours-refined", on CPU).

Precision: "fp32" is plain eager float32 (the reference). "fp32-cl" is float32 with BatchNorms folded
and channels-last. "bf16" is that in bfloat16 (on CPU the weights are cast to bfloat16, which is
faster than autocast; on CUDA autocast). "int8" is CPU post-training quantisation (`fusionnet.inference.int8`:
needs calibration images or a cached calibration). "fp16" is CUDA autocast only. "auto" picks what is
measurably fastest here (`fusionnet.inference.precision.resolve_inference_precision`).
`benchmarks/bench_inference.py` measures the variants.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fusionnet.hardware import resolve_device
from fusionnet.defaults import (DEFAULT_GUIDED_EPS, DEFAULT_GUIDED_RADIUS, DEFAULT_MAX_OUTPUT_SIDE,  # noqa: F401
                                DEFAULT_MAX_SIDE, PRECISIONS)
from fusionnet.inference.network import PreparedNetwork
from fusionnet.inference.precision import resolve_inference_precision
from fusionnet.io.images import DEFAULT_MAX_PIXELS, ImageLoadError, LoadedImage, fit_within, load_image
from fusionnet.model.geometry import as_float_image, resize_maps
from fusionnet.model.network import LateFusionNet
from fusionnet.refine import guided_filter

# DEFAULT_MAX_SIDE, DEFAULT_MAX_OUTPUT_SIDE, DEFAULT_GUIDED_RADIUS/EPS, PRECISIONS: fusionnet.defaults (--help without torch)


# ---------------------------------------------------------------------------------------------
# one image
# ---------------------------------------------------------------------------------------------


@dataclass
class MatteResult:
    """One image's matte; every map is `(H,W) float32 in [0,1]` at the input image's size.

    `alpha` is the final matte (guided-filter refined when refinement is on), `raw_alpha` the
    network's alpha before refinement; `network_size` is the `(h, w)` the network saw before padding.
    """

    alpha: np.ndarray
    raw_alpha: np.ndarray
    fg_prob: np.ndarray
    bg_prob: np.ndarray
    network_size: tuple[int, int]


class Matter(PreparedNetwork):
    """A model prepared for inference at a given device and precision; call it on images.

    Args:
        model: a LateFusionNet (put in eval mode here: BatchNorm uses its running statistics).
        device: "auto", "cpu", "cuda" or a torch.device.
        precision: "fp32" (eager reference), "fp32-cl" (folded BN, channels-last), "bf16", "int8" (CPU),
            "fp16" (CUDA only) or "auto" (the measurably fastest of fp32-cl, bf16 and int8 on this
            machine, `fusionnet.inference.precision`; the choice and why are in `precision` and `precision_reason`).
        max_side: longer side of the network input (paper: 800).
        refine: apply the guided filter to alpha at full resolution.
        radius, eps: guided filter window radius (pixels) and regularisation (on the [0,1] scale).
        compile: wrap the network in torch.compile; inputs pad to bucket sizes, at most 16 graphs per batch size.
        calibration: int8 only: images ((H,W,3) uint8 or float [0,1], ideally training composites) to
            calibrate on (the calibration is then cached); None: use the cached calibration of this model.
    """

    def __init__(
        self,
        model: LateFusionNet,
        *,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        max_side: int = DEFAULT_MAX_SIDE,
        refine: bool = True,
        radius: int = DEFAULT_GUIDED_RADIUS,
        eps: float = DEFAULT_GUIDED_EPS,
        compile: bool = False,
        calibration: Sequence[np.ndarray] | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {max_side}")
        self.precision_reason = "set by the caller"
        if precision == "auto":
            precision, self.precision_reason = resolve_inference_precision(model, resolve_device(device))
        super().__init__(model, device=device, precision=precision, compile=compile, calibration=calibration,
                         bucket_side=max_side)
        self.max_side = max_side
        self.refine = refine
        self.radius = radius
        self.eps = eps

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> MatteResult:
        """Matte `image`, `(H,W,3)` float in [0,1] (uint8 0..255 also accepted), of any size >= 1x1."""
        return self.matte_batch([image])[0]

    @torch.inference_mode()
    def matte_batch(self, images: Sequence[np.ndarray]) -> list[MatteResult]:
        """Matte same-size images (e.g. video frames) in one network call; one MatteResult each.

        Each image is `(H,W,3)` float in [0,1] or uint8, all of one size. Same steps as calling this
        Matter on each image (the network sees an `(N,3,h,w)` batch): equal up to float rounding.
        """
        rgbs = [as_float_image(image) for image in images]
        if not rgbs:
            return []
        size = (int(rgbs[0].shape[0]), int(rgbs[0].shape[1]))
        for rgb in rgbs[1:]:
            if rgb.shape[:2] != size:
                raise ValueError(f"matte_batch needs images of one size, got {size} and {rgb.shape[:2]}")
        network_size = fit_within(size, self.max_side)
        # contiguous NCHW, as a single image's permuted view is taken: a channels-last batch rounds differently
        x = torch.from_numpy(np.stack(rgbs)).permute(0, 3, 1, 2).contiguous().to(self.device)
        x = resize_maps(x, network_size).clamp_(0.0, 1.0)
        maps = _to_host(resize_maps(self.run_network(x), size).clamp_(0.0, 1.0))
        results = []
        for rgb, (raw_alpha, fg_prob, bg_prob) in zip(rgbs, maps):
            alpha = raw_alpha
            if self.refine and self.radius > 0:
                alpha = guided_filter(rgb, raw_alpha, self.radius, self.eps)
            results.append(
                MatteResult(
                    alpha=alpha, raw_alpha=raw_alpha, fg_prob=fg_prob, bg_prob=bg_prob, network_size=network_size
                )
            )
        return results


def _to_host(maps: Tensor) -> np.ndarray:
    """`(N,3,H,W)` maps [alpha, fg_prob, bg_prob] on the device -> float32 numpy: the batch's only device->host copy."""
    return maps.cpu().numpy()


def matte(model: LateFusionNet, image: np.ndarray, *, fast: bool = False, **options) -> MatteResult:
    """One-off convenience: `Matter(model, precision="bf16" if fast else "fp32", **options)(image)`."""
    options.setdefault("precision", "bf16" if fast else "fp32")
    return Matter(model, **options)(image)


# ---------------------------------------------------------------------------------------------
# many files
# ---------------------------------------------------------------------------------------------


@dataclass
class FileMatte:
    """The outcome for one input file: `image` and `result` on success, else `error` (a message)."""

    path: Path
    image: LoadedImage | None = None
    result: MatteResult | None = None
    error: str | None = None


def matte_files(
    matter: Matter,
    paths: Iterable[str | os.PathLike],
    *,
    max_output_side: int | None = DEFAULT_MAX_OUTPUT_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[FileMatte]:
    """Matte each file in turn; a file that fails yields its error and the batch goes on."""
    for path in paths:
        path = Path(path)
        try:
            image = load_image(path, max_side=max_output_side, max_pixels=max_pixels)
        except ImageLoadError as exc:
            yield FileMatte(path, error=exc.problem)
            continue
        try:
            yield FileMatte(path, image=image, result=matter(image.rgb))
        except (RuntimeError, ValueError, MemoryError) as exc:
            yield FileMatte(path, image=image, error=f"inference failed ({type(exc).__name__}: {exc})")
