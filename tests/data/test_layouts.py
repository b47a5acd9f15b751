"""Prefix-shared and packed layouts, and the LM head applied only at target positions, against the
plain layout and against explicit per-response loops (float32, 1e-5)."""

from __future__ import annotations

import random

import pytest
import torch

from prefopt.config import TrainConfig
from prefopt.data.collate import PaddedPairCollator
from prefopt.data.layouts import (
    DEFAULT_RULE,
    LAYOUT_RULES,
    PackedCollator,
    PrefixSharedCollator,
    choose_layout,
    estimate_costs,
    make_collator,
)
from prefopt.data.tokenize import TokenizedPair
from prefopt.errors import ConfigError
from prefopt.modeling.attention import model_layout
from prefopt.modeling.lm_head import ChunkedHeadLogps, split_lm_head
from prefopt.modeling.logprobs import response_logps, target_token_logps
from prefopt.objectives.preference import PreferenceObjective
from prefopt.objectives.reference import LiveReference
from prefopt.toy import tiny_gpt2_config, tiny_llama_config

VOCAB = 40
TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_qwen2_config(vocab_size: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def make_model(arch: str, seed: int = 0, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    config = {"gpt2": tiny_gpt2_config, "llama": tiny_llama_config, "qwen2": tiny_qwen2_config}[arch](VOCAB)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).float()
    return model.eval()  # no dropout: layouts must agree exactly


def make_pairs(n: int, *, ragged: bool, seed: int = 0) -> list[TokenizedPair]:
    """Random pairs; with ``ragged=False`` every pair has the same lengths (no padding anywhere)."""
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(4, VOCAB) for _ in range(rng.randint(lo, hi) if ragged else hi)]

    return [TokenizedPair(ids(1, 9), ids(1, 6), ids(1, 5), None, None, 10 + i) for i in range(n)]


@torch.no_grad()
def explicit_logps(model, pair: TokenizedPair) -> tuple[float, float]:
    """Each response scored alone, one unpadded row, full logits: the definition."""
    out = []
    for response in (pair.chosen_ids, pair.rejected_ids):
        seq = torch.tensor([pair.prompt_ids + response])
        logp = torch.log_softmax(model(seq).logits[0].double(), -1)
        start = len(pair.prompt_ids)
        out.append(sum(float(logp[t - 1, seq[0, t]]) for t in range(start, seq.shape[1])))
    return out[0], out[1]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_plain_layout_matches_explicit_loop(arch):
    model = make_model(arch)
    pairs = make_pairs(4, ragged=True)
    with torch.no_grad():
        sums, counts = response_logps(model, PaddedPairCollator(0)(pairs))
    for i, p in enumerate(pairs):
        chosen, rejected = explicit_logps(model, p)
        assert sums[2 * i].item() == pytest.approx(chosen, abs=1e-4)
        assert sums[2 * i + 1].item() == pytest.approx(rejected, abs=1e-4)
        assert counts[2 * i] == len(p.chosen_ids) and counts[2 * i + 1] == len(p.rejected_ids)


def loss_and_grads(policy, reference, collator, pairs):
    cfg = TrainConfig(beta=0.5)
    batch = collator(pairs)
    policy.zero_grad(set_to_none=True)
    losses, metrics = PreferenceObjective(cfg.loss_options(), LiveReference(reference))(policy, batch)
    losses.mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}
    sums, counts = response_logps(policy, batch)
    return losses.detach(), grads, sums.detach(), counts, batch


