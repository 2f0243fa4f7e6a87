"""Procedural foregrounds with realistic soft alpha: the embedded default data of `make run`.

Each foreground is a textured object whose matte has what real mattes have and binary masks lack:
thin hair-like strands and fur at the boundary (sub-pixel wide, so 0 < alpha < 1), a semi-transparent
veil, motion or defocus blur at the edges, and holes. Layers are drawn at 4x resolution and box-averaged
down, which gives correct anti-aliased coverage. Colours are composed "over" in premultiplied form, so
F is consistent with alpha. Everything is a pure function of (seed, index): same seed, same arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4  # draw at 4x, box-average down: exact coverage for sub-pixel strands
GAUSS_TRUNCATE = 4.0  # Gaussian kernels reach 4 sigma (scipy.ndimage's default, which made today's data)

# The collect stage parallelises over foregrounds (one process each): OpenCV runs in the calling thread.
cv2.setNumThreads(1)


@dataclass(frozen=True)
class SyntheticForeground:
    """fg: (H,W,3) uint8 RGB foreground colours; alpha: (H,W) uint8 matte (255 = opaque)."""

    fg: np.ndarray
    alpha: np.ndarray


def fractal_noise(rng: np.random.Generator, shape: tuple[int, int], octaves: int = 5,
                  base_cells: int = 3, persistence: float = 0.55) -> np.ndarray:
    """Smooth multi-octave value noise, (H,W) float32 rescaled to [0,1]."""
    height, width = shape
    total = np.zeros(shape, dtype=np.float32)
    amplitude = 1.0
    for octave in range(octaves):
        cells = base_cells * 2**octave
        grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
        up = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)
        total += amplitude * np.asarray(up, dtype=np.float32)
        amplitude *= persistence
    low, high = float(total.min()), float(total.max())
    return (total - low) / max(high - low, 1e-6)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour (3,) float in [0,1], avoiding near-black and near-white."""
    return (0.1 + 0.8 * rng.random(3)).astype(np.float32)


