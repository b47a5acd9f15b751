"""Preference losses as pure tensor functions (MATH.md sections 2-5). No model code here.

Every loss sees the same inputs, the per-response *summed* log-probabilities of the policy and the
reference (shape ``[B]``), and returns per-pair losses of shape ``[B]``. Losses are registered by name
in ``LOSSES``; adding one is one decorated function, never an ``if loss_type == ...`` chain.

Notation (MATH.md): ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``, the implicit
reward ``r = beta * (log pi - log ref)``, and the ODPO offset ``delta = alpha * f(s_w, s_l)`` which
sits *inside* the link: ``-log sigmoid(beta * h - delta)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class LossInputs:
    """What a registered loss function receives. All tensors are ``[B]``, one entry per pair."""

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    beta: float
    offset: Tensor  # ODPO's delta_r per pair; zeros when the loss has no offset. Never has a gradient.
    label_smoothing: float = 0.0

    @property
    def chosen_logratios(self) -> Tensor:
        return self.policy_chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> Tensor:
        return self.policy_rejected_logps - self.ref_rejected_logps

    @property
    def h(self) -> Tensor:
        """The log-ratio margin ``h(x, y_w, y_l)`` of MATH.md section 2."""
        return self.chosen_logratios - self.rejected_logratios

    @property
    def margin_logits(self) -> Tensor:
        """``beta * h - delta``: the argument of the link for every margin-based loss."""
        return self.beta * self.h - self.offset


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: Callable[[LossInputs], Tensor]
    takes_offset: bool  # the loss is defined on the margin, so an ODPO offset composes with it
    requires_scores: bool  # the loss needs per-response scores (ODPO)
    summary: str


LOSSES: dict[str, LossSpec] = {}


def register_loss(*names: str, takes_offset: bool = True, requires_scores: bool = False):
    """Register ``fn(inputs: LossInputs) -> Tensor[B]`` under one or more names."""

    def decorate(fn: Callable[[LossInputs], Tensor]) -> Callable[[LossInputs], Tensor]:
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        for name in names:
            if name in LOSSES:
                raise ValueError(f"loss {name!r} is registered twice")
            LOSSES[name] = LossSpec(name, fn, takes_offset, requires_scores, summary)
        return fn

    return decorate


def get_loss(name: str) -> LossSpec:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss_type {name!r}; choose one of: {', '.join(sorted(LOSSES))}") from None


# ----------------------------------------------------------------------------------------------
# The losses of issue 3. Each docstring's first line is the summary shown in docs and --help.


def _smoothed_sigmoid(inputs: LossInputs) -> Tensor:
    z = inputs.margin_logits
    eps = inputs.label_smoothing
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


@register_loss("dpo", "sigmoid")
def dpo_loss(inputs: LossInputs) -> Tensor:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta*h); with label_smoothing eps it is cDPO."""
    return _smoothed_sigmoid(inputs)


@register_loss("odpo", requires_scores=True)
def odpo_loss(inputs: LossInputs) -> Tensor:
    """ODPO (Amini et al. 2024): -log sigmoid(beta*h - alpha*f(s_w, s_l)), the offset inside."""
    return _smoothed_sigmoid(inputs)


@register_loss("cdpo")
def cdpo_loss(inputs: LossInputs) -> Tensor:
    """cDPO (Mitchell 2023): -(1-eps) log sigmoid(beta*h) - eps log sigmoid(-beta*h)."""
    return _smoothed_sigmoid(inputs)


@register_loss("ipo", takes_offset=False)
def ipo_loss(inputs: LossInputs) -> Tensor:
    """IPO (Azar et al. 2023): (h - 1/(2*beta))^2, a squared loss on the unscaled margin."""
    return (inputs.h - 1.0 / (2.0 * inputs.beta)) ** 2


@register_loss("hinge")
def hinge_loss(inputs: LossInputs) -> Tensor:
    """SLiC hinge (Zhao et al. 2023): max(0, 1 - beta*h)."""
    return torch.relu(1.0 - inputs.margin_logits)


# ----------------------------------------------------------------------------------------------
# ODPO offsets (MATH.md section 4)

