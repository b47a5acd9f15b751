"""The preference-loss family (issue 9): every loss against values derived by hand, closed forms at
``policy == ref``, edge cases, combinations, offsets on any margin, per-token options, config checks,
and a short training run for every loss.

Scalar arithmetic in this file uses ``math`` only, so it does not share code with the torch losses.
"""

from __future__ import annotations

import math

import pytest
import torch

from prefopt.config import TrainConfig, build_config, save_config
from prefopt.errors import ConfigError
from prefopt.losses.combine import LOSSES, preference_loss, preference_loss_terms
from prefopt.losses.offsets import odpo_offset
from prefopt.losses.token_options import length_desensitized_logps, wpo_pair_weights
from prefopt.modeling.logprobs import pair_logps, pair_token_logps, rank_within_response, token_log_sum_sq

LOG2 = math.log(2.0)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def nls(x: float) -> float:
    """-log sigmoid(x) = log(1 + e^-x)."""
    return math.log1p(math.exp(-x))


# Two pairs, beta = 0.5.
#   pair A: policy (-5, -9), ref (-6, -8): c = 1,    r = -1,  h = 2,  z = beta*h = 1
#   pair B: policy (-2, -1.5), ref (-1.5, -2): c = -0.5, r = 0.5, h = -1, z = -0.5
# Token counts: chosen (4, 2), rejected (3, 5).
PC, PR, RC, RR = t(-5.0, -2.0), t(-9.0, -1.5), t(-6.0, -1.5), t(-8.0, -2.0)
NC, NR = torch.tensor([4, 2]), torch.tensor([3, 5])
BETA = 0.5
C = [1.0, -0.5]
R = [-1.0, 0.5]
Z = [BETA * (c - r) for c, r in zip(C, R)]  # [1.0, -0.5]


def run(loss_type, **kw):
    kw.setdefault("beta", BETA)
    return preference_loss(PC, PR, RC, RR, loss_type=loss_type, chosen_tokens=NC, rejected_tokens=NR, **kw)[0]


def close(got: torch.Tensor, expected: list[float], tol: float = 1e-12):
    assert got.shape == (len(expected),)
    for g, e in zip(got.tolist(), expected):
        assert g == pytest.approx(e, abs=tol, rel=1e-12), (got.tolist(), expected)


# ------------------------------------------------------------------ hand values, one loss at a time


def test_every_trl_loss_type_and_simpo_is_registered():
    trl = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
           "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}
    assert trl | {"dpo", "odpo", "cdpo", "simpo"} <= set(LOSSES)
    for name in trl | {"simpo"}:
        doc = LOSSES[name].fn.__doc__
        assert "arXiv" in doc, f"{name}: docstring must cite its paper"


def test_sigmoid_and_hinge_hand_values():
    # -log sigmoid(z): z = 1 -> log(1 + e^-1) = 0.313262; z = -0.5 -> log(1 + e^0.5) = 0.974077
    close(run("sigmoid"), [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(0.5))])
    assert run("sigmoid")[0].item() == pytest.approx(0.3132617, abs=1e-7)
    # max(0, 1 - z): 1 - 1 = 0; 1 + 0.5 = 1.5
    close(run("hinge"), [0.0, 1.5])


def test_robust_hand_value():
    eps = 0.1
    # ((1-eps)*(-log sig(z)) - eps*(-log sig(-z))) / (1 - 2 eps)
    # pair A: (0.9*0.3132617 - 0.1*1.3132617)/0.8 = (0.2819355 - 0.1313262)/0.8 = 0.1882617
    expected = [((1 - eps) * nls(z) - eps * nls(-z)) / (1 - 2 * eps) for z in Z]
    close(run("robust", label_smoothing=eps), expected)
    assert expected[0] == pytest.approx(0.1882617, abs=1e-7)
    # eps = 0 is plain DPO
    close(run("robust"), [nls(z) for z in Z])


def test_exo_pair_hand_value():
    eps = 1e-3
    # q_w = sig(z), q_l = sig(-z): q_w (log q_w - log(1-eps)) + q_l (log q_l - log eps)
    expected = []
    for z in Z:
        qw, ql = sig(z), sig(-z)
        expected.append(qw * (math.log(qw) - math.log(1 - eps)) + ql * (math.log(ql) - math.log(eps)))
    close(run("exo_pair", label_smoothing=eps), expected)
    # pair A: 0.731059*(-0.313262+0.0010005) + 0.268941*(-1.313262+6.907755) = -0.228281 + 1.504591
    assert expected[0] == pytest.approx(1.276310, abs=1e-6)


