"""`prefopt online` killed with SIGKILL in the middle of a round's training and resumed with
--resume ends bit-identical to the run that was never interrupted (a kill while scoring:
tests/online/test_rounds.py). The run trains a LoRA adapter with the per-round reference, the
combination with the most state: the adapter continued from round to round, and the frozen
snapshot of the starting adapter as the reference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _online(out: Path, model: Path, prompts: Path, *extra: str, kill: str | None = None):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PREFOPT_TEST_KILL", None)
    if kill:
        env["PREFOPT_TEST_KILL"] = kill
    args = ["online", "--model_name_or_path", str(model), "--prompts", str(prompts),
            "--scorer", "prefopt.toy:good_word_score", "--rounds", "2", "--prompts_per_round", "8",
            "--samples_per_prompt", "4", "--pairing", "all", "--max_new_tokens", "8", "--loss_type", "odpo",
            "--learning_rate", "0.01", "--per_device_train_batch_size", "4", "--max_steps", "3", "--save_steps", "1",
            "--logging_steps", "1", "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8",
            "--reference_update", "per_round", "--report_to", "none", "--progress_bar", "false", "--log_throughput", "false",
            "--output_dir", str(out), *extra]
    return subprocess.run([sys.executable, "-m", "prefopt", *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_killed_while_training_and_while_scoring_then_resumed_equals_uninterrupted(tiny_llama, easy_data, tmp_path):
    prompts = easy_data["train"]
    whole = _online(tmp_path / "whole", tiny_llama, prompts)
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    first = _online(out, tiny_llama, prompts, kill="step:2")  # round 1, after training step 2 (checkpoint-2 saved)
    assert first.returncode == -signal.SIGKILL
    assert (out / "rounds" / "1" / "train" / "checkpoint-2").is_dir()
    assert not (out / "rounds" / "1" / "train_result.json").exists()
    second = _online(out, tiny_llama, prompts, "--resume")
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stderr  # round 1's training continued from its checkpoint

    for name in ("metrics.jsonl", "adapter_model.safetensors", "rounds/1/pairs.jsonl", "rounds/2/pairs.jsonl",
                 "rounds/2/samples.jsonl", "rounds/3/samples.jsonl", "rounds/2/train/adapter_model.safetensors"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    # per_round under LoRA: round 2's reference is the adapter it starts from (rewards exactly 0),
    # and that adapter is round 1's (the policy is not the base: its samples' KL is not 0)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in rows if r["round"] == 2 and r.get("round_step") == 1)
    assert start["rewards/chosen"] == 0.0 and start["rewards/rejected"] == 0.0
    assert next(r for r in rows if r["round"] == 2 and "samples/kl" in r)["samples/kl"] != 0.0

