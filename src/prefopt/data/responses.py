"""Tokenize single (prompt, response) items with exactly the rules of ``tokenize.tokenize_pairs``.

Scoring needs one sequence per response, not per pair (a rated row has any number of responses,
and a pair whose two responses become identical after truncation must still get two scores). The
rules are those of training, so a reward model scores ``prompt_ids + response_ids`` exactly as it
saw them: the prompt and the response tokenized apart, BOS before the prompt when the tokenizer adds
one (not for chat-templated prompts), EOS after the response, the prompt cut from the left to
``max_prompt_length``, the response cut from the right to fit ``max_length``.

One difference, because every response must get a score: a prompt that leaves no room for the
response (``tokenize_pairs`` drops that pair) is cut from the left to ``max_length - 1`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefopt.data.tokenize import SpecialTokens, cut_prompt, encode_texts


@dataclass(frozen=True)
class ResponseItem:
    prompt: str
    response: str
    templated: bool = False  # the prompt was rendered by a chat template (it holds BOS already)


@dataclass
class ResponseTokenStats:
    items: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    prompt_cut_to_fit: int = 0


def tokenize_responses(
    items: list[ResponseItem], tokenizer, *, max_length: int, max_prompt_length: int | None = None,
    max_completion_length: int | None = None, truncation_mode: str = "keep_end",
) -> tuple[list[tuple[list[int], list[int]]], ResponseTokenStats]:
    """``(prompt_ids, response_ids)`` per item, in input order."""
    stats = ResponseTokenStats(items=len(items))
    if not items:
        return [], stats
    prompts = encode_texts(tokenizer, [it.prompt for it in items])
    responses = encode_texts(tokenizer, [it.response for it in items])
    special = SpecialTokens(tokenizer)
    out = []
    for item, prompt, response in zip(items, prompts, responses):
        prompt, response = special.prompt(prompt, item.templated), special.completion(response)
        if max_prompt_length is not None and len(prompt) > max_prompt_length:
            prompt = cut_prompt(prompt, max_prompt_length, truncation_mode)
            stats.prompt_truncated += 1
        if len(prompt) > max_length - 1:
            prompt = prompt[-(max_length - 1):]
            stats.prompt_cut_to_fit += 1
        room = max_length - len(prompt)
        if max_completion_length is not None:
            room = min(room, max_completion_length)
        if len(response) > room:
            response = response[:room]
            stats.response_truncated += 1
        out.append((prompt, response))
    return out, stats
