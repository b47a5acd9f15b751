"""ODPO's offset (Amini, Vieira, Cotterell 2024, arXiv 2402.10571): how far apart the policy must push a pair, from its scores."""

from __future__ import annotations

import torch

Tensor = torch.Tensor

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