def test_nca_and_bco_pair_hand_values():
    # rewards beta*c, beta*r: pair A (0.5, -0.5), pair B (-0.25, 0.25)
    rc, rr = [BETA * c for c in C], [BETA * r for r in R]
    # nca: -log sig(rc) - 1/2 log sig(-rc) - 1/2 log sig(-rr)
    close(run("nca_pair"), [nls(a) + 0.5 * nls(-a) + 0.5 * nls(-b) for a, b in zip(rc, rr)])
    # bco: -log sig(rc) - log sig(-rr); pair A: 2*log(1 + e^-0.5) = 2*0.474077 = 0.948154
    close(run("bco_pair"), [nls(a) + nls(-b) for a, b in zip(rc, rr)])
    assert run("bco_pair")[0].item() == pytest.approx(0.948154, abs=1e-6)


def test_sppo_hard_hand_value():
    # (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2 with 1/(2*0.5) = 1:
    # pair A: (1 - 1)^2 + (-1 + 1)^2 = 0;  pair B: (-0.5 - 1)^2 + (0.5 + 1)^2 = 2.25 + 2.25 = 4.5
    close(run("sppo_hard"), [0.0, 4.5])


def test_ipo_hand_value():
    # (h - 1/(2 beta))^2: pair A (2 - 1)^2 = 1; pair B (-1 - 1)^2 = 4
    close(run("ipo"), [1.0, 4.0])


def test_aot_sorts_within_the_batch():
    # Ref margins chosen so that sorting changes the matching:
    # u = pc - pr = (-5+9, -2+1.5) = (4, -0.5);  v = rc - rr = (-6+5, -1.5+2) = (-1, 0.5)
    # sorted u = (-0.5, 4), sorted v = (-1, 0.5): d = (0.5, 3.5)  (unsorted it would be (5, -1))
    pc, pr, rc, rr = t(-5.0, -2.0), t(-9.0, -1.5), t(-6.0, -1.5), t(-5.0, -2.0)
    got = preference_loss(pc, pr, rc, rr, loss_type="aot", beta=BETA)[0]
    close(got, [nls(0.5 * 0.5), nls(0.5 * 3.5)])
    eps = 0.2
    got = preference_loss(pc, pr, rc, rr, loss_type="aot", beta=BETA, label_smoothing=eps)[0]
    close(got, [(1 - eps) * nls(BETA * d) + eps * nls(-BETA * d) for d in (0.5, 3.5)])
    # unpaired: c = pc - rc = (1, -0.5), r = pr - rr = (-4, 0.5)
    # sorted c = (-0.5, 1), sorted r = (-4, 0.5): d = (3.5, 0.5)
    got = preference_loss(pc, pr, rc, rr, loss_type="aot_unpaired", beta=BETA)[0]
    close(got, [nls(BETA * 3.5), nls(BETA * 0.5)])


def test_apo_hand_values():
    # zero: (1 - sig(beta c)) + sig(beta r); pair A: (1 - sig(0.5)) + sig(-0.5) = 2*0.3775407 = 0.7550813
    close(run("apo_zero"), [(1 - sig(BETA * c)) + sig(BETA * r) for c, r in zip(C, R)])
    assert run("apo_zero")[0].item() == pytest.approx(0.7550813, abs=1e-7)
    # down: sig(beta c) + 1 - sig(beta (c - r)); pair A: 0.6224593 + 1 - 0.7310586 = 0.8914007
    close(run("apo_down"), [sig(BETA * c) + 1 - sig(BETA * (c - r)) for c, r in zip(C, R)])
    assert run("apo_down")[0].item() == pytest.approx(0.8914007, abs=1e-7)


def test_discopop_hand_value():
    tau = 0.05
    # m = sig(z/tau): (1 - m)(-log sig z) + m e^-z
    expected = [(1 - sig(z / tau)) * nls(z) + sig(z / tau) * math.exp(-z) for z in Z]
    close(run("discopop"), expected)
    tau = 2.0  # a smoother blend, so both parts count
    expected = [(1 - sig(z / tau)) * nls(z) + sig(z / tau) * math.exp(-z) for z in Z]
    close(run("discopop", discopop_tau=tau), expected)
    # pair A, tau 2: m = sig(0.5) = 0.6224593: 0.3775407*0.3132617 + 0.6224593*0.3678794 = 0.1182700 + 0.2289890 = 0.3472590
    assert expected[0] == pytest.approx(0.3472590, abs=1e-6)


