"""Pairs from scored samples: which of a prompt's K samples are trained against each other.

Pure functions of the scores. Equal scores are never paired (their order would be a coin flip,
and ODPO's ``log(s_w - s_l)`` is undefined for them); a prompt whose K samples all score the
same yields no pair and counts as tied. A score of ``None`` marks a sample that cannot be trained
on (an empty response): it is left out of the pairing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PAIRINGS = ("best_worst", "all")


def pair_indices(scores: Sequence[float | None], pairing: str) -> list[tuple[int, int]]:
    """``(chosen, rejected)`` sample indices of one prompt's samples.

    ``best_worst``: the highest against the lowest score (the first such sample when several share
    the extreme score); no pair when every score is equal. ``all``: every two samples ``i < j`` with
    different scores, the higher one chosen, in ``(i, j)`` order.
    """
    usable = [i for i, s in enumerate(scores) if s is not None]
    if pairing == "best_worst":
        if not usable:
            return []
        best = max(usable, key=lambda i: (scores[i], -i))
        worst = min(usable, key=lambda i: (scores[i], i))
        return [] if scores[best] == scores[worst] else [(best, worst)]
    if pairing == "all":
        out = []
        for a, i in enumerate(usable):
            for j in usable[a + 1:]:
                if scores[i] > scores[j]:
                    out.append((i, j))
                elif scores[j] > scores[i]:
                    out.append((j, i))
        return out
    raise ValueError(f"unknown pairing {pairing!r}; one of {', '.join(PAIRINGS)}")


@dataclass(frozen=True)
class PairingStats:
    prompts: int
    pairs: int
    tied_prompts: int  # every (usable) sample of the prompt scored the same: no pair
    tied_sample_pairs: int  # of all usable sample pairs of every prompt, those with equal scores
    sample_pairs: int
    unusable_samples: int = 0  # score None: left out

    @property
    def tie_fraction(self) -> float:
        return self.tied_prompts / self.prompts if self.prompts else 0.0


def build_pairs(groups: Sequence[Sequence[float | None]], pairing: str
                ) -> tuple[list[tuple[int, int, int]], PairingStats]:
    """``(group, chosen, rejected)`` for every prompt's score list, and the counts."""
    pairs: list[tuple[int, int, int]] = []
    tied_prompts = tied_pairs = sample_pairs = unusable = 0
    for g, scores in enumerate(groups):
        pairs += [(g, c, r) for c, r in pair_indices(scores, pairing)]
        usable = [s for s in scores if s is not None]
        unusable += len(scores) - len(usable)
        k = len(usable)
        sample_pairs += k * (k - 1) // 2
        tied_pairs += sum(usable[i] == usable[j] for i in range(k) for j in range(i + 1, k))
        if k >= 2 and all(s == usable[0] for s in usable):
            tied_prompts += 1
    return pairs, PairingStats(len(groups), len(pairs), tied_prompts, tied_pairs, sample_pairs, unusable)
