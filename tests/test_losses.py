"""Paper Eq. 4-10 against values computed by hand on 2x2 maps."""

from __future__ import annotations

import math

import pytest
import torch

from fusionnet.losses import (
    cross_entropy_term,
    distance_term,
    fusion_loss,
    gradient_term,
    joint_loss,
    segmentation_loss,
    segmentation_step_loss,
    sparsity_loss,
    transition_mask,
)
from fusionnet.model import MattingOutput, blend

# 2x2 maps used throughout: one transition pixel (0.5), three known ones (1.0, 0.0, 0.02)
PROB = torch.tensor([[[[0.8, 0.3], [0.6, 0.1]]]], dtype=torch.float64)
ALPHA = torch.tensor([[[[1.0, 0.5], [0.0, 0.02]]]], dtype=torch.float64)


def test_transition_mask_uses_005_threshold():
    a = torch.tensor([0.0, 0.05, 0.0501, 0.5, 0.9499, 0.95, 1.0])
    assert transition_mask(a).tolist() == [False, False, True, True, True, False, False]


def test_cross_entropy_by_hand():
    # targets alpha > 0.05 -> [1, 1, 0, 0]; weight 0.5 on the transition pixel, 1 elsewhere (Eq. 6)
    expected = [-math.log(0.8), 0.5 * -math.log(0.3), -math.log(1 - 0.6), -math.log(1 - 0.1)]
    got = cross_entropy_term(PROB, ALPHA).flatten().tolist()
    assert got == pytest.approx(expected, rel=1e-12)


def test_distance_by_hand():
    # squared error on known pixels, absolute error in the transition region (Eq. 4)
    expected = [0.2**2, 0.2, 0.6**2, 0.08**2]
    assert distance_term(PROB, ALPHA).flatten().tolist() == pytest.approx(expected, rel=1e-12)


def test_gradient_by_hand():
    # x: prob diffs (-0.5 | 0), (-0.5 | 0); alpha diffs (-0.5 | 0), (0.02 | 0) -> |.| = 0, 0, 0.52, 0
    # y: prob diffs (-0.2, -0.2), alpha (-1, -0.48) -> 0.8, 0.28; last row 0. Each averaged over 4 pixels.
    expected = (0.52) / 4 + (0.8 + 0.28) / 4
    assert gradient_term(PROB, ALPHA).item() == pytest.approx(expected, rel=1e-12)


def test_segmentation_loss_by_hand():
    ce = (-math.log(0.8) + 0.5 * -math.log(0.3) - math.log(0.4) - math.log(0.9)) / 4
    ld = (0.04 + 0.2 + 0.36 + 0.0064) / 4
    lg = 0.13 + 0.27
    assert segmentation_loss(PROB, ALPHA).item() == pytest.approx(ce + ld + lg, rel=1e-12)
    assert segmentation_loss(PROB, ALPHA).item() == pytest.approx(1.01329, abs=1e-5)


def test_background_branch_uses_one_minus_alpha():
    # a background map that is exactly 1 - alpha has zero L_d and L_g for the B branch
    bg = 1 - ALPHA
    loss = segmentation_loss(bg.clamp(1e-6, 1 - 1e-6), 1 - ALPHA)
    ce_only = cross_entropy_term(bg.clamp(1e-6, 1 - 1e-6), 1 - ALPHA).mean()
    assert loss.item() == pytest.approx(ce_only.item(), abs=1e-5)


def test_logits_give_exact_cross_entropy_where_sigmoid_saturates():
    logits = torch.tensor([[[[30.0, -30.0], [2.0, -1.0]]]])
    alpha = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
    prob = torch.sigmoid(logits)
    exact = cross_entropy_term(prob, alpha, logits).flatten()
    assert exact[:2].tolist() == pytest.approx([30.0, 30.0], rel=1e-6)
    # where the probability is not saturated the two paths agree (the clamp changes nothing)
    clamped = cross_entropy_term(prob, alpha).flatten()
    assert clamped[2:].tolist() == pytest.approx(exact[2:].tolist(), rel=1e-6)


def test_fusion_loss_by_hand():
    # w = [0.1, 1, 0.1, 0.1]; |diff| = [0.2, 0.2, 0.6, 0.08]
    expected = (0.1 * 0.2 + 1 * 0.2 + 0.1 * 0.6 + 0.1 * 0.08) / 1.3
    assert fusion_loss(PROB, ALPHA).item() == pytest.approx(expected, rel=1e-12)


def test_sparsity_loss_by_hand():
    a = torch.tensor([0.25, 1.0, 0.0, 0.5], dtype=torch.float64)
    expected = (0.25**0.9 + 0.75**0.9 + 1 + 1 + 2 * 0.5**0.9) / 4
    got = sparsity_loss(a, gamma=0.9).item()
    assert got == pytest.approx(expected, rel=1e-3)  # the smoothing eps stays within 1e-3 relative
    assert got == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="gamma"):
        sparsity_loss(a, gamma=1.5)


def test_sparsity_gradient_is_finite_at_0_and_1():
    a = torch.tensor([0.0, 1.0, 0.3], requires_grad=True)
    sparsity_loss(a).backward()
    assert torch.isfinite(a.grad).all()


def _fake_output(fg, bg, beta):
    sides_f = tuple(fg for _ in range(4))
    sides_b = tuple(bg for _ in range(4))
    logit = lambda p: torch.log(p) - torch.log1p(-p)  # noqa: E731
    return MattingOutput(
        alpha=blend(beta, fg, bg),
        fg_prob=fg,
        bg_prob=bg,
        blend_weight=beta,
        fg_sides=sides_f,
        bg_sides=sides_b,
        fg_side_logits=tuple(logit(p) for p in sides_f),
        bg_side_logits=tuple(logit(p) for p in sides_b),
    )


def test_joint_loss_is_eq9():
    fg = PROB
    bg = torch.tensor([[[[0.1, 0.6], [0.7, 0.95]]]], dtype=torch.float64)
    beta = torch.tensor([[[[0.5, 0.2], [0.9, 0.4]]]], dtype=torch.float64)
    out = _fake_output(fg, bg, beta)
    lf = segmentation_loss(fg, ALPHA)
    lb = segmentation_loss(bg, 1 - ALPHA)
    lu = fusion_loss(blend(beta, fg, bg), ALPHA)
    ls = sparsity_loss(blend(beta, fg, bg))
    got = joint_loss(out, ALPHA, w1=0.5, w2=0.01)
    assert got.fusion.item() == pytest.approx(lu.item(), rel=1e-12)
    assert got.fg.item() == pytest.approx(4 * lf.item(), rel=1e-9)  # summed over the four side outputs
    assert got.bg.item() == pytest.approx(4 * lb.item(), rel=1e-9)
    assert got.total.item() == pytest.approx(lu.item() + 0.5 * 4 * (lf + lb).item() + 0.01 * ls.item(), rel=1e-9)
    step1 = segmentation_step_loss(out, ALPHA)
    assert step1.total.item() == pytest.approx(4 * (lf + lb).item(), rel=1e-9)