@pytest.mark.parametrize("tau", [0.05, 0.2])
def test_discopop_slope_at_zero_margin(tau):
    """d/dz at z = 0, with m = sig(z/tau), m' = 1/(4 tau), L = -log sig z (L' = -1/2), E = e^-z (E' = -1):
    m'(E - L) + (1 - m) L' + m E' = (1 - log 2)/(4 tau) - 1/4 - 1/2. Positive for tau < (1 - log 2)/3
    (0.102): from policy == ref the paper's default tau = 0.05 first pushes margins *negative*."""
    h = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    loss = preference_loss(h, t(0.0), t(0.0), t(0.0), loss_type="discopop", beta=1.0, discopop_tau=tau)[0]
    loss.sum().backward()
    assert h.grad.item() == pytest.approx((1 - LOG2) / (4 * tau) - 0.75, abs=1e-12)


def test_sft_is_the_mean_chosen_nll():
    # -log pi(y_w)/|y_w|: pair A 5/4 = 1.25, pair B 2/2 = 1; nothing else matters
    close(run("sft"), [1.25, 1.0])
    close(run("sft", chosen_nll=t(0.3, 0.7)), [0.3, 0.7])


def test_sigmoid_norm_and_length_normalize_hand_value():
    # c/|y_w| - r/|y_l|: pair A 1/4 - (-1)/3 = 0.5833333; pair B -0.5/2 - 0.5/5 = -0.35
    expected = [nls(BETA * (1 / 4 + 1 / 3)), nls(BETA * (-0.25 - 0.1))]
    close(run("sigmoid_norm"), expected)
    close(run("sigmoid", length_normalize=True), expected)


def test_simpo_hand_value_and_reference_free_mode():
    gamma = 0.5
    # beta*(log pi_w/|y_w| - log pi_l/|y_l|) - gamma; no reference at all:
    # pair A: 0.5*(-5/4 + 9/3) - 0.5 = 0.5*1.75 - 0.5 = 0.375;  pair B: 0.5*(-2/2 + 1.5/5) - 0.5 = -0.85
    expected = [nls(0.375), nls(-0.85)]
    close(run("simpo", target_margin=gamma), expected)
    # the same thing spelled with options on the plain sigmoid loss
    close(run("sigmoid", reference_free=True, length_normalize=True, target_margin=gamma), expected)
    # reference-free: the reference log-probs are ignored
    other = preference_loss(PC, PR, RC * 3, RR - 7, loss_type="simpo", beta=BETA, target_margin=gamma,
                            chosen_tokens=NC, rejected_tokens=NR)[0]
    close(other, expected)


# ------------------------------------------------------------------ closed forms at policy == ref

EPS, TAU, B0 = 0.1, 0.05, 0.25
CLOSED_FORMS = {  # c = r = 0, so z = 0
    "dpo": LOG2, "sigmoid": LOG2, "cdpo": LOG2, "robust": LOG2, "aot": LOG2, "aot_unpaired": LOG2,
    "sigmoid_norm": LOG2,
    "hinge": 1.0,
    "ipo": 1 / (4 * B0**2),  # (0 - 1/(2 beta))^2
    "sppo_hard": 2 * (1 / (2 * B0)) ** 2,  # (0 - 1/(2b))^2 + (0 + 1/(2b))^2
    "exo_pair": -LOG2 - 0.5 * math.log(EPS * (1 - EPS)),  # 1/2(log 1/2 - log(1-eps)) + 1/2(log 1/2 - log eps)
    "nca_pair": 2 * LOG2,  # log 2 + log2/2 + log2/2
    "bco_pair": 2 * LOG2,
    "apo_zero": 1.0,  # (1 - 1/2) + 1/2
    "apo_down": 1.0,  # 1/2 + (1 - 1/2)
    "discopop": 0.5 * LOG2 + 0.5,  # m = 1/2: 1/2 log 2 + 1/2 e^0
}
SMOOTHED = {"cdpo", "robust", "exo_pair", "aot", "aot_unpaired", "sigmoid_norm", "dpo", "sigmoid"}


@pytest.mark.parametrize("loss_type", sorted(CLOSED_FORMS))
def test_policy_equal_reference_closed_form(loss_type):
    x, y = t(-3.0, -7.5, -12.25), t(-4.0, -1.5, -20.0)
    eps = EPS if loss_type in SMOOTHED else 0.0
    got = preference_loss(x, y, x.clone(), y.clone(), loss_type=loss_type, beta=B0, label_smoothing=eps,
                          discopop_tau=TAU, chosen_tokens=torch.tensor([2, 3, 4]),
                          rejected_tokens=torch.tensor([1, 5, 6]))[0]
    close(got, [CLOSED_FORMS[loss_type]] * 3)


