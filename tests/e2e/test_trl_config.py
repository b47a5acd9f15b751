"""A DPOConfig YAML written as a TRL user writes it trains unchanged (a short run on a tiny model)."""

from __future__ import annotations

import math

import pytest
import yaml

from prefopt.training.metrics import read_metrics

TRL_STYLE = """\
# TRL DPOConfig keys (TRL 1.x and < 1.0) and TrainingArguments, unchanged
model_name_or_path: {model}
dataset: {data}
eval_dataset: {eval}
output_dir: {out}
loss_type: sigmoid
beta: 0.1
learning_rate: 1.0e-3
lr_scheduler_type: cosine_with_min_lr
lr_scheduler_kwargs:
  min_lr_rate: 0.1
warmup_ratio: 0.25
optim: adamw_torch
per_device_train_batch_size: 8
per_device_eval_batch_size: 8
gradient_accumulation_steps: 1
max_steps: 8
max_length: 32
max_completion_length: 8
truncation_mode: keep_end
padding_free: false
use_logits_to_keep: true
precompute_ref_log_probs: false
eval_strategy: steps
eval_steps: 4
save_strategy: "no"
logging_steps: 1
do_eval: true
push_to_hub: false
tf32: false
torch_dtype: fp32
model_init_kwargs:
  torch_dtype: float32
sync_ref_model: false
dataloader_num_workers: 0
dataset_num_proc: 1
gradient_checkpointing: false
bf16: false
disable_tqdm: true
seed: 3
"""


@pytest.mark.slow
def test_dpoconfig_yaml_trains_unchanged(cli_here, tiny_llama, easy_data, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "dpo_config.yaml"
    config.write_text(TRL_STYLE.format(model=tiny_llama, data=easy_data["train"], eval=easy_data["eval"], out=out))
    res = cli_here("train", "--config", config)
    assert res.returncode == 0, res.stderr
    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["step"] for r in rows if "eval/loss" in r] == [4, 8]  # eval_strategy: steps, eval_steps: 4
    assert not list(out.glob("checkpoint-*"))  # save_strategy: no
    # warm-up ceil(0.25 * 8) = 2 steps, then transformers' cosine_with_min_lr down to 0.1 * lr
    want = [1e-3 * (s / 2 if s < 2 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 6))) for s in range(8)]
    assert [r["learning_rate"] for r in train] == pytest.approx(want, rel=1e-6)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["optimizer"], saved["lr_scheduler_type"], saved["torch_dtype"]) == ("adamw", "cosine_with_min_lr",
                                                                                      "float32")
    assert saved["max_completion_length"] == 8 and saved["save_steps"] == 0
    summary = (out / "data_summary.json").read_text()
    assert "completion_truncated" in summary
    from prefopt.config import TrainConfig, build_config

    assert build_config(TrainConfig, out / "config.yaml") == build_config(TrainConfig, config)  # re-runnable
