"""Hash a directory tree before and after a command, to show that nothing that existed was changed.

Shared by the run-safety and bad-input end-to-end tests: ``snapshot(root)`` maps every file (by
content hash) and symbolic link (by its target, never followed) under ``root`` to a fingerprint;
``assert_unchanged(before, root)`` checks that each of them is still there and identical (new files
may appear, e.g. a lock file).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def snapshot(*roots: str | Path) -> dict[str, str]:
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
    after = snapshot(*roots)
    missing = sorted(set(before) - set(after))
    changed = sorted(p for p in before if p in after and after[p] != before[p])
    assert not missing and not changed, f"missing: {missing[:5]}, changed: {changed[:5]}"
