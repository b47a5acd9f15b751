"""Hash a directory tree, to check that a failed command left every file as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path


def snapshot(path: str | Path) -> dict[str, str]:
    """``{relative path: sha256 of the bytes}`` for every regular file under ``path``."""
    root = Path(path)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
