"""Image geometry around the network: reflection padding to the stride, map resizing, float images.

The authors' code pads by reflection to a multiple of the stride (32); numpy "reflect" semantics, so
even a 1x1 image works (it is repeated).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor

from fusionnet.model.network import LateFusionNet


def reflect_indices(size: int, total: int) -> Tensor:
    """Indices `0..total-1` folded back into `0..size-1` by mirror reflection (edge not repeated).

    Same as numpy's `np.pad(mode="reflect")` for any pad length; a size of 1 repeats its element.
    """
    index = torch.arange(total)
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index % period
    return torch.where(index < size, index, period - index)


def pad_to_multiple(x: Tensor, multiple: int = LateFusionNet.stride) -> Tensor:
    """Reflect-pad `(N,C,H,W)` at the bottom and right up to multiples of `multiple`."""
    height, width = x.shape[-2:]
    return pad_to_size(x, (-(-height // multiple) * multiple, -(-width // multiple) * multiple))


def pad_to_size(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Reflect-pad `(N,C,H,W)` at the bottom and right to `size` `(padded_h, padded_w)`, each >= H, W."""
    height, width = x.shape[-2:]
    padded_h, padded_w = size
    if padded_h != height:
        x = x.index_select(-2, reflect_indices(height, padded_h).to(x.device))
    if padded_w != width:
        x = x.index_select(-1, reflect_indices(width, padded_w).to(x.device))
    return x


def resize_maps(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of `(N,C,h,w)` to `size`; antialiased when shrinking, identity when equal."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return nnf.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


def as_float_image(image: np.ndarray) -> np.ndarray:
    """An `(H,W,3)` uint8 or float image as float32 in [0,1] (ValueError/TypeError for anything else)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"expected an (H,W,3) RGB image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"expected a float image in [0,1] or uint8, got {image.dtype}")
    return np.ascontiguousarray(np.clip(image, 0.0, 1.0), dtype=np.float32)
