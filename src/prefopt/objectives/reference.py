"""Where the reference policy's log-probs come from: one protocol, every kind.

A reference is a callable ``reference(batch, *, per_token=False) -> dict``. It returns the reference's
``chosen_logps``/``rejected_logps`` ``[B]`` (per-response sums) and their token counts; with
``per_token=True`` also the per-token values they sum (``token_logps [T]``, ``token_response [T]``,
``token_rank [T]``, ``counts [2B]``, as ``modeling.logprobs.pair_token_logps`` gives them), which
LD-DPO needs to weigh the reference's tokens like the policy's. Every kind answers both:

- ``LiveReference``: a frozen model, batch by batch (a copy of the initial policy, or another model);
- ``AdapterOffReference``: the policy's own base weights with its LoRA adapter switched off;
- ``AdapterSnapshotReference``: the policy's base weights with a frozen second adapter, the one the
  trainable adapter started from (``prefopt online``'s per-round reference under LoRA);
- ``CachedReference``: values precomputed once and looked up by ``batch["pair_index"]``
  (``reference_cache.py`` builds them and keeps them on disk);
- ``AutocastReference``: any of the above under the run's mixed-precision autocast.

The objective calls the reference under ``torch.no_grad()`` before the policy's forward.
"""

from __future__ import annotations

from typing import Protocol

import torch

from prefopt.errors import PrefoptError
from prefopt.memory import transient_heap
from prefopt.modeling.logprobs import pair_logps, pair_token_logps
from prefopt.modeling.peft import is_peft_model

Tensor = torch.Tensor


class Reference(Protocol):
    def __call__(self, batch: dict[str, Tensor], *, per_token: bool = False) -> dict[str, Tensor]: ...


def model_logps(model: torch.nn.Module, batch: dict[str, Tensor], per_token: bool) -> dict[str, Tensor]:
    """``pair_token_logps`` or ``pair_logps`` of ``model``: the two answers a reference gives."""
    return pair_token_logps(model, batch) if per_token else pair_logps(model, batch)


