"""losses.py: every loss term (E5, E6, E8, E9) against a hand computation on a few pixels, in
float64 on both sides (the hand side: Python floats), where rounding cannot decide the comparison
(helpers.F64_BOUND). In fp32, a CE of 0.1 from logits of 4 carries 4 * 1.2e-7 of absolute
rounding, up to 5e-6 relative: above the 1e-6 these tests used to allow."""

import math

import pytest
import torch
from helpers import F64_BOUND

from losses import (
    IGNORE,
    pseudo_label_loss,
    stability_loss,
    stability_mask,
    stability_weight,
    supervised_loss,
)

TAU = 0.95


def ce(z, y):
    """Cross-entropy of one pixel, by hand: -log softmax(z)[y]."""
    return -(z[y] - math.log(sum(math.exp(v) for v in z)))


def softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def as_logits(pixels):
    """[[z_c for c] for pixel] -> (1, C, 1, P) float64 tensor."""
    return torch.tensor(pixels, dtype=torch.float64).T[None, :, None, :].contiguous()


# --------------------------------------------------------------------------------------------
# E5


def test_supervised_loss_is_mean_ce_over_labelled_pixels_only():
    pixels = [[2.0, 0.5, -1.0], [0.0, 3.0, 1.0], [1.0, 1.0, 4.0]]
    labels = torch.tensor([[[0, IGNORE, 2]]])
    loss = supervised_loss(as_logits(pixels), labels)
    assert loss.item() == pytest.approx((ce(pixels[0], 0) + ce(pixels[2], 2)) / 2, rel=F64_BOUND)


def test_supervised_loss_without_labelled_pixels_is_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = supervised_loss(logits, torch.full((1, 2, 2), IGNORE))
    assert torch.isfinite(loss) and loss.item() == 0.0 and loss.grad_fn is not None


# --------------------------------------------------------------------------------------------
# E6


def test_pseudo_label_loss_divides_by_all_valid_pixels_not_the_confident_ones():
    pixels = [[2.0, 0.5, -1.0], [0.0, 3.0, 1.0], [1.0, 1.0, 4.0], [5.0, 0.0, 0.0]]
    pseudo = torch.tensor([[[0, 1, 1, 2]]])
    conf = torch.tensor([[[0.99, 0.50, TAU, 0.99]]])  # pixel 2 sits exactly on tau: confident
    valid = torch.tensor(
        [[[True, True, True, False]]]
    )  # pixel 3 is crop padding: out, however confident
    loss = pseudo_label_loss(as_logits(pixels), pseudo, conf, valid, TAU)
    assert loss.item() == pytest.approx(
        (ce(pixels[0], 0) + ce(pixels[2], 1)) / 3, rel=F64_BOUND
    )  # / |V| = 3, not 2


def test_pseudo_label_loss_below_tau_everywhere_is_zero_finite_and_differentiable():
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = pseudo_label_loss(
        logits,
        torch.randint(0, 4, (2, 3, 3)),
        torch.full((2, 3, 3), 0.9),
        torch.ones(2, 3, 3, dtype=torch.bool),
        TAU,
    )
    assert torch.isfinite(loss) and loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    # no valid pixel at all: still 0, not NaN
    empty = pseudo_label_loss(
        logits,
        torch.zeros(2, 3, 3, dtype=torch.long),
        torch.ones(2, 3, 3),
        torch.zeros(2, 3, 3, dtype=torch.bool),
        TAU,
    )
    assert torch.isfinite(empty) and empty.item() == 0.0


def test_mask_statistics_are_fp32_under_low_precision_logits():
    logits = torch.randn(1, 3, 2, 2).bfloat16()
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    pseudo, conf = torch.zeros(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 2)
    assert pseudo_label_loss(logits, pseudo, conf, valid).dtype == torch.float32
    assert stability_loss(logits, logits.flip(1), tau=0.0).dtype == torch.float32
    # and float64 stays float64 (the equivalence tests run in it): not rounded down to fp32
    wide = logits.double()
    assert pseudo_label_loss(wide, pseudo, conf, valid).dtype == torch.float64
    assert stability_loss(wide, wide.flip(1), tau=0.0).dtype == torch.float64


# --------------------------------------------------------------------------------------------
# E8


