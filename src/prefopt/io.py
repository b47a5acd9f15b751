"""Atomic file writing: a file prefopt writes is either the old one or the whole new one.

Every writer goes through ``atomic_path``: the data is written to a temporary file beside the
target (same directory, so the rename stays on one file system), flushed to disk, then renamed over
the target. A crash or a full disk never leaves half a file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

FULL_DISK_ENV = "PREFOPT_TEST_ENOSPC"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to ``path``, on an
    exception it is removed and ``path`` is untouched."""
    path = Path(path)
    if path.is_dir():  # os.replace would fail only after the whole file was written
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict], **dumps_kwargs) -> Path:
    """One JSON object per line."""
    return write_text_atomic(path, "".join(json.dumps(row, **dumps_kwargs) + "\n" for row in rows))


def simulate_full_disk(point: str, step: int | None = None) -> None:
    """Tests only: ``PREFOPT_TEST_ENOSPC=POINT`` (or ``POINT:STEP``) makes the write named ``point``
    fail as on a full disk: ``save:K`` (checkpoint K), ``metrics:K`` (the metrics row of step K),
    ``config`` (config.yaml), ``record`` (the run record), ``final`` (the final model), ``card``
    (the model card), ``eval:N`` (the N-th result file of ``prefopt eval``), ``partitionR:K`` (process
    R's writes into DeepSpeed's checkpoint K: its ZeRO partition). Never set in normal use."""
    wanted = os.environ.get(FULL_DISK_ENV)
    if wanted and wanted in (point, f"{point}:{step}"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
