"""The preference losses as pure tensor functions (docs/losses.md, which cites each paper), and their registry.

Every loss sees the same inputs, the per-response *summed* log-probabilities of the policy and the
reference (shape ``[B]``), and returns per-pair losses of shape ``[B]``. Losses are registered by name
in ``LOSSES``; adding one is one decorated function, never an ``if loss_type == ...`` chain.

Notation (docs/losses.md): ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``, the implicit
reward ``r = beta * (log pi - log ref)``, and the ODPO offset ``delta = alpha * f(s_w, s_l)`` which
sits *inside* the link: ``-log sigmoid(beta * h - delta)``.

The family covers every loss type of TRL's ``DPOTrainer`` and SimPO; ``combine.py`` weighs several
together and adds the margin terms (offset, target margin) and per-token options.
``docs/losses.md`` has the table of every loss and which options apply to it.
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
    chosen_nll: Tensor | None = None  # policy's mean per-token NLL of y_w, -log pi(y_w)/|y_w| (sft, rpo)
    discopop_tau: float = 0.05  # DiscoPOP's temperature

    @property
    def chosen_logratios(self) -> Tensor:
        return self.policy_chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> Tensor:
        return self.policy_rejected_logps - self.ref_rejected_logps

    @property
    def h(self) -> Tensor:
        """The log-ratio margin ``h(x, y_w, y_l)`` (docs/losses.md, Notation)."""
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
    uses_label_smoothing: bool = False  # label_smoothing changes this loss
    length_normalized: bool = False  # always sees log-probs divided by response length (sigmoid_norm, simpo)
    reference_free: bool = False  # always sees reference log-probs of 0 (simpo)
    sorts_batch: bool = False  # pairs are re-matched by sorting within the batch (aot): no per-pair weights


LOSSES: dict[str, LossSpec] = {}


def register_loss(*names: str, takes_offset: bool = True, requires_scores: bool = False, **flags: bool):
    """Register ``fn(inputs: LossInputs) -> Tensor[B]`` under one or more names.

    ``flags`` are the optional ``LossSpec`` booleans (``uses_label_smoothing``, ``length_normalized``,
    ``reference_free``, ``sorts_batch``)."""

    def decorate(fn: Callable[[LossInputs], Tensor]) -> Callable[[LossInputs], Tensor]:
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        for name in names:
            if name in LOSSES:
                raise ValueError(f"loss {name!r} is registered twice")
            LOSSES[name] = LossSpec(name, fn, takes_offset, requires_scores, summary, **flags)
        return fn

    return decorate


# ----------------------------------------------------------------------------------------------
# The classic losses. Each docstring's first line is the summary shown in docs and --help.


def _smoothed_sigmoid_of(z: Tensor, eps: float) -> Tensor:
    """``-(1-eps) log sigmoid(z) - eps log sigmoid(-z)``: DPO's link with label smoothing eps."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _smoothed_sigmoid(inputs: LossInputs) -> Tensor:
    return _smoothed_sigmoid_of(inputs.margin_logits, inputs.label_smoothing)


