"""Preference losses as pure tensor functions (MATH.md sections 2-5). No model code here.

Every loss sees the same inputs, the per-response *summed* log-probabilities of the policy and the
reference (shape ``[B]``), and returns per-pair losses of shape ``[B]``. Losses are registered by name
in ``LOSSES``; adding one is one decorated function, never an ``if loss_type == ...`` chain.

Notation (MATH.md): ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``, the implicit
reward ``r = beta * (log pi - log ref)``, and the ODPO offset ``delta = alpha * f(s_w, s_l)`` which
sits *inside* the link: ``-log sigmoid(beta * h - delta)``.

Issue 9 adds the whole family (every TRL ``DPOTrainer`` loss type, SimPO, ...), weighted combinations
of several losses, the ODPO offset and a SimPO target margin as terms on the margin of any loss that
has one, an RPO NLL term, and the per-token options (length normalisation, LD-DPO, WPO weights).
``docs/losses.md`` has the table of every loss and which options apply to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefopt.errors import ConfigError

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
    # --- issue 9: what the wider family needs ---
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
    # --- issue 9 ---
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
# The rest of the family (issue 9): every loss type of TRL's DPOTrainer, and SimPO.
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


def _smoothed_sigmoid_of(z: Tensor, eps: float) -> Tensor:
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


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
# Per-token options (issue 9): pure functions of the per-token log-probs of one forward pass
# (``logprobs.pair_token_logps``), so no option needs a second forward pass.


def length_desensitized_logps(
    token_logps: Tensor, token_response: Tensor, token_rank: Tensor, counts: Tensor, ld_alpha: float
) -> Tensor:
    """LD-DPO (Liu et al. 2024, arXiv 2409.06411): per-response log-probs with the verbose tail damped.

    Args: ``token_logps [T]``, ``token_response [T]`` (response index, ``2i`` chosen / ``2i+1``
    rejected of pair i), ``token_rank [T]`` (0-based position of the token in its response),
    ``counts [2B]`` tokens per response. With ``l_i = min(|y_w|, |y_l|)`` of the pair, returns ``[2B]``:
    ``sum_{t < l_i} log p_t + ld_alpha * sum_{t >= l_i} log p_t``. ``ld_alpha = 1`` is the plain sum.
    """
    shared = torch.minimum(counts[0::2], counts[1::2]).repeat_interleave(2)  # [2B]
    weight = torch.where(token_rank < shared[token_response], 1.0, float(ld_alpha)).to(token_logps.dtype)
    out = torch.zeros(counts.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return out.index_add(0, token_response, weight * token_logps)


def wpo_pair_weights(token_logps: Tensor, token_log_sum_sq: Tensor, token_response: Tensor, counts: Tensor) -> Tensor:
    """WPO weights (Zhou et al. 2024, arXiv 2406.11827, eq. 2, "sampled alignment" form), ``[B]``.

    Per response: ``w(y) = exp( mean_t [ log p(y_t) - log sum_v p(v)^2 ] )``, the policy's
    length-normalised probability of y relative to its own expected token probability; the pair's
    weight is ``w(y_w) * w(y_l)``. Detached: the weights get no gradient.
    """
    aligned = (token_logps - token_log_sum_sq).detach()
    sums = torch.zeros(counts.shape[0], dtype=aligned.dtype, device=aligned.device).index_add(
        0, token_response, aligned
    )
    w = torch.exp(sums / counts.clamp_min(1).to(aligned.dtype))
    return w[0::2] * w[1::2]


# ----------------------------------------------------------------------------------------------
# Combining losses and options (issue 9)


def parse_loss_types(value: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"sigmoid"``, ``"sigmoid, sft"`` or ``["sigmoid", "sft"]`` -> ``["sigmoid", "sft"]``."""
    names = value.split(",") if isinstance(value, str) else list(value)
    return [str(n).strip() for n in names if str(n).strip()]


