"""Where a benchmark's section goes in docs/benchmarks.md.

bench_data.py owns everything after its mark (it rewrites the file's end), so every other
benchmark's section is replaced where it stands, or put just before that mark when new.
"""

from __future__ import annotations

import sys
from pathlib import Path

DATA_MARK = "<!-- bench_data.py: everything below"


def put_section(path: Path, heading: str, report: str) -> None:
    """Write ``report`` (starting with ``heading``) into ``path``, replacing an older section of that heading."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if heading in text:
        before, _, rest = text.partition(heading)
        ends = [i + 1 for i in (rest.find("\n## "), rest.find("\n" + DATA_MARK)) if i >= 0]
        after = rest[min(ends):] if ends else ""
    elif DATA_MARK in text:
        before, after = text[: text.index(DATA_MARK)], text[text.index(DATA_MARK):]
    else:
        before, after = text, ""
    head = before.rstrip("\n") + "\n\n" if before.strip() else ""
    text = head + report.rstrip("\n") + "\n" + ("\n" + after if after else "")
    path.write_text(text, encoding="utf-8")


def publish(report: str, heading: str, path: Path, write: bool = True) -> None:
    """Print a benchmark's report and, unless ``write`` is false, put it into ``path`` as its section."""
    print(report)
    if write:
        put_section(path, heading, report)
        print(f"wrote {path}", file=sys.stderr)
