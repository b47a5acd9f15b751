"""The LM head at the target positions only, in chunks, so a ``[tokens, vocab]`` float32 logits
tensor never exists whole.

A DPO batch scores only completion tokens; computing full-vocabulary logits for every prompt token
(as ``model(...).logits`` does) wastes ``2·H·V`` FLOPs per prompt token and, at vocab 32k-150k, most
of the activation memory. ``split_lm_head`` says where ``body -> hidden[targets] -> head`` is exact:
the architectures whose head is one ``nn.Linear`` on the last hidden state (not with logit
soft-capping, logit scaling, or wrapped models such as DDP or PEFT, which use full logits).

The head's backward recomputes each chunk's logits but the last instead of keeping them
(``ChunkedHeadLogps``): one extra ``2·H·V`` per token of the other chunks buys a peak of one
``[chunk, V]`` block instead of ``[T, V]``. ``TiedGradInPlace`` accumulates the gradient of a weight
shared by the embedding and the head in one persistent buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

Tensor = torch.Tensor

# Architectures whose causal-LM forward is ``lm_head(base(...).last_hidden_state)`` and nothing else.
SAFE_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3", "olmo", "olmo2", "gemma",
    "stablelm", "starcoder2", "gpt_bigcode", "opt",
})
# Config attributes that mean the logits are transformed after the head: use full logits.
UNSAFE_CONFIG_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def split_lm_head(model) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """``(body, head)`` when applying the head to selected hidden states is exactly equal to
    selecting from the full logits; ``None`` when that cannot be guaranteed."""
    if not isinstance(model, PreTrainedModel) or _is_fsdp(model):
        # FSDP2 shards in place and gathers parameters around the root module's forward only:
        # calling the body and the head separately would break its single-root bookkeeping.
        return None
    config = model.config
    if getattr(config, "model_type", None) not in SAFE_MODEL_TYPES:
        return None
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in UNSAFE_CONFIG_KEYS):
        return None
    head = model.get_output_embeddings()
    body = getattr(model, model.base_model_prefix, None)
    if not isinstance(head, torch.nn.Linear) or not isinstance(body, torch.nn.Module) or body is model:
        return None
    return body, head


def _is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule  # absent from torch builds without distributed
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(model, FSDPModule)


class ChunkedHeadLogps(torch.autograd.Function):
    """``log_softmax(hidden @ W.T + b)[tokens]`` per row, ``[T]`` float32, chunk by chunk.

    ``d logp_t / d z = onehot(token_t) - softmax(z_t)``. The chunks' logits are written into one
    reused ``[chunk, V]`` buffer. The backward recomputes the logits of every chunk but the last:
    the forward turns the last chunk's logits into its softmax in that buffer and keeps it, since
    the backward needs one such buffer anyway (a batch whose targets fit in one chunk, e.g. 333
    tokens at GPT-2's vocabulary, has nothing to recompute).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, chunk_size, keep_last):
        n = hidden.shape[0]
        out = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        buffer = _logits_buffer(hidden, weight, chunk_size)
        kept = None
        for s in range(0, n, chunk_size):
            logits = _chunk_logits(hidden[s : s + chunk_size], weight, bias, buffer)
            picked = logits.gather(-1, tokens[s : s + chunk_size, None]).squeeze(-1)
            sums, shift = _exp_shifted_(logits)  # logits := exp(z - shift)
            lse[s : s + chunk_size] = sums.log().add_(shift)
            out[s : s + chunk_size] = picked - lse[s : s + chunk_size]
            if keep_last and s + chunk_size >= n:
                kept = logits.div_(sums[:, None])  # the softmax of the last chunk
        ctx.save_for_backward(hidden, weight, bias, tokens, lse)
        ctx.chunk_size, ctx.kept, ctx.buffer = chunk_size, kept, buffer
        # The backward runs outside autocast: it recomputes the logits in the forward's precision,
        # or its softmax would not match the forward's saved log-sum-exp.
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, tokens, lse = ctx.saved_tensors
        chunk_size, kept, buffer = ctx.chunk_size, ctx.kept, ctx.buffer
        ctx.kept = ctx.buffer = None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        need_b = need_b and bias is not None
        grad_w = grad_b = None  # allocated by the first chunk's product (no [V, H] zero fill)
        in_place = need_w and _accumulates_in_place(weight)
        if in_place:
            grad_w = weight.grad  # see accumulate_tied_grad_in_place
        starts = list(range(0, hidden.shape[0], chunk_size))
        for s in reversed(starts):  # the last chunk first: its softmax is kept in the buffer
            h = hidden[s : s + chunk_size]
            go = grad_out[s : s + chunk_size, None]
            # g = (onehot(token) - softmax(z)) * grad, built in the logits buffer itself, with the
            # softmax from the forward's saved logsumexp where it was not kept.
            if kept is not None:
                g, kept = kept, None
            else:
                device, enabled, dtype = ctx.autocast
                with torch.autocast(device, dtype=dtype, enabled=enabled):
                    logits = _chunk_logits(h, weight, bias, buffer)
                g = logits.sub_(lse[s : s + chunk_size, None]).exp_()
            g.mul_(-go).scatter_add_(-1, tokens[s : s + chunk_size, None], go)
            if grad_h is not None:
                grad_h[s : s + chunk_size] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w = g.t() @ h.float() if grad_w is None else grad_w.addmm_(g.t(), h.float())
            if need_b:
                grad_b = g.sum(0) if grad_b is None else grad_b.add_(g.sum(0))
        if need_w and grad_w is None:  # no target tokens
            grad_w = torch.zeros_like(weight, dtype=torch.float32)
        if need_b and grad_b is None:
            grad_b = torch.zeros_like(bias, dtype=torch.float32)
        grad_w = grad_w.to(weight.dtype) if grad_w is not None and not in_place else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None


IN_PLACE_GRAD = "_prefopt_grad_in_place"


def _accumulates_in_place(weight: Tensor) -> bool:
    grad = weight.grad
    return (getattr(weight, IN_PLACE_GRAD, False) and grad is not None and not grad.is_sparse
            and grad.dtype == torch.float32 and weight.dtype == torch.float32)


class TiedGradInPlace:
    """The tied weight's persistent gradient (see ``accumulate_tied_grad_in_place``): ``zero()``
    instead of setting ``.grad`` to None between steps, ``release()`` to restore plain autograd."""

    def __init__(self, weight: torch.nn.Parameter, embedding: torch.nn.Embedding):
        self.weight, self.embedding = weight, embedding
        self.buffer = torch.zeros_like(weight)
        embedding.sparse = True
        setattr(weight, IN_PLACE_GRAD, True)
        weight.grad = self.buffer

    def zero(self) -> None:
        self.weight.grad = self.buffer.zero_()

    def release(self) -> None:
        """Back to plain autograd (``torch.autograd.grad`` and gradient hooks on the weight see
        only what flows through autograd, so the in-place mode must not outlive training)."""
        self.embedding.sparse = False
        if hasattr(self.weight, IN_PLACE_GRAD):
            delattr(self.weight, IN_PLACE_GRAD)
        self.weight.grad = None
        self.buffer = None


def accumulate_tied_grad_in_place(model) -> TiedGradInPlace | None:
    """For a model whose input embedding is tied to its LM head (GPT-2 and most small models),
    let the tied weight's gradient accumulate in one persistent buffer instead of three fresh
    ``[V, H]`` blocks per backward (the head's gradient, the embedding's zero-filled dense gradient,
    and their sum): the head adds its product straight into ``weight.grad`` and the embedding
    returns a sparse gradient (only the rows of the batch's tokens) that autograd adds in place.
    At GPT-2's vocabulary that is 3 x 154 MB of fresh, page-faulting memory per step less.

    Returns the handle whose ``zero()`` replaces setting that ``.grad`` to None between steps and
    whose ``release()`` ends the mode (the trainer does both); ``None`` (nothing changed) where
    the conditions do not hold: a plain float32 ``PreTrainedModel`` whose head ``split_lm_head``
    accepts, trainable and tied. The caller makes sure that one process owns the whole model (no
    DDP, FSDP or DeepSpeed) and that nothing but ``backward()`` computes gradients of the weight
    meanwhile (``torch.autograd.grad`` would see only the embedding's part)."""
    parts = split_lm_head(model)
    if parts is None:
        return None
    head = parts[1]
    embedding = model.get_input_embeddings()
    weight = head.weight
    if (not isinstance(embedding, torch.nn.Embedding) or embedding.weight is not weight
            or not weight.requires_grad or weight.dtype != torch.float32 or embedding.max_norm is not None):
        return None
    return TiedGradInPlace(weight, embedding)


def _logits_buffer(hidden: Tensor, weight: Tensor, chunk_size: int) -> Tensor | None:
    """One float32 ``[chunk, V]`` block for every chunk's logits, where the product can write into
    it: float32 operands and no autocast (which would compute the product in half precision)."""
    if hidden.dtype != torch.float32 or weight.dtype != torch.float32 or hidden.shape[0] == 0:
        return None
    if torch.is_autocast_enabled(hidden.device.type):
        return None
    return hidden.new_empty(min(chunk_size, hidden.shape[0]), weight.shape[0])


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, buffer: Tensor | None) -> Tensor:
    """float32 logits of ``h``, in ``buffer`` when there is one (no fresh ``[chunk, V]`` block)."""
    if buffer is None:
        return F.linear(h, weight, bias).float()
    out = buffer[: h.shape[0]]
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def _exp_shifted_(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``logits := exp(logits - shift)`` in place, with ``shift`` the row maximum; returns the row
    sums and ``shift``, so ``logsumexp = log(sums) + shift`` and ``softmax = logits / sums``.
    torch's own ``logsumexp``/``softmax`` allocate two more ``[T, V]`` temporaries."""
    shift = logits.amax(-1)
    shift.masked_fill_(torch.isinf(shift), 0.0)  # a row of -inf stays -inf instead of NaN
    sums = logits.sub_(shift[:, None]).exp_().sum(-1)
    return sums, shift


def head_chunk_size(vocab_size: int, budget: int = 1 << 24) -> int:
    """Tokens per LM-head chunk so one float32 ``[chunk, vocab]`` block holds ``budget`` elements
    (64 MB): 333 tokens at GPT-2's vocabulary, 110 at 150k. Large enough that the chunk's matmul
    runs at full speed, small enough that the head's transient memory stays flat."""
    return max(16, budget // max(vocab_size, 1))


@torch.no_grad()
def head_log_sum_sq(hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk_size: int) -> Tensor:
    """``log sum_v softmax(hidden @ W.T + b)_v^2`` per row, float32, one reused ``[chunk, V]``
    buffer: ``log sum exp(2 z) - 2 logsumexp(z) = 2 (log ||exp(z - m)|| - log sum exp(z - m))``."""
    out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    buffer = _logits_buffer(hidden, weight, chunk_size)
    for s in range(0, hidden.shape[0], chunk_size):
        logits = _chunk_logits(hidden[s : s + chunk_size], weight, bias, buffer)
        sums, _ = _exp_shifted_(logits)
        out[s : s + chunk_size] = 2.0 * (torch.linalg.vector_norm(logits, dim=-1).log() - sums.log())
    return out
