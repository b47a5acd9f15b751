"""`prefopt online` with `use_peft`: the policy is a LoRA adapter that every round continues, the fixed
reference is the base (adapter off), the per-round reference the adapter the round started from,
live or precomputed; the final output is what `prefopt train --use_peft` writes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from prefopt.online.rounds import run_online
from tests.online.test_rounds import _cfg, _jsonl

pytest.importorskip("peft")

LORA = dict(use_peft=True, lora_r=4, lora_alpha=8)


@pytest.mark.slow
def test_one_lora_odpo_round_uses_the_scores_as_offsets_and_writes_adapter_and_merged_model(
        tiny_llama, easy_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    alpha = 0.5
    out = tmp_path / "run"
    rows = run_online(_cfg(tiny_llama, easy_data["train"], out, loss_type="odpo", alpha=alpha, prompts_per_round=6,
                           merge_adapter_on_save=True, **LORA), progress=False)
    pairs = _jsonl(out / "rounds" / "1" / "pairs.jsonl")
    assert pairs
    # LoRA's B starts at 0, so policy == reference (the base) at step 1: the loss is ODPO's offset alone
    first = next(r for r in rows if r.get("round") == 1 and r.get("round_step") == 1)
    by_hand = sum(math.log1p(math.exp(alpha * math.log(p["score_chosen"] - p["score_rejected"]))) for p in pairs)
    assert first["loss"] == pytest.approx(by_hand / len(pairs), rel=1e-5)
    assert first["rewards/margins"] == 0.0

    # What `prefopt train --use_peft --merge_adapter_on_save` writes: the adapter (the trained round's)
    # and merged/, no full model at the top.
    assert not (out / "model.safetensors").exists()
    final, trained = load_file(out / "adapter_model.safetensors"), load_file(
        out / "rounds" / "1" / "train" / "adapter_model.safetensors")
    assert final.keys() == trained.keys() and all(torch.equal(final[k], trained[k]) for k in final)
    assert any(k.endswith("lora_B.weight") and bool(final[k].abs().sum() > 0) for k in final)  # it trained
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_llama)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    by_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(out)).merge_and_unload()
    for name, tensor in by_peft.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], tensor, rtol=0, atol=0)
    # the final policy's samples come from base + adapter: it moved away from the initial policy
    summaries = [r for r in rows if "samples/reward_mean" in r]
    assert summaries[0]["samples/kl"] == 0.0 and summaries[1]["samples/kl"] != 0.0


@pytest.mark.slow
def test_lora_reference_update_with_a_live_and_a_precomputed_reference(tiny_llama, easy_data, tmp_path):
    """Two rounds: fixed with the reference live and precomputed, per_round precomputed (per_round
    live: tests/e2e/test_online_resume.py, tests/online/test_online_multiprocess.py). Round 1 is the
    same in every run (the reference is the base either way), so round 2 samples the same pairs and
    starts from the same adapter: the policy's log-probs agree, and only the reference differs."""
    starts = {}
    for update, precompute in (("fixed", False), ("fixed", True), ("per_round", True)):
        rows = run_online(_cfg(tiny_llama, easy_data["train"], tmp_path / f"{update}-{precompute}", rounds=2,
                               reference_update=update, loss_type="dpo", prompts_per_round=6,
                               precompute_ref_log_probs=precompute, **LORA), progress=False)
        starts[update, precompute] = {r["round"]: r for r in rows if r.get("round_step") == 1}
    live = starts["fixed", False][2]
    for key, s in starts.items():
        # round 1: a new adapter (B = 0) against the base: every implicit reward is 0, the loss log 2
        assert s[1]["rewards/chosen"] == 0.0 and s[1]["loss"] == pytest.approx(math.log(2)), key
        # round 2 continues round 1's adapter, in every run the same
        assert s[2]["logps/chosen"] == pytest.approx(live["logps/chosen"], rel=1e-6), key
    # fixed: the base, which round 1's training moved away from (a new adapter in round 2 would
    # start at the base's log-probs, with rewards 0); precomputed with the adapter off == live
    assert abs(live["rewards/chosen"]) > 1e-4 and abs(live["rewards/rejected"]) > 1e-4
    for key in ("loss", "rewards/chosen", "rewards/rejected"):
        assert starts["fixed", True][2][key] == pytest.approx(live[key], rel=1e-5, abs=1e-7), key
    # per_round: the reference is the adapter round 2 started from, so the rewards start at 0
    s = starts["per_round", True][2]
    assert abs(s["rewards/chosen"]) < 1e-6 and abs(s["rewards/rejected"]) < 1e-6
    assert s["loss"] == pytest.approx(math.log(2), abs=1e-6)
