"""Pairs from known scores: best_worst, all, and what happens to ties."""

from __future__ import annotations

import pytest

from prefopt.online.pairing import build_pairs, pair_indices
from prefopt.online.rounds import round_prompts


def test_best_worst_takes_the_highest_against_the_lowest():
    assert pair_indices([0.2, 0.9, -0.5, 0.4], "best_worst") == [(1, 2)]
    # several samples share the extreme score: the first of them
    assert pair_indices([0.9, 0.1, 0.9, 0.1], "best_worst") == [(0, 1)]


def test_all_pairs_every_two_different_scores_higher_chosen():
    assert pair_indices([0.2, 0.9, -0.5], "all") == [(1, 0), (0, 2), (1, 2)]
    # the tie (0, 2) is left out: 4 samples make 6 sample pairs, one tied
    assert pair_indices([0.5, 0.1, 0.5, 0.7], "all") == [(0, 1), (3, 0), (2, 1), (3, 1), (3, 2)]


def test_a_prompt_whose_samples_all_tie_yields_no_pair_and_counts_as_tied():
    groups = [[0.3, 0.3, 0.3], [0.1, 0.2, 0.1], [1.0, 1.0, 1.0]]
    for pairing in ("best_worst", "all"):
        pairs, stats = build_pairs(groups, pairing)
        assert all(g == 1 for g, _, _ in pairs)
        assert stats.tied_prompts == 2 and stats.tie_fraction == pytest.approx(2 / 3)
        # tied sample pairs: 3 + 1 + 3 of 9
        assert stats.tied_sample_pairs == 7 and stats.sample_pairs == 9
    assert build_pairs(groups, "best_worst")[0] == [(1, 1, 0)]
    assert build_pairs(groups, "all")[0] == [(1, 1, 0), (1, 1, 2)]


def test_unusable_samples_are_left_out_of_the_pairing():
    # sample 1 (an empty response) has the highest score but cannot be trained on
    assert pair_indices([0.2, None, -0.5, 0.4], "best_worst") == [(3, 2)]
    assert pair_indices([0.2, None, 0.4], "all") == [(2, 0)]
    pairs, stats = build_pairs([[None, 0.3, 0.3], [None, None, 0.1]], "all")
    # prompt 0: its two usable samples tie; prompt 1: one usable sample, no pair but no tie either
    assert pairs == [] and stats.tied_prompts == 1 and stats.unusable_samples == 3 and stats.sample_pairs == 1


def test_unknown_pairing_is_refused():
    with pytest.raises(ValueError, match="best_worst"):
        pair_indices([0.0, 1.0], "random")


def test_round_prompts_cycle_through_a_seeded_shuffle():
    rounds = [round_prompts(10, 4, r, seed=3) for r in (1, 2, 3)]
    first_pass = rounds[0] + rounds[1] + rounds[2][:2]
    assert sorted(first_pass) == list(range(10))  # every prompt once before any repeats
    assert round_prompts(10, 4, 1, seed=3) == rounds[0]  # a pure function of its arguments
    assert round_prompts(10, 4, 1, seed=4) != rounds[0]
    assert round_prompts(10, 0, 5, seed=3) == list(range(10))
    assert round_prompts(10, 12, 2, seed=3) == list(range(10))
