"""Tokenized pairs on disk: built once, memory-mapped by every process and every later run.

A store is one directory ``<data_cache_dir>/<key>/`` holding

- ``pairs.arrow``: an Arrow IPC stream (the format ``datasets`` writes, so
  ``datasets.Dataset.from_file`` reads it too) with one row per kept pair: ``prompt_ids``,
  ``chosen_ids``, ``rejected_ids`` (int32 lists, exactly ``TokenizedPair``'s), ``score_chosen``,
  ``score_rejected`` (float64, null without scores), ``index`` (the pair's position in input
  order, as ``tokenize_pairs`` numbers it) and ``row`` (the file's line or row the pair came from);
- ``lengths.i32``: every pair's prompt, chosen and rejected token counts (three int32 per pair, in
  pair order), what length statistics and batch planning read, so they never page in the pairs
  file;
- ``manifest.json``, written last: the key's parts, the pair count, both files' sizes and checksums
  and the data summary (printed again on every hit).

The key hashes the data file's bytes, the tokenizer (its whole serialized vocabulary, merges and
normalizers, special tokens, chat template) and every setting that changes the pairs, so a run
with the same inputs opens the store in seconds and any change builds another one. A store is
built in a temporary directory beside its final name and renamed into place under a file lock:
one process builds while the others wait, then they all map the same file. A directory under the
final name that fails its checks (missing manifest, wrong size, checksum or pair count) is
rebuilt. ``PairStore`` reads the mapped columns lazily, so a process holds the batches it works
on, not the dataset.

Why the file has few, large record batches and a separate lengths file: a page of a memory-mapped
file counts in a process's RSS once touched, and the kernel maps the pages around every touched one
too (fault-around, read-around). Opening a stream touches each batch's header, and reading a small
column (offsets, scores) touches one spot per batch, so with a batch per 1,000 pairs a cache hit on
1M pairs mapped ~270 MiB for 12 MiB of lengths. Batches of ``BATCH_PAIRS`` pairs, lengths read
from their own small file with plain reads, and per-pair columns read only where a pair is asked
for keep what a hit maps to the headers of a few hundred batches.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash

from prefopt.data.tokenize import TokenizedPair, adds_bos
from prefopt.errors import PrefoptError

STORE_VERSION = 2  # 2: large record batches and the lengths file
PAIRS_FILE = "pairs.arrow"
LENGTHS_FILE = "lengths.i32"
BATCH_PAIRS = 4096  # pairs per record batch (the last one fewer): see the module docstring
MANIFEST = "manifest.json"
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
PER_PAIR_COLUMNS = ("score_chosen", "score_rejected", "index", "row")
SCHEMA = pa.schema([
    *((name, pa.list_(pa.int32())) for name in ID_COLUMNS),
    ("score_chosen", pa.float64()),
    ("score_rejected", pa.float64()),
    ("index", pa.int64()),
    ("row", pa.int64()),
])


def default_data_cache_dir() -> Path:
    """``$PREFOPT_CACHE_DIR/data``, else ``$XDG_CACHE_HOME/prefopt/data``, else
    ``~/.cache/prefopt/data`` (beside the reference log-prob cache)."""
    if os.environ.get("PREFOPT_CACHE_DIR"):
        return Path(os.environ["PREFOPT_CACHE_DIR"]) / "data"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prefopt" / "data"


def cache_root(cfg) -> Path:
    return Path(cfg.data_cache_dir).expanduser() if cfg.data_cache_dir else default_data_cache_dir()


# ------------------------------------------------------------------------------------------------
# Key parts


def _hash_file(h, path: Path) -> None:
    with path.open("rb") as fh:
        while block := fh.read(1 << 24):
            h.update(block)


# Files at least this large have their digest remembered by (path, size, mtime, inode), so a cache
# hit on a multi-GB file does not read it again. Any write changes the mtime, and writing this much
# takes far longer than the filesystem's timestamp granularity, so a rewritten file is never
# mistaken for the old one; smaller files are cheap to hash every time.
REMEMBER_BYTES = 64 << 20


def _file_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def file_digest(path: Path, memo_dir: Path | None = None) -> str:
    """xxh3-128 of a file's bytes; remembered under ``memo_dir`` for large files."""
    memo = None
    if memo_dir is not None and path.stat().st_size >= REMEMBER_BYTES:
        ident = _file_identity(path)
        memo = memo_dir / f"{xxhash.xxh3_64_hexdigest(ident.encode())}.json"
        try:
            record = json.loads(memo.read_text())
            if record["identity"] == ident:
                return record["digest"]
        except (OSError, ValueError, KeyError):
            pass
    h = xxhash.xxh3_128()
    _hash_file(h, path)
    digest = h.hexdigest()
    if memo is not None:
        try:
            memo_dir.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"identity": ident, "digest": digest}))
            os.replace(tmp, memo)
        except OSError:
            pass  # a read-only cache only costs the next run a re-hash
    return digest


