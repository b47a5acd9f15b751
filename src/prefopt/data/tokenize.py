"""Tokenize pairs the way DPO needs: the prompt alone and each completion alone, concatenated.

Both responses of a pair therefore share the exact same prompt tokens (tokenizing ``prompt +
response`` as one string can merge tokens across the boundary and shift it). EOS is appended to each
completion. ``max_prompt_length`` cuts the prompt from the left (the end of a prompt matters most),
``max_length`` then cuts completions from the right; a pair whose prompt leaves no room for a
completion is dropped. Every cut and drop is counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from prefopt.data.records import PreferencePair


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    score_chosen: float | None
    score_rejected: float | None
    index: int  # position of the pair in the list it was tokenized from (input order)
    row: int = 0  # the file's line or row the pair came from (errors after tokenization name it)


@dataclass
class TokenizeStats:
    pairs_in: int = 0
    pairs_kept: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0
    dropped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"pairs_in": self.pairs_in, "pairs_kept": self.pairs_kept,
                "prompt_truncated": self.prompt_truncated, "completion_truncated": self.completion_truncated,
                "dropped": dict(self.dropped)}


class SpecialTokens:
    """BOS before a prompt (when the tokenizer adds one itself and the prompt lacks it) and EOS after
    a completion: the one rule shared by pair and single-response tokenization."""

    def __init__(self, tokenizer):
        self.bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
        self.eos = tokenizer.eos_token_id

    def prompt(self, ids: list[int], templated: bool) -> list[int]:
        if self.bos is not None and not templated and (not ids or ids[0] != self.bos):
            return [self.bos, *ids]
        return ids

    def completion(self, ids: list[int]) -> list[int]:
        if self.eos is not None and not (ids and ids[-1] == self.eos):
            return [*ids, self.eos]
        return ids


def adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def tokenize_pairs(
    pairs: list[PreferencePair],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
) -> tuple[list[TokenizedPair], TokenizeStats]:
    stats = TokenizeStats(pairs_in=len(pairs))
    if not pairs:
        return [], stats
    encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = encode([p.prompt for p in pairs])
    chosens = encode([p.chosen for p in pairs])
    rejecteds = encode([p.rejected for p in pairs])
    special = SpecialTokens(tokenizer)
    out = []
    for i, (pair, prompt, chosen, rejected) in enumerate(zip(pairs, prompts, chosens, rejecteds)):
        prompt = special.prompt(prompt, pair.templated)
        chosen, rejected = special.completion(chosen), special.completion(rejected)
        if max_prompt_length is not None and len(prompt) > max_prompt_length:
            prompt = prompt[-max_prompt_length:]
            stats.prompt_truncated += 1
        room = max_length - len(prompt)
        if room < 1:
            stats.dropped["prompt longer than max_length"] += 1
            continue
        if len(chosen) > room or len(rejected) > room:
            stats.completion_truncated += 1
            chosen, rejected = chosen[:room], rejected[:room]
        if chosen == rejected:
            stats.dropped["responses identical after truncation"] += 1
            continue
        out.append(TokenizedPair(prompt, chosen, rejected, pair.score_chosen, pair.score_rejected, i, pair.row))
    stats.pairs_kept = len(out)
    return out, stats
