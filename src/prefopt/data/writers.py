"""Writing rows back to a table file, in the format its extension names (the inverse of
``sources.py``): .jsonl/.ndjson, .json, .csv, .parquet. Every writer is atomic (``prefopt.io``)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from prefopt.errors import ConfigError
from prefopt.io import atomic_path, write_text_atomic

Writer = Callable[[Path, list[dict]], None]



def writer_for(path: Path) -> Writer:
    """The writer for ``path``'s extension; ``ConfigError`` for an unsupported one (before any work)."""
    suffix = path.suffix.lower()
    writers = {".jsonl": _write_jsonl, ".ndjson": _write_jsonl, ".json": _write_json, ".csv": _write_csv,
               ".parquet": _write_parquet}
    if suffix not in writers:
        raise ConfigError(f"--output {path}: unsupported file type {suffix or '(none)'}; "
                          "use .jsonl, .json, .parquet or .csv")
    return writers[suffix]


def _json_default(value):
    if hasattr(value, "item"):  # numpy scalars from Parquet or datasets
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in rows)
    write_text_atomic(path, text)


def _write_json(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, json.dumps(rows, ensure_ascii=False, indent=1, default=_json_default) + "\n")


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for r in rows:
        columns.extend(k for k in r if k not in columns)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:  # lists (rated responses/scores) as JSON, which the CSV reader decodes
        w.writerow({k: json.dumps(v, ensure_ascii=False, default=_json_default) if isinstance(v, list | dict) else v
                    for k, v in r.items()})
    write_text_atomic(path, buf.getvalue())


def _write_parquet(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