class LiveReference:
    """Reference log-probs from a frozen model, computed batch by batch."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def __call__(self, batch, *, per_token: bool = False):
        with transient_heap():  # no-grad temporaries: stack-like, reused next step (memory.py)
            return model_logps(self.model, batch, per_token)


class AdapterOffReference:
    """Reference log-probs from the policy's own base weights: the same forward pass with the LoRA
    adapter disabled, in eval mode (no LoRA dropout), no gradients. ``model`` is the PEFT model
    (the object, not a copy: the trainer's wrapped policy shares its parameters)."""

    def __init__(self, model: torch.nn.Module):
        if not is_peft_model(model):
            raise PrefoptError("AdapterOffReference needs a peft.PeftModel")
        self.model = model

    @torch.no_grad()
    def __call__(self, batch, *, per_token: bool = False):
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter(), transient_heap():
                return model_logps(self.model, batch, per_token)
        finally:
            self.model.train(was_training)


class AdapterSnapshotReference:
    """Reference log-probs from the policy's base weights with a frozen copy of the adapter the
    training started from, loaded beside the trainable one as a second adapter: the policy as it
    was at the start, without a second copy of the base weights (TRL's ``ref_adapter_name``). At
    the first step the two adapters are equal and every implicit reward is exactly 0."""

    NAME = "reference"

    def __init__(self, model: torch.nn.Module, adapter_dir: str):
        if not is_peft_model(model):
            raise PrefoptError("AdapterSnapshotReference needs a peft.PeftModel")
        self.model = model
        self.trained = model.active_adapter
        model.load_adapter(adapter_dir, adapter_name=self.NAME, is_trainable=False)
        model.set_adapter(self.trained)  # loading must not change which adapter trains

    @torch.no_grad()
    def __call__(self, batch, *, per_token: bool = False):
        was_training = self.model.training
        self.model.eval()
        # set_adapter also sets requires_grad: the snapshot is switched on frozen, the trained
        # adapter back on trainable. Under no_grad nothing records either flag in between.
        self.model.set_adapter(self.NAME, inference_mode=True)
        try:
            with transient_heap():
                return model_logps(self.model, batch, per_token)
        finally:
            self.model.set_adapter(self.trained)
            self.model.train(was_training)


class AutocastReference:
    """Runs a reference under the Accelerator's autocast, so that with bf16/fp16 the reference
    log-probs are computed in the same precision as the policy's (at initialisation the two then
    agree and every pair's loss is log 2, as without mixed precision)."""

    def __init__(self, reference: Reference, accelerator):
        self.reference, self.accelerator = reference, accelerator

    def __call__(self, batch, *, per_token: bool = False):
        with self.accelerator.autocast():
            return self.reference(batch, per_token=per_token)


class CachedReference:
    """Reference log-probs looked up by ``batch["pair_index"]``. ``tables`` is a list of
    ``(table, index_offset)``: a table's pair ``i`` answers to ``pair_index == offset + i``.

    A table holds per-pair sums (``index``, ``chosen_logps``, ``rejected_logps``) and, when it was
    computed for a per-token loss option, every pair's per-token values too (``token_logps``: the
    chosen response's tokens then the rejected one's, from ``token_offsets[i]``, with
    ``chosen_tokens``/``rejected_tokens`` counts)."""

    def __init__(self, tables: list[tuple[dict[str, Tensor], int]]):
        index = torch.cat([t["index"] + off for t, off in tables])
        self.chosen = torch.cat([t["chosen_logps"] for t, _ in tables])
        self.rejected = torch.cat([t["rejected_logps"] for t, _ in tables])
        size = int(index.max()) + 1 if len(index) else 0
        self.row = torch.full((size,), -1, dtype=torch.long)
        self.row[index] = torch.arange(len(index))
        self.per_token = all("token_logps" in t for t, _ in tables)
        if self.per_token:
            shifts, total = [], 0
            for t, _ in tables:
                shifts.append(t["token_offsets"][:-1] + total)
                total += int(t["token_offsets"][-1])
            self.token_start = torch.cat(shifts)
            self.token_logps = torch.cat([t["token_logps"] for t, _ in tables])
            self.chosen_tokens = torch.cat([t["chosen_tokens"] for t, _ in tables])
            self.rejected_tokens = torch.cat([t["rejected_tokens"] for t, _ in tables])

    def rows(self, batch) -> Tensor:
        pair_index = batch["pair_index"].cpu()
        known = (pair_index >= 0) & (pair_index < len(self.row))
        rows = self.row[pair_index.clamp(0, max(len(self.row) - 1, 0))] if len(self.row) else pair_index
        if not bool(known.all()) or bool((rows < 0).any()):
            raise PrefoptError("a pair has no precomputed reference log-probs (stale cache?)")
        return rows

    def __call__(self, batch, *, per_token: bool = False):
        rows = self.rows(batch)
        device = batch["input_ids"].device
        out = {
            "chosen_logps": self.chosen[rows].float().to(device),
            "rejected_logps": self.rejected[rows].float().to(device),
        }
        if not per_token:
            return out
        if not self.per_token:
            raise PrefoptError("these precomputed reference log-probs hold per-pair sums only; a per-token "
                               "loss option (ld_alpha) needs them computed with per-token values")
        values, response, rank, counts = [], [], [], []
        for j, r in enumerate(rows.tolist()):
            n_c, n_r = int(self.chosen_tokens[r]), int(self.rejected_tokens[r])
            start = int(self.token_start[r])
            values.append(self.token_logps[start : start + n_c + n_r])
            response.append(torch.cat([torch.full((n_c,), 2 * j), torch.full((n_r,), 2 * j + 1)]))
            rank.append(torch.cat([torch.arange(n_c), torch.arange(n_r)]))
            counts += [n_c, n_r]
        counts_t = torch.tensor(counts, dtype=torch.long)
        out.update(
            token_logps=torch.cat(values).float().to(device),
            token_response=torch.cat(response).long().to(device),
            token_rank=torch.cat(rank).long().to(device),
            counts=counts_t.to(device),
            chosen_tokens=counts_t[0::2].to(device),
            rejected_tokens=counts_t[1::2].to(device),
        )
        return out
