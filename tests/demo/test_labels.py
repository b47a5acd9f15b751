"""The demo's simulated annotators: Bradley–Terry label noise on scored pairs (issue 5)."""

from __future__ import annotations

import math
import random

import pytest

from prefopt.demo.labels import bt_preference_probability, sample_bt_labels


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _rows(diffs: list[float], seed: int = 0) -> list[dict]:
    """Scored pairs with ``score_chosen - score_rejected`` equal to each of ``diffs``."""
    rng = random.Random(seed)
    rows = []
    for i, d in enumerate(diffs):
        low = rng.uniform(0.0, 1.0 - d)
        rows.append({"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}",
                     "score_chosen": low + d, "score_rejected": low})
    return rows


def test_bt_probability_known_values():
    assert bt_preference_probability(0.7, 0.2, 0.5) == pytest.approx(_sig(1.0), abs=1e-15)
    assert bt_preference_probability(0.2, 0.7, 0.5) == pytest.approx(_sig(-1.0), abs=1e-15)
    assert bt_preference_probability(0.9, 0.1, 0.2) == pytest.approx(_sig(4.0), abs=1e-15)
    assert bt_preference_probability(0.4, 0.4, 0.2) == 0.5
    # Symmetric: P(a > b) + P(b > a) = 1.
    for a, b, t in ((0.31, 0.77, 0.1), (0.9, 0.05, 0.3), (0.5, 0.49, 1e-3)):
        assert bt_preference_probability(a, b, t) + bt_preference_probability(b, a, t) == pytest.approx(1.0)
    # Temperature -> 0: the scorer's ordering, without overflow; temperature 0 is that limit.
    assert bt_preference_probability(0.5001, 0.5, 1e-12) == 1.0
    assert bt_preference_probability(0.5, 0.5001, 1e-12) == 0.0
    assert (bt_preference_probability(0.6, 0.5, 0), bt_preference_probability(0.5, 0.6, 0)) == (1.0, 0.0)
    assert bt_preference_probability(0.5, 0.5, 0) == 0.5
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError):
            bt_preference_probability(0.6, 0.5, bad)


def test_low_temperature_gives_the_true_ordering_and_no_scores():
    rows = _rows([0.01, 0.3, 0.002, 0.8, 0.05] * 20)
    for temperature in (0.0, 1e-9):
        labelled, stats = sample_bt_labels(rows, temperature=temperature, seed=5)
        assert stats["flipped"] == 0 and stats["expected_flipped"] == pytest.approx(0.0, abs=1e-12)
        assert labelled == [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    # A very high temperature is a coin flip: about half the labels swap.
    _, stats = sample_bt_labels(_rows([0.5] * 2000), temperature=1e6, seed=0)
    assert stats["expected_flipped"] == pytest.approx(1000.0, abs=0.01)
    assert abs(stats["flipped"] - 1000) < 4 * math.sqrt(2000 * 0.25)


def test_flip_rate_matches_the_bradley_terry_probability():
    temperature = 0.2
    diffs = [0.05, 0.2, 0.5]
    n_each = 3000
    rows = _rows([d for d in diffs for _ in range(n_each)], seed=1)
    labelled, stats = sample_bt_labels(rows, temperature=temperature, seed=11)
    assert stats["pairs"] == len(rows) == len(labelled)
    # Each group's flips are Binomial(n, q) with q = sigmoid(-d / T): within 4 standard deviations.
    total_expected, total_var = 0.0, 0.0
    for k, d in enumerate(diffs):
        q = _sig(-d / temperature)
        group = range(k * n_each, (k + 1) * n_each)
        flips = 0
        for i in group:
            row, got = rows[i], labelled[i]
            assert set(got) == {"prompt", "chosen", "rejected"} and got["prompt"] == row["prompt"]
            swapped = (got["chosen"], got["rejected"]) == (row["rejected"], row["chosen"])
            kept = (got["chosen"], got["rejected"]) == (row["chosen"], row["rejected"])
            assert swapped != kept  # every label is either kept or exactly swapped
            flips += swapped
        std = math.sqrt(n_each * q * (1 - q))
        assert abs(flips - n_each * q) < 4 * std, (d, flips, n_each * q, std)
        total_expected += n_each * q
        total_var += n_each * q * (1 - q)
    assert stats["expected_flipped"] == pytest.approx(total_expected, rel=1e-9)
    assert abs(stats["flipped"] - total_expected) < 4 * math.sqrt(total_var)
    # Seeded: the same seed gives the same labels, another seed other labels.
    assert sample_bt_labels(rows, temperature=temperature, seed=11) == (labelled, stats)
    assert sample_bt_labels(rows, temperature=temperature, seed=12)[0] != labelled
