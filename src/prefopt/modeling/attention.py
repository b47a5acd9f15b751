"""Attention masks: the layouts' boolean 4D masks in the form the model's attention takes.

SDPA takes the bool mask itself, eager attention adds a float mask, and FlexAttention (GPU only,
optional) takes a ``BlockMask``. Any other implementation cannot take a custom mask.
"""

from __future__ import annotations

import torch

from prefopt.data.layouts import choose_layout, make_collator
from prefopt.errors import ConfigError

Tensor = torch.Tensor

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")


def attention_inputs(model, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model inputs of ``batch``, with a 4D bool mask converted for the model's attention."""
    inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 4:
        inputs["attention_mask"] = convert_4d_mask(model, mask)
    return inputs


def attn_implementation(model) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) or "sdpa"


def convert_4d_mask(model, mask: Tensor):
    impl = attn_implementation(model)
    if impl == "sdpa":
        return mask  # SDPA: True = attend
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    if impl == "flex_attention":
        return flex_block_mask(mask)
    raise ConfigError(
        f"attention implementation {impl!r} cannot take the custom masks of the prefix_shared and "
        "packed layouts; use layout: plain, or load the model with sdpa, eager or flex_attention"
    )


def flex_block_mask(mask: Tensor):
    """A FlexAttention ``BlockMask`` reading the dense bool mask (GPU only: FlexAttention's
    backward does not run on CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask  # optional: FlexAttention, GPU runs

    dense = mask[:, 0]
    n_rows, length = dense.shape[0], dense.shape[-1]

    def mask_mod(b, h, q, kv):
        return dense[b, q, kv]

    return create_block_mask(mask_mod, B=n_rows, H=None, Q_LEN=length, KV_LEN=length, device=mask.device)


def model_device_type(model) -> str:
    """Where ``model``'s parameters are (``cpu`` for a model without any)."""
    try:
        return next(model.parameters()).device.type
    except (AttributeError, StopIteration, TypeError):
        return "cpu"


def model_layout(requested: str, pairs, batch_size: int, model, row_tokens: int = 0,
                 device_type: str | None = None) -> str:
    """``data.layouts.choose_layout`` for ``model``: its attention implementation and hidden size,
    on ``device_type`` (the device training runs on; default: where the model's parameters are)."""
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 1024
    return choose_layout(requested, pairs, batch_size, attn_impl=attn_implementation(model), hidden_size=int(hidden),
                         row_tokens=row_tokens, device_type=device_type or model_device_type(model))


def model_collator(requested: str, pairs, batch_size: int, model, pad_token_id: int, row_tokens: int = 0,
                   device_type: str | None = None):
    """The collator of the layout ``model_layout`` picks."""
    layout = model_layout(requested, pairs, batch_size, model, row_tokens, device_type)
    return make_collator(layout, pad_token_id, row_tokens)