@pytest.mark.parametrize("loss_type", sorted(CLOSED_FORMS))
def test_beta_near_zero_tends_to_the_closed_form(loss_type):
    """As beta -> 0 every margin beta*h -> 0, so each loss tends to its policy == ref value (the
    1/beta targets of ipo and sppo_hard dominate: there the relative error is what vanishes)."""
    beta = 1e-7
    eps = EPS if loss_type in SMOOTHED else 0.0
    got = preference_loss(PC, PR, RC, RR, loss_type=loss_type, beta=beta, label_smoothing=eps,
                          chosen_tokens=NC, rejected_tokens=NR)[0]
    assert torch.isfinite(got).all()
    if loss_type == "ipo":
        expected = 1 / (4 * beta**2)
    elif loss_type == "sppo_hard":
        expected = 2 * (1 / (2 * beta)) ** 2
    else:
        expected = CLOSED_FORMS[loss_type]
    for g in got.tolist():
        assert g == pytest.approx(expected, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("loss_type", sorted(set(LOSSES) - {"odpo"}))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_margins_stay_finite_with_finite_gradients(loss_type, dtype):
    # h = +2e4 (pair 0) and -2e4 (pair 1) at beta = 1: far beyond where exp() overflows
    pc = torch.tensor([0.0, -1e4], dtype=dtype, requires_grad=True)
    pr = torch.tensor([-1e4, 0.0], dtype=dtype, requires_grad=True)
    rc = torch.tensor([-1e4, 0.0], dtype=dtype)
    rr = torch.tensor([0.0, -1e4], dtype=dtype)
    eps = 0.1 if loss_type == "exo_pair" else 0.0
    losses = preference_loss(pc, pr, rc, rr, loss_type=loss_type, beta=1.0, label_smoothing=eps,
                             chosen_tokens=torch.tensor([1, 1]), rejected_tokens=torch.tensor([1, 1]))[0]
    assert torch.isfinite(losses).all(), losses
    losses.sum().backward()
    for grad in (pc.grad, pr.grad):
        assert grad is None or torch.isfinite(grad).all()  # sft does not depend on y_l
    if loss_type in ("dpo", "sigmoid", "discopop", "robust"):
        # right side: ~0; wrong side: -log sigmoid(-2e4) ~ 2e4 (discopop: the logistic part, m ~ 0)
        assert losses[0].item() == pytest.approx(0.0, abs=1e-6)
        assert losses[1].item() == pytest.approx(2e4, rel=1e-6)


def test_discopop_does_not_make_nan_where_the_naive_form_does():
    z = -2000.0  # exp(-z) overflows; the naive m * exp(-z) is 0 * inf = nan
    naive = torch.sigmoid(torch.tensor(z / 0.05)) * torch.exp(torch.tensor(-z))
    assert torch.isnan(naive)
    got = preference_loss(t(0.0), t(-z), t(0.0), t(0.0), loss_type="discopop", beta=1.0)[0]
    assert got.item() == pytest.approx(-z, rel=1e-12)  # -log sigmoid(z) ~ |z|


# ------------------------------------------------------------------ combinations


def test_combined_loss_is_the_weighted_sum_of_its_parts():
    weights = [0.7, 0.2, 1.5]
    combo = preference_loss_terms(PC, PR, RC, RR, loss_type=["sigmoid", "sft", "hinge"], loss_weights=weights,
                                  beta=BETA, chosen_tokens=NC, rejected_tokens=NR)
    expected = [0.7 * nls(z) + 0.2 * nll + 1.5 * max(0.0, 1 - z) for z, nll in zip(Z, [1.25, 1.0])]
    close(combo.losses, expected)
    parts = [run(name) for name in ("sigmoid", "sft", "hinge")]
    assert torch.allclose(combo.losses, sum(w * p for w, p in zip(weights, parts)), atol=1e-12)
    assert set(combo.parts) == {"sigmoid", "sft", "hinge"}
    assert torch.equal(combo.parts["hinge"], parts[2])
    # a comma-separated string is the same list; default weights are 1
    close(run("sigmoid, sft"), [nls(z) + nll for z, nll in zip(Z, [1.25, 1.0])])


def test_rpo_alpha_adds_the_chosen_nll():
    # RPO: DPO + alpha * (-log pi(y_w)/|y_w|) = nls(z) + 0.3 * (1.25, 1.0)
    terms = preference_loss_terms(PC, PR, RC, RR, loss_type="dpo", beta=BETA, rpo_alpha=0.3,
                                  chosen_tokens=NC, rejected_tokens=NR)
    close(terms.losses, [nls(z) + 0.3 * nll for z, nll in zip(Z, [1.25, 1.0])])
    close(terms.parts["nll"], [1.25, 1.0])


def test_wpo_pair_weights_multiply_each_loss_not_the_rpo_term():
    w = t(0.25, 0.5)
    got = run("sigmoid", pair_weights=w, rpo_alpha=2.0)
    close(got, [0.25 * nls(Z[0]) + 2 * 1.25, 0.5 * nls(Z[1]) + 2 * 1.0])


# ------------------------------------------------------------------ the offset on any margin


def test_offset_composes_with_every_margin_loss():
    sw, sl = t(0.9, 0.7), t(0.4, 0.6)
    alpha = 0.5
    delta = [alpha * math.log(0.5), alpha * math.log(0.1)]  # alpha * log(s_w - s_l)
    kw = dict(score_chosen=sw, score_rejected=sl, alpha=alpha, use_offset=True)
    close(run("sigmoid", **kw), [nls(z - d) for z, d in zip(Z, delta)])
    close(run("hinge", **kw), [max(0.0, 1 - (z - d)) for z, d in zip(Z, delta)])
    close(run("discopop", **kw),
          [(1 - sig((z - d) / 0.05)) * nls(z - d) + sig((z - d) / 0.05) * math.exp(-(z - d)) for z, d in zip(Z, delta)])
    eps = 0.1
    close(run("robust", label_smoothing=eps, **kw),
          [((1 - eps) * nls(z - d) - eps * nls(d - z)) / (1 - 2 * eps) for z, d in zip(Z, delta)])
    # odpo is the named shortcut for sigmoid + offset
    assert torch.equal(run("odpo", score_chosen=sw, score_rejected=sl, alpha=alpha), run("sigmoid", **kw))
    # with a list, the offset goes on every loss
    close(run(["sigmoid", "hinge"], **kw), [nls(z - d) + max(0.0, 1 - (z - d)) for z, d in zip(Z, delta)])
    # odpo in a list gets its offset without use_offset, and sft (no margin) is unaffected
    got = run(["odpo", "sft"], score_chosen=sw, score_rejected=sl, alpha=alpha)
    close(got, [nls(z - d) + nll for z, d, nll in zip(Z, delta, [1.25, 1.0])])


def test_offset_and_target_margin_refused_where_there_is_no_margin():
    sw, sl = t(0.9, 0.7), t(0.4, 0.6)
    for name in ("ipo", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "sft"):
        assert not LOSSES[name].takes_offset
        with pytest.raises(ConfigError, match=f"use_offset shifts the reward margin, but loss '{name}'"):
            run(name, score_chosen=sw, score_rejected=sl, use_offset=True)
        with pytest.raises(ConfigError, match="target_margin"):
            run(name, target_margin=0.5)
    with pytest.raises(ConfigError, match="loss 'sft' has no margin"):
        run(["sigmoid", "sft"], score_chosen=sw, score_rejected=sl, use_offset=True)
    with pytest.raises(ValueError, match="use_offset needs score_chosen"):
        run("hinge", use_offset=True)


def test_target_margin_shifts_every_margin_like_a_constant_offset():
    # a constant offset of 0.3 via scores (diff scaling, alpha 1, s_w - s_l = 0.3) equals target_margin 0.3
    via_scores = run("hinge", score_chosen=t(0.5, 0.8), score_rejected=t(0.2, 0.5), alpha=1.0,
                     offset_scaling="diff", use_offset=True)
    close(via_scores, [max(0.0, 1 - (z - 0.3)) for z in Z], tol=1e-9)
    close(run("hinge", target_margin=0.3), [max(0.0, 1 - (z - 0.3)) for z in Z], tol=1e-9)


# ------------------------------------------------------------------ per-token options


def test_rank_within_response_for_scattered_targets():
    # response 0 at positions 3, 4, 5 (entries 1, 3, 4); response 1 at 6, 7 (entries 2, 0)
    rank = rank_within_response(torch.tensor([1, 0, 1, 0, 0]), torch.tensor([7, 3, 6, 4, 5]), width=8)
    assert rank.tolist() == [1, 0, 0, 1, 2]


def test_length_desensitized_logps_hand_value():
    # pair 0: chosen tokens (-1, -2, -3), rejected (-0.5, -0.25): shared length 2
    #   chosen -1 - 2 + a*(-3), rejected -0.75
    # pair 1: chosen (-4), rejected (-1, -1, -1, -1): shared length 1
    #   chosen -4, rejected -1 + a*(-3)
    logps = t(-1, -2, -3, -0.5, -0.25, -4, -1, -1, -1, -1)
    response = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    rank = torch.tensor([0, 1, 2, 0, 1, 0, 0, 1, 2, 3])
    counts = torch.tensor([3, 2, 1, 4])
    for a in (0.0, 0.5, 1.0):
        got = length_desensitized_logps(logps, response, rank, counts, a)
        close(got, [-3 - 3 * a, -0.75, -4, -1 - 3 * a])
    # ld_alpha = 1 is the plain sum
    plain = torch.zeros(4, dtype=torch.float64).index_add(0, response, logps)
    assert torch.allclose(length_desensitized_logps(logps, response, rank, counts, 1.0), plain)


def test_token_log_sum_sq_and_wpo_weights_hand_values():
    # softmax([0, log 2, log 3]) = (1, 2, 3)/6: sum p^2 = 14/36
    logits = torch.tensor([[0.0, math.log(2), math.log(3)]])
    assert token_log_sum_sq(logits).item() == pytest.approx(math.log(14 / 36), abs=1e-6)
    # response 0: logps (-1, -3), log sum p^2 (-0.5, -0.5): mean(-0.5, -2.5) = -1.5
    # response 1: logp -2, log sum p^2 -1: mean -1. Pair weight e^-1.5 * e^-1 = e^-2.5
    w = wpo_pair_weights(t(-1, -3, -2), t(-0.5, -0.5, -1), torch.tensor([0, 0, 1]), torch.tensor([2, 1]))
    close(w, [math.exp(-2.5)])


@pytest.fixture(scope="module")
def two_models(tiny_llama, tmp_path_factory):
    from prefopt.data.collate import PaddedPairCollator
    from prefopt.data.records import PreferencePair
    from prefopt.data.tokenize import tokenize_pairs
    from prefopt.modeling.load import load_causal_lm, load_tokenizer
    from prefopt.toy import build_tiny_model

    other = build_tiny_model(tmp_path_factory.mktemp("models") / "llama_seed1", arch="llama", seed=1)
    tok = load_tokenizer(str(tiny_llama))
    # responses of unequal lengths, so LD-DPO's tail weighting has tokens to act on
    rows = [
        ("the movie was", "good and great fine", "bad"),
        ("the plot", "nice", "awful dull poor boring"),
        ("this film is", "superb film", "weak plot really"),
        ("the cast", "lovely music and actor", "terrible"),
    ]
    pairs = [PreferencePair(prompt, chosen, rejected, 0.9, 0.1) for prompt, chosen, rejected in rows]
    tokenized, _ = tokenize_pairs(pairs, tok, max_length=64, max_prompt_length=32)
    batch = PaddedPairCollator(tok.pad_token_id)(tokenized)
    policy = load_causal_lm(str(tiny_llama), disable_dropout_=True)
    ref = load_causal_lm(str(other), disable_dropout_=True)
    return policy, ref, batch


def test_pair_token_logps_matches_pair_logps_and_an_explicit_loop(two_models):
    policy, _, batch = two_models
    with torch.no_grad():
        plain = pair_logps(policy, batch)
        tok = pair_token_logps(policy, batch, log_sum_sq=True)
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for k in ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens"):
        assert torch.allclose(plain[k].double(), tok[k].double(), atol=1e-5), k
    # explicit loop: the j-th target of a response has rank j, and its log sum p^2 is from its logits row
    seen: dict[int, int] = {}
    for i in range(batch["target_tokens"].numel()):
        resp = int(batch["target_response"][i])
        assert int(tok["token_rank"][i]) == seen.get(resp, 0)
        seen[resp] = seen.get(resp, 0) + 1
        row = logits[batch["target_rows"][i], batch["target_positions"][i]].double()
        p = torch.softmax(row, -1)
        assert tok["token_log_sum_sq"][i].item() == pytest.approx(math.log(float((p * p).sum())), abs=1e-5)


def _objective(cfg_kw, ref_model):
    from prefopt.objectives.preference import PreferenceObjective
    from prefopt.objectives.reference import LiveReference

    cfg = TrainConfig(model_name_or_path="m", dataset="d", **cfg_kw).validate()
    return PreferenceObjective(cfg.loss_options(), LiveReference(ref_model) if ref_model is not None else None)


def test_objective_ld_alpha_against_per_token_truncation(two_models):
    policy, ref, batch = two_models
    with torch.no_grad():
        base, _ = _objective({"beta": 0.5}, ref)(policy, batch)
        ld1, _ = _objective({"beta": 0.5, "ld_alpha": 1.0}, ref)(policy, batch)
        ld0, _ = _objective({"beta": 0.5, "ld_alpha": 0.0}, ref)(policy, batch)
        p, r = pair_token_logps(policy, batch), pair_token_logps(ref, batch)
    assert torch.allclose(base, ld1, atol=1e-6)
    # ld_alpha = 0: only the first min(|y_w|, |y_l|) tokens of each response count
    expected = []
    for i in range(int(batch["num_pairs"])):
        n = min(int(p["chosen_tokens"][i]), int(p["rejected_tokens"][i]))

        def head(out, response, n=n):
            values = out["token_logps"][out["token_response"] == response]
            return float(values[:n].sum())

        h = (head(p, 2 * i) - head(r, 2 * i)) - (head(p, 2 * i + 1) - head(r, 2 * i + 1))
        expected.append(nls(0.5 * h))
    close(ld0.double(), expected, tol=1e-5)
    assert not torch.allclose(ld0, base)  # the batch has pairs of unequal lengths


def test_objective_wpo_and_combination_metrics(two_models):
    policy, ref, batch = two_models
    with torch.no_grad():
        plain, _ = _objective({"beta": 0.5}, ref)(policy, batch)
        weighted, _ = _objective({"beta": 0.5, "use_weighting": True}, ref)(policy, batch)
        tok = pair_token_logps(policy, batch, log_sum_sq=True)
        combo, metrics = _objective({"beta": 0.5, "loss_type": "sigmoid,sft", "loss_weights": [1.0, 0.5]},
                                    ref)(policy, batch)
    w = wpo_pair_weights(tok["token_logps"], tok["token_log_sum_sq"], tok["token_response"], tok["counts"])
    # p(y_t) / sum_v p(v)^2 is about 1 for a near-uniform model, above 1 for tokens likelier than average
    assert torch.all(w > 0) and (w - 1).abs().max() > 1e-3
    assert torch.allclose(weighted, plain * w, atol=1e-6)
    nll = -tok["chosen_logps"] / tok["chosen_tokens"]
    assert torch.allclose(combo, plain + 0.5 * nll, atol=1e-5)
    assert torch.allclose(metrics["loss/sft"], nll, atol=1e-5)


def test_reference_free_objective_needs_no_reference(two_models):
    policy, _, batch = two_models
    with torch.no_grad():
        got, metrics = _objective({"beta": 2.0, "loss_type": "simpo", "target_margin": 1.0}, None)(policy, batch)
        p = pair_logps(policy, batch)
    margin = 2.0 * (p["chosen_logps"] / p["chosen_tokens"] - p["rejected_logps"] / p["rejected_tokens"]) - 1.0
    close(got.double(), [nls(m) for m in margin.tolist()], tol=1e-5)


# ------------------------------------------------------------------ configuration


def cfg(**kw):
    return TrainConfig(model_name_or_path="m", dataset="d", **kw)


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"loss_type": "ipo", "use_offset": True}, "use_offset shifts the reward margin, but loss 'ipo'"),
        ({"loss_type": "dpo,apo_zero", "target_margin": 0.2}, "target_margin .* 'apo_zero'"),
        ({"loss_type": "dpo,sft", "loss_weights": [1.0]}, "loss_weights has 1 value"),
        ({"loss_type": "dpo", "loss_weights": [-1.0]}, "loss_weights must be finite and >= 0"),
        ({"loss_type": "exo_pair"}, "exo_pair' needs label_smoothing > 0"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing has no effect"),
        ({"loss_type": "aot", "use_weighting": True}, "re-matches pairs by sorting"),
        ({"ld_alpha": 1.5}, r"ld_alpha must be in \[0, 1\]"),
        ({"loss_type": "dpo,dpo"}, "lists a loss twice"),
        ({"loss_type": "sigmoid,sppo_hrd"}, "unknown loss_type value 'sppo_hrd'; did you mean 'sppo_hard'"),
        ({"discopop_tau": 0.0}, "discopop_tau must be > 0"),
        ({"rpo_alpha": -1.0}, "rpo_alpha must be >= 0"),
    ],
)
def test_config_refuses_inconsistent_loss_options(kw, message):
    with pytest.raises(ConfigError, match=message):
        cfg(**kw).validate()


