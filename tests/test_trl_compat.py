"""A TRL user's config keys: translated, accepted without effect, or refused; never silently dropped."""

from __future__ import annotations

import math

import pytest

from prefopt.config import TrainConfig, build_config, config_fields, trl_markdown
from prefopt.errors import ConfigError
from prefopt.trl_compat import SAME_NAMED, TRL_KEYS

# Keys a DPOConfig YAML commonly sets (TRL 1.16 and TRL < 1.0 names, TrainingArguments), as a
# TRL user writes them; `expect` is what prefopt must make of them.
TRL_YAML = """\
model_name_or_path: m
dataset: d.jsonl
output_dir: out
beta: 0.1
loss_type: sigmoid
learning_rate: 5.0e-7
lr_scheduler_type: cosine_with_min_lr
lr_scheduler_kwargs: {min_lr: 5.0e-8}
warmup_ratio: 0.1
optim: adamw_torch
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
max_length: 512
max_completion_length: 128
truncation_mode: keep_end
padding_free: false
use_logits_to_keep: true
eval_strategy: steps
save_strategy: "no"
do_eval: true
push_to_hub: false
tf32: false
torch_dtype: bf16
model_init_kwargs: {torch_dtype: bfloat16}
sync_ref_model: false
dataloader_num_workers: 2
gradient_checkpointing: true
logging_steps: 5
disable_tqdm: true
seed: 7
"""


def test_a_dpoconfig_yaml_is_read_with_trl_meanings(tmp_path):
    path = tmp_path / "dpo.yaml"
    path.write_text(TRL_YAML)
    notes: list[str] = []
    cfg = build_config(TrainConfig, path, notes=notes).validate()
    assert cfg.lr_scheduler_type == "cosine_with_min_lr"
    assert cfg.min_lr_rate == pytest.approx(0.1)  # min_lr / learning_rate
    assert cfg.warmup_ratio == 0.1 and cfg.warmup_for(95) == 10  # ceil(9.5), as transformers rounds
    assert cfg.optimizer == "adamw" and cfg.torch_dtype == "bfloat16"
    assert cfg.max_length == 512 and cfg.prompt_limit() == 256  # max_prompt_length unset: half
    assert cfg.max_completion_length == 128 and cfg.truncation_mode == "keep_end"
    assert cfg.layout == "auto"  # padding_free: false keeps the layout choice
    assert cfg.eval_steps == 5  # eval_strategy: steps, eval_steps unset -> logging_steps, as transformers
    assert cfg.save_steps == 0  # save_strategy: no
    assert cfg.tf32 is False and cfg.progress_bar is False and cfg.seed == 7
    assert cfg.loss_type == "sigmoid"
    # dataloader_num_workers changes nothing here: said once, not dropped silently
    assert [n.split(":")[0] for n in notes] == ["dataloader_num_workers"]


def test_every_problem_is_reported_at_once_with_what_to_use(tmp_path):
    path = tmp_path / "dpo.yaml"
    path.write_text("beta: 0.1\nbetta: 2\npush_to_hub: true\noptim: adamw_8bit\nsave_strategy: epoch\n"
                    "pretrain: gpt2\nlr_scheduler_type: polynomial\nsync_ref_model: true\n")
    with pytest.raises(ConfigError) as e:
        build_config(TrainConfig, path)
    lines = str(e.value).splitlines()
    assert len(lines) == 7, lines
    text = str(e.value)
    assert "unknown config key 'betta'; did you mean 'beta'?" in text
    assert "push_to_hub is not offered; upload output_dir" in text
    assert "optim: value 'adamw_8bit' is not offered" in text
    assert "save_strategy: epoch is not offered; use save_strategy: steps with save_steps" in text
    assert "unknown config key 'pretrain'; did you mean 'model_name_or_path'?" in text  # by meaning (OpenRLHF)
    assert "'lr_scheduler_type' must be one of" in text
    assert "sync_ref_model (TR-DPO) is not offered" in text
    assert all(line.startswith(str(path)) for line in lines)