def source_fingerprint(spec, split: str, memo_dir: Path | None = None) -> dict[str, Any] | None:
    """What identifies a dataset's content: a hash of a file's bytes (and its suffix, which picks
    the reader), or of every file of a ``save_to_disk`` directory and the split. ``None`` for rows
    in memory and hub ids, which are then not cached (a temporary store serves the run)."""
    if not isinstance(spec, str | Path):
        return None
    path = Path(spec)
    if path.is_file():
        return {"file": file_digest(path, memo_dir), "suffix": path.suffix.lower()}
    if path.is_dir():
        h = xxhash.xxh3_128()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(file.relative_to(path)).encode() + b"\0" + file_digest(file, memo_dir).encode())
        return {"directory": h.hexdigest(), "split": split}
    return None


def tokenizer_fingerprint(tokenizer) -> str:
    """Everything of a tokenizer that can change token ids: the serialized fast tokenizer (vocab,
    merges, normalizer, pre-tokenizer, added tokens) or a slow one's vocabulary, its special tokens,
    chat template and whether it adds BOS itself."""
    h = xxhash.xxh3_128(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "special": getattr(tokenizer, "special_tokens_map", None),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "adds_bos": adds_bos(tokenizer),
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def store_key(parts: dict[str, Any]) -> str:
    return xxhash.xxh3_128(json.dumps({"version": STORE_VERSION, **parts}, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Reading


class PairStore(Sequence):
    """The tokenized pairs of one dataset, read from a memory-mapped Arrow file: ``len``,
    ``store[i]`` (a ``TokenizedPair``), slices (lists) and iteration, like the list it replaces.
    Token ids stay in the mapped file until a batch asks for them; ``lengths()`` gives the token
    counts as arrays without building a single pair."""

    def __init__(self, table: pa.Table, *, source: str, row_label: str = "row", fingerprint: str | None = None,
                 path: Path | None = None, index_offset: int = 0, content: str | None = None):
        self.table, self.source, self.row_label = table, source, row_label
        self.fingerprint, self.path, self.index_offset = fingerprint, path, index_offset
        self._content = content
        self._chunks = []  # per record batch: {column: (offsets, values)}, views into the map
        self._per_pair = []  # per record batch: (score_chosen, score_rejected, index, row) arrays, ditto
        starts = [0]
        for batch in table.to_batches():
            self._chunks.append({name: (_numpy(batch.column(name).offsets), _numpy(batch.column(name).values))
                                 for name in ID_COLUMNS})
            # Views only: a page of these is touched when a pair on it is asked for, not at open.
            self._per_pair.append(tuple(batch.column(name) for name in PER_PAIR_COLUMNS))
            starts.append(starts[-1] + batch.num_rows)
        self._starts = np.asarray(starts, dtype=np.int64)

    @classmethod
    def open(cls, path: Path, *, source: str, row_label: str = "row", fingerprint: str | None = None,
             content: str | None = None) -> PairStore:
        # Zero-copy: the table's buffers point into the map, which stays open as long as they live.
        table = pa.ipc.open_stream(pa.memory_map(str(path / PAIRS_FILE), "r")).read_all()
        return cls(table, source=source, row_label=row_label, fingerprint=fingerprint, path=path, content=content)

    @property
    def content_fingerprint(self) -> str | None:
        """The pairs' ``ColumnsFingerprint`` (``data.fingerprint``), computed when the store was
        built and kept in its manifest; ``None`` when unknown (a store built before it was
        recorded) or when the indices are shifted (``with_index_offset``): then it is computed."""
        return self._content if self.index_offset == 0 else None

    def with_index_offset(self, offset: int) -> PairStore:
        """The same pairs, their ``index`` shifted by ``offset`` (eval pairs next to training
        pairs in one reference table), without copying the data."""
        return PairStore(self.table, source=self.source, row_label=self.row_label,
                         fingerprint=None if self.fingerprint is None else f"{self.fingerprint}+{offset}",
                         path=self.path, index_offset=self.index_offset + offset)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _pair(self, i: int) -> TokenizedPair:
        c = int(np.searchsorted(self._starts, i, side="right")) - 1
        j = i - int(self._starts[c])
        ids = []
        for name in ID_COLUMNS:
            offsets, values = self._chunks[c][name]
            ids.append(values[offsets[j]:offsets[j + 1]].tolist())
        sc, sr, index, row = (column[j].as_py() for column in self._per_pair[c])
        return TokenizedPair(ids[0], ids[1], ids[2], sc, sr, index + self.index_offset, row)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._pair(j) for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"pair {i} out of range ({len(self)} pairs)")
        return self._pair(i)

    def __iter__(self) -> Iterator[TokenizedPair]:
        for i in range(len(self)):
            yield self._pair(i)

    def lengths(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Token counts of every pair's prompt, chosen and rejected response, read from the
        lengths file with plain reads: no page of the pairs file is touched."""
        table = np.fromfile(self.path / LENGTHS_FILE, dtype=np.int32).reshape(-1, len(ID_COLUMNS))
        return table[:, 0], table[:, 1], table[:, 2]

    def _column(self, name: str, dtype) -> np.ndarray:
        """One of ``PER_PAIR_COLUMNS`` for every pair, gathered from the record batches."""
        k = PER_PAIR_COLUMNS.index(name)
        parts = [_numpy(columns[k]) for columns in self._per_pair]
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)

    def indices(self) -> np.ndarray:
        """Every pair's ``index``."""
        return self._column("index", np.int64) + self.index_offset

    def scores(self) -> tuple[np.ndarray, np.ndarray]:
        """``score_chosen`` and ``score_rejected`` of every pair (NaN where a pair has none)."""
        return self._column("score_chosen", np.float64), self._column("score_rejected", np.float64)


# ------------------------------------------------------------------------------------------------
# Writing


def _numpy(arr: pa.Array) -> np.ndarray:
    """A primitive Arrow array as numpy over the same memory, nulls as NaN (float columns).
    ``Array.to_numpy`` would import pandas: over a second on every cache hit."""
    dtype = np.dtype(arr.type.to_pandas_dtype())
    validity, data = arr.buffers()[:2]
    out = np.frombuffer(data, dtype=dtype, count=len(arr) + arr.offset)[arr.offset:] if len(arr) else np.zeros(0, dtype)
    if arr.null_count:
        bits = np.unpackbits(np.frombuffer(validity, dtype=np.uint8), bitorder="little")
        out = np.where(bits[arr.offset:arr.offset + len(arr)].astype(bool), out, np.nan)
    return out


def _arrow(values: np.ndarray, type_: pa.DataType, valid: np.ndarray | None = None) -> pa.Array:
    """A contiguous numpy array as an Arrow array over the same memory (``pa.array`` on numpy
    would import pandas: over a second and 50 MB in every process that builds a store)."""
    values = np.ascontiguousarray(values)
    mask = None if valid is None else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(type_, len(values), [mask, pa.py_buffer(values)],
                                 null_count=-1 if valid is None else int(len(valid) - valid.sum()))


def record_batch(encoded: dict[str, np.ndarray]) -> pa.RecordBatch:
    """An Arrow batch from ``encode_pairs``' arrays."""
    arrays = []
    for name in ID_COLUMNS:
        lengths = encoded[f"{name}_lengths"]
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        arrays.append(pa.ListArray.from_arrays(_arrow(offsets, pa.int32()),
                                               _arrow(encoded[name].astype(np.int32, copy=False), pa.int32())))
    for name in ("score_chosen", "score_rejected"):
        values = encoded[name].astype(np.float64, copy=False)
        valid = ~np.isnan(values)  # NaN marks "no score": null in the file
        arrays.append(_arrow(np.where(valid, values, 0.0), pa.float64(), None if valid.all() else valid))
    arrays.append(_arrow(encoded["index"].astype(np.int64, copy=False), pa.int64()))
    arrays.append(_arrow(encoded["row"].astype(np.int64, copy=False), pa.int64()))
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


def encode_pairs(pairs: list[TokenizedPair], index_offset: int = 0) -> dict[str, np.ndarray]:
    """Flat numpy arrays for a list of pairs (cheap to send from a worker process)."""
    out: dict[str, np.ndarray] = {}
    for name in ID_COLUMNS:
        lists = [getattr(p, name) for p in pairs]
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        out[f"{name}_lengths"] = lengths
        # One pass over all the ids of the chunk (a copy per pair costs a numpy call per pair).
        out[name] = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=int(lengths.sum()))
    nan = float("nan")
    out["score_chosen"] = np.array([nan if p.score_chosen is None else p.score_chosen for p in pairs], dtype=np.float64)
    out["score_rejected"] = np.array([nan if p.score_rejected is None else p.score_rejected for p in pairs],
                                     dtype=np.float64)
    out["index"] = np.fromiter((p.index + index_offset for p in pairs), dtype=np.int64, count=len(pairs))
    out["row"] = np.fromiter((p.row for p in pairs), dtype=np.int64, count=len(pairs))
    return out


def concat_encoded(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``encode_pairs``' arrays of consecutive chunks as one."""
    return parts[0] if len(parts) == 1 else {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def write_pairs(directory: Path, chunks: Iterable[dict[str, np.ndarray]], batch_pairs: int | None = None) -> int:
    """Write ``encode_pairs``' arrays, chunk after chunk, as the pairs file (record batches of at
    least ``batch_pairs`` pairs, default ``BATCH_PAIRS``, but the last) and the lengths file;
    returns the pair count."""
    batch_pairs = batch_pairs or BATCH_PAIRS
    n, pending, pending_pairs = 0, [], 0
    with (pa.OSFile(str(directory / PAIRS_FILE), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer,
          (directory / LENGTHS_FILE).open("wb") as lengths):

        def flush() -> None:
            nonlocal n, pending, pending_pairs
            encoded = concat_encoded(pending)
            pending, pending_pairs = [], 0
            writer.write_batch(record_batch(encoded))
            table = np.stack([encoded[f"{name}_lengths"] for name in ID_COLUMNS], axis=1).astype(np.int32)
            lengths.write(table.tobytes())
            n += len(table)

        for encoded in chunks:
            if len(encoded["index"]):
                pending.append(encoded)
                pending_pairs += len(encoded["index"])
                if pending_pairs >= batch_pairs:
                    flush()
        if pending:
            flush()
    return n


def _checksum(path: Path) -> str:
    h = xxhash.xxh3_64()
    _hash_file(h, path)
    return h.hexdigest()


def _finish(directory: Path, num_pairs: int, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest (the completion marker) once the pairs and lengths files are complete
    and synced."""
    pairs, lengths = directory / PAIRS_FILE, directory / LENGTHS_FILE
    for path in (pairs, lengths):
        with path.open("rb") as fh:
            os.fsync(fh.fileno())
    st = pairs.stat()
    manifest = {**manifest, "version": STORE_VERSION, "num_pairs": num_pairs, "bytes": st.st_size,
                "mtime_ns": st.st_mtime_ns, "checksum": _checksum(pairs), "lengths_checksum": _checksum(lengths),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, directory / MANIFEST)
    return manifest


def read_manifest(directory: Path, *, verify: bool = True) -> dict[str, Any] | None:
    """The manifest of a complete, intact store, else ``None`` (missing, half-written or damaged:
    the pairs file's size, checksum and pair count and the lengths file's size and checksum must
    match the manifest). The pairs file's checksum is skipped when it is large and its modification
    time is still the one recorded at the build (it has not been written since, see
    ``REMEMBER_BYTES``): a hit on a multi-GB store stays fast."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        pairs, lengths = directory / PAIRS_FILE, directory / LENGTHS_FILE
        st = pairs.stat()
        if manifest.get("version") != STORE_VERSION or st.st_size != manifest["bytes"]:
            return None
        if lengths.stat().st_size != 4 * len(ID_COLUMNS) * manifest["num_pairs"]:
            return None
        unchanged = st.st_size >= REMEMBER_BYTES and st.st_mtime_ns == manifest.get("mtime_ns")
        if verify and not unchanged and _checksum(pairs) != manifest["checksum"]:
            return None
        if verify and _checksum(lengths) != manifest["lengths_checksum"]:
            return None
        with pa.memory_map(str(pairs), "r") as fh:
            if pa.ipc.open_stream(fh).read_all().num_rows != manifest["num_pairs"]:
                return None
    except (OSError, ValueError, KeyError, pa.ArrowException):
        return None
    return manifest


# ------------------------------------------------------------------------------------------------
# Get or build


Builder = Callable[[Path], tuple[int, dict[str, Any]]]  # writes the store's files into a directory -> (pairs, manifest)


def get_or_build(root: Path, key: str, build: Builder) -> tuple[Path, dict[str, Any], bool]:
    """The store ``root/key``: opened when complete and intact, else built by ``build`` into a
    temporary directory and renamed into place. A file lock makes concurrent processes (the ranks
    of a run, or two runs) wait for one build. Returns (directory, manifest, hit)."""
    from filelock import FileLock

    final = root / key
    manifest = read_manifest(final)
    if manifest is not None:
        return final, manifest, True
    check_writable(root)
    if not os.access(root, os.W_OK):
        raise PrefoptError(f"data_cache_dir {root} is not writable and holds no store for this data and these "
                           "settings: build it where it is writable (prefopt prepare), set data_cache_dir, or "
                           "data_cache: false")
    with FileLock(str(root / f"{key}.lock")):
        manifest = read_manifest(final)  # another process may have built it while we waited
        if manifest is not None:
            return final, manifest, True
        for stale in root.glob(f".tmp-{key}-*"):  # a build killed before its rename
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # damaged or half-written by something other than this code: rebuild
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
        try:
            num_pairs, manifest = build(tmp)
            manifest = _finish(tmp, num_pairs, manifest)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, manifest, False


def build_temporary(build: Builder) -> tuple[Path, dict[str, Any]]:
    """A store that is not cached (``data_cache: false``, rows in memory): built in a temporary
    directory that is removed when the process exits (the open mapping stays valid until then)."""
    import atexit

    tmp = Path(tempfile.mkdtemp(prefix="prefopt-pairs-"))
    atexit.register(shutil.rmtree, tmp, True)
    try:
        num_pairs, manifest = build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, {**manifest, "num_pairs": num_pairs}


# ------------------------------------------------------------------------------------------------
# Listing and clearing (``prefopt cache``)


def list_stores(root: Path) -> list[dict[str, Any]]:
    out = []
    if not root.is_dir():
        return out
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "digests"):
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        manifest = None if d.name.startswith(".tmp-") else read_manifest(d, verify=False)
        entry = {"key": d.name, "path": str(d), "bytes": size, "complete": manifest is not None}
        if manifest is not None:
            entry.update(source=manifest.get("summary", {}).get("source"), pairs=manifest["num_pairs"],
                         created=manifest.get("created"))
        out.append(entry)
    return out


def clear_stores(root: Path) -> tuple[int, int]:
    """Remove every store (and leftover temporary build) under ``root``; returns (stores, bytes)."""
    n = freed = 0
    if not root.is_dir():
        return 0, 0
    for d in root.iterdir():
        if d.is_dir() and (len(d.name) == 32 or d.name.startswith(".tmp-")):
            freed += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            shutil.rmtree(d, ignore_errors=True)
            n += 1
        elif d.suffix == ".lock":
            d.unlink(missing_ok=True)
        elif d.name == "digests":  # remembered digests of large data files
            shutil.rmtree(d, ignore_errors=True)
    return n, freed


def check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrefoptError(f"data_cache_dir {root}: cannot create it ({e.strerror}); set data_cache_dir or "
                           "data_cache: false") from None
