"""Preemption: SIGTERM (what SLURM and Kubernetes send before they kill a job) and SIGINT (Ctrl-C)
ask the run to stop; the training loop finishes the optimizer step under way, writes a checkpoint,
and raises ``RunInterrupted`` (exit status 128 + signal: 143, 130). A second Ctrl-C stops at once.

Handlers are installed only from the main thread (Python's rule) and the previous ones are put back
when training ends. With several processes every one of them may get the signal, or only some: the
loop all-reduces the flag each step so all stop after the same step (trainer.py).
"""

from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []  # every stop signal handled in this process (the crash tests wait on it)


def signals_received() -> int:
    return len(_received)


class StopRequest:
    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without a checkpoint
        if self.signum is None:
            print(f"\nprefopt: {signal.Signals(signum).name} received: finishing this step, then writing a "
                  "checkpoint", file=sys.stderr, flush=True)
        self.signum = signum
        _received.append(signum)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
