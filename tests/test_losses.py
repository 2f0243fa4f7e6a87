"""Paper Eq. 4-10 against values computed by hand on 2x2 maps."""

from __future__ import annotations

import math

import numpy as np
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
    side_losses,
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


# A background map that is not 1 - alpha, with its B-branch loss worked out by hand (B target = 1 - alpha).
BG = torch.tensor([[[[0.1, 0.6], [0.7, 0.95]]]], dtype=torch.float64)


def test_background_branch_by_hand():
    # 1 - alpha = [[0, .5], [1, .98]]: one transition pixel (0.5); CE targets (1 - alpha) > 0.05 -> [0, 1, 1, 1]
    ce = (-math.log(0.9) + 0.5 * -math.log(0.6) - math.log(0.7) - math.log(0.95)) / 4
    ld = (0.1**2 + 0.1 + 0.3**2 + 0.03**2) / 4  # squared on known pixels, |.| on the transition one
    # x: B diffs (.5 | 0), (.25 | 0); target (.5 | 0), (-.02 | 0) -> .27. y: B (.6, .35), target (1, .48) -> .4, .13
    lg = 0.27 / 4 + (0.4 + 0.13) / 4
    assert ld > 0.05 and lg > 0.19  # the prediction is not its target: both terms count
    assert segmentation_loss(BG, 1 - ALPHA).item() == pytest.approx(ce + ld + lg, rel=1e-12)
    assert segmentation_loss(BG, 1 - ALPHA).item() == pytest.approx(0.442410, abs=1e-6)
    # the F branch's target on the same map is a different number: the branch must flip alpha
    assert segmentation_loss(BG, ALPHA).item() != pytest.approx(ce + ld + lg, rel=1e-3)


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


def reference_segmentation_loss(prob: np.ndarray, alpha: np.ndarray) -> float:
    """Eq. 4-7 per method-notes.md, pixel by pixel in plain Python: mean CE + mean L_d + L_g, one (H,W) map."""
    height, width = alpha.shape
    ce = ld = gx = gy = 0.0
    for y in range(height):
        for x in range(width):
            p, a = prob[y, x], alpha[y, x]
            transition = 0.05 < a < 0.95
            target = 1.0 if a > 0.05 else 0.0
            ce += (0.5 if transition else 1.0) * -(target * math.log(p) + (1 - target) * math.log(1 - p))
            ld += abs(p - a) if transition else (p - a) ** 2
            if x + 1 < width:  # forward differences; the last column / row contributes 0
                gx += abs((prob[y, x + 1] - p) - (alpha[y, x + 1] - a))
            if y + 1 < height:
                gy += abs((prob[y + 1, x] - p) - (alpha[y + 1, x] - a))
    n = height * width
    return ce / n + ld / n + gx / n + gy / n


def test_reference_agrees_with_the_hand_values():
    assert reference_segmentation_loss(PROB[0, 0].numpy(), ALPHA[0, 0].numpy()) == pytest.approx(1.01329, abs=1e-5)
    assert reference_segmentation_loss(BG[0, 0].numpy(), 1 - ALPHA[0, 0].numpy()) == pytest.approx(0.442410, abs=1e-6)


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


def _fake_output(fg_sides, bg_sides, beta):
    """A MattingOutput from given side maps; the last side is the branch's full-resolution map."""
    return MattingOutput(
        alpha=blend(beta, fg_sides[-1], bg_sides[-1]),
        fg_prob=fg_sides[-1],
        bg_prob=bg_sides[-1],
        blend_weight=beta,
        fg_sides=tuple(fg_sides),
        bg_sides=tuple(bg_sides),
        fg_side_logits=tuple(_logit(p) for p in fg_sides),
        bg_side_logits=tuple(_logit(p) for p in bg_sides),
    )


def _four_distinct_sides(last: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Three 2x2 maps in (0.02, 0.98), each with its own loss, then `last` (the full-resolution map)."""
    rng = np.random.default_rng(seed)
    others = [torch.from_numpy(rng.uniform(0.02, 0.98, (1, 1, 2, 2))) for _ in range(3)]
    return [*others, last]


FG_SIDES = _four_distinct_sides(PROB, seed=1)
BG_SIDES = _four_distinct_sides(BG, seed=2)
BETA = torch.tensor([[[[0.5, 0.2], [0.9, 0.4]]]], dtype=torch.float64)


def _reference_side_sums() -> tuple[list[float], list[float]]:
    alpha = ALPHA[0, 0].numpy()
    fg = [reference_segmentation_loss(p[0, 0].numpy(), alpha) for p in FG_SIDES]
    bg = [reference_segmentation_loss(p[0, 0].numpy(), 1 - alpha) for p in BG_SIDES]
    return fg, bg


def test_side_losses_sum_four_distinct_sides_of_each_branch():
    fg, bg = _reference_side_sums()
    # every side has its own value, so a loss that repeats one side or drops one gives another sum
    assert min(abs(a - b) for i, a in enumerate(fg + bg) for b in (fg + bg)[i + 1 :]) > 1e-3
    loss_f, loss_b = side_losses(_fake_output(FG_SIDES, BG_SIDES, BETA), ALPHA)
    assert loss_f.item() == pytest.approx(sum(fg), rel=1e-9)
    assert loss_b.item() == pytest.approx(sum(bg), rel=1e-9)  # B sides against 1 - alpha
    step1 = segmentation_step_loss(_fake_output(FG_SIDES, BG_SIDES, BETA), ALPHA)
    assert (step1.fg.item(), step1.bg.item()) == (pytest.approx(sum(fg), rel=1e-9), pytest.approx(sum(bg), rel=1e-9))
    assert step1.total.item() == pytest.approx(sum(fg) + sum(bg), rel=1e-9)  # Step 1: weight 1 each


def test_joint_loss_is_eq9():
    fg, bg = _reference_side_sums()
    out = _fake_output(FG_SIDES, BG_SIDES, BETA)
    # Eq. 2 and Eq. 8, 10 by hand on the full-resolution maps: alpha = beta F + (1 - beta)(1 - B)
    f, b, beta, gt = PROB.flatten().tolist(), BG.flatten().tolist(), BETA.flatten().tolist(), ALPHA.flatten().tolist()
    alpha_pred = [w * fi + (1 - w) * (1 - bi) for w, fi, bi in zip(beta, f, b)]
    weight = [1.0 if 0.05 < a < 0.95 else 0.1 for a in gt]
    lu = sum(w * abs(p - a) for w, p, a in zip(weight, alpha_pred, gt)) / sum(weight)
    ls = sum(p**0.9 + (1 - p) ** 0.9 for p in alpha_pred) / 4
    got = joint_loss(out, ALPHA, w1=0.5, w2=0.01)
    np.testing.assert_allclose(out.alpha.flatten().numpy(), alpha_pred, rtol=1e-12)
    assert got.fusion.item() == pytest.approx(lu, rel=1e-12)
    assert got.sparsity.item() == pytest.approx(ls, rel=1e-5)  # the smoothing eps stays within 1e-5
    assert got.fg.item() == pytest.approx(sum(fg), rel=1e-9)  # summed over the four side outputs
    assert got.bg.item() == pytest.approx(sum(bg), rel=1e-9)
    assert got.total.item() == pytest.approx(lu + 0.5 * (sum(fg) + sum(bg)) + 0.01 * ls, rel=1e-7)
