"""The toy review language of ``prefopt demo``: its words, a generator of reviews and the
ground-truth sentiment scorer.

A review is an opener, then clauses ``the NOUN was ADJECTIVE`` joined by ``and`` / ``but``, then a
full stop. Only adjectives carry sentiment. Each review has a hidden mood (positive, negative or
mixed) that decides how likely its adjectives are positive or negative, so a model trained on the
reviews (the SFT model) writes reviews of every mood and its samples vary in score, as the IMDb
GPT-2 of the papers does.

The prompt of a review is the opener and the first ``the NOUN was``; the completion is the rest.
"""

from __future__ import annotations

import math
import random
import re

# Adjective -> sentiment weight. The scorer sums the weights of a text's words.
POSITIVE = {"good": 1.0, "nice": 1.0, "fine": 0.5, "fun": 1.0, "great": 2.0, "superb": 2.0,
            "brilliant": 2.0, "moving": 1.0}
NEGATIVE = {"bad": -1.0, "weak": -1.0, "dull": -1.0, "silly": -0.5, "awful": -2.0, "terrible": -2.0,
            "boring": -1.0, "poor": -1.0}
NEUTRAL = ("long", "short", "loud", "slow", "simple", "strange", "new", "quiet")
NOUNS = ("movie", "film", "plot", "acting", "cast", "music", "ending", "script", "story", "camera",
         "dialogue", "pacing")
OPENERS = (("i", "watched", "this", "movie"), ("we", "saw", "the", "film"), ("my", "review", ":"),
           ("so", "i", "went", "to", "see", "it"), ("last", "night", "i", "saw", "this"))
FUNCTION_WORDS = ("the", "was", "and", "but", ".")
WEIGHTS = {**POSITIVE, **NEGATIVE}
# Scorer temperature: a text whose weights sum to +2 scores sigmoid(1.5) = 0.82.
SCORE_SCALE = 0.75

# mood -> (P(positive adjective), P(negative adjective)); the rest are neutral adjectives.
MOODS = {"positive": (0.6, 0.1), "negative": (0.1, 0.6), "mixed": (0.3, 0.3)}
MOOD_WEIGHTS = {"positive": 0.3, "negative": 0.3, "mixed": 0.4}


def vocabulary() -> list[str]:
    """Every word of the language, in a fixed order (the tokenizer's ids follow it)."""
    words: list[str] = []
    for group in (FUNCTION_WORDS, *OPENERS, NOUNS, NEUTRAL, POSITIVE, NEGATIVE):
        for w in group:
            if w not in words:
                words.append(w)
    return words


_WORD = re.compile(r"[a-z]+")


def sentiment_score(texts: list[str]) -> list[float]:
    """Ground-truth reward: ``sigmoid(SCORE_SCALE * sum of word weights)``, in (0, 1).

    A scorer in the ``module:function`` sense of ``prefopt eval --scorer``:
    ``prefopt.demo.world:sentiment_score``. Words are runs of letters (the decoder glues the full
    stop to the last word: ``great.``); unknown words weigh 0.
    """
    out = []
    for text in texts:
        total = sum(WEIGHTS.get(w, 0.0) for w in _WORD.findall(text.lower()))
        out.append(1.0 / (1.0 + math.exp(-SCORE_SCALE * total)))
    return out


def _adjective(rng: random.Random, mood: str) -> str:
    p_pos, p_neg = MOODS[mood]
    u = rng.random()
    if u < p_pos:
        return rng.choice(list(POSITIVE))
    if u < p_pos + p_neg:
        return rng.choice(list(NEGATIVE))
    return rng.choice(NEUTRAL)


def make_review(rng: random.Random, mood: str | None = None) -> tuple[str, str]:
    """One review as ``(prompt, completion)``; ``prompt + " " + completion`` is the full text.

    The completion has 2 to 4 clauses: ``ADJ [and|but the NOUN was ADJ]... .``
    """
    if mood is None:
        mood = rng.choices(list(MOOD_WEIGHTS), weights=list(MOOD_WEIGHTS.values()))[0]
    prompt = [*rng.choice(OPENERS), "the", rng.choice(NOUNS), "was"]
    completion = [_adjective(rng, mood)]
    for _ in range(rng.randint(1, 3)):
        completion += [rng.choice(("and", "but")), "the", rng.choice(NOUNS), "was", _adjective(rng, mood)]
    completion.append(".")
    return " ".join(prompt), " ".join(completion)


def make_reviews(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [make_review(rng) for _ in range(n)]


def make_prompts(n: int, seed: int) -> list[str]:
    """Prompts drawn like the reviews' prompts (the held-out prompts use another seed)."""
    return [prompt for prompt, _ in make_reviews(n, seed)]


def build_pairs(prompts: list[str], completions: list[list[str]], scores: list[list[float]]) -> tuple[list[dict], int]:
    """Preference rows from scored samples, as the papers built them: for each prompt, samples
    ``(0, 1)``, ``(2, 3)``, ... make pairs; the higher score is chosen and both scores are kept.

    Pairs whose two scores are equal carry no preference and are skipped (DPO cannot learn from a
    tie and ODPO's ``log(s_w - s_l)`` offset is undefined there). Returns the rows and how many
    ties were skipped.
    """
    rows, ties = [], 0
    for prompt, comps, ss in zip(prompts, completions, scores):
        for a in range(0, len(comps) - 1, 2):
            b = a + 1
            if ss[a] == ss[b] or comps[a] == comps[b]:
                ties += 1
                continue
            w, l_ = (a, b) if ss[a] > ss[b] else (b, a)
            rows.append({"prompt": prompt, "chosen": comps[w], "rejected": comps[l_],
                         "score_chosen": ss[w], "score_rejected": ss[l_]})
    return rows, ties