def test_config_lists_from_yaml_and_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("loss_type: [sigmoid, sft]\nloss_weights: [1, 0.5]\nuse_offset: false\n")
    c = build_config(TrainConfig, path)
    assert c.loss_type == "sigmoid,sft" and c.loss_weights == [1.0, 0.5]
    c = build_config(TrainConfig, path, {"loss_weights": "0.8, 0.2"})
    assert c.loss_weights == [0.8, 0.2]
    with pytest.raises(ConfigError, match="loss_weights' expects a list of float"):
        build_config(TrainConfig, None, {"loss_weights": "1,x"})
    save_config(c, tmp_path / "saved.yaml")  # a saved config reads back the same
    assert build_config(TrainConfig, tmp_path / "saved.yaml").loss_weights == [0.8, 0.2]


@pytest.mark.slow
def test_cli_refuses_offset_on_ipo_in_one_line(cli_here, tiny_llama, easy_data, tmp_path):
    res = cli_here("train", "--model_name_or_path", tiny_llama, "--dataset", easy_data["train"], "--output_dir",
              tmp_path / "o", "--loss_type", "ipo", "--use_offset", "true")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "use_offset" in lines[0] and "'ipo'" in lines[0], res.stderr


# ------------------------------------------------------------------ a short training run per loss

