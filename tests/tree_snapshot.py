"""Hash a directory tree, to check that a failed command left every file as it was.

``snapshot(path)``: ``{relative path: sha256}`` of every regular file under one directory.
``tree_state(*roots)``: every file (by content hash) and symbolic link (by its target, never
followed) under several roots, keyed by absolute path; ``assert_unchanged(before, *roots)`` checks
that each of them is still there and identical (new files may appear, e.g. a lock file).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def snapshot(path: str | Path) -> dict[str, str]:
    """``{relative path: sha256 of the bytes}`` for every regular file under ``path``."""
    root = Path(path)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }




def tree_state(*roots: str | Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for root in map(Path, roots):
        if root.is_symlink() or root.is_file():
            out[str(root)] = _fingerprint(root)
            continue
        for dirpath, dirnames, filenames in os.walk(root):  # os.walk does not follow links by default
            for name in sorted(dirnames + filenames):
                path = Path(dirpath) / name
                if path.is_symlink() or path.is_file():
                    out[str(path)] = _fingerprint(path)
    return out


def _fingerprint(path: Path) -> str:
    if path.is_symlink():
        return "link:" + os.readlink(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_unchanged(before: dict[str, str], *roots: str | Path) -> None:
    after = tree_state(*roots)
    missing = sorted(set(before) - set(after))
    changed = sorted(p for p in before if p in after and after[p] != before[p])
    assert not missing and not changed, f"missing: {missing[:5]}, changed: {changed[:5]}"
