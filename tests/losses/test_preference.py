"""Losses against values derived by hand (docs/losses.md)."""

import math

import pytest
import torch

from prefopt.losses.combine import LOSSES, preference_loss
from prefopt.losses.offsets import odpo_offset

LOG2 = math.log(2.0)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# One pair: policy logps (-5, -9), reference logps (-6, -8).
# chosen logratio = -5 - (-6) = 1, rejected logratio = -9 - (-8) = -1, so h = 2.
PC, PR, RC, RR = t(-5.0), t(-9.0), t(-6.0), t(-8.0)


def loss(loss_type, **kw):
    return preference_loss(PC, PR, RC, RR, loss_type=loss_type, **kw)


def test_dpo_hand_value_and_rewards():
    losses, cr, rr = loss("dpo", beta=0.5)
    # beta*h = 0.5*2 = 1 -> -log sigmoid(1) = log(1 + e^-1)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1.0)), abs=1e-12)
    assert cr.item() == pytest.approx(0.5 * 1.0) and rr.item() == pytest.approx(0.5 * -1.0)
    assert not cr.requires_grad


@pytest.mark.parametrize("loss_type", ["dpo", "sigmoid", "cdpo"])
def test_policy_equal_reference_gives_log2(loss_type):
    x = t(-3.0, -7.5, -12.25)
    y = t(-4.0, -1.5, -20.0)
    losses, cr, rr = preference_loss(x, y, x.clone(), y.clone(), loss_type=loss_type, beta=0.1,
                                     label_smoothing=0.1 if loss_type == "cdpo" else 0.0)
    assert torch.allclose(losses, torch.full_like(losses, LOG2), atol=1e-12)
    assert torch.all(cr == 0) and torch.all(rr == 0)


def test_cdpo_label_smoothing_hand_value():
    eps, beta = 0.2, 0.5  # z = beta*h = 1
    expected = -(1 - eps) * math.log(sigmoid(1.0)) - eps * math.log(sigmoid(-1.0))
    assert loss("cdpo", beta=beta, label_smoothing=eps)[0].item() == pytest.approx(expected, abs=1e-12)
    # dpo with label smoothing is cDPO (TRL's sigmoid loss does the same)
    assert loss("dpo", beta=beta, label_smoothing=eps)[0].item() == pytest.approx(expected, abs=1e-12)


def test_ipo_hand_value():
    # (h - 1/(2 beta))^2 = (2 - 1/(2*0.25))^2 = (2 - 2)^2 = 0; with beta 0.5: (2 - 1)^2 = 1
    assert loss("ipo", beta=0.25)[0].item() == pytest.approx(0.0, abs=1e-12)
    assert loss("ipo", beta=0.5)[0].item() == pytest.approx(1.0, abs=1e-12)


def test_hinge_hand_value():
    # max(0, 1 - beta*h): beta 0.25 -> 1 - 0.5 = 0.5; beta 1 -> max(0, -1) = 0
    assert loss("hinge", beta=0.25)[0].item() == pytest.approx(0.5, abs=1e-12)
    assert loss("hinge", beta=1.0)[0].item() == pytest.approx(0.0, abs=1e-12)


def test_odpo_offset_inside_the_sigmoid_hand_value():
    # scores 0.9 and 0.4: log_diff offset = alpha*log(0.5); beta*h = 0.5*2 = 1
    alpha = 0.5
    delta = alpha * math.log(0.5)
    expected = -math.log(sigmoid(1.0 - delta))
    got = loss("odpo", beta=0.5, alpha=alpha, score_chosen=t(0.9), score_rejected=t(0.4))[0].item()
    assert got == pytest.approx(expected, abs=1e-12)
    # a negative log offset (close scores) relaxes the constraint: loss below plain DPO
    assert got < loss("dpo", beta=0.5)[0].item()


@pytest.mark.parametrize(
    "scaling,expected",
    [("log_diff", math.log(3.0 - 1.0)), ("diff", 3.0 - 1.0), ("log_ratio", math.log(3.0 / 1.0))],
)
def test_offset_scalings(scaling, expected):
    got = odpo_offset(t(3.0), t(1.0), alpha=2.0, scaling=scaling)
    assert got.item() == pytest.approx(2.0 * expected, abs=1e-12)


