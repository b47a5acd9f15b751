"""Per-response log-probs against an explicit per-token loop, whatever the padding."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.data.collate import PaddedPairCollator
from prefopt.data.records import PreferencePair
from prefopt.data.tokenize import tokenize_pairs
from prefopt.modeling.logprobs import pair_logps, token_logps

PAIRS = [
    PreferencePair("the movie was", "good", "bad and dull"),
    PreferencePair("a film with a very really and quite boring story and it was", "great great fine", "poor"),
    PreferencePair("it", "wonderful music and a lovely cast", "terrible"),
]


def explicit_logp(model, ids: list[int], start: int) -> float:
    """sum_{t >= start} log p(ids[t] | ids[:t]), one unpadded sequence, one token at a time."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    total = 0.0
    for t in range(start, len(ids)):
        total += torch.log_softmax(logits[t - 1].double(), dim=-1)[ids[t]].item()
    return total


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_batched_logps_equal_explicit_loop(arch, request):
    path = request.getfixturevalue(arch)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenized, _ = tokenize_pairs(PAIRS, tok, max_length=64)
    batch = PaddedPairCollator(tok.pad_token_id)(tokenized)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    with torch.no_grad():
        out = pair_logps(model, batch)
    for i, p in enumerate(tokenized):
        start = len(p.prompt_ids)
        want_c = explicit_logp(model, p.prompt_ids + p.chosen_ids, start)
        want_r = explicit_logp(model, p.prompt_ids + p.rejected_ids, start)
        assert out["chosen_logps"][i].item() == pytest.approx(want_c, abs=1e-4)
        assert out["rejected_logps"][i].item() == pytest.approx(want_r, abs=1e-4)
        assert out["chosen_tokens"][i].item() == len(p.chosen_ids)
        assert out["rejected_tokens"][i].item() == len(p.rejected_ids)


def test_a_pair_scores_the_same_alone_and_in_a_padded_batch(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenized, _ = tokenize_pairs(PAIRS, tok, max_length=64)
    collate = PaddedPairCollator(tok.pad_token_id)
    with torch.no_grad():
        together = pair_logps(model, collate(tokenized))
        for i, p in enumerate(tokenized):
            alone = pair_logps(model, collate([p]))
            assert alone["chosen_logps"].item() == pytest.approx(together["chosen_logps"][i].item(), abs=1e-5)
            assert alone["rejected_logps"].item() == pytest.approx(together["rejected_logps"][i].item(), abs=1e-5)


def test_token_logps_chunks_equal_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 11, generator=g)
    tokens = torch.randint(0, 11, (37,), generator=g)
    want = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    assert torch.allclose(token_logps(logits, tokens, chunk_size=5), want, atol=1e-6)


def test_both_responses_share_identical_prompt_tokens_and_end_with_eos(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tokenized, _ = tokenize_pairs(PAIRS, tok, max_length=64)
    for p, src in zip(tokenized, PAIRS):
        assert p.prompt_ids[0] == tok.bos_token_id
        assert p.chosen_ids[-1] == tok.eos_token_id and p.rejected_ids[-1] == tok.eos_token_id
        assert tok.decode(p.prompt_ids, skip_special_tokens=True) == src.prompt
