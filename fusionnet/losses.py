"""Training losses of the paper, Eq. 4-10, with the details of method-notes.md ("Targets and losses").

Every map is `(N,1,H,W)` float; `alpha` is the ground truth in [0,1]. Terms are averaged over pixels
(the paper writes sums, the authors' code uses means). Known pixels: alpha <= 0.05 or alpha >= 0.95;
the rest is the transition region.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as nnf
from torch import Tensor

from fusionnet.model import MattingOutput

KNOWN_THRESHOLD = 0.05
CE_WEIGHT_KNOWN = 1.0
CE_WEIGHT_TRANSITION = 0.5  # paper Eq. 6: w_p
FUSION_WEIGHT_KNOWN = 0.1  # paper Eq. 8: w_p outside the transition region
SPARSITY_EPS = 1e-6  # inside the powers (authors' code): d/da (a + eps)^gamma is finite at 0 and 1


def transition_mask(alpha: Tensor, threshold: float = KNOWN_THRESHOLD) -> Tensor:
    """Bool map of transition pixels: threshold < alpha < 1 - threshold."""
    return (alpha > threshold) & (alpha < 1 - threshold)


def cross_entropy_term(prob: Tensor, alpha: Tensor, logits: Tensor | None = None) -> Tensor:
    """Paper Eq. 6 per pixel: w_p * CE(F_p, alpha_hat_p), alpha_hat = [alpha > 0.05].

    Given `logits` (prob = sigmoid(logits)) the cross-entropy is exact even where `prob`
    saturates to 0 or 1 in float32; otherwise the log is clamped at the smallest normal float.
    """
    target = (alpha > KNOWN_THRESHOLD).to(prob.dtype)
    weight = torch.where(transition_mask(alpha), CE_WEIGHT_TRANSITION, CE_WEIGHT_KNOWN).to(prob.dtype)
    if logits is not None:
        return weight * nnf.binary_cross_entropy_with_logits(logits, target, reduction="none")
    tiny = torch.finfo(prob.dtype).tiny
    ce = -(target * torch.log(prob.clamp_min(tiny)) + (1 - target) * torch.log((1 - prob).clamp_min(tiny)))
    return weight * ce


def distance_term(prob: Tensor, alpha: Tensor) -> Tensor:
    """Paper Eq. 4 per pixel: |F - alpha| in the transition region, (F - alpha)^2 on known pixels."""
    diff = prob - alpha
    return torch.where(transition_mask(alpha), diff.abs(), diff.square())


def forward_gradients(x: Tensor) -> tuple[Tensor, Tensor]:
    """Forward differences along x and y; the last column/row (differencing outside the image) is 0."""
    gx = nnf.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1, 0, 0))
    gy = nnf.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))
    return gx, gy


def gradient_term(prob: Tensor, alpha: Tensor) -> Tensor:
    """Paper Eq. 5 averaged: mean |grad_x F - grad_x alpha| + mean |grad_y F - grad_y alpha|.

    Each of the two terms is averaged over all H*W pixels (the zero-padded differences included).
    """
    px, py = forward_gradients(prob)
    ax, ay = forward_gradients(alpha)
    return (px - ax).abs().mean() + (py - ay).abs().mean()


def segmentation_loss(prob: Tensor, alpha: Tensor, logits: Tensor | None = None) -> Tensor:
    """Paper Eq. 7, L_F for one probability map: mean CE (Eq. 6) + mean L_d (Eq. 4) + L_g (Eq. 5).

    For the background branch (L_B) pass `bg_prob` and `1 - alpha` (the paper's alpha -> 1 - alpha).
    """
    ce = cross_entropy_term(prob, alpha, logits).mean()
    return ce + distance_term(prob, alpha).mean() + gradient_term(prob, alpha)


def side_losses(output: MattingOutput, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """L_F and L_B summed over the four side outputs of each decoder (the paper's side losses)."""
    loss_f = sum(
        segmentation_loss(p, alpha, l) for p, l in zip(output.fg_sides, output.fg_side_logits)
    )
    loss_b = sum(
        segmentation_loss(p, 1 - alpha, l) for p, l in zip(output.bg_sides, output.bg_side_logits)
    )
    return loss_f, loss_b  # type: ignore[return-value]


def fusion_loss(alpha_pred: Tensor, alpha: Tensor) -> Tensor:
    """Paper Eq. 8, L_u = sum(w * |alpha_pred - alpha|) / sum(w); w = 1 in transition, 0.1 elsewhere."""
    known = torch.full_like(alpha_pred, FUSION_WEIGHT_KNOWN)
    weight = torch.where(transition_mask(alpha), torch.ones_like(alpha_pred), known)
    return (weight * (alpha_pred - alpha).abs()).sum() / weight.sum()


def sparsity_loss(alpha_pred: Tensor, gamma: float = 0.9) -> Tensor:
    """Paper Eq. 10, L_s = mean(alpha^gamma + (1 - alpha)^gamma), gamma in [0, 1].

    As the authors' code: (alpha + eps)^gamma + (1 - alpha + eps)^gamma, so the gradient stays finite
    and non-zero at exactly 0 and 1 (a clamp would zero it there).
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1] (paper Eq. 10), got {gamma}")
    return ((alpha_pred + SPARSITY_EPS).pow(gamma) + (1 - alpha_pred + SPARSITY_EPS).pow(gamma)).mean()


class SegmentationLoss(NamedTuple):
    total: Tensor
    fg: Tensor
    bg: Tensor


class JointLoss(NamedTuple):
    total: Tensor
    fusion: Tensor
    fg: Tensor
    bg: Tensor
    sparsity: Tensor


def segmentation_step_loss(output: MattingOutput, alpha: Tensor) -> SegmentationLoss:
    """Step 1 (segmentation pre-training): L_F + L_B on all side outputs, weight 1 each."""
    loss_f, loss_b = side_losses(output, alpha)
    return SegmentationLoss(loss_f + loss_b, loss_f, loss_b)


def joint_loss(
    output: MattingOutput, alpha: Tensor, w1: float = 0.5, w2: float = 0.01, gamma: float = 0.9
) -> JointLoss:
    """Paper Eq. 9, L_J = L_u + w1 * (L_F + L_B) + w2 * L_s, L_F and L_B summed over side outputs."""
    loss_u = fusion_loss(output.alpha, alpha)
    loss_f, loss_b = side_losses(output, alpha)
    loss_s = sparsity_loss(output.alpha, gamma)
    return JointLoss(loss_u + w1 * (loss_f + loss_b) + w2 * loss_s, loss_u, loss_f, loss_b, loss_s)