@register_loss("dpo", "sigmoid", uses_label_smoothing=True)
def dpo_loss(inputs: LossInputs) -> Tensor:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta*h); with label_smoothing eps it is cDPO.

    arXiv 2305.18290, eq. 7. TRL's ``sigmoid``; an offset or target margin makes it ``-log sigmoid(z)``.
    """
    return _smoothed_sigmoid(inputs)


@register_loss("odpo", requires_scores=True, uses_label_smoothing=True)
def odpo_loss(inputs: LossInputs) -> Tensor:
    """ODPO (Amini et al. 2024): -log sigmoid(beta*h - alpha*f(s_w, s_l)), the offset inside.

    arXiv 2402.10571, eq. 6. The same as ``sigmoid`` with ``use_offset``.
    """
    return _smoothed_sigmoid(inputs)


@register_loss("cdpo", uses_label_smoothing=True)
def cdpo_loss(inputs: LossInputs) -> Tensor:
    """cDPO (Mitchell 2023): -(1-eps) log sigmoid(beta*h) - eps log sigmoid(-beta*h)."""
    return _smoothed_sigmoid(inputs)


@register_loss("ipo", takes_offset=False)
def ipo_loss(inputs: LossInputs) -> Tensor:
    """IPO (Azar et al. 2023): (h - 1/(2*beta))^2, a squared loss on the unscaled margin.

    arXiv 2310.12036, eq. 17. TRL's ``ipo`` divides each log-ratio by its response length first:
    here that is ``length_normalize: true``.
    """
    return (inputs.h - 1.0 / (2.0 * inputs.beta)) ** 2


@register_loss("hinge")
def hinge_loss(inputs: LossInputs) -> Tensor:
    """SLiC hinge (Zhao et al. 2023): max(0, 1 - beta*h).

    arXiv 2305.10425 (SLiC-HF), with the DPO margin in place of SLiC's likelihood margin.
    """
    return torch.relu(1.0 - inputs.margin_logits)


# ----------------------------------------------------------------------------------------------
# The rest of the family: every loss type of TRL's DPOTrainer, and SimPO.
# Notation: c = chosen log-ratio, r = rejected log-ratio, h = c - r, z = beta*h - delta (the margin
# logit, delta the offset terms), eps = label_smoothing. All are per pair, shape [B].


@register_loss("robust", uses_label_smoothing=True)
def robust_loss(inputs: LossInputs) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409): unbiased under label flips of rate eps.

    ``((1-eps) * -log sigmoid(z) - eps * -log sigmoid(-z)) / (1 - 2*eps)``; at ``eps = 0`` it is DPO.
    """
    z = inputs.margin_logits
    eps = inputs.label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


@register_loss("exo_pair", uses_label_smoothing=True)
def exo_pair_loss(inputs: LossInputs) -> Tensor:
    """EXO, pairwise (Ji et al. 2024, arXiv 2402.00856, eq. 16): reverse KL to a smoothed label.

    With ``q_w = sigmoid(z)``, ``q_l = sigmoid(-z)`` and the target ``(1-eps, eps)``:
    ``q_w * (log q_w - log(1-eps)) + q_l * (log q_l - log eps)``. Needs ``eps > 0``.
    """
    z = inputs.margin_logits
    eps = inputs.label_smoothing
    log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)
    return log_qw.exp() * (log_qw - math.log1p(-eps)) + log_ql.exp() * (log_ql - math.log(eps))


@register_loss("nca_pair", takes_offset=False)
def nca_pair_loss(inputs: LossInputs) -> Tensor:
    """NCA, pairwise (Chen et al. 2024, arXiv 2402.05369): absolute rewards, not their difference.

    ``-log sigmoid(beta*c) - 1/2 log sigmoid(-beta*c) - 1/2 log sigmoid(-beta*r)``.
    """
    rc, rr = inputs.beta * inputs.chosen_logratios, inputs.beta * inputs.rejected_logratios
    return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)


@register_loss("bco_pair", takes_offset=False)
def bco_pair_loss(inputs: LossInputs) -> Tensor:
    """BCO, pairwise (Jung et al. 2024, arXiv 2404.04656): a binary classifier on each reward.

    ``-log sigmoid(beta*c) - log sigmoid(-beta*r)`` (TRL's current form, without a running-mean shift).
    """
    rc, rr = inputs.beta * inputs.chosen_logratios, inputs.beta * inputs.rejected_logratios
    return -F.logsigmoid(rc) - F.logsigmoid(-rr)


@register_loss("sppo_hard", takes_offset=False)
def sppo_hard_loss(inputs: LossInputs) -> Tensor:
    """SPPO with hard labels (Wu et al. 2024, arXiv 2405.00675, eq. 4.7 with P = 1 / 0).

    ``(c - 1/(2*beta))^2 + (r + 1/(2*beta))^2``: each log-ratio regressed to its own target.
    """
    half = 0.5 / inputs.beta
    return (inputs.chosen_logratios - half) ** 2 + (inputs.rejected_logratios + half) ** 2


@register_loss("aot", takes_offset=False, uses_label_smoothing=True, sorts_batch=True)
def aot_loss(inputs: LossInputs) -> Tensor:
    """AOT, paired (Melnyk et al. 2024, arXiv 2406.05882): DPO on sorted log-ratio quantiles.

    ``u = sort_B(log pi(y_w) - log pi(y_l))``, ``v = sort_B(log ref(y_w) - log ref(y_l))``;
    ``-(1-eps) log sigmoid(beta*(u-v)) - eps log sigmoid(-beta*(u-v))``. Sorting is over the batch, so
    entry i of the result belongs to the i-th quantile, not to pair i.
    """
    u, _ = torch.sort(inputs.policy_chosen_logps - inputs.policy_rejected_logps, dim=0)
    v, _ = torch.sort(inputs.ref_chosen_logps - inputs.ref_rejected_logps, dim=0)
    return _smoothed_sigmoid_of(inputs.beta * (u - v), inputs.label_smoothing)


