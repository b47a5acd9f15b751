"""The processes of a multi-process ``prefopt online`` run (``torchrun --nproc_per_node N -m prefopt online``).

Every process samples and scores a contiguous share of the round's prompts; the shares are
gathered in rank order, so every process holds the whole round (the same samples, scores and pairs
as one process: each sample has its own seeded random stream). Only the main process writes files;
a barrier after each stage makes the other processes read them only once they are complete. Training
is ``recipes.train`` on every process, i.e. the multi-process loop of ``prefopt train``.

One process (no launcher) is the same code with a world of one: every collective is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from prefopt.training.distributed import together

T = TypeVar("T")


class Ranks:
    """This process's place in the run: ``rank``, ``size``, ``device``; gathering and barriers."""

    def __init__(self):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        if self.size > 1:
            from accelerate import PartialState

            # The process group that the rounds' trainings (Accelerate) then reuse: gloo on CPU.
            state = PartialState(cpu=not torch.cuda.is_available())
            self.state = state
            self.rank, self.size, self.device = state.process_index, state.num_processes, state.device
        else:
            self.state = None  # ``together`` with no state: one process, a failure is simply raised
            self.rank = 0
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> range:
        """This process's contiguous part of ``range(n)`` (the first ``n % size`` processes get one more)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def gather(self, items: list[T]) -> list[T]:
        """Every process's ``items`` concatenated in rank order, on every process."""
        if self.size == 1:
            return list(items)
        parts: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(parts, list(items))
        return [x for part in parts for x in part]

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """``fn()`` on the main process (``None`` elsewhere), its outcome settled across processes
        (``training.distributed.together``): a refusal there (e.g. the output directory's lock) stops
        every process with one line, and none is left waiting for the main one."""
        result = None
        with together(self.state):
            if self.is_main:
                result = fn()
        return result