def validate_loss_options(
    loss_type: str | list[str],
    *,
    loss_weights=None,
    use_offset: bool = False,
    target_margin: float = 0.0,
    label_smoothing: float = 0.0,
    use_weighting: bool = False,
    ld_alpha: float | None = None,
    rpo_alpha: float = 0.0,
    discopop_tau: float = 0.05,
) -> tuple[list[LossSpec], list[float]]:
    """Check a combination of losses and options; return the specs and their weights.

    Raises ``ConfigError`` with a message naming the offending key. Unknown names raise ``ValueError``
    (``get_loss``), which ``TrainConfig.validate`` turns into a ``ConfigError`` with a hint.
    """
    names = parse_loss_types(loss_type)
    if not names:
        raise ConfigError("loss_type names no loss")
    if len(set(names)) != len(names):
        raise ConfigError(f"loss_type lists a loss twice: {', '.join(names)}")
    specs = [get_loss(n) for n in names]
    if loss_weights is None:
        weights = [1.0] * len(specs)
    else:
        weights = [float(w) for w in loss_weights]
        if len(weights) != len(specs):
            raise ConfigError(
                f"loss_weights has {len(weights)} value(s) but loss_type names {len(specs)} loss(es) ({', '.join(names)})"
            )
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ConfigError(f"loss_weights must be finite and >= 0, got {weights}")
    # An offset (ODPO) or a target margin (SimPO) is a shift of the margin beta*h: a loss without a
    # margin has nowhere to put it, and silently dropping it would hide a mistake.
    for key, active in (("use_offset", use_offset), ("target_margin", target_margin != 0.0)):
        if active:
            bad = [s.name for s in specs if not s.takes_offset]
            if bad:
                ok = sorted(n for n, s in LOSSES.items() if s.takes_offset)
                raise ConfigError(
                    f"{key} shifts the reward margin, but loss {', '.join(map(repr, bad))} has no margin "
                    f"to shift; it applies to: {', '.join(ok)}"
                )
    if not math.isfinite(target_margin):
        raise ConfigError(f"target_margin must be finite, got {target_margin}")
    if label_smoothing > 0 and not any(s.uses_label_smoothing for s in specs):
        ok = sorted(n for n, s in LOSSES.items() if s.uses_label_smoothing)
        raise ConfigError(
            f"label_smoothing has no effect on loss_type {', '.join(names)}; it applies to: {', '.join(ok)}"
        )
    if "exo_pair" in names and not label_smoothing > 0:
        raise ConfigError("loss 'exo_pair' needs label_smoothing > 0 (the EXO paper uses 1e-3)")
    if use_weighting:
        bad = [s.name for s in specs if s.sorts_batch]
        if bad:
            raise ConfigError(
                f"use_weighting (WPO) weights each pair, but loss {', '.join(map(repr, bad))} re-matches pairs by sorting"
            )
    if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
        raise ConfigError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
    if not (math.isfinite(rpo_alpha) and rpo_alpha >= 0):
        raise ConfigError(f"rpo_alpha must be >= 0, got {rpo_alpha}")
    if not (math.isfinite(discopop_tau) and discopop_tau > 0):
        raise ConfigError(f"discopop_tau must be > 0, got {discopop_tau}")
    return specs, weights


def loss_needs_scores(loss_type: str | list[str], use_offset: bool = False) -> bool:
    """True when some loss gets an ODPO offset, which needs both scores of every pair."""
    return use_offset or any(get_loss(n).requires_scores for n in parse_loss_types(loss_type))


def loss_needs_reference(loss_type: str | list[str], reference_free: bool = False) -> bool:
    """False when no loss looks at reference log-probs, so no reference model is needed."""
    return not (reference_free or all(get_loss(n).reference_free for n in parse_loss_types(loss_type)))


