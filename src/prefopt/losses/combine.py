"""Several losses and options as one objective: ``LossOptions`` is built and validated once, and
``loss_terms`` only computes.

``LossOptions.create(...)`` (or ``TrainConfig.loss_options()``) checks the combination of losses and
options and raises ``ConfigError`` naming the offending key; the per-step path
(``loss_terms``, what ``objectives.preference.PreferenceObjective`` calls) does no parsing and no
validation. ``preference_loss`` / ``preference_loss_terms`` are the functional entry points with
keyword options, for notebooks and tests: they build the options, then call ``loss_terms``.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import torch

from prefopt.errors import ConfigError
from prefopt.losses.offsets import NONPOSITIVE_POLICIES, OFFSET_SCALINGS, odpo_offset
from prefopt.losses.preference import LOSSES, LossInputs, LossSpec

Tensor = torch.Tensor


def parse_loss_types(value: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"sigmoid"``, ``"sigmoid, sft"`` or ``["sigmoid", "sft"]`` -> ``["sigmoid", "sft"]``."""
    names = value.split(",") if isinstance(value, str) else list(value)
    return [str(n).strip() for n in names if str(n).strip()]


def get_loss(name: str) -> LossSpec:
    """The registered loss ``name``; ``ConfigError`` (a ``ValueError``) naming the closest one."""
    try:
        return LOSSES[name]
    except KeyError:
        hint = difflib.get_close_matches(name, list(LOSSES), n=1)
        raise ConfigError(
            f"unknown loss_type value {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
            + f" (choose from: {', '.join(sorted(LOSSES))})"
        ) from None


def check_beta(beta: float) -> float:
    """The one place beta's range is checked."""
    if not (isinstance(beta, int | float) and math.isfinite(beta) and beta > 0):
        raise ConfigError(f"beta must be > 0, got {beta}")
    return float(beta)


@dataclass(frozen=True)
class LossOptions:
    """A validated combination of losses and options. Build it with ``create`` (keywords) or
    ``TrainConfig.loss_options()``; the fields are then trusted by ``loss_terms``."""

    specs: tuple[LossSpec, ...]
    weights: tuple[float, ...]
    beta: float = 0.1
    alpha: float = 1.0
    label_smoothing: float = 0.0
    offset_scaling: str = "log_diff"
    on_nonpositive: str = "error"  # what odpo_offset does with s_w <= s_l: error or clamp
    use_offset: bool = False
    target_margin: float = 0.0
    reference_free: bool = False
    length_normalize: bool = False
    rpo_alpha: float = 0.0
    discopop_tau: float = 0.05
    ld_alpha: float | None = None  # LD-DPO: needs per-token log-probs of policy and reference
    use_weighting: bool = False  # WPO: needs per-token log-probs of the policy

    @classmethod
    def create(
        cls,
        loss_type: str | list[str] | tuple[str, ...] = "dpo",
        *,
        loss_weights=None,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        offset_scaling: str = "log_diff",
        on_nonpositive: str = "error",
        use_offset: bool = False,
        target_margin: float = 0.0,
        reference_free: bool = False,
        length_normalize: bool = False,
        rpo_alpha: float = 0.0,
        discopop_tau: float = 0.05,
        ld_alpha: float | None = None,
        use_weighting: bool = False,
    ) -> LossOptions:
        """Check a combination of losses and options; ``ConfigError`` names the offending key."""
        names = parse_loss_types(loss_type)
        if not names:
            raise ConfigError("loss_type names no loss")
        if len(set(names)) != len(names):
            raise ConfigError(f"loss_type lists a loss twice: {', '.join(names)}")
        specs = tuple(get_loss(n) for n in names)
        beta = check_beta(beta)
        if loss_weights is None:
            weights = (1.0,) * len(specs)
        else:
            weights = tuple(float(w) for w in loss_weights)
            if len(weights) != len(specs):
                raise ConfigError(
                    f"loss_weights has {len(weights)} value(s) but loss_type names {len(specs)} loss(es) "
                    f"({', '.join(names)})"
                )
            if not all(math.isfinite(w) and w >= 0 for w in weights):
                raise ConfigError(f"loss_weights must be finite and >= 0, got {list(weights)}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if not math.isfinite(alpha):
            raise ConfigError(f"alpha must be finite, got {alpha}")
        if offset_scaling not in OFFSET_SCALINGS:
            raise ConfigError(f"offset_scaling must be one of {', '.join(OFFSET_SCALINGS)}; got {offset_scaling!r}")
        if on_nonpositive not in NONPOSITIVE_POLICIES:
            raise ConfigError(f"on_nonpositive must be one of {', '.join(NONPOSITIVE_POLICIES)}; got {on_nonpositive!r}")
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
                    f"use_weighting (WPO) weights each pair, but loss {', '.join(map(repr, bad))} re-matches "
                    "pairs by sorting"
                )
        if ld_alpha is not None and not (math.isfinite(ld_alpha) and 0.0 <= ld_alpha <= 1.0):
            raise ConfigError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
        if not (math.isfinite(rpo_alpha) and rpo_alpha >= 0):
            raise ConfigError(f"rpo_alpha must be >= 0, got {rpo_alpha}")
        if not (math.isfinite(discopop_tau) and discopop_tau > 0):
            raise ConfigError(f"discopop_tau must be > 0, got {discopop_tau}")
        return cls(
            specs=specs, weights=weights, beta=beta, alpha=float(alpha), label_smoothing=float(label_smoothing),
            offset_scaling=offset_scaling, on_nonpositive=on_nonpositive, use_offset=bool(use_offset),
            target_margin=float(target_margin), reference_free=bool(reference_free),
            length_normalize=bool(length_normalize), rpo_alpha=float(rpo_alpha), discopop_tau=float(discopop_tau),
            ld_alpha=None if ld_alpha is None else float(ld_alpha), use_weighting=bool(use_weighting),
        )

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def needs_scores(self) -> bool:
        """Some loss gets an ODPO offset, which needs both scores of every pair."""
        return _need_scores(self.specs, self.use_offset)

    @property
    def needs_reference(self) -> bool:
        """False when no loss looks at reference log-probs, so no reference model is needed."""
        return _need_reference(self.specs, self.reference_free)

    @property
    def needs_sft(self) -> bool:
        return self.rpo_alpha > 0 or any(s.name == "sft" for s in self.specs)

    @property
    def reference_per_token(self) -> bool:
        """LD-DPO weighs the reference's tokens too: the reference must give per-token values."""
        return self.ld_alpha is not None