@pytest.mark.parametrize(
    "arch, ragged, attn",
    [(arch, ragged, attn) for arch in ("gpt2", "llama") for ragged in (True, False) for attn in ("sdpa", "eager")]
    + [("qwen2", True, "sdpa")],
    ids=lambda v: {True: "padding", False: "no-padding"}.get(v, v) if isinstance(v, bool) else v,
)
def test_layouts_match_plain(arch, ragged, attn):
    policy, reference = make_model(arch, seed=0, attn=attn), make_model(arch, seed=1, attn=attn)
    # The policy must differ from the reference, or every DPO gradient would be the same constant.
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pairs = make_pairs(6, ragged=ragged)
    base_loss, base_grads, base_sums, base_counts, _ = loss_and_grads(policy, reference, PaddedPairCollator(0), pairs)
    assert base_loss.abs().sum() > 0 and len(base_grads) == len(list(policy.parameters()))
    for collator in (PrefixSharedCollator(0), PackedCollator(0), PackedCollator(0, row_tokens=40)):
        loss, grads, sums, counts, batch = loss_and_grads(policy, reference, collator, pairs)
        torch.testing.assert_close(sums, base_sums, **TOL)
        torch.testing.assert_close(counts, base_counts)
        torch.testing.assert_close(loss, base_loss, **TOL)
        for name, g in base_grads.items():
            torch.testing.assert_close(grads[name], g, **TOL, msg=f"{collator.layout}: gradient of {name}")
        assert batch["input_ids"].shape[0] < 2 * len(pairs)  # fewer rows than plain's 2B
        if not ragged and collator.layout == "prefix_shared":
            assert batch["num_tokens"] == batch["input_ids"].numel()  # no padding at all


def test_prefix_shared_rows_by_hand():
    """P=2, C=2, R=1: tokens [p0 p1 c0 c1 r0] at positions [0 1 2 3 2]; r0 sees p0 p1 and itself,
    not the chosen tokens; c0 is predicted at position 1, c1 at 2, r0 at 1 (the last prompt token)."""
    pair = TokenizedPair([5, 6], [7, 8], [9], None, None, 3)
    other = TokenizedPair([5], [7], [9], None, None, 4)  # shorter: its row is padded by 2
    b = PrefixSharedCollator(0)([pair, other])
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 7, 9, 0, 0]]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 2]
    assert b["position_ids"][1, :3].tolist() == [0, 1, 1]
    mask = b["attention_mask"][:, 0].int().tolist()
    assert mask[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]]
    assert mask[1][2] == [1, 0, 1, 0, 0]  # other's rejected token: prompt and itself
    assert mask[1][3] == [0, 0, 0, 1, 0] and mask[1][4] == [0, 0, 0, 0, 1]  # padding: itself only
    assert b["target_rows"].tolist() == [0, 0, 0, 1, 1]
    assert b["target_positions"].tolist() == [1, 2, 1, 0, 0]
    assert b["target_tokens"].tolist() == [7, 8, 9, 7, 9]
    assert b["target_response"].tolist() == [0, 0, 1, 2, 3]
    assert b["num_tokens"] == 8 and b["pair_index"].tolist() == [3, 4]


def test_packed_rows_hold_several_pairs_without_crossing():
    pairs = [TokenizedPair([5, 6], [7], [8], None, None, 0), TokenizedPair([5], [9], [8], None, None, 1),
             TokenizedPair([6], [7], [9], None, None, 2)]
    b = PackedCollator(0, row_tokens=7)(pairs)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 5, 9, 8], [6, 7, 9, 0, 0, 0, 0]]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 2, 0, 1, 1]
    mask = b["attention_mask"][0, 0].int()
    assert mask[4].tolist() == [0, 0, 0, 0, 1, 0, 0]  # second segment's prompt: nothing of the first
    assert mask[6].tolist() == [0, 0, 0, 0, 1, 0, 1]
    assert b["num_tokens"] == 10


def test_selective_head_equals_full_logits_with_gradients():
    model = make_model("gpt2")
    batch = PaddedPairCollator(0)(make_pairs(3, ragged=True))
    assert split_lm_head(model) is not None
    out = {}
    for selective in (False, True):
        model.zero_grad(set_to_none=True)
        logps = target_token_logps(model, batch, chunk_size=5, selective=selective)
        (logps * torch.linspace(-1, 1, len(logps))).sum().backward()
        out[selective] = logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(out[True][0], out[False][0], **TOL)
    for name, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], g, **TOL)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_selective_head_gives_the_per_token_wpo_term_of_full_logits(arch):
    """The per-token options (ld_alpha, WPO's log sum p^2) use the head-only path too."""
    model = make_model(arch)
    batch = make_collator("prefix_shared", 0)(make_pairs(3, ragged=True))
    out = {}
    for selective in (False, True):
        model.zero_grad(set_to_none=True)
        logps, sum_sq = target_token_logps(model, batch, chunk_size=5, selective=selective, log_sum_sq=True)
        (logps * torch.linspace(-1, 1, len(logps))).sum().backward()
        out[selective] = logps.detach(), sum_sq, {n: p.grad.clone() for n, p in model.named_parameters()}
    assert not out[True][1].requires_grad
    torch.testing.assert_close(out[True][0], out[False][0], **TOL)
    torch.testing.assert_close(out[True][1], out[False][1], **TOL)
    assert (out[True][1] < 0).all()  # log of a sum of squared probabilities
    for name, g in out[False][2].items():
        torch.testing.assert_close(out[True][2][name], g, **TOL)


