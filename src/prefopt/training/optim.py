"""Learning-rate schedules and optimizers, as small pure pieces the training loop composes."""

from __future__ import annotations

import math

import torch


def lr_multiplier(step: int, *, kind: str, warmup_steps: int, total_steps: int, min_lr_rate: float = 0.0) -> float:
    """Multiplier of the peak learning rate used for optimizer step ``step`` (0-based).

    Linear warm-up from 0 over ``warmup_steps``, then ``constant`` (also called
    ``constant_with_warmup``, transformers' name for it), ``linear`` decay to 0, ``cosine`` decay to 0
    at ``total_steps``, or ``cosine_with_min_lr``: the cosine scaled into ``[min_lr_rate, 1]``, as
    transformers computes it.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "cosine_with_min_lr":
        return min_lr_rate + (1.0 - min_lr_rate) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler_type {kind!r}")


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay, fused=fused_adamw_ok(params) or None,
        )
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.learning_rate, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def fused_adamw_ok(params) -> bool:
    """The fused AdamW kernel (one pass per tensor, no temporaries; what transformers' Trainer and
    so TRL use by default with torch >= 2.8) takes floating-point tensors on one CPU or CUDA device
    type. On CPU it is ~15x faster than the per-tensor loop and does not allocate the two
    parameter-sized temporaries of that loop (for a 50k-vocab embedding, 300 MB at peak); the
    update is the same up to float rounding."""
    devices = {p.device.type for p in params}
    return len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


def build_scheduler(cfg, optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(
            step, kind=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_for(total_steps), total_steps=total_steps,
            min_lr_rate=cfg.min_lr_rate,
        ),
    )
