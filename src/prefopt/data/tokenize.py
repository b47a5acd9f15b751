"""Tokenize pairs the way DPO needs: the prompt alone and each completion alone, concatenated.

Both responses of a pair therefore share the exact same prompt tokens (tokenizing ``prompt +
response`` as one string can merge tokens across the boundary and shift it). EOS is appended to each
completion. ``max_prompt_length`` cuts the prompt from the left (the end of a prompt matters most),
``max_length`` then cuts completions from the right; a pair whose prompt leaves no room for a
completion is dropped. Every cut and drop is counted.
"""

from __future__ import annotations

import weakref
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


def cut_prompt(prompt: list[int], limit: int, truncation_mode: str) -> list[int]:
    """The prompt's last ``limit`` tokens (``keep_end``: the words next to the response matter
    most) or its first (``keep_start``)."""
    return prompt[:limit] if truncation_mode == "keep_start" else prompt[-limit:]


def adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def _backend_encoder(tokenizer):
    """The Rust tokenizer's ``encode_batch_fast`` when calling it directly gives exactly what
    ``tokenizer(texts, add_special_tokens=False)["input_ids"]`` gives, else ``None``.

    Through ``transformers`` every text's encoding is converted into Python dicts (attention mask,
    token type ids, offsets) that are thrown away here: a tenth of a chunk's time for long texts.
    Direct is only right for a plain fast tokenizer: its class must not change how ``__call__``
    encodes, the backend must hold no truncation or padding that the call would have switched off,
    and special tokens must be split (or not) as the call would."""
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

    backend = getattr(tokenizer, "backend_tokenizer", None)
    cls = type(tokenizer)
    if (backend is None or not isinstance(tokenizer, PreTrainedTokenizerFast)
            or cls.__call__ is not PreTrainedTokenizerBase.__call__
            or cls._encode_plus is not PreTrainedTokenizerFast._encode_plus
            or hasattr(tokenizer, "_switch_to_input_mode")
            or backend.truncation is not None or backend.padding is not None
            or backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False))):
        return None
    return getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast (no offsets): tokenizers >= 0.21


_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> direct path agreed on real text


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added: ``tokenizer(texts,
    add_special_tokens=False)["input_ids"]``, through the Rust tokenizer directly where that is the
    same (``_backend_encoder``, asked on every call: the tokenizer's settings may change). The
    first direct call per tokenizer also compares the two on its texts."""
    if not texts:
        return []
    direct = _backend_encoder(tokenizer)
    if direct is not None:
        try:
            agreed = _CHECKED[tokenizer]
        except (KeyError, TypeError):
            sample = texts[:16]
            agreed = ([e.ids for e in direct(sample, add_special_tokens=False)]
                      == tokenizer(sample, add_special_tokens=False)["input_ids"])
            try:
                _CHECKED[tokenizer] = agreed
            except TypeError:
                pass
        if agreed:
            return [e.ids for e in direct(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_unique(tokenizer, texts: list[str]) -> list[list[int]]:
    """``encode_texts`` of each text, each distinct text tokenized once: preference sets often
    repeat a prompt over several pairs (several responses per prompt, binarized ratings), and
    tokenizing is most of what preparation costs. One call for all: the tokenizer's threads share
    one queue. A repeated text gets its own copy of the ids (no list is shared between pairs)."""
    first: dict[str, int] = {}
    for text in texts:
        first.setdefault(text, len(first))
    if len(first) == len(texts):
        return encode_texts(tokenizer, texts)
    ids = encode_texts(tokenizer, list(first))
    seen = [False] * len(ids)
    out = []
    for text in texts:
        k = first[text]
        out.append(list(ids[k]) if seen[k] else ids[k])
        seen[k] = True
    return out


def tokenize_pairs(
    pairs: list[PreferencePair],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    truncation_mode: str = "keep_end",
) -> tuple[list[TokenizedPair], TokenizeStats]:
    stats = TokenizeStats(pairs_in=len(pairs))
    if not pairs:
        return [], stats
    n = len(pairs)
    prompts, chosens, rejecteds = (lambda ids: (ids[:n], ids[n:2 * n], ids[2 * n:]))(encode_unique(
        tokenizer, [p.prompt for p in pairs] + [p.chosen for p in pairs] + [p.rejected for p in pairs]))
    special = SpecialTokens(tokenizer)
    out = []
    for i, (pair, prompt, chosen, rejected) in enumerate(zip(pairs, prompts, chosens, rejecteds)):
        prompt = special.prompt(prompt, pair.templated)
        chosen, rejected = special.completion(chosen), special.completion(rejected)
        if max_prompt_length is not None and len(prompt) > max_prompt_length:
            prompt = cut_prompt(prompt, max_prompt_length, truncation_mode)
            stats.prompt_truncated += 1
        room = max_length - len(prompt)
        if max_completion_length is not None:
            room = min(room, max_completion_length)
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
