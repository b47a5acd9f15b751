"""Model forward -> per-target-token and per-response log-probabilities, for any batch layout.

A collated batch (``data/collate.py``, ``data/layouts.py``) describes its targets explicitly: for
every completion token, the row and position whose logits predict it, the token, and the response
it belongs to (``2i`` chosen, ``2i+1`` rejected of pair i). ``target_token_logps`` runs the model
once and reads just those; the rest sums per response and splits pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prefopt.data.collate import to_device
from prefopt.memory import transient_heap
from prefopt.modeling.attention import attention_inputs
from prefopt.modeling.lm_head import ChunkedHeadLogps, head_chunk_size, head_log_sum_sq, split_lm_head
from prefopt.progress import progress_bar

Tensor = torch.Tensor


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


def target_token_logps(model, batch: dict[str, Tensor], chunk_size: int | None = None,
                       selective: bool = True, *, log_sum_sq: bool = False):
    """Per-target-token log-probs ``[T]`` (float32) of ``batch`` (see data/collate.py for the contract).

    With ``log_sum_sq`` returns ``(logps, log_sum_sq)``: also ``log sum_v p(v)^2`` at each target
    (WPO's weights; float32, no gradient), from the same forward pass, also head-only."""
    inputs = attention_inputs(model, batch)
    rows, positions, tokens = batch["target_rows"], batch["target_positions"], batch["target_tokens"]
    parts = split_lm_head(model) if selective else None
    if parts is None:
        logits = model(**inputs, use_cache=False).logits  # [R, L, V]
        selected = logits[rows, positions]
        logps = token_logps(selected, tokens, chunk_size or 1024)
        return (logps, token_log_sum_sq(selected.detach(), chunk_size or 1024)) if log_sum_sq else logps
    body, head = parts
    hidden = body(**inputs, use_cache=False).last_hidden_state  # [R, L, H]
    chunk_size = chunk_size or head_chunk_size(head.weight.shape[0])
    keep_last = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    at_targets = hidden[rows, positions]
    logps = ChunkedHeadLogps.apply(at_targets, head.weight, head.bias, tokens, chunk_size, keep_last)
    if not log_sum_sq:
        return logps
    return logps, head_log_sum_sq(at_targets.detach(), head.weight.detach(), head.bias, chunk_size)


def response_logps(model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed completion log-probs and token counts per response, both ``[2B]``.

    Response ``2i`` is pair i's chosen response and ``2i + 1`` its rejected one.
    """
    # Logits only at the completion positions (full logits where that is not exact), and the
    # layouts' 4D masks converted for the model's attention implementation.
    return sum_per_response(target_token_logps(model, batch), batch)


def sum_per_response(per_token: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Per-token log-probs ``[T]`` -> per-response sums and token counts ``[2B]``."""
    n_responses = 2 * int(batch["num_pairs"])
    index = batch["target_response"]
    sums = torch.zeros(n_responses, dtype=per_token.dtype, device=per_token.device).index_add(0, index, per_token)
    counts = torch.zeros(n_responses, dtype=torch.long, device=index.device).index_add(
        0, index, torch.ones_like(index)
    )
    return sums, counts


def split_pairs(sums: Tensor, counts: Tensor) -> dict[str, Tensor]:
    """Interleaved per-response values ``[2B]`` -> ``chosen_*`` / ``rejected_*`` ``[B]``."""
    return {
        "chosen_logps": sums[0::2],
        "rejected_logps": sums[1::2],
        "chosen_tokens": counts[0::2],
        "rejected_tokens": counts[1::2],
    }


def pair_logps(model, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``chosen_logps``, ``rejected_logps`` ``[B]`` and their token counts, in one forward pass."""
    return split_pairs(*response_logps(model, batch))


# --- per-token log-probs for the per-token loss options (LD-DPO, WPO) ---


def token_log_sum_sq(logits: Tensor, chunk_size: int = 1024) -> Tensor:
    """``log sum_v p(v)^2`` per row of ``logits [T, V]`` (WPO's alignment term), float32, no gradient:
    ``logsumexp(2*logits) - 2*logsumexp(logits)``, chunked like ``token_logps``."""
    out = []
    with torch.no_grad():
        for start in range(0, logits.shape[0], chunk_size):
            chunk = logits[start : start + chunk_size].float()
            out.append(torch.logsumexp(2.0 * chunk, dim=-1) - 2.0 * torch.logsumexp(chunk, dim=-1))
    if not out:
        return logits.new_zeros((0,), dtype=torch.float32)
    return torch.cat(out)


def rank_within_response(token_response: Tensor, target_positions: Tensor, width: int) -> Tensor:
    """0-based index of each target token inside its response, ``[T]``, for any layout: tokens are
    ordered by (response, position) with a stable sort, so the targets need not be contiguous."""
    key = token_response * (width + 1) + target_positions
    order = torch.argsort(key, stable=True)
    sorted_response = token_response[order]
    n = int(token_response.max()) + 1 if token_response.numel() else 0
    counts = torch.zeros(n, dtype=torch.long, device=token_response.device).index_add(
        0, sorted_response, torch.ones_like(sorted_response)
    )
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - starts[sorted_response]
    return rank


def pair_token_logps(model, batch: dict[str, Tensor], *, log_sum_sq: bool = False) -> dict[str, Tensor]:
    """``pair_logps`` plus the per-token values it sums, from the same single forward pass.

    Extra keys: ``token_logps [T]`` (with gradient), ``token_response [T]`` (``2i`` chosen / ``2i+1``
    rejected of pair i), ``token_rank [T]`` (position inside the response), ``counts [2B]``, and with
    ``log_sum_sq`` also ``token_log_sum_sq [T]`` (``token_log_sum_sq``, for WPO weights).
    """
    # The LM head at the targets only, as in response_logps (full logits where that is not exact).
    result = target_token_logps(model, batch, log_sum_sq=log_sum_sq)
    per_token, sum_sq = result if log_sum_sq else (result, None)
    sums, counts = sum_per_response(per_token, batch)
    index = batch["target_response"]
    out = {
        **split_pairs(sums, counts),
        "token_logps": per_token,
        "token_response": index,
        "token_rank": rank_within_response(index, batch["target_positions"], batch["input_ids"].shape[1]),
        "counts": counts,
    }
    if log_sum_sq:
        out["token_log_sum_sq"] = sum_sq
    return out


def score_pairs(model, pairs: Sequence, collator, *, batch_size: int, device, progress: bool = True,
                desc: str = "logps") -> list[dict]:
    """Per-pair summed log-probs of ``model`` in input order, batched, no gradients: one row
    ``{index, chosen_logps, rejected_logps, chosen_tokens, rejected_tokens}`` per pair."""
    model.eval()
    rows = []
    starts = range(0, len(pairs), batch_size)
    with torch.no_grad(), transient_heap():
        for start in progress_bar(starts, desc=desc, disable=not progress):
            chunk = pairs[start : start + batch_size]
            batch = to_device(collator(list(chunk)), device)
            out = {k: v.tolist() for k, v in pair_logps(model, batch).items()}
            for j, pair in enumerate(chunk):
                rows.append({"index": pair.index, **{k: out[k][j] for k in out}})
    return rows