@pytest.mark.parametrize(
    "c_self,c_other,self_learns,other_learns",
    [
        (0.97, 0.50, False, True),  # only self confident: the other student learns from it
        (0.50, 0.97, True, False),  # only the other confident: self learns
        (0.96, 0.98, True, False),  # both confident, other more: self learns
        (0.98, 0.96, False, True),  # both confident, self more: the other learns
        (0.97, 0.97, True, True),  # exact tie, both confident: both learn
        (0.50, 0.60, False, False),  # neither confident: nobody learns
        (TAU, 0.50, False, True),  # confidence exactly tau counts as confident
    ],
)
def test_stability_mask_truth_table(c_self, c_other, self_learns, other_learns):
    a, b = torch.tensor([c_self]), torch.tensor([c_other])
    assert stability_mask(a, b, TAU).item() is self_learns
    assert stability_mask(b, a, TAU).item() is other_learns


def test_stability_masks_cover_every_confident_pixel_and_overlap_only_on_ties():
    g = torch.Generator().manual_seed(0)
    c1 = torch.rand(4096, generator=g)
    c2 = torch.where(
        torch.rand(4096, generator=g) < 0.1, c1, torch.rand(4096, generator=g)
    )  # 10% exact ties
    m1, m2 = stability_mask(c1, c2, 0.5), stability_mask(c2, c1, 0.5)
    confident = torch.maximum(c1, c2) >= 0.5
    assert torch.equal(m1 | m2, confident)
    assert torch.equal(m1 & m2, confident & (c1 == c2))


# Four pixels, 3 classes, tau 0.95: the cases of E8 with known confidences
SELF = [
    [5.0, 0.0, 0.0],  # c 0.987 | other 1/3   -> self confident only: self does not learn
    [0.0, 1.0, 0.0],  # c 0.576 | other 0.995 -> self learns
    [4.0, 0.0, 0.0],  # c 0.965 | other 0.987 -> both confident, other more: self learns
    [0.0, 0.0, 0.0],
]  # 1/3     | 1/3         -> neither
OTHER = [[0.0, 0.0, 0.0], [0.0, 0.0, 6.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.0]]


def test_stability_loss_equals_the_hand_formula():
    masked = [1, 2]
    sq = [
        sum((ps - po) ** 2 for ps, po in zip(softmax(SELF[i]), softmax(OTHER[i]))) for i in masked
    ]
    expect = sum(sq) / (3 * len(masked))  # / (C * |M|)
    loss = stability_loss(as_logits(SELF), as_logits(OTHER), TAU)
    assert loss.item() == pytest.approx(expect, rel=F64_BOUND)
    # the other direction: only pixel 0 is the other student's to learn
    back = sum((po - ps) ** 2 for po, ps in zip(softmax(OTHER[0]), softmax(SELF[0]))) / 3
    assert stability_loss(as_logits(OTHER), as_logits(SELF), TAU).item() == pytest.approx(
        back, rel=F64_BOUND
    )


def test_stability_loss_with_an_empty_mask_is_zero_finite_and_differentiable():
    z = torch.zeros(1, 3, 2, 2, requires_grad=True)  # uniform: nobody is confident
    loss = stability_loss(z, torch.zeros(1, 3, 2, 2), TAU)
    assert torch.isfinite(loss) and loss.item() == 0.0 and loss.grad_fn is not None


def test_stability_gradient_reaches_only_the_student_side_on_masked_pixels():
    z_self = as_logits(SELF).requires_grad_()
    z_other = as_logits(OTHER).requires_grad_()
    stability_loss(z_self, z_other, TAU).backward()
    assert z_other.grad is None  # the target is detached
    has_grad = z_self.grad.abs().sum(1)[0, 0] > 0
    assert has_grad.tolist() == [False, True, True, False]  # exactly the E8 mask of SELF
    # the released variant (student side detached too) trains nothing
    assert not stability_loss(as_logits(SELF).requires_grad_().detach(), z_other, TAU).requires_grad


# --------------------------------------------------------------------------------------------
# E9


def test_stability_weight_ramps_by_cosine_to_half_then_stays():
    T = 1000  # T_up = round(0.2 T) = 200
    assert stability_weight(0, T) == 0.0
    assert stability_weight(199, T) == pytest.approx(0.5)  # end of the ramp: t = T_up - 1
    assert stability_weight(200, T) == 0.5 and stability_weight(T, T) == 0.5
    assert stability_weight(50, T) == pytest.approx(0.5 * (1 - math.cos(math.pi * 50 / 199)) / 2)
    ramp = [stability_weight(t, T) for t in range(200)]
    assert all(a < b for a, b in zip(ramp, ramp[1:]))  # strictly increasing on the ramp
    assert stability_weight(0, 3) == 0.5  # a ramp of <= 1 step: the peak at once