def test_max_completion_length_is_a_key_and_suggestions_go_by_meaning():
    cfg = build_config(TrainConfig, None, {"max_completion_length": "64"})
    assert cfg.max_completion_length == 64
    with pytest.raises(ConfigError, match="did you mean 'max_completion_length'"):
        build_config(TrainConfig, None, {"max_target_length": 64})  # LLaMA-Factory's name
    with pytest.raises(ConfigError, match="did you mean 'max_prompt_length'"):
        build_config(TrainConfig, None, {"prompt_max_len": 64})  # OpenRLHF's name


def test_bad_nested_values_are_one_line_each():
    with pytest.raises(ConfigError) as e:
        build_config(TrainConfig, None, {"lr_scheduler_kwargs": {"min_lr": "tiny"},
                                         "model_init_kwargs": {"revision": "main"}})
    assert str(e.value).splitlines() == [
        "command line: lr_scheduler_kwargs: lr_scheduler_kwargs.min_lr expects a number, got 'tiny'",
        "command line: model_init_kwargs: model_init_kwargs.revision is not offered; prefopt reads "
        "torch_dtype/dtype and attn_implementation from it",
    ]
    cfg = build_config(TrainConfig, None, {"lr_scheduler_kwargs": '{"min_lr_rate": 0.3}'})  # JSON on a flag
    assert cfg.min_lr_rate == 0.3


def test_alias_and_key_that_disagree_are_refused():
    with pytest.raises(ConfigError, match="optimizer and optim both set optimizer"):
        build_config(TrainConfig, None, {"optimizer": "rmsprop", "optim": "adamw_torch"})
    cfg = build_config(TrainConfig, None, {"optimizer": "adamw", "optim": "adamw_torch_fused"})
    assert cfg.optimizer == "adamw"
    with pytest.raises(ConfigError, match="warmup_steps and warmup_ratio exclude each other"):
        build_config(TrainConfig, None, {"warmup_steps": 3, "warmup_ratio": 0.1}).validate(require_paths=False)


@pytest.mark.parametrize("overrides,expected", [
    ({"padding_free": True}, {"layout": "packed"}),
    ({"eval_strategy": "no", "eval_dataset": "e.jsonl"}, {"eval_dataset": None}),
    ({"eval_strategy": "steps", "eval_steps": 7}, {"eval_steps": 7}),
    ({"warmup_steps": 0.25}, {"warmup_ratio": 0.25, "warmup_steps": 0}),  # transformers 5: a float < 1 is a ratio
    ({"lr_scheduler_type": "constant_with_warmup"}, {"lr_scheduler_type": "constant_with_warmup"}),
    ({"optimizer": "adamw_torch"}, {"optimizer": "adamw"}),
    ({"torch_dtype": "fp32"}, {"torch_dtype": "float32"}),
    ({"dtype": "bf16"}, {"torch_dtype": "bfloat16"}),
    ({"model_init_kwargs": {"attn_implementation": "eager", "dtype": "float32"}},
     {"attn_implementation": "eager", "torch_dtype": "float32"}),
    ({"lr_scheduler_kwargs": {"min_lr_rate": 0.2}}, {"min_lr_rate": 0.2}),
    ({"per_gpu_train_batch_size": 3}, {"per_device_train_batch_size": 3}),
    ({"evaluation_strategy": "no"}, {"eval_dataset": None}),
    ({"train_sampling_strategy": "sequential"}, {"shuffle": False}),
    ({"disable_tqdm": False, "include_tokens_per_second": False}, {"progress_bar": True, "log_throughput": False}),
])
def test_translations(overrides, expected):
    cfg = build_config(TrainConfig, None, overrides)
    for key, value in expected.items():
        assert getattr(cfg, key) == value, key


def test_trl_keys_are_not_prefopt_keys_unless_they_translate_values():
    fields = config_fields(TrainConfig)
    for name, entry in TRL_KEYS.items():
        # a prefopt key of the same name wins, so an entry for it would be dead (except value translations)
        assert name not in fields or entry.target == name, name
    for name in SAME_NAMED:
        assert name in fields or name in TRL_KEYS, name


def test_trl_table_lists_every_key_the_user_asked_about():
    table = trl_markdown()
    for key in ("eval_strategy", "warmup_ratio", "padding_free", "use_logits_to_keep", "optim",
                "max_completion_length", "push_to_hub", "save_strategy", "do_eval", "tf32", "model_init_kwargs",
                "truncation_mode", "sync_ref_model", "dataloader_num_workers", "dataset_num_proc", "report_to",
                "run_name", "logging_dir"):
        assert f"| `{key}` |" in table, key