def test_odpo_with_alpha_zero_equals_dpo():
    pc, pr, rc, rr = t(-5.0, -3.0, -8.0), t(-9.0, -2.5, -8.1), t(-6.0, -3.3, -7.0), t(-8.0, -2.0, -9.0)
    sw, sl = t(0.9, 0.7, 0.55), t(0.1, 0.2, 0.5)
    odpo = preference_loss(pc, pr, rc, rr, loss_type="odpo", beta=0.3, alpha=0.0, score_chosen=sw, score_rejected=sl)
    dpo = preference_loss(pc, pr, rc, rr, loss_type="dpo", beta=0.3)
    for a, b in zip(odpo, dpo):
        assert torch.equal(a, b)


def test_odpo_needs_scores_and_never_produces_nan():
    with pytest.raises(ValueError, match="needs score_chosen"):
        loss("odpo", beta=0.1)
    with pytest.raises(ValueError, match="score_chosen <= score_rejected"):
        loss("odpo", beta=0.1, score_chosen=t(0.5), score_rejected=t(0.5))
    clamped = loss("odpo", beta=0.1, score_chosen=t(0.5), score_rejected=t(0.5), on_nonpositive="clamp")[0]
    assert torch.isfinite(clamped).all()
    # clamped difference 1e-6: offset log(1e-6) = -13.8, so the loss is close to 0 but finite
    assert clamped.item() == pytest.approx(-math.log(sigmoid(0.1 * 2 - math.log(1e-6))), rel=1e-9)


def test_offset_gets_no_gradient():
    sw = t(0.9).requires_grad_()
    off = odpo_offset(sw, t(0.1), alpha=1.0)
    assert not off.requires_grad


def test_dpo_gradient_matches_math_section_3():
    """grad L = -beta * sigma(r_l - r_w) * (grad log pi(y_w) - grad log pi(y_l)), averaged over pairs.

    With the log-probs themselves as the parameters, d/d logpi(y_w) = -beta*sigma(r_l - r_w)/B and
    d/d logpi(y_l) = +beta*sigma(r_l - r_w)/B."""
    beta = 0.7
    pc = t(-5.0, -2.0, -9.0).requires_grad_()
    pr = t(-9.0, -1.0, -9.5).requires_grad_()
    rc, rr = t(-6.0, -2.5, -7.0), t(-8.0, -2.0, -9.0)
    losses, cr, rr_ = preference_loss(pc, pr, rc, rr, loss_type="dpo", beta=beta)
    losses.mean().backward()
    weight = torch.sigmoid(rr_ - cr)  # sigma(r_l - r_w): large when the pair is ordered wrongly
    assert torch.allclose(pc.grad, -beta * weight / 3, atol=1e-12)
    assert torch.allclose(pr.grad, beta * weight / 3, atol=1e-12)
    # pairs 1 and 2 are ordered wrongly (r_w < r_l): their weight is above 1/2, pair 0's below
    assert (weight > 0.5).tolist() == [False, True, True]


def test_registry_and_errors():
    assert {"dpo", "sigmoid", "odpo", "cdpo", "ipo", "hinge"} <= set(LOSSES)
    assert LOSSES["odpo"].requires_scores and not LOSSES["dpo"].requires_scores
    with pytest.raises(ValueError, match="unknown loss_type value 'dpoo'"):
        loss("dpoo", beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        loss("dpo", beta=0.0)


def test_large_margins_stay_finite():
    big = preference_loss(t(0.0), t(-1e4), t(0.0), t(0.0), loss_type="dpo", beta=1.0)[0]
    wrong = preference_loss(t(-1e4), t(0.0), t(0.0), t(0.0), loss_type="dpo", beta=1.0)[0]
    assert big.item() == pytest.approx(0.0, abs=1e-12)
    assert wrong.item() == pytest.approx(1e4, rel=1e-9)