@pytest.mark.parametrize("keep_last", [False, True])
def test_chunked_head_gradcheck_with_bias(keep_last):
    torch.manual_seed(0)
    h = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 11, (7,))
    got = ChunkedHeadLogps.apply(h, w, b, tokens, 3, keep_last)
    want = torch.log_softmax(h @ w.T + b, -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    # forward output is float32, so check gradients against autograd of the direct formula instead
    g = torch.randn(7, dtype=torch.float64)
    grads = torch.autograd.grad((got * g).sum(), (h, w, b))
    want_grads = torch.autograd.grad((want * g).sum(), (h, w, b))
    for a, e in zip(grads, want_grads):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_full_logits_fallback_for_softcapping_and_wrappers():
    model = make_model("llama")
    model.config.final_logit_softcapping = 30.0
    assert split_lm_head(model) is None
    assert split_lm_head(torch.nn.Linear(2, 2)) is None


class _FakeModel:
    def __init__(self, impl, hidden=256):
        self.config = type("C", (), {"_attn_implementation": impl, "hidden_size": hidden})()


def test_auto_layout_choice():
    long_prompt = [TokenizedPair(list(range(4, 200)), [5] * 20, [6] * 20, None, None, i) for i in range(8)]
    assert model_layout("auto", long_prompt, 4, _FakeModel("sdpa")) == "prefix_shared"
    # Lengths that vary a lot: packing removes the padding of the short pairs.
    rng = random.Random(0)
    ragged = [TokenizedPair([4] * rng.choice([4, 200]), [5] * 10, [6] * 10, None, None, i) for i in range(64)]
    assert model_layout("auto", ragged, 8, _FakeModel("sdpa")) == "packed"
    # No prompt to share: the plain layout is as cheap and simplest.
    no_prompt = [TokenizedPair([4], [5] * 30, [6] * 30, None, None, i) for i in range(8)]
    assert choose_layout("auto", no_prompt, 4, attn_impl="sdpa", hidden_size=256) == "plain"
    # Attention that cannot take a 4D mask.
    assert choose_layout("auto", long_prompt, 4, attn_impl="flash_attention_2") == "plain"
    with pytest.raises(ConfigError, match="flash_attention_2"):
        model_layout("prefix_shared", long_prompt, 4, _FakeModel("flash_attention_2"))
    assert isinstance(make_collator("packed", 0), PackedCollator)


def _same_pairs(n_prompt: int, n_response: int, n: int = 4) -> list[TokenizedPair]:
    return [TokenizedPair([4] * n_prompt, [5] * n_response, [6] * n_response, None, None, i) for i in range(n)]


def test_auto_layout_on_cuda_with_sdpa_needs_a_larger_saving():
    """H=256, prompt 30, responses 60: plain is 2 rows of 90 tokens, 2(24·H²·90 + 4H·90²) = 299.7M;
    prefix sharing one row of 150, 24·H²·150 + 4H·150² = 259.0M: 13.6% cheaper. Enough on CPU (5%),
    not on CUDA with SDPA, whose 4D mask costs the flash kernel (15%)."""
    pairs = _same_pairs(30, 60)
    costs = estimate_costs(pairs, 4, 256)
    assert costs["plain"] / 4 == 2 * (24 * 256**2 * 90 + 4 * 256 * 90**2)
    assert costs["prefix_shared"] / 4 == 24 * 256**2 * 150 + 4 * 256 * 150**2
    assert choose_layout("auto", pairs, 4, attn_impl="sdpa", hidden_size=256, device_type="cpu") == "prefix_shared"
    assert choose_layout("auto", pairs, 4, attn_impl="sdpa", hidden_size=256, device_type="cuda") == "plain"
    assert LAYOUT_RULES[("cuda", "sdpa")].min_saving == 0.15


def test_auto_layout_on_cuda_with_flex_costs_only_the_allowed_pairs():
    """H=64, prompt 100, responses 300: computing every pair of a row (CPU), the shared row of 700
    costs more than two plain rows of 400; FlexAttention skips the masked blocks, so the shared row
    costs its allowed pairs (causal 400 + causal 300 + 300·100) and is 9% cheaper than plain's two
    causal rows."""
    pairs = _same_pairs(100, 300)
    dense, allowed = estimate_costs(pairs, 4, 64), estimate_costs(pairs, 4, 64, attention="allowed")
    assert dense["prefix_shared"] > dense["plain"]
    causal = lambda n: n * (n + 1) // 2  # noqa: E731
    assert allowed["plain"] / 4 == 2 * (24 * 64**2 * 400 + 4 * 64 * causal(400))
    assert allowed["prefix_shared"] / 4 == 24 * 64**2 * 700 + 4 * 64 * (causal(400) + causal(300) + 300 * 100)
    assert allowed["prefix_shared"] < 0.95 * allowed["plain"]
    for device in ("cpu", "cuda"):
        assert choose_layout("auto", pairs, 4, attn_impl="sdpa", hidden_size=64, device_type=device) == "plain"
    assert choose_layout("auto", pairs, 4, attn_impl="flex_attention", hidden_size=64,
                         device_type="cuda") == "prefix_shared"
    # A device without a rule of its own gets the CPU cost model; explicit layouts are never second-guessed.
    assert (DEFAULT_RULE.attention, DEFAULT_RULE.min_saving) == ("dense", 0.05)
    assert choose_layout("auto", pairs, 4, attn_impl="flex_attention", hidden_size=64, device_type="mps") == "plain"
    assert choose_layout("packed", pairs, 4, attn_impl="sdpa", device_type="cuda") == "packed"


def test_model_layout_reads_the_device_of_the_model():
    pairs = _same_pairs(30, 60)
    model = make_model("llama")
    model.config.hidden_size = 256  # the cost model's H (the weights are not used)
    assert model_layout("auto", pairs, 4, model) == "prefix_shared"  # its parameters are on the CPU
    assert model_layout("auto", pairs, 4, model, device_type="cuda") == "plain"  # e.g. before placement


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs a GPU")
def test_flex_attention_matches_plain_on_gpu():
    model = make_model("llama", attn="flex_attention").cuda()
    sdpa = make_model("llama", attn="sdpa").cuda()
    pairs = make_pairs(4, ragged=True)
    from prefopt.data.collate import to_device

    want, _ = response_logps(sdpa, to_device(PaddedPairCollator(0)(pairs), "cuda"))
    got, _ = response_logps(model, to_device(PrefixSharedCollator(0)(pairs), "cuda"))
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_attn_implementation_loads_policy_and_reference_with_it(tiny_llama, easy_data):
    from accelerate.utils import DistributedType

    from prefopt.recipes import build_models

    class OneProcess:  # the Accelerator attributes build_models reads, without creating one
        mixed_precision, local_process_index, num_processes = "no", 0, 1
        device = torch.device("cpu")
        distributed_type = DistributedType.NO

    for attn, want in (("auto", "sdpa"), ("eager", "eager")):
        cfg = TrainConfig(model_name_or_path=str(tiny_llama), dataset=str(easy_data["train"]), attn_implementation=attn,
                          ref_model_name_or_path=str(tiny_llama))
        assert cfg.attention_kwargs() == ({} if attn == "auto" else {"attn_implementation": attn})
        policy, reference = build_models(cfg, OneProcess())
        assert policy.config._attn_implementation == want
        assert reference.model.config._attn_implementation == want
    from prefopt.config import build_config

    with pytest.raises(ConfigError, match="'attn_implementation' must be one of auto, sdpa"):
        build_config(TrainConfig, overrides={"attn_implementation": "flash"})
