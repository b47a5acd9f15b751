"""One error family for everything a user can get wrong.

The CLI turns a `PrefoptError` into one line on stderr and exit status 2; anything else is a bug in
prefopt and keeps its traceback.
"""

from __future__ import annotations


class PrefoptError(Exception):
    """A problem with the user's input (data, configuration, paths), not with prefopt."""


class ConfigError(PrefoptError, ValueError):
    """An unknown, mistyped or inconsistent configuration key or value (also a ``ValueError``, so
    the functional API's bad arguments can be caught as such)."""


class DataError(PrefoptError):
    """A bad row in a data file. The message names the file, the row and the field."""

    def __init__(self, source: str, row: int | None, field: str | None, problem: str, row_label: str = "row"):
        self.source, self.row, self.field, self.problem = source, row, field, problem
        self.row_label = row_label
        parts = [str(source)]
        if row is not None:
            parts.append(f"{row_label} {row}")
        if field is not None:
            parts.append(f"field '{field}'")
        super().__init__(", ".join(parts) + f": {problem}")

    def __reduce__(self):
        # Rebuilt from its parts when it crosses a process boundary (a tokenizing worker).
        return (type(self), (self.source, self.row, self.field, self.problem, self.row_label))


class SharedFailure(PrefoptError):
    """Raised on the other processes of a multi-process run when one process failed: they stop
    with the same exit status, and only the main process prints the line
    (``training.distributed.together``)."""


class RunInterrupted(Exception):
    """Training stopped on SIGTERM or SIGINT after writing a checkpoint. Not a ``PrefoptError``: the
    input was fine, and the exit status says which signal it was (128 + the signal number, what a
    shell reports for a process the signal ended), so a job script can tell a preemption apart."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
