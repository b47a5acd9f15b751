"""The Bradley–Terry reward-model objective (docs/reward_models.md): scores of both responses -> BT loss."""

from __future__ import annotations

import torch

from prefopt.data.tokenize import TokenizedPair
from prefopt.errors import DataError, PrefoptError
from prefopt.losses.bradley_terry import bt_loss, score_margins

Tensor = torch.Tensor


class RewardObjective:
    """``objective(model, batch) -> (losses [B], metrics {name: [B]})`` for the training loop."""

    def __init__(self, *, margin_from_scores: bool = False, margin_scale: float = 1.0):
        self.margin_from_scores, self.margin_scale = margin_from_scores, margin_scale

    def __call__(self, model, batch):
        n = int(batch["num_pairs"])
        scores = model(batch["input_ids"], batch["attention_mask"])  # [2B]
        chosen, rejected = scores[:n], scores[n:]
        margin = None
        if self.margin_from_scores:
            if "score_chosen" not in batch:
                raise PrefoptError("margin_from_scores needs score_chosen and score_rejected on every pair")
            margin = score_margins(batch["score_chosen"], batch["score_rejected"], self.margin_scale)
        losses = bt_loss(chosen, rejected, margin)
        chosen, rejected = chosen.detach(), rejected.detach()
        metrics = {
            "accuracy": (chosen > rejected).float(),
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
        }
        if margin is not None:
            metrics["margin"] = margin.float()
        return losses, metrics


def check_margin_scores(tokenized: list[TokenizedPair], cfg, source: str) -> int:
    """With ``margin_from_scores`` every pair needs both scores; returns how many pairs have
    ``s_w < s_l`` (their margin is clamped to 0)."""
    if not cfg.margin_from_scores:
        return 0
    missing = [p for p in tokenized if p.score_chosen is None or p.score_rejected is None]
    if missing:
        raise DataError(source, None, cfg.score_chosen_column,
                        f"margin_from_scores is on but {len(missing)} pair(s) have no scores")
    return sum(1 for p in tokenized if p.score_chosen < p.score_rejected)
