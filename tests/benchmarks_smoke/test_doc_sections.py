"""Benchmarks share docs/benchmarks.md: a section is replaced where it stands, a new one goes
before bench_data.py's mark, and that mark (bench_data.py rewrites everything after it) survives."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.doc_sections import DATA_MARK, put_section  # noqa: E402

MARK = DATA_MARK + " is written by benchmarks/bench_data.py -->"
DOC = f"# Benchmarks\n\n## A\n\nold a\n\n## B\n\nold b\n\n{MARK}\n\n## Data\n\nrows\n"


def test_a_section_is_replaced_where_it_stands_and_the_mark_survives(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text(DOC)
    put_section(doc, "## B", "## B\n\nnew b\n")  # the last section before the mark
    put_section(doc, "## A", "## A\n\nnew a\n")
    assert doc.read_text() == f"# Benchmarks\n\n## A\n\nnew a\n\n## B\n\nnew b\n\n{MARK}\n\n## Data\n\nrows\n"


def test_a_new_section_goes_before_the_mark_or_at_the_end(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text(DOC)
    put_section(doc, "## C", "## C\n\nc\n")
    assert doc.read_text() == DOC.replace(f"{MARK}", f"## C\n\nc\n\n{MARK}")
    fresh = tmp_path / "new.md"
    put_section(fresh, "## C", "## C\n\nc\n")
    assert fresh.read_text() == "## C\n\nc\n"
