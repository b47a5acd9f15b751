"""Losses: pure tensor functions, no model code.

- ``preference``: the registry and every DPO-family loss (``register_loss``, ``LOSSES``);
- ``offsets``: ODPO's offset ``alpha * f(s_w, s_l)``;
- ``token_options``: LD-DPO and WPO, from per-token log-probs;
- ``combine``: ``LossOptions`` (validated once) and ``loss_terms`` (the per-step computation),
  ``preference_loss`` (keyword entry point);
- ``bradley_terry``: the reward model's loss.
"""

from prefopt.losses.bradley_terry import bt_loss, score_margins
from prefopt.losses.combine import (
    LossOptions,
    LossTerms,
    check_beta,
    get_loss,
    loss_needs_reference,
    loss_needs_scores,
    loss_terms,
    parse_loss_types,
    preference_loss,
    preference_loss_terms,
)
from prefopt.losses.offsets import CLAMP_MIN_DIFF, NONPOSITIVE_POLICIES, OFFSET_SCALINGS, odpo_offset
from prefopt.losses.preference import LOSSES, LossInputs, LossSpec, register_loss
from prefopt.losses.token_options import length_desensitized_logps, wpo_pair_weights

__all__ = [
    "CLAMP_MIN_DIFF", "LOSSES", "NONPOSITIVE_POLICIES", "OFFSET_SCALINGS", "LossInputs", "LossOptions", "LossSpec",
    "LossTerms", "bt_loss", "check_beta", "get_loss", "length_desensitized_logps", "loss_needs_reference",
    "loss_needs_scores", "loss_terms", "odpo_offset", "parse_loss_types", "preference_loss",
    "preference_loss_terms", "register_loss", "score_margins", "wpo_pair_weights",
]
