"""Seeded per-row sampling: deterministic, independent of batching, and a true sample."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.evaluation.generation import GumbelRowSampler, nucleus_filter, sample_seeded
from prefopt.evaluation.policy import encode_prompts

PROMPTS = ["the movie", "a film about the cast and the scene was", "very", "the director of this film is very"]


@pytest.fixture(scope="module")
def model_and_ids(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    return model, tok, encode_prompts(tok, PROMPTS)


def _draw(model, tok, ids, **kw):
    args = dict(num_samples=3, max_new_tokens=10, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                seed=7)
    args.update(kw)
    return [(s.prompt_index, s.sample_index, s.completion_ids) for s in sample_seeded(model, ids, **args)]


def test_same_seed_same_samples_other_seed_other_samples(model_and_ids):
    model, tok, ids = model_and_ids
    a = _draw(model, tok, ids, batch_size=12)
    assert a == _draw(model, tok, ids, batch_size=12)
    assert a != _draw(model, tok, ids, batch_size=12, seed=8)
    assert a != _draw(model, tok, ids, batch_size=12, stream=1)
    assert len({tuple(c) for _, _, c in a}) > 6  # the samples of one prompt differ from each other


def test_left_padded_batch_equals_one_at_a_time(model_and_ids):
    model, tok, ids = model_and_ids
    assert len({len(p) for p in ids}) == len(ids)  # prompts of different lengths: real left padding
    batched = _draw(model, tok, ids, batch_size=12)
    single = _draw(model, tok, ids, batch_size=1)
    assert batched == single
    # one prompt alone, with its key, draws what it drew among the others
    alone = _draw(model, tok, [ids[1]], batch_size=1, prompt_keys=[1])
    assert [c for _, _, c in alone] == [c for i, _, c in batched if i == 1]


def test_gumbel_max_draws_from_the_softmax_and_respects_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits[0].double(), -1)
    n = 4000
    sampler = GumbelRowSampler([torch.Generator().manual_seed(0)])
    counts = torch.zeros(4)
    for _ in range(n):
        counts[int(sampler(None, logits).argmax())] += 1
    for p, c in zip(probs.tolist(), counts.tolist()):
        assert abs(c / n - p) < 4 * math.sqrt(p * (1 - p) / n)  # within 4 standard errors
    # probs are 0.644, 0.237, 0.087, 0.032: top_p 0.8 keeps the first two (0.644 < 0.8 <= 0.881)
    kept = nucleus_filter(logits, 0.8)
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]
    sampler = GumbelRowSampler([torch.Generator().manual_seed(1)], top_p=0.8)
    assert {int(sampler(None, logits).argmax()) for _ in range(300)} == {0, 1}
    # temperature: a very low one makes the draw the arg-max
    cold = GumbelRowSampler([torch.Generator().manual_seed(2)], temperature=1e-3)
    assert {int(cold(None, logits).argmax()) for _ in range(100)} == {0}