def _need_scores(specs, use_offset: bool) -> bool:
    return use_offset or any(s.requires_scores for s in specs)


def _need_reference(specs, reference_free: bool) -> bool:
    return not (reference_free or all(s.reference_free for s in specs))


def loss_needs_scores(loss_type: str | list[str], use_offset: bool = False) -> bool:
    """True when some loss gets an ODPO offset, which needs both scores of every pair (the rule of
    ``LossOptions.needs_scores``, for callers that hold only the names, such as the data layer)."""
    return _need_scores([get_loss(n) for n in parse_loss_types(loss_type)], use_offset)


def loss_needs_reference(loss_type: str | list[str], reference_free: bool = False) -> bool:
    """False when no loss looks at reference log-probs, so no reference model is needed."""
    return _need_reference([get_loss(n) for n in parse_loss_types(loss_type)], reference_free)


@dataclass(frozen=True)
class LossTerms:
    """What ``loss_terms`` returns. All tensors are ``[B]``."""

    losses: Tensor  # sum_k weight_k * loss_k (* WPO weight) + rpo_alpha * nll: what is minimised
    chosen_rewards: Tensor  # detached beta * (log pi - log ref) of y_w, as the options define log pi
    rejected_rewards: Tensor
    parts: dict[str, Tensor]  # each loss (unweighted, detached) by name, and "nll" when rpo_alpha > 0


