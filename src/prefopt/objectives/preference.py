"""The DPO-family objective: policy and reference log-probs -> preference loss and TRL's metrics."""

from __future__ import annotations

import torch

from prefopt.losses.combine import LossOptions, loss_terms
from prefopt.losses.token_options import length_desensitized_logps, wpo_pair_weights
from prefopt.modeling.logprobs import pair_logps, pair_token_logps
from prefopt.objectives.reference import Reference

Tensor = torch.Tensor


def preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, policy: dict[str, Tensor]) -> dict[str, Tensor]:
    """TRL's per-pair metrics from the implicit rewards and the policy's log-probs."""
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": policy["chosen_logps"].detach(),
        "logps/rejected": policy["rejected_logps"].detach(),
    }


class PreferenceObjective:
    """``objective(model, batch) -> (losses [B], metrics {name: [B]})`` for the training loop.

    ``options`` are validated once (``TrainConfig.loss_options()``); each step only computes. The
    reference log-probs come from ``reference(batch, per_token=...)`` (any kind of
    ``objectives.reference``), or are zero when ``reference`` is None (reference-free losses).
    """

    def __init__(self, options: LossOptions, reference: Reference | None):
        self.options = options
        self.reference = reference

    def __call__(self, model, batch):
        o = self.options
        # The reference first: its temporaries are gone before the policy's activations are made,
        # and the heap they leave is reused by them (memory.py).
        with torch.no_grad():
            ref = None if self.reference is None else self.reference(batch, per_token=o.reference_per_token)
        # Per-token options read the per-token log-probs of the same single forward pass.
        if o.ld_alpha is not None or o.use_weighting:
            policy = pair_token_logps(model, batch, log_sum_sq=o.use_weighting)
        else:
            policy = pair_logps(model, batch)
        if ref is None:
            ref = {k: torch.zeros_like(policy[k]) for k in ("chosen_logps", "rejected_logps")}
        (pc, pr), (rc, rr) = sequence_logps(policy, o.ld_alpha), sequence_logps(ref, o.ld_alpha)
        n_chosen = policy["chosen_tokens"].clamp_min(1)
        terms = loss_terms(
            o, pc, pr, rc, rr,
            score_chosen=batch.get("score_chosen"), score_rejected=batch.get("score_rejected"),
            chosen_tokens=policy["chosen_tokens"], rejected_tokens=policy["rejected_tokens"],
            chosen_nll=-policy["chosen_logps"] / n_chosen.to(policy["chosen_logps"].dtype),
            pair_weights=wpo_pair_weights(
                policy["token_logps"], policy["token_log_sum_sq"], policy["token_response"], policy["counts"]
            ) if o.use_weighting else None,
        )
        metrics = preference_metrics(terms.chosen_rewards, terms.rejected_rewards, policy)
        if len(terms.parts) > 1:  # a combination: log each part (unweighted) too
            metrics.update({f"loss/{name}": part for name, part in terms.parts.items()})
        return terms.losses, metrics


def sequence_logps(out: dict, ld_alpha: float | None) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) ``[B]`` log-probs: plain sums, or LD-DPO's damped sums from per-token values."""
    if ld_alpha is None:
        return out["chosen_logps"], out["rejected_logps"]
    sums = length_desensitized_logps(
        out["token_logps"], out["token_response"], out["token_rank"], out["counts"], ld_alpha
    )
    return sums[0::2], sums[1::2]
