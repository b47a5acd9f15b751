"""Read rows from wherever the user keeps them, remembering each row's position for error messages.

JSONL and CSV rows are numbered by their line in the file (what an editor shows); JSON, Parquet
and ``datasets`` rows by their 1-based position.
"""

from __future__ import annotations

import csv
import json
import math
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefopt.errors import DataError, PrefoptError


@dataclass
class RawRows:
    source: str  # the path or dataset id, as the user wrote it
    row_label: str  # "line" or "row"
    rows: list[tuple[int, dict[str, Any]]]  # (row number, row)
    # CSV/TSV: every cell is text; a format decodes JSON lists only in the columns it defines as lists.
    cells_are_text: bool = False

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


IN_MEMORY = "<in-memory dataset>"
TOO_DEEP = "malformed JSON (nested too deeply)"


def read_rows(spec, split: str = "train") -> RawRows:
    """The rows of a dataset: a file, a ``save_to_disk`` directory, a hub id, or rows already in
    memory (a list of dicts, a ``datasets.Dataset`` or ``DatasetDict``), numbered from 1."""
    if not isinstance(spec, str | Path):
        return _read_in_memory(spec, split)
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        return _read_saved_dataset(spec, path, split)
    if path.is_file():
        suffix = "".join(path.suffixes[-1:]).lower()
        reader = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
                  ".tsv": _read_csv, ".parquet": _read_parquet}.get(suffix)
        if reader is None:
            raise PrefoptError(
                f"{spec}: unsupported file type {suffix or '(none)'}; use .jsonl, .json, .parquet or .csv"
            )
        return reader(spec, path)
    if path.exists():  # neither a file nor a directory: a FIFO, a device, a socket
        raise PrefoptError(f"{spec}: not a regular file ({_file_kind(path)}); give a data file or a dataset directory")
    if path.suffix or spec.startswith((".", "/", "~")):
        raise PrefoptError(f"dataset not found: {spec}")
    return _read_hub_dataset(spec, split)  # a hub id such as "org/name" (needs network)


def _file_kind(path: Path) -> str:
    mode = path.stat().st_mode
    for test, name in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _decode_lines(spec: str, path: Path) -> Iterator[tuple[int, str]]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(spec, lineno, None, f"not valid UTF-8 (byte {e.start})", "line") from None


def _read_jsonl(spec: str, path: Path) -> RawRows:
    return RawRows(spec, "line", list(_iter_jsonl(spec, path)))


def _iter_jsonl(spec: str, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for lineno, line in _decode_lines(spec, path):
        if lineno == 1:
            line = line.lstrip("\ufeff")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(spec, lineno, None, f"malformed JSON ({e.msg} at column {e.colno})", "line") from None
        except RecursionError:
            raise DataError(spec, lineno, None, TOO_DEEP, "line") from None
        if not isinstance(obj, dict):
            raise DataError(spec, lineno, None, f"expected a JSON object, got {type(obj).__name__}", "line")
        yield lineno, obj


def _read_json(spec: str, path: Path) -> RawRows:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(spec, None, None, f"not valid UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(spec, e.lineno, None, f"malformed JSON ({e.msg} at column {e.colno})", "line") from None
    except RecursionError:
        raise DataError(spec, None, None, TOO_DEEP) from None
    if isinstance(obj, dict):
        if isinstance(obj.get("data"), list):
            obj = obj["data"]
        elif obj and all(isinstance(v, dict) and "responses" in v for v in obj.values()):
            # {prompt: {"responses": [...], "rewards"|"scores": [...]}}: the TL;DR file's shape.
            obj = [{"prompt": k, **v} for k, v in obj.items()]
        else:
            raise DataError(spec, None, None, "expected a list of objects (or {'data': [...]})")
    if not isinstance(obj, list):
        raise DataError(spec, None, None, f"expected a list of objects, got {type(obj).__name__}")
    rows = []
    for i, item in enumerate(obj, start=1):
        if not isinstance(item, dict):
            raise DataError(spec, i, None, f"expected a JSON object, got {type(item).__name__}")
        rows.append((i, item))
    return RawRows(spec, "row", rows)


def _read_csv(spec: str, path: Path) -> RawRows:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(spec, line, None, f"not valid UTF-8 (byte {e.start})", "line") from None
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
    rows = []
    try:
        start = 2
        for row in reader:
            end = reader.line_num
            if None in row:
                raise DataError(spec, start, None, "more values than header columns", "line")
            missing = [k for k, v in row.items() if v is None]
            if missing:
                raise DataError(spec, start, missing[0], "row has fewer values than the header", "line")
            rows.append((start, dict(row)))
            start = end + 1
    except csv.Error as e:
        raise DataError(spec, reader.line_num, None, f"malformed CSV ({e})", "line") from None
    return RawRows(spec, "line", rows, cells_are_text=True)


def decode_list_cells(raw: RawRows, columns) -> RawRows:
    """CSV/TSV rows with the cells of ``columns`` (the ones a format defines as lists, e.g. the rated
    format's ``responses``/``scores``) decoded from JSON lists; every other cell stays text, so a
    response that reads "[1, 2, 3]" is that string. Other sources are returned as they are."""
    if not raw.cells_are_text:
        return raw
    wanted = set(columns)
    rows = [(n, {k: _json_list(v) if k in wanted else v for k, v in row.items()}) for n, row in raw.rows]
    return RawRows(raw.source, raw.row_label, rows, cells_are_text=True)


def _json_list(value: Any) -> Any:
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            decoded = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return value  # the format's own check names the row and field
        return decoded if isinstance(decoded, list) else value
    return value


def _iter_parquet(spec: str, path: Path, batch_rows: int) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=batch_rows)
        i = 0
        for batch in batches:
            for r in batch.to_pylist():
                i += 1
                yield i, _plain(r)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(spec, None, None, f"cannot read Parquet: {e}") from None


def _read_parquet(spec: str, path: Path) -> RawRows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(spec, None, None, f"cannot read Parquet: {e}") from None
    return RawRows(spec, "row", [(i, _plain(r)) for i, r in enumerate(table.to_pylist(), start=1)])


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if not (isinstance(v, float) and math.isnan(v)) else float("nan")) for k, v in row.items()}