def textured_colour(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A textured colour field (H,W,3) float32 in [0,1]: two-colour noise blend plus a pattern."""
    height, width = shape
    mix = fractal_noise(rng, shape, base_cells=int(rng.integers(2, 6)))[..., None]
    field = _random_colour(rng) * (1.0 - mix) + _random_colour(rng) * mix
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    pattern = int(rng.integers(0, 3))
    if pattern == 1:  # warped stripes (fabric, fur bands)
        angle, period = rng.uniform(0, math.pi), rng.uniform(6, 30)
        warp = 12.0 * fractal_noise(rng, shape, octaves=3)
        stripes = 0.5 + 0.5 * np.sin((xx * math.cos(angle) + yy * math.sin(angle) + warp) * 2 * math.pi / period)
        field = field * (0.75 + 0.25 * stripes[..., None])
    elif pattern == 2:  # fine grain (skin, paper)
        field = field * (0.85 + 0.3 * (fractal_noise(rng, shape, base_cells=24, octaves=2)[..., None] - 0.5))
    shade = 0.8 + 0.4 * fractal_noise(rng, shape, octaves=2, base_cells=2)[..., None]  # soft lighting
    return np.clip(field * shade, 0.0, 1.0).astype(np.float32)


def _blob_radius(rng: np.random.Generator, base: float) -> np.ndarray:
    """A smooth closed outline: radius r(theta) sampled at 360 angles, (360,) float64 in pixels."""
    theta = np.linspace(0, 2 * math.pi, 360, endpoint=False)
    radius = np.ones_like(theta)
    for k in range(2, 7):
        radius += rng.uniform(0, 0.16) / math.sqrt(k) * np.cos(k * theta + rng.uniform(0, 2 * math.pi))
    return base * radius


def _body_and_holes(rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float],
                    radius: np.ndarray) -> np.ndarray:
    """Solid object coverage (H,W) float32 in [0,1] with anti-aliased outline and 0-3 holes."""
    height, width = shape
    s = SUPERSAMPLE
    canvas = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(canvas)
    theta = np.linspace(0, 2 * math.pi, radius.size, endpoint=False)
    cy, cx = centre
    outline = [(float((cx + r * math.cos(t)) * s), float((cy + r * math.sin(t)) * s)) for r, t in zip(radius, theta)]
    draw.polygon(outline, fill=255)
    for _ in range(int(rng.integers(0, 4))):
        t, d = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.6) * float(radius.min())
        hy, hx = cy + d * math.sin(t), cx + d * math.cos(t)
        ry, rx = rng.uniform(3, 12, size=2)
        draw.ellipse([(hx - rx) * s, (hy - ry) * s, (hx + rx) * s, (hy + ry) * s], fill=0)
    return np.asarray(canvas.reduce(s), dtype=np.float32) / 255.0


def _strands(rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float],
             radius: np.ndarray) -> np.ndarray:
    """Hair strands on 1-2 arcs of the outline plus optional short fur all round.

    Strands are 0.25-1 px wide random walks leaving the outline, so most of their pixels are
    fractional: (H,W) float32 coverage in [0,1].
    """
    height, width = shape
    s = SUPERSAMPLE
    canvas = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(canvas)
    cy, cx = centre
    scale = min(height, width) / 320.0

    def grow(theta: float, length: float, max_width: int, opacity: tuple[float, float]) -> None:
        r = float(radius[int(theta / (2 * math.pi) * radius.size) % radius.size]) * 0.97
        y, x = cy + r * math.sin(theta), cx + r * math.cos(theta)
        heading, curl = theta + rng.normal(0, 0.35), rng.normal(0, 0.06)
        points = [(x * s, y * s)]
        for _ in range(max(2, int(length / 2))):
            heading += curl + rng.normal(0, 0.08)  # smooth bend with a little jitter
            x, y = x + 2 * math.cos(heading), y + 2 * math.sin(heading)
            points.append((x * s, y * s))
        draw.line(points, fill=int(255 * rng.uniform(*opacity)), width=int(rng.integers(1, max_width + 1)),
                  joint="curve")

    for _ in range(int(rng.integers(1, 3))):  # hair: long strands on an arc, mostly the upper side (a head)
        middle = rng.uniform(-math.pi + 0.4, -0.4) if rng.random() < 0.8 else rng.uniform(0, 2 * math.pi)
        span = rng.uniform(0.8, 2.0)
        for _ in range(int(rng.integers(60, 160) * scale)):
            grow(middle + span * rng.uniform(-0.5, 0.5), rng.uniform(12, 60) * scale, 4, (0.5, 1.0))
    if rng.random() < 0.6:  # fur: short dense strands all round
        for _ in range(int(rng.integers(200, 450) * scale)):
            grow(rng.uniform(0, 2 * math.pi), rng.uniform(4, 14) * scale, 3, (0.4, 0.9))
    return np.asarray(canvas.reduce(s), dtype=np.float32) / 255.0


def _veil(rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float],
          radius: np.ndarray) -> np.ndarray:
    """A semi-transparent region (glass, gauze): (H,W) float32 in [0, 0.75] with a soft edge."""
    height, width = shape
    theta = rng.uniform(0, 2 * math.pi)
    r = float(radius.mean())
    vy, vx = centre[0] + r * math.sin(theta), centre[1] + r * math.cos(theta)
    ry, rx = r * rng.uniform(0.35, 0.7, size=2)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    inside = (((yy - vy) / ry) ** 2 + ((xx - vx) / rx) ** 2 <= 1.0).astype(np.float32)
    soft = _gaussian_blur(inside, sigma=rng.uniform(1.5, 5.0))
    level = rng.uniform(0.2, 0.6) * (0.6 + 0.4 * fractal_noise(rng, shape, octaves=3))
    return np.clip(soft * level, 0.0, 0.75).astype(np.float32)


def _blur_kernel(rng: np.random.Generator) -> np.ndarray:
    """Motion (line) or defocus (disk) point-spread function, normalised to sum 1."""
    if rng.random() < 0.5:
        length, angle = rng.uniform(5, 15), rng.uniform(0, math.pi)
        half = int(math.ceil(length / 2))
        kernel = Image.new("L", ((2 * half + 1) * 4,) * 2, 0)
        dx, dy = length / 2 * math.cos(angle), length / 2 * math.sin(angle)
        c = (half + 0.5) * 4
        ImageDraw.Draw(kernel).line([(c - dx * 4, c - dy * 4), (c + dx * 4, c + dy * 4)], fill=255, width=4)
        psf = np.asarray(kernel.reduce(4), dtype=np.float64)
    else:
        rad = rng.uniform(1.5, 4.0)
        half = int(math.ceil(rad))
        yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
        psf = (yy**2 + xx**2 <= rad**2).astype(np.float64)
    return psf / psf.sum()


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of an (H,W) float32 image, kernel radius round(4 sigma), mirrored border
    (d c b a | a b c d, OpenCV's BORDER_REFLECT); computed in float64, returned as float32.
    """
    radius = int(GAUSS_TRUNCATE * sigma + 0.5)
    size = 2 * radius + 1
    blurred = cv2.GaussianBlur(image.astype(np.float64), (size, size), sigma, borderType=cv2.BORDER_REFLECT)
    return blurred.astype(np.float32)


def _convolve_same(image: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """2-D convolution, output the size of `image` (zero padding outside it): (H,W) or (H,W,C) float64.

    The centre of psf (kh, kw) is at ((kh - 1) // 2, (kw - 1) // 2), as in the 'same' part of a full
    convolution. cv2.filter2D correlates, so it gets the flipped psf; its default anchor (k // 2 on
    each axis) is that centre mirrored, k - 1 - (k - 1) // 2, for odd and even sizes alike.
    """
    flipped = np.ascontiguousarray(psf[::-1, ::-1], dtype=np.float64)
    return cv2.filter2D(np.asarray(image, dtype=np.float64), cv2.CV_64F, flipped, borderType=cv2.BORDER_CONSTANT)


def _blur_region(rng: np.random.Generator, alpha: np.ndarray, premult: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blur alpha and premultiplied colour on a random half of the image (smooth transition).

    Blurring the premultiplied colour, not F, is what a moving or defocused object does to the image.
    """
    height, width = alpha.shape
    psf = _blur_kernel(rng)
    blurred_alpha = np.clip(_convolve_same(alpha, psf), 0.0, 1.0)
    blurred_premult = _convolve_same(premult, psf)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    side = (xx - width / 2) * math.cos(angle) + (yy - height / 2) * math.sin(angle)
    region = 1.0 / (1.0 + np.exp(-side / (0.08 * min(height, width))))
    alpha = region * blurred_alpha + (1 - region) * alpha
    premult = region[..., None] * blurred_premult + (1 - region[..., None]) * premult
    return alpha.astype(np.float32), np.clip(premult, 0.0, alpha[..., None]).astype(np.float32)


def make_foreground(seed: int, index: int, size: tuple[int, int] = (320, 320)) -> SyntheticForeground:
    """Generate foreground number `index` for `seed`; (height, width) = size, each >= 32.

    Returns uint8 arrays: fg (H,W,3) colours and alpha (H,W). Deterministic in (seed, index, size).
    """
    height, width = int(size[0]), int(size[1])
    if height < 32 or width < 32:
        raise ValueError(f"make_foreground: size must be at least 32x32, got {size}")
    rng = np.random.default_rng([int(seed), int(index)])
    shape = (height, width)
    base = min(height, width) * rng.uniform(0.2, 0.3)
    if rng.random() < 0.4:  # object running off the bottom edge, like a portrait's shoulders
        centre = (height * rng.uniform(0.65, 0.85), width * rng.uniform(0.4, 0.6))
        base *= 1.3
    else:
        centre = (height * rng.uniform(0.4, 0.6), width * rng.uniform(0.4, 0.6))
    radius = _blob_radius(rng, base)

    body = _body_and_holes(rng, shape, centre, radius)
    strands = _strands(rng, shape, centre, radius)
    veil = _veil(rng, shape, centre, radius) if rng.random() < 0.5 else np.zeros(shape, np.float32)
    body_colour, strand_colour, veil_colour = (textured_colour(rng, shape) for _ in range(3))

    # "over" compositing of veil < body < strands, in premultiplied colour
    premult = veil[..., None] * veil_colour
    premult = body[..., None] * body_colour + (1 - body[..., None]) * premult
    alpha = 1.0 - (1.0 - veil) * (1.0 - body)
    if rng.random() < 0.5:  # blur the solid part only: the strands stay sharp, so every matte keeps thin hair
        alpha, premult = _blur_region(rng, alpha, premult)
    premult = strands[..., None] * strand_colour + (1 - strands[..., None]) * premult
    alpha = 1.0 - (1.0 - alpha) * (1.0 - strands)

    colour = np.where(alpha[..., None] > 1e-4, premult / np.maximum(alpha[..., None], 1e-4), body_colour)
    fg = np.clip(np.rint(colour * 255.0), 0, 255).astype(np.uint8)
    return SyntheticForeground(fg=fg, alpha=np.clip(np.rint(alpha * 255.0), 0, 255).astype(np.uint8))
