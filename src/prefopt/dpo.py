"""The DPO-family objective: policy and reference log-probs -> preference loss and TRL's metrics."""

from __future__ import annotations

import torch

from prefopt.logprobs import pair_logps
from prefopt.losses import preference_loss


class PreferenceObjective:
    """``objective(model, batch) -> (losses [B], metrics {name: [B]})`` for the training loop.

    The reference log-probs come from ``reference(batch)``: a frozen model's forward pass today;
    a precomputed cache plugs in the same way.
    """

    def __init__(self, cfg, reference):
        self.cfg = cfg
        self.reference = reference

    def __call__(self, model, batch):
        cfg = self.cfg
        policy = pair_logps(model, batch)
        with torch.no_grad():
            ref = self.reference(batch)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            policy["chosen_logps"], policy["rejected_logps"], ref["chosen_logps"], ref["rejected_logps"],
            loss_type=cfg.loss_type, beta=cfg.beta, alpha=cfg.alpha,
            score_chosen=batch.get("score_chosen"), score_rejected=batch.get("score_rejected"),
            label_smoothing=cfg.label_smoothing, offset_scaling=cfg.offset_scaling,
            on_nonpositive="clamp" if cfg.nonpositive_score_diff == "clamp" else "error",
        )
        metrics = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": policy["chosen_logps"].detach(),
            "logps/rejected": policy["rejected_logps"].detach(),
        }
        return losses, metrics


class LiveReference:
    """Reference log-probs from a frozen model, computed batch by batch."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def __call__(self, batch):
        return pair_logps(self.model, batch)
