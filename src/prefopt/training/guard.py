"""The NaN guard: a non-finite loss or gradient must never reach the weights silently.

Checked once per optimizer step, before the update. ``on_nonfinite: stop`` (the default) raises
``NonFiniteError`` naming the step and the likely cause; nothing is saved after that, so the last
checkpoint stays the last good state. ``on_nonfinite: skip`` drops the update instead (the step still
counts, so data order and schedule are unchanged) and counts it; more than ``max_skipped_steps``
skips stop the run all the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from prefopt.errors import PrefoptError
from prefopt.training.checkpoint import damaged_text, intact_checkpoints


class NonFiniteError(PrefoptError):
    """Training produced a non-finite loss or gradient."""


@dataclass
class StepHealth:
    """What one optimizer step saw: collected while it runs, judged before the update."""

    bad_pairs: list[int] = field(default_factory=list)  # dataset positions whose loss is not finite
    pairs: int = 0

    def observe(self, losses: torch.Tensor, positions: list[int]) -> None:
        """``losses [B]`` of one micro-batch and the dataset positions of its pairs."""
        finite = torch.isfinite(losses.detach())
        if not bool(finite.all()):
            self.bad_pairs.extend(positions[i] for i in (~finite).nonzero().flatten().tolist())
        self.pairs += len(positions)


def max_abs_weight(model: torch.nn.Module) -> float:
    with torch.no_grad():
        values = [p.detach().abs().max().float() for p in model.parameters() if p.requires_grad and p.numel()]
    return float(torch.stack(values).max()) if values else 0.0


def likely_cause(*, health: StepHealth, loss_finite: bool, grad_norm: float, lr: float, weight_max: float,
                 mixed_precision: str = "no") -> str:
    """A best guess a user can act on, from the cheapest signals."""
    if mixed_precision == "fp16":
        return "fp16 overflow: train in bf16 or fp32, or lower the learning rate"
    if not math.isfinite(weight_max) or weight_max > 1e4:
        return (f"the learning rate ({lr:g}) is too high: the weights have diverged (largest |w| = {weight_max:.3g}); "
                "lower learning_rate or keep max_grad_norm > 0")
    if health.bad_pairs and len(health.bad_pairs) < health.pairs:
        shown = ", ".join(map(str, sorted(health.bad_pairs)[:5]))
        return (f"a bad row: the loss is non-finite for {len(health.bad_pairs)} of {health.pairs} pairs "
                f"(dataset pairs {shown}); check them with `prefopt validate`")
    if loss_finite and not math.isfinite(grad_norm):
        return f"a gradient overflow: lower the learning rate ({lr:g}) or set max_grad_norm"
    return f"the learning rate ({lr:g}) may be too high, or a row is bad; lower learning_rate and check the data"


def check_step(trainer, health: StepHealth, loss_sum: float, grad_norm: float) -> bool:
    """Judge one step before its update. Returns True when the update must be skipped; raises
    ``NonFiniteError`` to stop. All processes reach the same verdict (the flag is summed)."""
    local_bad = not math.isfinite(loss_sum) or not math.isfinite(grad_norm)
    reduced, _ = trainer.all_reduce_sum({"bad": float(local_bad)})
    if reduced["bad"] == 0:
        return False
    cfg, step = trainer.cfg, trainer.step + 1  # the step being taken, as metrics.jsonl numbers it
    if cfg.on_nonfinite == "skip" and trainer.skipped_steps < cfg.max_skipped_steps:
        return True
    cause = likely_cause(
        health=health, loss_finite=math.isfinite(loss_sum), grad_norm=grad_norm,
        lr=trainer.scheduler.get_last_lr()[0], weight_max=max_abs_weight(trainer.model),
        mixed_precision=str(getattr(trainer.accelerator, "mixed_precision", "no")),
    )
    what = "loss" if not math.isfinite(loss_sum) else "gradient"
    if cfg.on_nonfinite == "skip":
        what += f" after {trainer.skipped_steps} skipped steps (max_skipped_steps)"
    # "Last good" means verified: a checkpoint whose files no longer match their checksums is named, not offered.
    found, damaged = intact_checkpoints(trainer.output_dir)
    kept = f"last good checkpoint: {found[0]}" if found else "no intact checkpoint"
    if damaged:
        kept += f" (skipped damaged: {damaged_text(damaged)})"
    elif not found:
        kept = "no checkpoint was written yet"
    raise NonFiniteError(f"step {step}: non-finite {what}; likely cause: {cause}. Training stopped; {kept}")
