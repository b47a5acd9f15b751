"""Noisy preference labels for ``prefopt demo``: annotators that follow the Bradley–Terry model.

The papers' full pipeline starts from *human* labels, which disagree with any fixed reward on a
share of pairs. The demo simulates such annotators from its ground-truth scorer: for two responses
with scores ``s_a`` and ``s_b`` the annotator prefers ``a`` with probability

    P(a > b) = sigmoid((s_a - s_b) / temperature)            (Bradley-Terry)

so pairs with close scores are near coin flips and pairs with far-apart scores are almost always
labelled as the scorer orders them. ``temperature -> 0`` gives the scorer's ordering exactly.
The labelled file carries no scores, only ``prompt``/``chosen``/``rejected``: it looks like human
preference data, and anything that needs scores (ODPO) must get them from a learned reward model.
"""

from __future__ import annotations

import math
import random


def bt_preference_probability(s_a: float, s_b: float, temperature: float) -> float:
    """``sigmoid((s_a - s_b) / temperature)``, computed without overflow.

    ``temperature == 0`` is the limit: 1 if ``s_a > s_b``, 0 if ``s_a < s_b``, 0.5 on a tie."""
    if not temperature >= 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    diff = s_a - s_b
    if temperature == 0 or diff == 0:
        return 0.5 if diff == 0 else float(diff > 0)
    z = diff / temperature
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def sample_bt_labels(rows: list[dict], *, temperature: float, seed: int) -> tuple[list[dict], dict]:
    """Relabel scored pairs as a Bradley–Terry annotator would, and drop the scores.

    ``rows`` are pair rows with ``prompt``, ``chosen``, ``rejected``, ``score_chosen``,
    ``score_rejected`` (``chosen`` is the response the scorer prefers). For each row one uniform
    draw ``u`` decides: the scorer's order is kept when ``u < P(chosen > rejected)``, else the two
    responses swap. Returns the new rows (``prompt``, ``chosen``, ``rejected`` only, in input order)
    and ``{"pairs", "flipped", "expected_flipped"}`` where ``expected_flipped`` is the sum of the
    flip probabilities (the mean of ``flipped`` over seeds).
    """
    rng = random.Random(seed)
    out, flipped, expected = [], 0, 0.0
    for row in rows:
        p_keep = bt_preference_probability(row["score_chosen"], row["score_rejected"], temperature)
        expected += 1.0 - p_keep
        keep = rng.random() < p_keep
        flipped += not keep
        a, b = (row["chosen"], row["rejected"]) if keep else (row["rejected"], row["chosen"])
        out.append({"prompt": row["prompt"], "chosen": a, "rejected": b})
    return out, {"pairs": len(rows), "flipped": flipped, "expected_flipped": expected}