OFFSET_SCALINGS = ("log_diff", "diff", "log_ratio")
NONPOSITIVE_POLICIES = ("drop", "error", "clamp")
CLAMP_MIN_DIFF = 1e-6


def odpo_offset(
    score_chosen: Tensor,
    score_rejected: Tensor,
    *,
    alpha: float,
    scaling: str = "log_diff",
    on_nonpositive: str = "error",
) -> Tensor:
    """The ODPO offset ``delta_r = alpha * f(s_w, s_l)`` per pair, shape ``[B]``, no gradient.

    ``scaling``: ``log_diff`` is ``log(s_w - s_l)`` (the paper's default), ``diff`` is ``s_w - s_l``,
    ``log_ratio`` is ``log(s_w / s_l)`` (in the paper's code; needs positive scores).

    A pair with ``s_w - s_l <= 0`` has no defined log offset (the paper's code silently turns it into
    a zero loss). The data layer normally drops such pairs first; here ``on_nonpositive="error"``
    raises and ``"clamp"`` uses ``CLAMP_MIN_DIFF`` for the difference, so no -inf or NaN ever
    reaches a loss.
    """
    if scaling not in OFFSET_SCALINGS:
        raise ValueError(f"unknown offset scaling {scaling!r}; choose one of {OFFSET_SCALINGS}")
    if on_nonpositive not in ("error", "clamp"):
        raise ValueError(f"on_nonpositive must be 'error' or 'clamp' here, not {on_nonpositive!r}")
    s_w = score_chosen.detach().to(torch.float64)
    s_l = score_rejected.detach().to(torch.float64)
    if not (torch.isfinite(s_w).all() and torch.isfinite(s_l).all()):
        raise ValueError("ODPO scores must be finite")
    diff = s_w - s_l
    bad = diff <= 0
    if bad.any():
        if on_nonpositive == "error":
            raise ValueError(
                f"{int(bad.sum())} pair(s) have score_chosen <= score_rejected; the ODPO offset is undefined"
            )
        diff = diff.clamp_min(CLAMP_MIN_DIFF)
    if scaling == "diff":
        value = diff
    elif scaling == "log_diff":
        value = torch.log(diff)
    else:
        if (s_l <= 0).any():
            raise ValueError("log_ratio offsets need positive scores (s_l > 0)")
        value = torch.log((s_l + diff) / s_l)  # == s_w / s_l, with the clamped difference
    return (alpha * value).to(score_chosen.dtype if score_chosen.is_floating_point() else torch.float32)


# ----------------------------------------------------------------------------------------------
# The public entry point


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    loss_type: str = "dpo",
    beta: float = 0.1,
    alpha: float = 1.0,
    score_chosen: Tensor | None = None,
    score_rejected: Tensor | None = None,
    label_smoothing: float = 0.0,
    offset_scaling: str = "log_diff",
    on_nonpositive: str = "error",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference losses and implicit rewards.

    Args: four ``[B]`` tensors of summed response log-probs; the reference ones carry no gradient.
    Returns ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` where the rewards are the
    detached implicit rewards ``beta * (policy_logps - ref_logps)``.
    """
    spec = get_loss(loss_type)
    if beta <= 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a positive number, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if spec.requires_scores:
        if score_chosen is None or score_rejected is None:
            raise ValueError(f"loss_type {loss_type!r} needs score_chosen and score_rejected for every pair")
        offset = odpo_offset(
            score_chosen, score_rejected, alpha=alpha, scaling=offset_scaling, on_nonpositive=on_nonpositive
        ).to(policy_chosen_logps.device, policy_chosen_logps.dtype)
    else:
        offset = torch.zeros_like(policy_chosen_logps).detach()
    inputs = LossInputs(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps.detach(),
        ref_rejected_logps.detach(),
        beta=beta,
        offset=offset,
        label_smoothing=label_smoothing,
    )
    losses = spec.fn(inputs)
    chosen_rewards = (beta * inputs.chosen_logratios).detach()
    rejected_rewards = (beta * inputs.rejected_logratios).detach()
    return losses, chosen_rewards, rejected_rewards
