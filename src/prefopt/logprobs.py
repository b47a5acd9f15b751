"""Model forward -> per-response summed log-probabilities, for any batch layout (see collate.py)."""

from __future__ import annotations

import torch

Tensor = torch.Tensor

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")


def token_logps(logits: Tensor, tokens: Tensor, chunk_size: int = 1024) -> Tensor:
    """``log softmax(logits)[tokens]`` for ``logits [T, V]`` and ``tokens [T]``, in float32, computed
    in chunks of rows so that a float32 copy of all ``[T, V]`` logits never exists at once."""
    out = []
    for start in range(0, logits.shape[0], chunk_size):
        chunk = logits[start : start + chunk_size].float()
        picked = chunk.gather(-1, tokens[start : start + chunk_size, None]).squeeze(-1)
        out.append(picked - torch.logsumexp(chunk, dim=-1))
    if not out:
        return logits.new_zeros((0,), dtype=torch.float32)
    return torch.cat(out)


def response_logps(model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed completion log-probs and token counts per response, both ``[2B]``.

    Response ``2i`` is pair i's chosen response and ``2i + 1`` its rejected one.
    """
    from prefopt.selective import target_token_logps

    # Logits only at the completion positions (full logits where that is not exact), and the
    # layouts' 4D masks converted for the model's attention implementation.
    per_token = target_token_logps(model, batch)  # [T]
    n_responses = 2 * int(batch["num_pairs"])
    index = batch["target_response"]
    sums = torch.zeros(n_responses, dtype=per_token.dtype, device=per_token.device).index_add(0, index, per_token)
    counts = torch.zeros(n_responses, dtype=torch.long, device=index.device).index_add(
        0, index, torch.ones_like(index)
    )
    return sums, counts


def pair_logps(model, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``chosen_logps``, ``rejected_logps`` ``[B]`` and their token counts, in one forward pass."""
    sums, counts = response_logps(model, batch)
    return {
        "chosen_logps": sums[0::2],
        "rejected_logps": sums[1::2],
        "chosen_tokens": counts[0::2],
        "rejected_tokens": counts[1::2],
    }