@register_loss("aot_unpaired", takes_offset=False, uses_label_smoothing=True, sorts_batch=True)
def aot_unpaired_loss(inputs: LossInputs) -> Tensor:
    """AOT, unpaired (Melnyk et al. 2024, arXiv 2406.05882): chosen and rejected quantiles matched.

    ``d = sort_B(c) - sort_B(r)``; ``-(1-eps) log sigmoid(beta*d) - eps log sigmoid(-beta*d)``.
    """
    c, _ = torch.sort(inputs.chosen_logratios, dim=0)
    r, _ = torch.sort(inputs.rejected_logratios, dim=0)
    return _smoothed_sigmoid_of(inputs.beta * (c - r), inputs.label_smoothing)


@register_loss("apo_zero", takes_offset=False)
def apo_zero_loss(inputs: LossInputs) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 7): raise y_w, lower y_l.

    ``(1 - sigmoid(beta*c)) + sigmoid(beta*r)``; for chosen responses better than the model's own.
    """
    return (1.0 - torch.sigmoid(inputs.beta * inputs.chosen_logratios)) + torch.sigmoid(
        inputs.beta * inputs.rejected_logratios
    )


@register_loss("apo_down", takes_offset=False)
def apo_down_loss(inputs: LossInputs) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 8): lower both, y_l more.

    ``sigmoid(beta*c) + (1 - sigmoid(beta*(c - r)))``; for chosen responses worse than the model's own.
    """
    c, h = inputs.chosen_logratios, inputs.h
    return torch.sigmoid(inputs.beta * c) + (1.0 - torch.sigmoid(inputs.beta * h))


@register_loss("discopop")
def discopop_loss(inputs: LossInputs) -> Tensor:
    """DiscoPOP, log-ratio modulated (Lu et al. 2024, arXiv 2406.08414, eq. 5).

    With ``m = sigmoid(z/tau)``: ``(1 - m) * -log sigmoid(z) + m * exp(-z)``. The exponential term is
    computed as ``exp(log sigmoid(z/tau) - z)``, so a large negative margin gives a large finite value,
    not ``inf * 0 = nan``.
    """
    z, tau = inputs.margin_logits, inputs.discopop_tau
    log_m = F.logsigmoid(z / tau)
    return -F.logsigmoid(z) * torch.sigmoid(-z / tau) + torch.exp(log_m - z)


@register_loss("sft", takes_offset=False)
def sft_loss(inputs: LossInputs) -> Tensor:
    """SFT on the chosen response (the NLL term of RPO, Pang et al. 2024, arXiv 2404.19733).

    ``-log pi(y_w|x) / |y_w|``: the policy's mean per-token negative log-likelihood of y_w, per pair
    (TRL averages over all chosen tokens of the batch instead; equal when lengths are equal).
    """
    if inputs.chosen_nll is None:
        raise ValueError("loss 'sft' needs the chosen responses' token counts (chosen_tokens) or chosen_nll")
    return inputs.chosen_nll


@register_loss("sigmoid_norm", uses_label_smoothing=True, length_normalized=True)
def sigmoid_norm_loss(inputs: LossInputs) -> Tensor:
    """Length-normalised DPO (as in Tulu 3, Lambert et al. 2024, arXiv 2411.15124).

    ``-log sigmoid(beta * (c/|y_w| - r/|y_l|))``: DPO on per-token average log-ratios.
    """
    return _smoothed_sigmoid(inputs)


@register_loss("simpo", uses_label_smoothing=True, length_normalized=True, reference_free=True)
def simpo_loss(inputs: LossInputs) -> Tensor:
    """SimPO (Meng, Xia, Chen 2024, arXiv 2405.14734): reference-free, length-normalised, margin gamma.

    ``-log sigmoid(beta * (log pi(y_w)/|y_w| - log pi(y_l)/|y_l|) - gamma)``; gamma is ``target_margin``.
    """
    return _smoothed_sigmoid(inputs)
