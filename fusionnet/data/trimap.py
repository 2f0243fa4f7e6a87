"""Evaluation trimaps for composites: the paper's "-25" unknown band, written as 0/128/255 PNGs.

The "-full" variant (metrics over the whole image) needs no file: it is mask=None in fusionnet.metrics.
"""

from __future__ import annotations

import numpy as np

from fusionnet.metrics import transition_band

UNKNOWN, FOREGROUND, BACKGROUND = 128, 255, 0


def band_trimap(alpha: np.ndarray, radius: int = 25) -> np.ndarray:
    """Trimap with unknown = transition pixels (0 < alpha < 1) dilated by a disk of `radius`.

    alpha: (H,W) uint8 in [0,255]. Returns (H,W) uint8: 128 in the band, else 255 where alpha is
    255 and 0 where alpha is 0 (every other value is inside the band by construction).
    """
    if alpha.dtype != np.uint8 or alpha.ndim != 2:
        raise ValueError(f"band_trimap: alpha must be (H,W) uint8, got {alpha.dtype} {alpha.shape}")
    band = transition_band(alpha.astype(np.float64) / 255.0, radius=int(radius))
    trimap = np.where(alpha == 255, FOREGROUND, BACKGROUND).astype(np.uint8)
    trimap[band] = UNKNOWN
    return trimap
