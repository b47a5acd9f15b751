"""The fingerprint of tokenized data: one hash over every pair's token ids, lengths, scores and
index, in order. Two lists of pairs have the same fingerprint exactly when training would see the
same thing, whatever file, format or tokenizer produced them.

Used by checkpoints (a resumed run must train on the data it started with) and, without the scores,
by the reference log-prob cache (the reference's log-probs do not depend on them).
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