B = 0.1  # TrainConfig's default beta: the first logged loss is the policy == ref closed form
E2E = [
    ("dpo", {}, LOG2),
    ("cdpo", {"label_smoothing": 0.1}, LOG2),
    ("odpo", {"alpha": 0.5}, None),
    ("hinge", {}, 1.0),
    ("ipo", {}, 1 / (4 * B**2)),
    ("robust", {"label_smoothing": 0.1}, LOG2),
    ("exo_pair", {"label_smoothing": 1e-3}, -LOG2 - 0.5 * math.log(1e-3 * (1 - 1e-3))),
    ("nca_pair", {}, 2 * LOG2),
    ("bco_pair", {}, 2 * LOG2),
    ("sppo_hard", {}, 2 * (1 / (2 * B)) ** 2),
    ("aot", {}, LOG2),
    ("aot_unpaired", {}, LOG2),
    ("apo_zero", {}, 1.0),
    ("apo_down", {}, 1.0),
    ("discopop", {}, 0.5 * LOG2 + 0.5),
    ("sft", {}, None),
    ("sigmoid_norm", {}, LOG2),
    ("simpo", {"beta": 2.0, "target_margin": 1.0}, None),
    ("sigmoid,sft", {"loss_weights": [1.0, 0.5]}, None),
    ("hinge", {"use_offset": True, "alpha": 0.5}, None),
    ("dpo", {"ld_alpha": 0.5}, LOG2),
    ("dpo", {"use_weighting": True}, "not log 2"),
    ("dpo", {"rpo_alpha": 0.5}, None),
    ("dpo", {"reference_free": True, "length_normalize": True}, None),
]