@dataclass(frozen=True)
class LossTerms:
    """What ``preference_loss_terms`` returns. All tensors are ``[B]``."""

    losses: Tensor  # sum_k weight_k * loss_k (* WPO weight) + rpo_alpha * nll: what is minimised
    chosen_rewards: Tensor  # detached beta * (log pi - log ref) of y_w, as the options define log pi
    rejected_rewards: Tensor
    parts: dict[str, Tensor]  # each loss (unweighted, detached) by name, and "nll" when rpo_alpha > 0


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
    **options,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference losses and implicit rewards.

    Args: four ``[B]`` tensors of summed response log-probs; the reference ones carry no gradient.
    Returns ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` where the rewards are the
    detached implicit rewards ``beta * (policy_logps - ref_logps)``. ``options`` are the issue-9
    keywords of ``preference_loss_terms`` (loss lists and weights, offsets on any margin loss,
    reference-free and length-normalised modes, RPO, WPO weights).
    """
    terms = preference_loss_terms(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        loss_type=loss_type, beta=beta, alpha=alpha, score_chosen=score_chosen, score_rejected=score_rejected,
        label_smoothing=label_smoothing, offset_scaling=offset_scaling, on_nonpositive=on_nonpositive, **options,
    )
    return terms.losses, terms.chosen_rewards, terms.rejected_rewards


def preference_loss_terms(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    loss_type: str | list[str] = "dpo",
    beta: float = 0.1,
    alpha: float = 1.0,
    score_chosen: Tensor | None = None,
    score_rejected: Tensor | None = None,
    label_smoothing: float = 0.0,
    offset_scaling: str = "log_diff",
    on_nonpositive: str = "error",
    loss_weights=None,
    use_offset: bool = False,
    target_margin: float = 0.0,
    reference_free: bool = False,
    length_normalize: bool = False,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
    chosen_nll: Tensor | None = None,
    rpo_alpha: float = 0.0,
    pair_weights: Tensor | None = None,
    discopop_tau: float = 0.05,
) -> LossTerms:
    """The full objective: ``sum_k w_k * loss_k * pair_weight + rpo_alpha * nll``, per pair.

    - ``loss_type``: one name, a comma-separated string or a list; ``loss_weights`` (default all 1).
    - ``use_offset``: the ODPO offset ``alpha * f(s_w, s_l)`` (``offset_scaling``) on the margin of
      every listed loss (each must have a margin); ``odpo`` always gets it. ``target_margin`` (SimPO's
      gamma) is subtracted from every margin the same way.
    - ``reference_free``: reference log-probs are taken as 0 (``simpo`` always is).
    - ``length_normalize``: every log-prob is divided by its response's token count
      ``chosen_tokens``/``rejected_tokens`` ``[B]`` (``sigmoid_norm`` and ``simpo`` always are).
    - ``chosen_nll [B]``: the policy's mean per-token NLL of y_w (for ``sft`` and ``rpo_alpha``);
      default ``-policy_chosen_logps / chosen_tokens``.
    - ``pair_weights [B]``: WPO weights (``wpo_pair_weights``) multiplying every listed loss, not the
      RPO term.
    """
    if beta <= 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a positive number, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    specs, weights = validate_loss_options(
        loss_type, loss_weights=loss_weights, use_offset=use_offset, target_margin=target_margin,
        label_smoothing=label_smoothing, use_weighting=pair_weights is not None, rpo_alpha=rpo_alpha,
        discopop_tau=discopop_tau,
    )
    like = policy_chosen_logps
    ref_chosen_logps, ref_rejected_logps = ref_chosen_logps.detach(), ref_rejected_logps.detach()
    zeros = torch.zeros_like(like).detach()

    def lengths() -> tuple[Tensor, Tensor]:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("length normalisation needs chosen_tokens and rejected_tokens for every pair")
        return chosen_tokens.clamp_min(1).to(like.dtype), rejected_tokens.clamp_min(1).to(like.dtype)

    if chosen_nll is None and (rpo_alpha > 0 or any(s.name == "sft" for s in specs)):
        chosen_nll = -policy_chosen_logps / lengths()[0]

    odpo = None
    if use_offset or any(s.requires_scores for s in specs):
        if score_chosen is None or score_rejected is None:
            who = "use_offset" if use_offset else f"loss_type {loss_type!r}"
            raise ValueError(f"{who} needs score_chosen and score_rejected for every pair")
        odpo = odpo_offset(
            score_chosen, score_rejected, alpha=alpha, scaling=offset_scaling, on_nonpositive=on_nonpositive
        ).to(like.device, like.dtype)

    def view(ref_free: bool, normalize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The four log-prob tensors as a loss with these options sees them."""
        pc, pr = policy_chosen_logps, policy_rejected_logps
        rc, rr = (zeros, zeros) if ref_free else (ref_chosen_logps, ref_rejected_logps)
        if normalize:
            nc, nr = lengths()
            pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
        return pc, pr, rc, rr

    total = zeros
    parts: dict[str, Tensor] = {}
    for spec, weight in zip(specs, weights):
        shift = zeros
        if odpo is not None and (use_offset or spec.requires_scores):
            shift = shift + odpo
        if spec.takes_offset and target_margin:
            shift = shift + target_margin
        inputs = LossInputs(
            *view(reference_free or spec.reference_free, length_normalize or spec.length_normalized),
            beta=beta, offset=shift, label_smoothing=label_smoothing, chosen_nll=chosen_nll,
            discopop_tau=discopop_tau,
        )
        part = spec.fn(inputs)
        parts[spec.name] = part.detach()
        if pair_weights is not None:
            part = part * pair_weights.detach()
        total = total + weight * part
    if rpo_alpha > 0:
        parts["nll"] = chosen_nll.detach()
        total = total + rpo_alpha * chosen_nll
    pc, pr, rc, rr = view(reference_free, length_normalize)
    return LossTerms(total, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach(), parts)


def loss_options_from_config(cfg) -> dict:
    """The ``preference_loss`` keywords a ``TrainConfig`` sets (all but the per-batch tensors)."""
    return dict(
        loss_type=cfg.loss_type, beta=cfg.beta, alpha=cfg.alpha, label_smoothing=cfg.label_smoothing,
        offset_scaling=cfg.offset_scaling,
        on_nonpositive="clamp" if cfg.nonpositive_score_diff == "clamp" else "error",
        loss_weights=cfg.loss_weights, use_offset=cfg.use_offset, target_margin=cfg.target_margin,
        reference_free=cfg.reference_free, length_normalize=cfg.length_normalize, rpo_alpha=cfg.rpo_alpha,
        discopop_tau=cfg.discopop_tau,
    )