def test_every_trainingarguments_key_is_known():
    """Every key of the installed transformers' TrainingArguments is a prefopt key or a TRL entry, so
    none of them gets a plain "unknown key": each has a meaning, a note or a line saying what to use."""
    import dataclasses

    from transformers import TrainingArguments

    fields = config_fields(TrainConfig)
    missing = [f.name for f in dataclasses.fields(TrainingArguments)
               if f.init and f.name not in fields and f.name not in TRL_KEYS]
    assert missing == []


def test_max_prompt_length_follows_max_length():
    assert build_config(TrainConfig, None, {"max_length": 512}).validate(require_paths=False).prompt_limit() == 256
    assert TrainConfig(max_length=64, max_prompt_length=None).prompt_limit() is None
    assert TrainConfig(max_length=64, max_prompt_length=40).prompt_limit() == 40
    with pytest.raises(ConfigError, match="max_prompt_length must be at least 1"):
        TrainConfig(max_prompt_length=0).validate(require_paths=False)


def test_cosine_with_min_lr_matches_transformers_formula():
    from prefopt.training.optim import lr_multiplier

    got = [lr_multiplier(s, kind="cosine_with_min_lr", warmup_steps=2, total_steps=6, min_lr_rate=0.1)
           for s in range(7)]
    # warm-up 0, 1/2; then 0.1 + 0.9 * 0.5 * (1 + cos(pi * k / 4)) for k = 0..4
    want = [0.0, 0.5] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    assert got == pytest.approx(want)
    assert got[-1] == pytest.approx(0.1)
    assert lr_multiplier(1, kind="constant_with_warmup", warmup_steps=4, total_steps=6) == 0.25


def test_bf16_notice_on_cpu_without_a_fast_path():
    from prefopt.training.distributed import slow_cpu_precision

    cfg = TrainConfig(bf16=True)
    no_bf16 = {"architecture": "x86_64", "cpu_name": "X", "avx512_bf16": False, "amx_bf16": False}
    assert "bf16 on this CPU (X) has no avx512_bf16 or amx_bf16" in slow_cpu_precision(cfg, no_bf16)
    assert slow_cpu_precision(cfg, {**no_bf16, "amx_bf16": True}) is None
    assert slow_cpu_precision(TrainConfig(), no_bf16) is None
    assert slow_cpu_precision(TrainConfig(torch_dtype="float16"), no_bf16).startswith("fp16")


# The fields TRL 1.16's DPOConfig and its _BaseConfig declare (trl/trainer/dpo_config.py,
# base_config.py), and the DPOConfig fields of TRL < 1.0 that configs in the wild still carry.
DPOCONFIG_1_16 = (
    "activation_offloading beta dataset_num_proc disable_dropout discopop_tau f_alpha_divergence_coef "
    "f_divergence_type gradient_checkpointing label_smoothing ld_alpha learning_rate logging_steps loss_type "
    "loss_weights lr_scheduler_kwargs max_length model_init_kwargs pad_to_multiple_of pad_token padding_free "
    "precompute_ref_batch_size precompute_ref_log_probs ref_model_mixup_alpha ref_model_sync_steps "
    "router_aux_loss_coef sync_ref_model torch_empty_cache_steps truncation_mode trust_remote_code "
    "use_liger_kernel use_weighting").split()
DPOCONFIG_OLD = (
    "max_prompt_length max_completion_length rpo_alpha reference_free use_logits_to_keep use_num_logits_to_keep "
    "generate_during_eval model_adapter_name ref_adapter_name force_use_ref_model is_encoder_decoder "
    "label_pad_token_id padding_value ref_model_init_kwargs tools use_liger_loss").split()


def test_every_dpoconfig_key_is_known():
    fields = config_fields(TrainConfig)
    assert [k for k in DPOCONFIG_1_16 + DPOCONFIG_OLD if k not in fields and k not in TRL_KEYS] == []
    table = trl_markdown()
    assert [k for k in DPOCONFIG_1_16 + DPOCONFIG_OLD if f"| `{k}` |" not in table] == []
