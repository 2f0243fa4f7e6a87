"""Temporal smoothing of a video's alpha mattes (the paper mattes single images; video is its future work).

A per-frame network gives each frame its own matte, so on a static camera sensor noise alone makes
alpha flicker. `AlphaSmoother` averages alpha over time only where the picture did not change, so a
moving edge keeps the frame's own alpha. `flicker` is the measure: mean |alpha_t - alpha_{t-1}|.
"""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np

from fusionnet.defaults import DEFAULT_MOTION_THRESHOLD  # noqa: F401  benchmarks/bench_video.py sweeps it

# Box-blur the frames before differencing: it averages sensor noise away (5x5: ~5x less) but keeps motion.
CHANGE_BLUR_SIZE = 5


class AlphaSmoother:
    """Motion-gated exponential moving average of alpha between consecutive frames.

    Per pixel, with frames I in [0,1] and box5 a 5x5 box blur:

        change_t  = mean over RGB of |box5(I_t) - box5(I_{t-1})|
        keep_t    = strength * clip(1 - change_t / motion_threshold, 0, 1)
        smooth_t  = keep_t * smooth_{t-1} + (1 - keep_t) * alpha_t,     smooth_0 = alpha_0

    A static pixel keeps `strength` of its running average (flicker shrinks); a pixel whose blurred
    colour changed by `motion_threshold` or more takes this frame's alpha as is (no smear). A new
    frame size (or `reset()`) starts over. State: the previous blurred frame and smoothed alpha.

    Args:
        strength: in [0, 1); 0 returns alpha unchanged, larger averages over more frames
            (about 1 / (1 - strength) frames where static).
        motion_threshold: > 0, on the [0,1] colour scale.
    """

    def __init__(self, strength: float, motion_threshold: float = DEFAULT_MOTION_THRESHOLD):
        if not (0.0 <= strength < 1.0):
            raise ValueError(f"smoothing strength must be in [0, 1), got {strength!r}")
        if not (0.0 < motion_threshold < float("inf")):
            raise ValueError(f"motion_threshold must be a finite number > 0, got {motion_threshold!r}")
        self.strength = float(strength)
        self.motion_threshold = float(motion_threshold)
        self.reset()

    def __repr__(self) -> str:
        return f"AlphaSmoother(strength={self.strength}, motion_threshold={self.motion_threshold})"

    def reset(self) -> None:
        self._previous_frame: np.ndarray | None = None
        self._previous_alpha: np.ndarray | None = None

    def __call__(self, frame: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        """`frame` `(H,W,3)` float in [0,1], `alpha` `(H,W)` float in [0,1] -> smoothed `(H,W)` float32."""
        frame = np.asarray(frame, np.float32)
        alpha = np.asarray(alpha, np.float32)
        if frame.ndim != 3 or frame.shape[2] != 3 or alpha.shape != frame.shape[:2]:
            raise ValueError(f"expected an (H,W,3) frame and an (H,W) alpha, got {frame.shape} and {alpha.shape}")
        blurred = cv2.blur(frame, (CHANGE_BLUR_SIZE, CHANGE_BLUR_SIZE))
        previous = self._previous_alpha
        if self.strength == 0.0 or previous is None or previous.shape != alpha.shape:
            smoothed = alpha.copy()
        else:
            change = np.abs(blurred - self._previous_frame).mean(axis=2)
            keep = self.strength * np.clip(1.0 - change / self.motion_threshold, 0.0, 1.0)
            smoothed = (keep * previous + (1.0 - keep) * alpha).astype(np.float32)
        self._previous_frame, self._previous_alpha = blurred, smoothed
        return smoothed


def flicker(alphas: Iterable[np.ndarray]) -> float:
    """Mean over frames and pixels of |alpha_t - alpha_{t-1}| (same-size `(H,W)` mattes in [0,1]).

    Streams: holds only the previous matte. Fewer than two mattes give 0.0.
    """
    total, count, previous = 0.0, 0, None
    for alpha in alphas:
        alpha = np.asarray(alpha, np.float64)
        if previous is not None:
            total += float(np.abs(alpha - previous).mean())
            count += 1
        previous = alpha
    return total / count if count else 0.0
