"""What `fusionnet matte`, the server and video write for one matted image: alpha, cut-out, composite, trimap.

Every output is uint8: alpha `(H,W)`, rgba `(H,W,4)` (estimated foreground colours + alpha, so the
cut-out has no colour fringe), composite `(H,W,3)` over a colour or an image scaled to cover and
centre-cropped, trimap `(H,W)` 0/128/255 (the implicit trimap of the two decoder branches).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fusionnet.defaults import OUTPUT_KINDS  # noqa: F401  re-exported: callers import it from here
from fusionnet.inference.matter import MatteResult
from fusionnet.io.images import to_uint8
from fusionnet.model.geometry import resize_maps
from fusionnet.refine import estimate_foreground, implicit_trimap

Background = tuple[int, int, int] | np.ndarray  # an RGB colour, or an (H,W,3) float image in [0,1]


def fit_background(background: Background, size: tuple[int, int]) -> np.ndarray:
    """`(H,W,3)` float32 background: a flat colour, or the image scaled to cover and centre-cropped."""
    height, width = size
    if isinstance(background, tuple):
        return np.broadcast_to(np.asarray(background, np.float32) / 255.0, (height, width, 3))
    import torch

    bh, bw = background.shape[:2]
    scale = max(height / bh, width / bw)
    cover = (max(height, round(bh * scale)), max(width, round(bw * scale)))
    x = resize_maps(torch.from_numpy(background).permute(2, 0, 1)[None], cover)[0].permute(1, 2, 0)
    top, left = (cover[0] - height) // 2, (cover[1] - width) // 2
    return x[top : top + height, left : left + width].clamp(0.0, 1.0).numpy()


def render_outputs(
    image: np.ndarray, result: MatteResult, kinds: Sequence[str], background: Background
) -> dict[str, np.ndarray]:
    """The uint8 arrays to write for one image, keyed by output kind."""
    outputs: dict[str, np.ndarray] = {}
    alpha = result.alpha
    if "alpha" in kinds:
        outputs["alpha"] = to_uint8(alpha)
    if "rgba" in kinds or "composite" in kinds:
        foreground = estimate_foreground(image, alpha)
        if "rgba" in kinds:
            outputs["rgba"] = np.dstack([to_uint8(foreground), to_uint8(alpha)])
        if "composite" in kinds:
            a = alpha[:, :, None]
            composite = a * foreground + (1.0 - a) * fit_background(background, alpha.shape)
            outputs["composite"] = to_uint8(composite)
    if "trimap" in kinds:
        outputs["trimap"] = implicit_trimap(result.fg_prob, result.bg_prob)
    return outputs
