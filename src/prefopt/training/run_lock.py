"""One run per output directory: an advisory lock (``fcntl.flock``) on ``OUTPUT/.prefopt.lock``.

The kernel drops a ``flock`` when its process ends in any way (SIGKILL and power loss of the
process included), so a lock can never outlive its run; a lock *file* left by a dead run is stale by
construction and is taken over (with a note naming the dead process). The file holds the holder's
pid, host and command, which is what a refused second run names. Only the main process of a
multi-process run takes it (``recipes.start_output_dir`` settles the outcome on every process).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from prefopt.errors import PrefoptError

LOCK_FILE = ".prefopt.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; runs are then not protected
    fcntl = None


class RunLockedError(PrefoptError):
    """Another live process holds the output directory's lock."""


def describe_holder(info: dict) -> str:
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}: "
            f"{info.get('command', '?')}")


def _read_info(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def lock_holder(directory: str | Path) -> dict | None:
    """Who holds ``directory``'s lock now (its pid, host, command), or None. Takes nothing: a shared
    lock is tried and dropped at once, so this may run on every process of a launch."""
    path = Path(directory) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_info(path) or {"pid": "?"}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def linked_bookkeeping(path: Path) -> str:
    return (f"output_dir {path.parent}: {path.name} is a symbolic link (to {os.readlink(path)}); prefopt writes "
            "this file itself and never through a link: remove the link or choose another output_dir")


class RunLock:
    """The held lock of one run. ``acquire`` raises ``RunLockedError`` naming the holder."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        if fcntl is None:  # pragma: no cover
            return self
        try:
            # Never through a link: the file is truncated and written, which would hit the link's target.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            if self.path.is_symlink():
                raise PrefoptError(linked_bookkeeping(self.path)) from None
            raise e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = _read_info(self.path)
            raise RunLockedError(f"output_dir {self.path.parent} is in use by another prefopt run "
                                 f"({describe_holder(info)}); wait for it to finish or choose another output_dir"
                                 ) from None
        previous = _read_info(self.path)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            # The kernel released its flock, so that process is gone (or on another host, its run over).
            print(f"prefopt: note: a stale lock in {self.path.parent} from {describe_holder(previous)} was "
                  "taken over (that run is no longer running)", file=sys.stderr)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "command": shlex.join(["prefopt", *sys.argv[1:]]) if sys.argv else "python"}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        """Unlock. The file stays (deleting it would race with a process opening it to lock); its
        stale content is harmless, see the module docstring."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None
