"""Batch layouts. Every layout produces the same description of what to score:

- the model inputs (``input_ids``, ``attention_mask``, optional ``position_ids``), and
- flat *targets*: ``target_rows``, ``target_positions`` (the position whose logits predict the
  token), ``target_tokens`` and ``target_response`` (which response the token belongs to:
  ``2*i`` is pair i's chosen response, ``2*i + 1`` its rejected one).

``modeling.logprobs.response_logps`` turns any such batch into per-response summed log-probs, so a new
layout (prefix sharing, packing) is only a new collator.
"""

from __future__ import annotations

from typing import Any

import torch

from prefopt.data.tokenize import TokenizedPair

Tensor = torch.Tensor


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    """A collated batch with its tensors on ``device``."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _scores(pairs: list[TokenizedPair]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if all(p.score_chosen is not None and p.score_rejected is not None for p in pairs):
        return (torch.tensor([p.score_chosen for p in pairs], dtype=torch.float64),
                torch.tensor([p.score_rejected for p in pairs], dtype=torch.float64))
    return None, None


class PaddedPairCollator:
    """The plain layout: ``2B`` right-padded rows, ``prompt+chosen`` for every pair, then
    ``prompt+rejected`` for every pair. Padding is on the right, so no real token attends to a pad
    and positions need no correction."""

    layout = "plain"

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
        sequences, completion_starts = [], []
        for which in ("chosen_ids", "rejected_ids"):
            for p in pairs:
                sequences.append(p.prompt_ids + getattr(p, which))
                completion_starts.append(len(p.prompt_ids))
        width = max(len(s) for s in sequences)
        n_rows, n_pairs = len(sequences), len(pairs)
        input_ids = torch.full((n_rows, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n_rows, width), dtype=torch.long)
        rows, positions, tokens, responses = [], [], [], []
        for r, (seq, start) in enumerate(zip(sequences, completion_starts)):
            input_ids[r, : len(seq)] = torch.tensor(seq)
            attention_mask[r, : len(seq)] = 1
            pair_index, is_rejected = r % n_pairs, r // n_pairs
            for t in range(start, len(seq)):
                rows.append(r)
                positions.append(t - 1)  # the logits at t-1 predict token t
                tokens.append(seq[t])
                responses.append(2 * pair_index + is_rejected)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        return target_batch(pairs, inputs, (rows, positions, tokens, responses), attention_mask.sum())


def target_batch(pairs: list[TokenizedPair], inputs: dict[str, torch.Tensor], targets, num_tokens) -> dict:
    """The batch every layout hands to ``response_logps``: model ``inputs``, the flat ``targets``
    ``(rows, positions, tokens, responses)`` as lists, and the pairs' indices and scores."""
    rows, positions, tokens, responses = targets
    batch = {
        **inputs,
        "target_rows": torch.tensor(rows, dtype=torch.long),
        "target_positions": torch.tensor(positions, dtype=torch.long),
        "target_tokens": torch.tensor(tokens, dtype=torch.long),
        "target_response": torch.tensor(responses, dtype=torch.long),
        "num_pairs": torch.tensor(len(pairs)),
        "num_tokens": num_tokens,
        "pair_index": torch.tensor([p.index for p in pairs], dtype=torch.long),
    }
    score_chosen, score_rejected = _scores(pairs)
    if score_chosen is not None:
        batch["score_chosen"], batch["score_rejected"] = score_chosen, score_rejected
    return batch


# ---------------------------------------------------------------------------------------------
# Reward models: whole sequences, not targets


def pad_sequences(sequences: list[list[int]], pad_token_id: int, padding_side: str = "right") -> tuple[Tensor, Tensor]:
    """``input_ids`` and ``attention_mask`` ``[N, L]`` for token lists, padded on either side."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, seq in enumerate(sequences):
        span = slice(0, len(seq)) if padding_side == "right" else slice(width - len(seq), width)
        input_ids[r, span] = torch.tensor(seq, dtype=torch.long)
        attention_mask[r, span] = 1
    return input_ids, attention_mask


class RewardPairCollator:
    """``2B`` rows: ``prompt + chosen`` for every pair, then ``prompt + rejected`` for every pair.

    Scores are passed through (``score_chosen``/``score_rejected``, ``[B]``) when every pair has
    them; the objective turns them into BT margins when ``margin_from_scores`` is on."""

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        self.pad_token_id, self.padding_side = pad_token_id, padding_side

    def __call__(self, pairs: list[TokenizedPair]) -> dict[str, Tensor]:
        sequences = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
        input_ids, attention_mask = pad_sequences(sequences, self.pad_token_id, self.padding_side)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "num_pairs": torch.tensor(len(pairs)),
            "num_tokens": attention_mask.sum(),
            "pair_index": torch.tensor([p.index for p in pairs], dtype=torch.long),
        }
        score_chosen, score_rejected = _scores(pairs)
        if score_chosen is not None:
            batch["score_chosen"], batch["score_rejected"] = score_chosen, score_rejected
        return batch
