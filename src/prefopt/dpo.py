"""The DPO-family objective: policy and reference log-probs -> preference loss and TRL's metrics."""

from __future__ import annotations

import torch

from prefopt.logprobs import pair_logps, pair_token_logps
from prefopt.losses import (
    length_desensitized_logps,
    loss_options_from_config,
    preference_loss_terms,
    wpo_pair_weights,
)


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
        # Per-token options (issue 9) read the per-token log-probs of the same forward pass.
        ld_alpha, use_weighting = cfg.ld_alpha, cfg.use_weighting
        # The reference first: its temporaries are gone before the policy's activations are made,
        # and the heap they leave is reused by them (memory.py).
        with torch.no_grad():
            if self.reference is None:  # reference-free: no reference model was loaded
                ref = None
            elif ld_alpha is not None:
                ref = self.reference(batch, per_token=True)
            else:
                ref = self.reference(batch)
        if ld_alpha is not None or use_weighting:
            policy = pair_token_logps(model, batch, log_sum_sq=use_weighting)
        else:
            policy = pair_logps(model, batch)
        if ref is None:
            ref = {k: torch.zeros_like(policy[k]) for k in ("chosen_logps", "rejected_logps")}
        (pc, pr), (rc, rr) = _sequence_logps(policy, ld_alpha), _sequence_logps(ref, ld_alpha)
        n_chosen = policy["chosen_tokens"].clamp_min(1)
        terms = preference_loss_terms(
            pc, pr, rc, rr, **loss_options_from_config(cfg),
            score_chosen=batch.get("score_chosen"), score_rejected=batch.get("score_rejected"),
            chosen_tokens=policy["chosen_tokens"], rejected_tokens=policy["rejected_tokens"],
            chosen_nll=-policy["chosen_logps"] / n_chosen.to(policy["chosen_logps"].dtype),
            pair_weights=wpo_pair_weights(
                policy["token_logps"], policy["token_log_sum_sq"], policy["token_response"], policy["counts"]
            ) if use_weighting else None,
        )
        losses, chosen_rewards, rejected_rewards = terms.losses, terms.chosen_rewards, terms.rejected_rewards
        metrics = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": policy["chosen_logps"].detach(),
            "logps/rejected": policy["rejected_logps"].detach(),
        }
        if len(terms.parts) > 1:  # a combination: log each part (unweighted) too
            metrics.update({f"loss/{name}": part for name, part in terms.parts.items()})
        return losses, metrics


def _sequence_logps(out: dict, ld_alpha: float | None):
    """(chosen, rejected) ``[B]`` log-probs: plain sums, or LD-DPO's damped sums from per-token values."""
    if ld_alpha is None:
        return out["chosen_logps"], out["rejected_logps"]
    sums = length_desensitized_logps(
        out["token_logps"], out["token_response"], out["token_rank"], out["counts"], ld_alpha
    )
    return sums[0::2], sums[1::2]


class LiveReference:
    """Reference log-probs from a frozen model, computed batch by batch."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def __call__(self, batch, per_token: bool = False):
        from prefopt.memory import transient_heap

        with transient_heap():  # no-grad temporaries: stack-like, reused next step (memory.py)
            return pair_token_logps(self.model, batch) if per_token else pair_logps(self.model, batch)
