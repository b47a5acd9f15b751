"""The tokenized data's fingerprint and the file checksums, against hashes computed by hand."""

from __future__ import annotations

import hashlib
import struct

from prefopt.data.fingerprint import (
    COLUMNS_PREFIX,
    ColumnsFingerprint,
    columns_fingerprint,
    data_fingerprint,
    pairs_fingerprint,
    same_data,
)
from prefopt.data.store import encode_pairs
from prefopt.data.tokenize import TokenizedPair
from prefopt.digest import CHUNK, bytes_digest, file_digest


def tp(prompt, chosen, rejected, sw=None, sl=None, index=0):
    return TokenizedPair(list(prompt), list(chosen), list(rejected), sw, sl, index)


def by_hand(pairs, scores=True) -> str:
    """The documented byte layout, written out independently."""
    h = hashlib.sha256(f"pairs-v1:{int(scores)}".encode())
    for p in pairs:
        for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids):
            h.update(struct.pack("<I", len(ids)) + b"".join(struct.pack("<q", i) for i in ids))
        if scores:
            for s in (p.score_chosen, p.score_rejected):
                h.update(struct.pack("<?d", s is not None, 0.0 if s is None else s))
        h.update(struct.pack("<q", p.index))
    h.update(struct.pack("<Q", len(pairs)))
    return h.hexdigest()


def test_fingerprint_matches_the_byte_layout_computed_by_hand():
    pairs = [tp([2, 5, 6], [7, 3], [9, 3], 0.9, 0.1, 0), tp([2, 8], [40000, 3], [1, 3], None, None, 1)]
    assert pairs_fingerprint(pairs) == by_hand(pairs)
    assert pairs_fingerprint(pairs, scores=False) == by_hand(pairs, scores=False)


def test_fingerprint_sees_every_change_training_would_see():
    base = [tp([2, 5], [7, 3], [9, 3], 0.9, 0.1, 0), tp([2, 8], [6, 3], [4, 3], 0.5, 0.2, 1)]
    fp = pairs_fingerprint(base)
    for what, pairs in variants_of(base).items():
        assert pairs_fingerprint(pairs) != fp, what
    # The reference cache leaves scores out: its key must not change with them.
    assert pairs_fingerprint(variants_of(base)["a score"], scores=False) == pairs_fingerprint(base, scores=False)
    assert pairs_fingerprint([tp(*(list(x) for x in ([2, 5], [7, 3], [9, 3])), 0.9, 0.1, 0), base[1]]) == fp


def variants_of(base):
    return {
        "a token": [tp([2, 5], [7, 3], [9, 3], 0.9, 0.1, 0), tp([2, 8], [6, 3], [5, 3], 0.5, 0.2, 1)],
        "a token moved from prompt to response": [tp([2], [5, 7, 3], [9, 3], 0.9, 0.1, 0), base[1]],
        "a score": [tp([2, 5], [7, 3], [9, 3], 0.9, 0.2, 0), base[1]],
        "a score dropped": [tp([2, 5], [7, 3], [9, 3], None, None, 0), base[1]],
        "the order": [base[1], base[0]],
        "a pair fewer": base[:1],
        "the pair index": [base[0], tp([2, 8], [6, 3], [4, 3], 0.5, 0.2, 2)],
        "a score of 0 for none": [tp([2, 5], [7, 3], [9, 3], 0.0, 0.0, 0), base[1]],
    }


def test_columns_fingerprint_sees_every_change_and_not_how_the_pairs_were_chunked():
    base = [tp([2, 5], [7, 3], [9, 3], 0.9, 0.1, 0), tp([2, 8], [6, 3], [4, 3], 0.5, 0.2, 1),
            tp([1], [6, 6, 3], [3], None, None, 2)]
    fp = columns_fingerprint(base)
    for chunk in (1, 2, 3):  # a store's build feeds it one chunk of columns at a time
        assert columns_fingerprint(base, chunk=chunk) == fp
    by_parts = ColumnsFingerprint()
    by_parts.update(encode_pairs(base[:1]))
    by_parts.update(encode_pairs(base[1:]))
    assert by_parts.hexdigest() == fp and by_parts.count == 3
    for what, pairs in variants_of(base[:2]).items():
        assert columns_fingerprint([*pairs, base[2]]) != fp, what
    assert columns_fingerprint(base[:2]) != fp  # a pair fewer at the end
    assert data_fingerprint(base) == COLUMNS_PREFIX + fp


def test_same_data_reads_both_kinds_of_recorded_fingerprint():
    base = [tp([2, 5], [7, 3], [9, 3], 0.9, 0.1, 0), tp([2, 8], [6, 3], [4, 3], 0.5, 0.2, 1)]
    other = variants_of(base)["a token"]
    assert same_data(data_fingerprint(base), base) and not same_data(data_fingerprint(base), other)
    # A checkpoint written before the columns fingerprint recorded pairs_fingerprint: still honoured.
    assert same_data(pairs_fingerprint(base), base) and not same_data(pairs_fingerprint(base), other)


def test_file_digest_is_the_sha256_of_the_bytes_across_chunks(tmp_path):
    f = tmp_path / "w.bin"
    data = bytes(range(256)) * ((2 * CHUNK + 1000) // 256)  # more than two read chunks
    f.write_bytes(data)
    assert file_digest(f) == hashlib.sha256(data).hexdigest()
    # Length-prefixed parts: moving a byte across a boundary changes the digest.
    assert bytes_digest([b"ab", b"c"]) != bytes_digest([b"a", b"bc"])
    assert bytes_digest([b"ab"]) == hashlib.sha256(struct.pack("<Q", 2) + b"ab").hexdigest()