@pytest.mark.parametrize("loss_type,extra,first", E2E, ids=[f"{a}-{'-'.join(b) or 'plain'}" for a, b, _ in E2E])
def test_short_training_run(loss_type, extra, first, tiny_llama, easy_data, tmp_path):
    from prefopt.recipes import train
    from prefopt.training.metrics import read_metrics

    out = tmp_path / "run"
    c = TrainConfig(model_name_or_path=str(tiny_llama), dataset=str(easy_data["train"]), output_dir=str(out),
                    loss_type=loss_type, max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                    learning_rate=1e-2, progress_bar=False, report_to="none", save_steps=0, **extra)
    train(c)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen", "grad_norm"):
            assert r[k] is not None and math.isfinite(r[k]), (k, r)
    assert rows[0]["loss"] != rows[1]["loss"]  # the policy moved
    if first == "not log 2":  # WPO: log 2 times the mean pair weight, which is not exactly 1
        assert rows[0]["loss"] > 0 and abs(rows[0]["loss"] - LOG2) > 1e-6
    elif first is not None:
        assert rows[0]["loss"] == pytest.approx(first, rel=1e-5)
    if "," in loss_type:
        assert rows[0]["loss"] == pytest.approx(rows[0]["loss/sigmoid"] + 0.5 * rows[0]["loss/sft"], rel=1e-6)


def test_odpo_offset_function_is_unchanged():
    # the issue-3 offset keeps its meaning: alpha * log(s_w - s_l)
    assert odpo_offset(t(0.9), t(0.4), alpha=0.5).item() == pytest.approx(0.5 * math.log(0.5), abs=1e-12)


@pytest.mark.parametrize("name", ["simpo.yaml", "odpo_mixture.yaml"])
def test_example_configs_are_valid(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / name
    c = build_config(TrainConfig, path).validate()
    assert c.loss_type in ("simpo", "sigmoid,hinge")
