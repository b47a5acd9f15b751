"""The data order: which pairs make up each micro-batch of each optimizer step, for every process.

A pure function of ``(seed, epoch)``: a global micro-batch is a slice of a seeded permutation, and
each process takes its own shard of it. Restoring the step therefore restores the position in the
data; checkpoints need no sampler state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Schedule:
    """Which examples make up each micro-batch, for every process. Pure arithmetic."""

    num_examples: int
    per_device_batch_size: int
    num_processes: int
    accumulation: int
    seed: int
    shuffle: bool

    @property
    def global_micro_batch(self) -> int:
        return self.per_device_batch_size * self.num_processes

    @property
    def micro_batches_per_epoch(self) -> int:
        if self.num_processes == 1:
            return math.ceil(self.num_examples / self.global_micro_batch)
        # Several processes: every rank needs a full shard, so a ragged tail is dropped.
        return self.num_examples // self.global_micro_batch

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.micro_batches_per_epoch / self.accumulation))

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_examples, generator=g).tolist()

    def step_micro_batches(self, step: int) -> list[list[int]]:
        """The global micro-batches (lists of example indices) of optimizer step ``step``."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        first = step_in_epoch * self.accumulation
        last = min(first + self.accumulation, self.micro_batches_per_epoch)
        g = self.global_micro_batch
        return [order[m * g : (m + 1) * g] for m in range(first, last)]

    def shard(self, micro_batch: list[int], rank: int) -> list[int]:
        if self.num_processes == 1:
            return micro_batch
        b = self.per_device_batch_size
        return micro_batch[rank * b : (rank + 1) * b]
