"""Progress: a tqdm bar on a terminal, a compact line now and then in a log.

tqdm redraws its bar with carriage returns. Written into a file (``prefopt demo > log 2>&1``, a
batch job's log, a CI log) every redraw is kept, so one line of the log holds thousands of
characters and ``grep``/``tail`` show garbage. When the stream is not a terminal (nor a notebook,
where tqdm draws a widget), ``progress_bar`` returns a ``LineProgress`` instead, with the part of
tqdm's interface prefopt uses: a bar kept after it ends (``leave=True``, as training's) writes a
line each time another ``LINE_PERCENT`` % is done (but not within ``LINE_MIN_SECONDS`` of its last
line, so a phase of a few seconds is one line) and when it ends; a transient one (``leave=False``,
as an evaluation's or tokenization's) writes nothing unless it runs long. Either kind also writes a
line when ``LINE_SECONDS`` passed since its last one, so a long phase is never silent. Hugging Face
Trainer's logs are the model: a line now and then with the numbers, not a redraw per step.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

LINE_PERCENT = 10
LINE_MIN_SECONDS = 5.0
LINE_SECONDS = 60.0


def in_notebook() -> bool:
    """Whether tqdm would draw a notebook widget (it chooses by the running IPython kernel)."""
    from tqdm.autonotebook import tqdm as notebook_tqdm
    from tqdm.std import tqdm as std_tqdm

    return notebook_tqdm is not std_tqdm


def is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


def progress_bar(iterable: Iterable | None = None, *, desc: str = "", total: float | None = None,
                 unit: str = "it", disable: bool | None = False, initial: int = 0, leave: bool = True,
                 file: TextIO | None = None, **tqdm_kwargs: Any):
    """``tqdm.auto.tqdm`` on a terminal or in a notebook, ``LineProgress`` otherwise. ``disable``
    ``None`` counts as ``False`` here: a log gets lines, where tqdm would have shown nothing."""
    stream = file if file is not None else sys.stderr
    if disable or is_terminal(stream) or in_notebook():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=bool(disable), initial=initial,
                    leave=leave, file=file, **tqdm_kwargs)
    return LineProgress(iterable, desc=desc, total=total, unit=unit, initial=initial, leave=leave, file=stream)


def format_interval(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}" if hours else f"{m}:{s:02d}"


def count(n: float) -> str:
    return str(int(n)) if n == int(n) else f"{n:.2f}"


class LineProgress:
    """The tqdm methods prefopt calls (iteration, ``update``, ``set_postfix``, ``close``, a context
    manager, ``n`` and ``total``), writing whole lines: ``desc: n/total unit (p%) elapsed, left, rate,
    postfix``."""

    def __init__(self, iterable: Iterable | None = None, *, desc: str = "", total: float | None = None,
                 unit: str = "it", initial: int = 0, leave: bool = True, file: TextIO | None = None,
                 clock=time.monotonic):
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit.strip() or "it"
        self.n = self.start_n = initial
        self.leave, self.file, self.clock = leave, file if file is not None else sys.stderr, clock
        self.started = self.last_line = clock()
        self.postfix = ""
        self.lines_written = 0
        self.n_written: float | None = None  # the count the last line showed
        self.closed = False
        # The next percentage that earns a line (resumed runs start past 0).
        self.next_percent = self._percent_done() // LINE_PERCENT * LINE_PERCENT + LINE_PERCENT

    def _percent_done(self) -> int:
        return int(100 * self.n / self.total) if self.total else 0

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def update(self, n: float = 1) -> None:
        if self.closed:
            return
        self.n += n
        now = self.clock()
        since = now - self.last_line
        due_percent = (self.leave and self.total and self._percent_done() >= self.next_percent
                       and self.n < self.total and since >= LINE_MIN_SECONDS)
        if due_percent or since >= LINE_SECONDS:
            self.write_line(now)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if (self.leave and self.n > self.start_n or self.lines_written) and self.n_written != self.n:
            self.write_line(self.clock())

    def write_line(self, now: float) -> None:
        elapsed = now - self.started
        done = self.n - self.start_n
        parts = [f"{self.desc}: " if self.desc else ""]
        if self.total:
            parts.append(f"{count(self.n)}/{count(self.total)} {self.unit} ({self._percent_done()}%)")
        else:
            parts.append(f"{count(self.n)} {self.unit}")
        timing = [f"{format_interval(elapsed)} elapsed"]
        if self.total and done > 0 and self.n < self.total:
            timing.append(f"{format_interval(elapsed / done * (self.total - self.n))} left")
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            timing.append(f"{rate:.2f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{self.unit}")
        parts.append(" [" + ", ".join(timing) + "]")
        if self.postfix:
            parts.append(" " + self.postfix)
        self.file.write("".join(parts) + "\n")
        self.file.flush()
        self.lines_written += 1
        self.n_written = self.n
        self.last_line = now
        if self.total:
            self.next_percent = self._percent_done() // LINE_PERCENT * LINE_PERCENT + LINE_PERCENT
