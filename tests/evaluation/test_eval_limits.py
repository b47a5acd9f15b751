"""``prefopt eval`` a user can wait for: the plan line, a progress bar per phase, --max_prompts and
--max_pairs as seeded subsets, the reward's standard error, the reference's pair log-probs reused
from the cache."""

from __future__ import annotations

import json
import math

import pytest

from prefopt.evaluation.policy import eval_plan, mean_stderr
from prefopt.toy import build_tiny_model


def test_mean_stderr_by_hand():
    # values 1, 2, 3, 6: mean 3, sample variance (4 + 1 + 0 + 9) / 3 = 14/3, stderr sqrt(14/3 / 4)
    assert mean_stderr([1.0, 2.0, 3.0, 6.0]) == pytest.approx(math.sqrt(14 / 3 / 4))
    assert math.isnan(mean_stderr([1.0]))


def test_eval_plan_line():
    line = eval_plan(["a", "b"], "ref", 100, 10, 2, 48, "p.json", 2942, 2942)
    assert line == ("prefopt: eval plan: 2 models + reference ref; 10 prompts (seeded subset of 100) x 2 samples "
                    "(up to 48 new tokens) per model; preference accuracy on 2942 pairs of p.json")
    assert "(seeded subset of 2942; --max_pairs)" in eval_plan(["a"], "r", 5, 5, 1, 8, "p.json", 2942, 256)


@pytest.mark.slow
def test_eval_limits_progress_stderr_and_cached_reference(cli_here, tiny_llama, easy_data, tmp_path, monkeypatch):
    import torch

    from prefopt.data.prepare import seeded_subset
    from prefopt.evaluation.policy import load_eval_pairs, preference_accuracy, read_prompts
    from prefopt.modeling.load import load_causal_lm, load_tokenizer

    monkeypatch.setenv("PREFOPT_CACHE_DIR", str(tmp_path / "cache"))
    policy_dir = build_tiny_model(tmp_path / "policy", arch="llama", seed=1)
    args = ["eval", "--model", policy_dir, "--ref", tiny_llama, "--prompts", easy_data["train"],
            "--scorer", "prefopt.demo.world:sentiment_score", "--num_samples", "2", "--max_new_tokens", "6",
            "--pairs", easy_data["eval"], "--beta", "0.5", "--max_prompts", "5", "--max_pairs", "6",
            "--seed", "7", "--batch_size", "4"]
    first = cli_here(*args, "--output_dir", tmp_path / "e1")
    assert first.returncode == 0, first.stderr[-2000:]
    assert ("eval plan: 1 model + reference " in first.stderr
            and "; 5 prompts (seeded subset of 64) x 2 samples (up to 6 new tokens) per model; preference "
                "accuracy on 6 pairs (seeded subset of 32; --max_pairs)" in first.stderr)
    for phase in ("ref samples", "policy samples", "KL: policy logps", "KL: reference logps",
                  "accuracy: reference", "accuracy: policy"):
        assert phase in first.stderr, phase
    got = json.loads((tmp_path / "e1" / "eval_policy.json").read_text())
    assert got["num_prompts"] == 5 and got["num_prompts_total"] == 64
    assert got["num_pairs"] == 6 and got["num_pairs_total"] == 32
    assert got["reward_stderr"] > 0 and got["reward_ref_stderr"] > 0
    assert f"reward {got['reward']:.4f} ± {got['reward_stderr']:.4f}" in first.stderr
    # The same subset of prompts: the seeded one, in file order.
    prompts = read_prompts(str(easy_data["train"]))
    assert {e["prompt"] for e in got["examples"]} <= set(seeded_subset(prompts, 5, 7))

    # The accuracy on the subset, computed here without the cache, matches.
    tok = load_tokenizer(str(policy_dir))
    pairs, total = load_eval_pairs(str(easy_data["eval"]), tok, max_pairs=6, seed=7)
    assert total == 32 and len(pairs) == 6
    with torch.no_grad():
        direct = preference_accuracy(load_causal_lm(str(policy_dir)), load_causal_lm(str(tiny_llama)), pairs, tok,
                                     beta=0.5, batch_size=4)
    assert got["accuracy"] == pytest.approx(direct["accuracy"])
    assert got["reward_margin"] == pytest.approx(direct["reward_margin"], rel=1e-5)

    # A second evaluation reuses the reference's pair log-probs and gets the same numbers.
    second = cli_here(*args, "--output_dir", tmp_path / "e2")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "reference log-probs of the 6 pairs reused from the cache" in second.stderr
    assert "accuracy: reference" not in second.stderr
    again = json.loads((tmp_path / "e2" / "eval_policy.json").read_text())
    assert again["accuracy"] == got["accuracy"] and again["reward_margin"] == pytest.approx(got["reward_margin"])
    assert again["reward"] == got["reward"]


def test_eval_limits_must_be_positive():
    from prefopt.errors import PrefoptError
    from prefopt.evaluation.policy import run_eval

    with pytest.raises(PrefoptError, match="--max_pairs must be at least 1"):
        run_eval(["m"], "r", prompts="p.txt", scorer="x:y", pairs="p.json", max_pairs=0)
    with pytest.raises(PrefoptError, match="--max_prompts must be at least 1"):
        run_eval(["m"], "r", prompts="p.txt", scorer="x:y", max_prompts=-1)
