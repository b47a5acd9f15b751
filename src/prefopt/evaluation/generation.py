"""Sampling with one random stream per sequence: the same samples whatever the batch.

``sample_seeded`` draws completions with Hugging Face ``generate`` (left-padded batches, KV cache)
but does the random part itself: each (prompt, sample) row owns a ``torch.Generator`` seeded from
``(seed, stream, prompt index, sample index)``, and a logits processor adds Gumbel noise drawn
from that row's generator to the (temperature-scaled, nucleus-filtered) logits, after which
``generate`` takes the arg-max. ``argmax(logits + Gumbel)`` is an exact sample from
``softmax(logits)`` (the Gumbel-max trick), and because no row reads another row's random numbers,
a sample depends only on its own seed and prompt: batching, batch size, the order of the jobs and a
restart halfway do not change it. (``generate(do_sample=True)`` draws every row from one global
stream, so the same seed gives different samples in a different batch.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from prefopt.evaluation.policy import Sample, left_pad


def row_seed(*parts: int) -> int:
    """A 63-bit seed from integers (hash-mixed, so nearby inputs give unrelated streams)."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def nucleus_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every token outside the smallest set whose probability reaches ``top_p``
    (the most likely token always stays)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability of the strictly more likely tokens
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


class GumbelRowSampler:
    """A ``generate`` logits processor: row ``r``'s scores become
    ``nucleus(logits / temperature) + Gumbel noise from generators[r]``, in float64."""

    def __init__(self, generators: list[torch.Generator], *, temperature: float = 1.0, top_p: float = 1.0):
        self.generators = generators
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = nucleus_filter(scores.double() / self.temperature, self.top_p)
        vocab = logits.shape[-1]
        noise = torch.stack([
            # The smallest positive float64 keeps log(0) away; the noise is drawn on the CPU so that the
            # stream is the same on every device.
            -torch.log(-torch.log(torch.rand(vocab, generator=g, dtype=torch.float64).clamp_min_(1e-300)))
            for g in self.generators
        ])
        return logits + noise.to(logits.device)


@torch.no_grad()
def sample_seeded(
    model,
    prompt_ids: Sequence[list[int]],
    *,
    num_samples: int,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | None,
    seed: int,
    stream: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    prompt_keys: Sequence[int] | None = None,
    device=None,
) -> list[Sample]:
    """``num_samples`` completions per prompt, in (prompt, sample) order. Row (i, k) is drawn from
    its own generator seeded by ``(seed, stream, prompt_keys[i], k)``; ``prompt_keys`` default to
    the prompts' positions (pass stable ids, e.g. the prompt's index in its file, to make a sample
    independent of which other prompts were drawn with it)."""
    from transformers import GenerationConfig, LogitsProcessorList

    device = device or next(model.parameters()).device
    model.eval()
    keys = list(prompt_keys) if prompt_keys is not None else list(range(len(prompt_ids)))
    jobs = [(i, k) for i in range(len(prompt_ids)) for k in range(num_samples)]
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    out: list[Sample] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        prompts = [list(prompt_ids[i]) for i, _ in chunk]
        input_ids, attention_mask = left_pad(prompts, pad_token_id)
        width = input_ids.shape[1]
        generators = [torch.Generator().manual_seed(row_seed(seed, stream, keys[i], k)) for i, k in chunk]
        processor = GumbelRowSampler(generators, temperature=temperature, top_p=top_p)
        generated = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config,
            logits_processor=LogitsProcessorList([processor]),
        )[:, width:].tolist()
        for (i, k), p, tokens in zip(chunk, prompts, generated):
            if eos_token_id is not None and eos_token_id in tokens:
                tokens = tokens[: tokens.index(eos_token_id) + 1]
            out.append(Sample(i, k, p, tokens))
    return out