def loss_terms(
    options: LossOptions,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    score_chosen: Tensor | None = None,
    score_rejected: Tensor | None = None,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
    chosen_nll: Tensor | None = None,
    pair_weights: Tensor | None = None,
) -> LossTerms:
    """The full objective ``sum_k w_k * loss_k * pair_weight + rpo_alpha * nll``, per pair, for
    already validated ``options``.

    - The ODPO offset ``alpha * f(s_w, s_l)`` goes on the margin of every listed loss with
      ``use_offset`` (``odpo`` always gets it); ``target_margin`` (SimPO's gamma) likewise.
    - ``reference_free``: reference log-probs are taken as 0 (``simpo`` always is).
    - ``length_normalize``: every log-prob is divided by its response's token count
      ``chosen_tokens``/``rejected_tokens`` ``[B]`` (``sigmoid_norm`` and ``simpo`` always are).
    - ``chosen_nll [B]``: the policy's mean per-token NLL of y_w (for ``sft`` and ``rpo_alpha``);
      default ``-policy_chosen_logps / chosen_tokens``.
    - ``pair_weights [B]``: WPO weights (``wpo_pair_weights``) multiplying every listed loss, not the
      RPO term.
    """
    o = options
    like = policy_chosen_logps
    ref_chosen_logps, ref_rejected_logps = ref_chosen_logps.detach(), ref_rejected_logps.detach()
    zeros = torch.zeros_like(like).detach()

    def lengths() -> tuple[Tensor, Tensor]:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("length normalisation needs chosen_tokens and rejected_tokens for every pair")
        return chosen_tokens.clamp_min(1).to(like.dtype), rejected_tokens.clamp_min(1).to(like.dtype)

    if chosen_nll is None and o.needs_sft:
        chosen_nll = -policy_chosen_logps / lengths()[0]

    odpo = None
    if o.needs_scores:
        if score_chosen is None or score_rejected is None:
            who = "use_offset" if o.use_offset else f"loss_type {','.join(o.names)!r}"
            raise ValueError(f"{who} needs score_chosen and score_rejected for every pair")
        odpo = odpo_offset(
            score_chosen, score_rejected, alpha=o.alpha, scaling=o.offset_scaling,
            on_nonpositive="clamp" if o.on_nonpositive == "clamp" else "error",
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
    for spec, weight in zip(o.specs, o.weights):
        shift = zeros
        if odpo is not None and (o.use_offset or spec.requires_scores):
            shift = shift + odpo
        if spec.takes_offset and o.target_margin:
            shift = shift + o.target_margin
        inputs = LossInputs(
            *view(o.reference_free or spec.reference_free, o.length_normalize or spec.length_normalized),
            beta=o.beta, offset=shift, label_smoothing=o.label_smoothing, chosen_nll=chosen_nll,
            discopop_tau=o.discopop_tau,
        )
        part = spec.fn(inputs)
        parts[spec.name] = part.detach()
        if pair_weights is not None:
            part = part * pair_weights.detach()
        total = total + weight * part
    if o.rpo_alpha > 0:
        parts["nll"] = chosen_nll.detach()
        total = total + o.rpo_alpha * chosen_nll
    pc, pr, rc, rr = view(o.reference_free, o.length_normalize)
    return LossTerms(total, (o.beta * (pc - rc)).detach(), (o.beta * (pr - rr)).detach(), parts)


# ----------------------------------------------------------------------------------------------
# Functional entry points with keyword options


def preference_loss_terms(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    loss_type: str | list[str] = "dpo",
    score_chosen: Tensor | None = None,
    score_rejected: Tensor | None = None,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
    chosen_nll: Tensor | None = None,
    pair_weights: Tensor | None = None,
    **options,
) -> LossTerms:
    """``loss_terms`` with the options given as keywords (``LossOptions.create``'s: ``beta``,
    ``alpha``, ``loss_weights``, ``use_offset``, ``target_margin``, ``label_smoothing``,
    ``offset_scaling``, ``on_nonpositive``, ``reference_free``, ``length_normalize``, ``rpo_alpha``,
    ``discopop_tau``). ``pair_weights`` turns on WPO weighting."""
    opts = LossOptions.create(loss_type, use_weighting=pair_weights is not None, **options)
    return loss_terms(
        opts, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        score_chosen=score_chosen, score_rejected=score_rejected, chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens, chosen_nll=chosen_nll, pair_weights=pair_weights,
    )


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
    detached implicit rewards ``beta * (policy_logps - ref_logps)``. ``options`` are the other
    keywords of ``preference_loss_terms`` (loss lists and weights, offsets on any margin loss,
    reference-free and length-normalised modes, RPO, WPO weights).
    """
    terms = preference_loss_terms(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        loss_type=loss_type, beta=beta, alpha=alpha, score_chosen=score_chosen, score_rejected=score_rejected,
        label_smoothing=label_smoothing, offset_scaling=offset_scaling, on_nonpositive=on_nonpositive, **options,
    )
    return terms.losses, terms.chosen_rewards, terms.rejected_rewards
