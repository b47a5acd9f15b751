"""Per-token loss options: pure functions of the per-token log-probs of one forward pass
(``modeling.logprobs.pair_token_logps``), so no option needs a second forward pass."""

from __future__ import annotations

import torch

Tensor = torch.Tensor



def length_desensitized_logps(
    token_logps: Tensor, token_response: Tensor, token_rank: Tensor, counts: Tensor, ld_alpha: float
) -> Tensor:
    """LD-DPO (Liu et al. 2024, arXiv 2409.06411): per-response log-probs with the verbose tail damped.

    Args: ``token_logps [T]``, ``token_response [T]`` (response index, ``2i`` chosen / ``2i+1``
    rejected of pair i), ``token_rank [T]`` (0-based position of the token in its response),
    ``counts [2B]`` tokens per response. With ``l_i = min(|y_w|, |y_l|)`` of the pair, returns ``[2B]``:
    ``sum_{t < l_i} log p_t + ld_alpha * sum_{t >= l_i} log p_t``. ``ld_alpha = 1`` is the plain sum.
    """
    shared = torch.minimum(counts[0::2], counts[1::2]).repeat_interleave(2)  # [2B]
    weight = torch.where(token_rank < shared[token_response], 1.0, float(ld_alpha)).to(token_logps.dtype)
    out = torch.zeros(counts.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return out.index_add(0, token_response, weight * token_logps)


def wpo_pair_weights(token_logps: Tensor, token_log_sum_sq: Tensor, token_response: Tensor, counts: Tensor) -> Tensor:
    """WPO weights (Zhou et al. 2024, arXiv 2406.11827, eq. 2, "sampled alignment" form), ``[B]``.

    Per response: ``w(y) = exp( mean_t [ log p(y_t) - log sum_v p(v)^2 ] )``, the policy's
    length-normalised probability of y relative to its own expected token probability; the pair's
    weight is ``w(y_w) * w(y_l)``. Detached: the weights get no gradient.
    """
    aligned = (token_logps - token_log_sum_sq).detach()
    sums = torch.zeros(counts.shape[0], dtype=aligned.dtype, device=aligned.device).index_add(
        0, token_response, aligned
    )
    w = torch.exp(sums / counts.clamp_min(1).to(aligned.dtype))
    return w[0::2] * w[1::2]


# ----------------------------------------------------------------------------------------------
