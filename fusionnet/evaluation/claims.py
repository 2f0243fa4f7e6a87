"""The paper's claims about its two decoder branches, measured: implicit trimap (Fig. 3), bracketing (Fig. 4).

Paper Sec. 3.2: the segmentation losses make F and B agree on the known regions (Eq. 3: F + B = 1)
and leave the transition region to the fusion network, so
- the pixels where neither F nor B is ~1 form an implicit trimap's unknown region (Fig. 3), which
  should cover the true transition pixels (0 < alpha < 1);
- the true alpha of a transition pixel is bracketed by the two branch estimates, 1 - B <= alpha <= F
  (Fig. 4), which is what lets the fusion network (Eq. 2) blend to the right value.
`ClaimCounts` accumulates the pixel counts behind both over a set of images (pooled, not per-image means).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fusionnet.refine import implicit_trimap

__all__ = ["ClaimCounts"]


@dataclass
class ClaimCounts:
    """Pixel counts behind the implicit-trimap and bracketing claims, pooled over images.

    transition: true transition pixels (0 < alpha < 1); unknown: implicit-trimap unknown pixels;
    both: their intersection; bracketed: transition pixels with 1 - B <= alpha <= F (paper
    Fig. 4's order); bracketed_either: transition pixels between F and 1 - B in either order.
    """

    pixels: int = 0
    transition: int = 0
    unknown: int = 0
    both: int = 0
    bracketed: int = 0
    bracketed_either: int = 0

    def add(self, gt: np.ndarray, fg_prob: np.ndarray, bg_prob: np.ndarray, threshold: float) -> None:
        """Count one image. gt, fg_prob, bg_prob: (H,W) float in [0,1]."""
        transition = (gt > 0.0) & (gt < 1.0)
        unknown = implicit_trimap(fg_prob, bg_prob, threshold) == 128
        one_minus_b = 1.0 - bg_prob
        lower, upper = np.minimum(fg_prob, one_minus_b), np.maximum(fg_prob, one_minus_b)
        self.pixels += gt.size
        self.transition += int(transition.sum())
        self.unknown += int(unknown.sum())
        self.both += int((transition & unknown).sum())
        self.bracketed += int((transition & (one_minus_b <= gt) & (gt <= fg_prob)).sum())
        self.bracketed_either += int((transition & (lower <= gt) & (gt <= upper)).sum())

    def summary(self) -> dict[str, float]:
        """recall = |T & U| / |T|, precision = |T & U| / |U|, iou = |T & U| / |T | U|, ratios."""
        union = self.transition + self.unknown - self.both
        return {
            "implicit_trimap_recall": _ratio(self.both, self.transition),
            "implicit_trimap_precision": _ratio(self.both, self.unknown),
            "implicit_trimap_iou": _ratio(self.both, union),
            "implicit_unknown_fraction": _ratio(self.unknown, self.pixels),
            "true_transition_fraction": _ratio(self.transition, self.pixels),
            "bracketing_ratio": _ratio(self.bracketed, self.transition),
            "bracketing_ratio_either_order": _ratio(self.bracketed_either, self.transition),
        }


def _ratio(num: int, den: int) -> float:
    return float(num) / den if den else math.nan
