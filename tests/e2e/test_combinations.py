"""Features together, where earlier bugs sat: LD-DPO's per-token reference with LoRA, with bf16
autocast and with a precomputed reference; reward models under the same precision refusals."""

from __future__ import annotations

import math

import pytest

from prefopt.cli import main
from prefopt.training.metrics import read_metrics

pytestmark = pytest.mark.slow


def _train(tiny_llama, data, out, *extra, command=("train",)):
    args = [*command, "--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(out),
            "--max_steps", "3", "--logging_steps", "1", "--save_steps", "0", "--progress_bar", "false",
            "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--report_to", "none",
            "--max_length", "48", "--max_prompt_length", "24", "--log_throughput", "false", *extra]
    return main(args)


@pytest.mark.parametrize("extra", [
    ("--use_peft", "true", "--lora_r", "4", "--lora_target_modules", "q_proj,v_proj"),
    ("--bf16", "true"),
    ("--precompute_ref_log_probs", "true"),
], ids=["lora", "bf16", "precomputed"])
def test_ld_alpha_runs_with(extra, tiny_llama, easy_data, tmp_path):
    extra = (*extra, "--ref_logps_cache_dir", str(tmp_path / "cache")) if "--precompute_ref_log_probs" in extra else extra
    assert _train(tiny_llama, easy_data["train"], tmp_path / "run", "--ld_alpha", "0.5", *extra) == 0
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    # Policy == reference at step 1 (LoRA's B is 0; autocast applies to both): every loss is log 2.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_precomputed_per_token_reference_matches_the_live_one(tiny_llama, easy_data, tmp_path):
    """The cache, computed once, then reused (a hit), gives the live reference's losses."""
    common = ("--ld_alpha", "0.5", "--seed", "3")
    assert _train(tiny_llama, easy_data["train"], tmp_path / "live", *common) == 0
    cache = ("--precompute_ref_log_probs", "true", "--ref_logps_cache_dir", str(tmp_path / "cache"))
    assert _train(tiny_llama, easy_data["train"], tmp_path / "pre1", *common, *cache) == 0
    assert _train(tiny_llama, easy_data["train"], tmp_path / "pre2", *common, *cache) == 0
    live = read_metrics(tmp_path / "live" / "metrics.jsonl")
    for run in ("pre1", "pre2"):
        pre = read_metrics(tmp_path / run / "metrics.jsonl")
        for a, b in zip(live, pre):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
            assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)


def test_reward_train_refuses_fp16_on_cpu_like_train(tiny_llama, easy_data, tmp_path, capsys):
    for command in (("train",), ("reward", "train")):
        out = tmp_path / "_".join(command)
        assert _train(tiny_llama, easy_data["train"], out, "--fp16", "true", command=command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("prefopt: error: fp16 mixed precision needs a CUDA GPU"), err
        assert not out.exists()  # refused before anything was written


def test_reward_train_applies_bf16(tiny_llama, easy_data, tmp_path):
    assert _train(tiny_llama, easy_data["train"], tmp_path / "rm", "--bf16", "true", command=("reward", "train")) == 0
    rows = read_metrics(tmp_path / "rm" / "metrics.jsonl")
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