def _datasets():
    import datasets  # heavy to import (pyarrow, fsspec): only when a dataset object or directory is read

    return datasets


def _read_in_memory(data, split: str) -> RawRows:
    datasets = _datasets()

    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise PrefoptError(f"{IN_MEMORY}: no split {split!r}; it has {', '.join(data.keys())}")
        data = data[split]
    if isinstance(data, datasets.Dataset):
        return RawRows(IN_MEMORY, "row", [(i, dict(r)) for i, r in enumerate(data, start=1)])
    if isinstance(data, list | tuple):
        rows = []
        for i, row in enumerate(data, start=1):
            if not isinstance(row, dict):
                raise DataError(IN_MEMORY, i, None, f"expected a dict of columns, got {type(row).__name__}")
            rows.append((i, dict(row)))
        return RawRows(IN_MEMORY, "row", rows)
    raise PrefoptError(f"cannot read a dataset from a {type(data).__name__}: give a path, a list of dicts "
                       "or a datasets.Dataset")


def _read_saved_dataset(spec: str, path: Path, split: str) -> RawRows:
    datasets = _datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise PrefoptError(f"{spec}: not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise PrefoptError(f"{spec}: no split {split!r}; it has {', '.join(ds.keys())}")
        ds = ds[split]
    return RawRows(spec, "row", [(i, dict(r)) for i, r in enumerate(ds, start=1)])


def _read_hub_dataset(spec: str, split: str) -> RawRows:
    datasets = _datasets()

    try:
        ds = datasets.load_dataset(spec, split=split)
    except Exception as e:
        raise PrefoptError(f"dataset not found or not loadable: {spec} ({type(e).__name__}: {e})") from None
    return RawRows(spec, "row", [(i, dict(r)) for i, r in enumerate(ds, start=1)])


def iter_row_chunks(spec, split: str = "train", chunk_rows: int = 1000) -> Iterator[RawRows]:
    """``read_rows`` in pieces of at most ``chunk_rows`` rows, with the same row numbers and errors.
    JSONL and Parquet files are streamed (memory does not grow with the file); the other sources
    are read whole first (a JSON document or CSV file is parsed at once anyway)."""
    rows: Iterator[tuple[int, dict[str, Any]]]
    path = Path(spec) if isinstance(spec, str | Path) else None
    suffix = "".join(path.suffixes[-1:]).lower() if path is not None and path.is_file() else ""
    if suffix in (".jsonl", ".ndjson"):
        source, label, rows = str(spec), "line", _iter_jsonl(str(spec), path)
    elif suffix == ".parquet":
        source, label, rows = str(spec), "row", _iter_parquet(str(spec), path, chunk_rows)
    else:
        raw = read_rows(spec, split)
        source, label, rows = raw.source, raw.row_label, iter(raw.rows)
    chunk: list[tuple[int, dict[str, Any]]] = []
    for item in rows:
        chunk.append(item)
        if len(chunk) >= chunk_rows:
            yield RawRows(source, label, chunk)
            chunk = []
    if chunk:
        yield RawRows(source, label, chunk)
