"""The fingerprint of tokenized data: one hash over every pair's token ids, lengths, scores and
index, in order. Two lists of pairs have the same fingerprint exactly when training would see the
same thing, whatever file, format or tokenizer produced them.

``pairs_fingerprint`` is used, without the scores, by the reference log-prob cache for pairs in
memory (the reference's log-probs do not depend on them). Checkpoints (a resumed run must train on
the data it started with) record ``data_fingerprint``: the same content hashed column by column,
which the tokenized-pair store computes while it is built, so recording and checking it costs
nothing however many pairs there are.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections.abc import Iterable

FINGERPRINT_VERSION = 1
_NO_SCORE = struct.pack("<?d", False, 0.0)


def pairs_fingerprint(pairs: Iterable, *, scores: bool = True) -> str:
    """Hex SHA-256 over ``pairs`` (``TokenizedPair``-like: ``prompt_ids``, ``chosen_ids``,
    ``rejected_ids``, ``score_chosen``, ``score_rejected``, ``index``) in order. ``scores=False``
    leaves the scores out."""
    h = hashlib.sha256(f"pairs-v{FINGERPRINT_VERSION}:{int(scores)}".encode())
    count = 0
    for p in pairs:
        for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids):
            h.update(len(ids).to_bytes(4, "little"))
            h.update(array("q", ids).tobytes())
        if scores:
            for s in (p.score_chosen, p.score_rejected):
                h.update(_NO_SCORE if s is None else struct.pack("<?d", True, float(s)))
        h.update(int(p.index).to_bytes(8, "little", signed=True))
        count += 1
    h.update(count.to_bytes(8, "little"))
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# The columns fingerprint: computed while a store is written, so a run never reads its pairs again.

COLUMNS_PREFIX = "columns-v1:"
_ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


class ColumnsFingerprint:
    """xxh3-128 over the same content as ``pairs_fingerprint`` (every pair's token ids, lengths,
    scores and index, in order), fed a chunk of columns at a time (``store.encode_pairs``' arrays).
    Each column is hashed as one stream, so how the pairs were split into chunks (chunk size,
    worker count, dropped rows) does not change it: a store's build computes it at no extra pass,
    and a list of pairs gives the same value (``columns_fingerprint``)."""

    def __init__(self):
        import xxhash

        self._h = {name: xxhash.xxh3_128() for name in
                   (*_ID_COLUMNS, *(f"{c}_lengths" for c in _ID_COLUMNS), "score_chosen", "score_rejected", "index")}
        self.count = 0

    def update(self, encoded: dict) -> None:
        import numpy as np

        for name in _ID_COLUMNS:
            self._h[name].update(np.ascontiguousarray(encoded[name], dtype="<i4").tobytes())
            self._h[f"{name}_lengths"].update(np.ascontiguousarray(encoded[f"{name}_lengths"], dtype="<i8").tobytes())
        for name in ("score_chosen", "score_rejected"):
            values = np.asarray(encoded[name], dtype="<f8")
            self._h[name].update(np.where(np.isnan(values), np.nan, values).tobytes())  # one NaN: "no score"
        self._h["index"].update(np.ascontiguousarray(encoded["index"], dtype="<i8").tobytes())
        self.count += len(encoded["index"])

    def hexdigest(self) -> str:
        parts = [f"{name}={h.hexdigest()}" for name, h in self._h.items()]
        return hashlib.sha256(f"{COLUMNS_PREFIX}{self.count}:{','.join(parts)}".encode()).hexdigest()


def columns_fingerprint(pairs: Iterable, chunk: int = 4096) -> str:
    """``ColumnsFingerprint`` of pairs held in memory (one pass over them)."""
    from prefopt.data.store import encode_pairs

    fp, batch = ColumnsFingerprint(), []
    for p in pairs:
        batch.append(p)
        if len(batch) == chunk:
            fp.update(encode_pairs(batch))
            batch = []
    if batch:
        fp.update(encode_pairs(batch))
    return fp.hexdigest()


def data_fingerprint(pairs) -> str:
    """What a checkpoint records about its training data: ``columns-v1:`` and the columns
    fingerprint, which a ``PairStore`` knows from its build (free at a million pairs) and a list of
    pairs is hashed for."""
    known = getattr(pairs, "content_fingerprint", None)
    return COLUMNS_PREFIX + (known or columns_fingerprint(pairs))


def same_data(saved: str, pairs) -> bool:
    """Whether ``pairs`` are the data a checkpoint recorded as ``saved``: a columns fingerprint is
    compared as such; an older checkpoint's ``pairs_fingerprint`` (no prefix) is recomputed over the
    pairs, the one case that still reads them all."""
    if saved.startswith(COLUMNS_PREFIX):
        return saved == data_fingerprint(pairs)
    return saved == pairs_fingerprint(pairs)
