"""Every kind of reference answers ``reference(batch, *, per_token=...)`` with the same values:
per-pair sums, and per-token values whose LD-DPO sums match the live model's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from prefopt.data.collate import PaddedPairCollator
from prefopt.data.formats import Columns, load_pairs
from prefopt.data.layouts import PrefixSharedCollator
from prefopt.data.tokenize import tokenize_pairs
from prefopt.errors import PrefoptError
from prefopt.modeling.load import freeze, load_causal_lm, load_tokenizer
from prefopt.modeling.logprobs import pair_logps, pair_token_logps
from prefopt.objectives.preference import sequence_logps
from prefopt.objectives.reference import (
    AdapterOffReference,
    AutocastReference,
    CachedReference,
    LiveReference,
)
from prefopt.objectives.reference_cache import compute_table

LD_ALPHA = 0.3


@pytest.fixture(scope="module")
def setup(tiny_llama, easy_data):
    tok = load_tokenizer(str(tiny_llama))
    pairs, _ = load_pairs(str(easy_data["train"]), columns=Columns(), tokenizer=tok)
    tokenized, _ = tokenize_pairs(pairs[:12], tok, max_length=64, max_prompt_length=32)
    # Responses of different lengths, so LD-DPO's damping of the longer one's tail shows.
    g = torch.Generator().manual_seed(0)
    ragged = [dataclasses.replace(p, rejected_ids=p.rejected_ids + torch.randint(4, 20, (1 + i % 5,), generator=g)
                                  .tolist()) for i, p in enumerate(tokenized)]
    model = freeze(load_causal_lm(str(tiny_llama)))
    return model, ragged, tok.pad_token_id


def _expected(model, batch):
    with torch.no_grad():
        return pair_logps(model, batch), sequence_logps(pair_token_logps(model, batch), LD_ALPHA)


def _check(reference, model, batch, atol=1e-5):
    want_sums, want_ld = _expected(model, batch)
    got = reference(batch)
    for key in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(got[key].float(), want_sums[key], atol=atol, rtol=0)
    got_tok = reference(batch, per_token=True)
    for key in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(got_tok[key].float(), want_sums[key], atol=atol, rtol=0)
    ld = sequence_logps(got_tok, LD_ALPHA)
    torch.testing.assert_close(ld[0].float(), want_ld[0], atol=atol, rtol=0)
    torch.testing.assert_close(ld[1].float(), want_ld[1], atol=atol, rtol=0)
    # LD-DPO damps the tail: its sums differ from the plain ones wherever the lengths differ
    assert (ld[1] - got_tok["rejected_logps"]).abs().max() > 1e-3


def test_live_reference(setup):
    model, pairs, pad = setup
    _check(LiveReference(model), model, PaddedPairCollator(pad)(pairs))


def test_autocast_reference_forwards_per_token(setup):
    model, pairs, pad = setup

    class Fp32Accelerator:  # autocast that changes nothing: the values must be the live ones
        def autocast(self):
            return torch.autocast("cpu", enabled=False)

    _check(AutocastReference(LiveReference(model), Fp32Accelerator()), model, PaddedPairCollator(pad)(pairs))

    class Bf16Accelerator:
        def autocast(self):
            return torch.autocast("cpu", dtype=torch.bfloat16)

    out = AutocastReference(LiveReference(model), Bf16Accelerator())(PaddedPairCollator(pad)(pairs), per_token=True)
    assert out["token_logps"].dtype == torch.float32 and torch.isfinite(out["token_logps"]).all()


def test_cached_reference_in_another_layout(setup):
    """A table computed in the plain layout answers batches of the prefix-shared layout."""
    model, pairs, pad = setup
    table = compute_table(model, pairs, PaddedPairCollator(pad), batch_size=5, device="cpu", per_token=True)
    cached = CachedReference([(table, 0)])
    batch = PrefixSharedCollator(pad)(pairs[3:9])
    _check(cached, model, batch)


def test_cached_reference_without_per_token_values_says_so(setup):
    model, pairs, pad = setup
    table = compute_table(model, pairs, PaddedPairCollator(pad), batch_size=5, device="cpu")
    cached = CachedReference([(table, 0)])
    batch = PaddedPairCollator(pad)(pairs[:4])
    torch.testing.assert_close(cached(batch)["chosen_logps"], _expected(model, batch)[0]["chosen_logps"],
                               atol=1e-5, rtol=0)
    with pytest.raises(PrefoptError, match="per-token"):
        cached(batch, per_token=True)


def test_adapter_off_reference(setup, tiny_llama):
    peft = pytest.importorskip("peft")
    model, pairs, pad = setup
    policy = peft.get_peft_model(load_causal_lm(str(tiny_llama)),
                                 peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # a non-zero adapter, so adapter-on and adapter-off differ
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = PaddedPairCollator(pad)(pairs)
    with torch.no_grad():
        assert (pair_logps(policy, batch)["chosen_logps"] - pair_logps(model, batch)["chosen_logps"]).abs().max() > 1e-3
    _check(AdapterOffReference(policy), model, batch)
