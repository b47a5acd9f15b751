"""The Bradley–Terry loss of a reward model (Bradley and Terry 1952; docs/reward_models.md), a pure tensor function.

It lives beside the preference losses rather than in their registry: the registry's losses take policy and
reference log-probs, while a reward model's loss takes the model's own scalar scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def bt_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None) -> Tensor:
    """Per-pair Bradley–Terry loss ``-log sigmoid(r_w - r_l - m)``, shape ``[B]``.

    ``chosen_rewards``/``rejected_rewards`` are the scores ``r(x, y_w)``, ``r(x, y_l)`` (``[B]``);
    ``margin`` (``[B]``, optional) is a known per-pair margin ``m >= 0`` that the reward difference
    must exceed. It is a constant of the data: it gets no gradient. ``logsigmoid`` keeps the loss
    finite for any difference (``-log sigmoid(z) = softplus(-z)``).
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin.detach().to(diff.dtype)
    return -F.logsigmoid(diff)


def score_margins(score_chosen: Tensor, score_rejected: Tensor, scale: float) -> Tensor:
    """The BT margin ``m = scale * max(s_w - s_l, 0)`` per pair (``m >= 0``: a margin never rewards the wrong order)."""
    return (scale * (score_chosen - score_rejected)).clamp_min(0.0)
