"""TRL's ``DPOConfig`` / ``TrainingArguments`` keys in a prefopt config: what each one becomes.

A YAML file written for TRL's ``DPOTrainer`` runs unchanged when every key in it either means the
same here (the same name, or an alias translated to prefopt's key), has no effect on the result in
TRL either, or is refused with one line that says what to use instead. Nothing is dropped without a
word: keys accepted without an effect here print a note. This table is the single source of truth
for the translation and for the TRL table in docs/config.md (``prefopt.config.trl_markdown``).

Keys are looked up only when prefopt has no key of that name: a prefopt key always wins, so a key
added to ``TrainConfig`` later (with TRL's meaning) takes over from its entry here. The exception is
an entry whose target is its own name (``warmup_steps``): it translates a TRL value of a prefopt key.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefopt.errors import ConfigError


class Refused(Exception):
    """A TRL key or value prefopt does not offer; the message says what to use instead."""


@dataclass(frozen=True)
class TrlKey:
    """How one TRL key is read. ``translate(value)`` returns prefopt key/value pairs (empty: no
    effect) and an optional note to print, or raises ``Refused``. ``kind`` and ``doc`` are for the
    table in docs/config.md."""

    kind: str  # "alias" | "no effect" | "refused"
    target: str
    doc: str
    translate: Callable[[Any], tuple[dict[str, Any], str | None]]


def _falsy(value: Any) -> bool:
    return value in (None, False, 0, "", "no", "none", "false", [], {})


def alias(target: str, doc: str = "", values: dict | None = None, convert=None) -> TrlKey:
    """Same meaning under prefopt's name ``target``; ``values`` maps TRL values (others refused)."""

    def translate(value):
        if convert is not None:
            return convert(value), None
        if values is not None:
            key = value.lower() if isinstance(value, str) else value
            if key not in values:
                raise Refused(f"value {value!r} is not offered; " + doc)
            return {target: values[key]}, None
        return {target: value}, None

    return TrlKey("alias", target, doc, translate)


def only(default: Any, doc: str, ok: tuple = ()) -> TrlKey:
    """Accepted at TRL's default (or any of ``ok``), which is what prefopt does; refused otherwise."""

    def translate(value):
        if value == default or value in ok or (default in (None, False) and _falsy(value)):
            return {}, None
        raise Refused(doc)

    shown = {None: "unset", True: "`true`", False: "`false`"}.get(default, f"`{default}`") if not isinstance(
        default, int | float) or isinstance(default, bool) else f"`{default}`"
    return TrlKey("refused unless default", shown, doc, translate)


def no_effect(doc: str, note: bool = True) -> TrlKey:
    """Accepted with any value; it changes nothing here. ``note``: say so when the run starts
    (False where it changes nothing in TRL's trainer either)."""

    def translate(value):
        return {}, (doc if note and not _falsy(value) else None)

    return TrlKey("no effect", "", doc, translate)


def trackers(name: str) -> TrlKey:
    def translate(value):
        if _falsy(value):
            return {}, None
        raise Refused(f"{name} is not offered; trackers take run_name and logging_dir, and their own "
                      "environment variables (e.g. WANDB_PROJECT, TRACKIO_PROJECT)")

    return TrlKey("see trackers", "", "trackers: `report_to`", translate)


def _strategy(key: str, steps_key: str, off: dict[str, Any]):
    def convert(value):
        v = str(value).lower()
        if v == "steps":
            return {}
        if v == "no":
            return dict(off)
        raise Refused(f"{key}: {value} is not offered; use {key}: steps with {steps_key}: N (or no)")

    return convert


def _eval_strategy(value):
    v = str(value).lower()
    if v == "steps":
        return {"eval_strategy_steps": True}  # resolved below: eval_steps defaults to logging_steps
    if v == "no":
        return {"eval_off": True}  # resolved below: no evaluation, even with an eval_dataset in the file
    raise Refused(f"eval_strategy: {value} is not offered; use eval_strategy: steps with eval_steps: N "
                  "(or no)")


def _padding_free(value):
    return {"layout": "packed"} if value is True or str(value).lower() == "true" else {}


def _disable_tqdm(value):
    return {} if value is None else {"progress_bar": not _truthy(value)}


def _truthy(value) -> bool:
    return value is True or str(value).lower() in ("true", "1", "yes")


_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
           "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32", "auto": "auto"}


def _model_init_kwargs(value):
    if _falsy(value):
        return {}
    out = {}
    for k, v in _mapping("model_init_kwargs", value).items():
        if k in ("torch_dtype", "dtype"):
            if str(v).lower() not in _DTYPES:
                raise Refused(f"model_init_kwargs.{k}: {v!r} is not offered; use torch_dtype: "
                              "auto, float32, bfloat16 or float16")
            out["torch_dtype"] = _DTYPES[str(v).lower()]
        elif k == "attn_implementation":
            out["attn_implementation"] = v
        elif k == "trust_remote_code" and not _truthy(v):
            continue
        else:
            raise Refused(f"model_init_kwargs.{k} is not offered; prefopt reads torch_dtype/dtype and "
                          "attn_implementation from it")
    return out


def _mapping(name: str, value) -> dict:
    """A YAML mapping, or JSON text of one (the command line)."""
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except ValueError:
            pass
    if not isinstance(value, dict):
        raise Refused(f"{name} must be a mapping (JSON on the command line), got {value!r}")
    return value


def _number(name: str, value) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        out = float(value)
    except (TypeError, ValueError):
        raise Refused(f"{name} expects a number, got {value!r}") from None
    if not math.isfinite(out):
        raise Refused(f"{name} expects a finite number, got {value!r}")
    return out


def _lr_scheduler_kwargs(value):
    if _falsy(value):
        return {}
    out = {}
    for k, v in _mapping("lr_scheduler_kwargs", value).items():
        if k == "min_lr_rate":
            out["min_lr_rate"] = _number("lr_scheduler_kwargs.min_lr_rate", v)
        elif k == "min_lr":
            # divided by learning_rate once every key is known (resolve_lr_floor)
            out["min_lr"] = _number("lr_scheduler_kwargs.min_lr", v)
        elif k == "num_cycles" and _number("lr_scheduler_kwargs.num_cycles", v) == 0.5:
            continue  # the one cosine half-wave prefopt draws
        else:
            raise Refused(f"lr_scheduler_kwargs.{k} is not offered; prefopt reads min_lr_rate and min_lr "
                          "(for cosine_with_min_lr)")
    return out


def _warmup_steps(value):
    # transformers 5 takes a float below 1 in warmup_steps as a ratio of the total steps
    if isinstance(value, float) and 0 < value < 1:
        return {"warmup_ratio": value}
    return {"warmup_steps": value}


def _include_tps(value):
    return {"log_throughput": _truthy(value)}


_OPTIM = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
          "rmsprop": "rmsprop"}
_ACCEL = "use accelerate launch --config_file configs/accelerate/{ddp,fsdp2,zero2,zero3}.yaml (docs/distributed.md)"

# Every entry: a TRL (DPOConfig, TRL < 1.0 DPOConfig, ModelConfig) or transformers TrainingArguments
# key with no prefopt key of the same name.
TRL_KEYS: dict[str, TrlKey] = {
    # --- model ---
    "model_init_kwargs": alias("torch_dtype", "its torch_dtype/dtype and attn_implementation become those keys; "
                               "other entries refused",
                               convert=_model_init_kwargs),
    "ref_model_init_kwargs": only(None, "ref_model_init_kwargs is not offered: the reference loads like the policy "
                                  "(torch_dtype)"),
    "dtype": alias("torch_dtype", "transformers 5's name of torch_dtype", values=_DTYPES),
    "trust_remote_code": only(False, "trust_remote_code: true is not offered: prefopt loads architectures that "
                              "transformers ships"),
    "router_aux_loss_coef": only(None, "router_aux_loss_coef (MoE load balancing) is not offered"),
    "model_adapter_name": only(None, "model_adapter_name is not offered: with use_peft prefopt trains one adapter"),
    "ref_adapter_name": only(None, "ref_adapter_name is not offered: with use_peft the reference is the base model "
                             "with the adapter off"),
    "force_use_ref_model": only(False, "force_use_ref_model is not offered: with use_peft the reference is the "
                                "adapter-off base model (no second copy)"),
    "is_encoder_decoder": only(False, "encoder-decoder models are not offered: prefopt trains causal LMs"),
    "activation_offloading": only(False, "activation_offloading is not offered; use gradient_checkpointing"),
    "use_liger_kernel": only(False, "use_liger_kernel is not needed: prefopt's chunked LM head never builds the "
                             "full logits; remove the key"),
    "use_liger_loss": only(False, "use_liger_loss is not needed: prefopt's chunked LM head never builds the "
                           "full logits; remove the key"),
    # --- data ---
    "padding_free": alias("layout", "`true` is `layout: packed` (pairs concatenated, no padding); `false` keeps "
                          "`layout`", convert=_padding_free),
    "use_logits_to_keep": no_effect("always on in prefopt: the LM head runs at completion tokens only", note=False),
    "use_num_logits_to_keep": no_effect("always on in prefopt: the LM head runs at completion tokens only",
                                        note=False),
    "pad_to_multiple_of": no_effect("pad_to_multiple_of has no effect: prefopt pads to the longest row of a batch "
                                    "(or packs)"),
    "padding_value": no_effect("internal: padded positions never enter a loss", note=False),
    "label_pad_token_id": no_effect("internal: padded positions never enter a loss", note=False),
    "pad_token": only(None, "pad_token is not offered: prefopt pads with the tokenizer's pad token (EOS when it has "
                      "none); positions are masked, so the value never matters"),
    "tools": only(None, "tools (tool-calling chat templates) are not offered"),
    "dataset_text_field": no_effect("SFT only; preference data is read from prompt/chosen/rejected columns",
                                    note=False),
    "remove_unused_columns": no_effect("prefopt reads only the columns it names (prompt_column, ...)", note=False),
    "dataloader_num_workers": no_effect("dataloader_num_workers has no effect: prefopt tokenizes the data once "
                                        "before training and batches in the main process"),
    "dataloader_pin_memory": no_effect("batches are built in the main process and moved to the device as they "
                                       "are used", note=False),
    "dataloader_persistent_workers": no_effect("no loader workers in prefopt", note=False),
    "dataloader_prefetch_factor": no_effect("no loader workers in prefopt", note=False),
    "dataloader_drop_last": only(False, "dataloader_drop_last is not offered: the last partial batch is trained "
                                 "on (its loss is weighted by its pair count)"),
    "group_by_length": only(False, "group_by_length is not offered; layout: packed removes padding instead"),
    "generate_during_eval": only(False, "generate_during_eval is not offered; sample and score with "
                                 "`prefopt eval` (docs/evaluation.md)"),
    "precompute_ref_batch_size": no_effect("precompute_ref_batch_size has no effect: the reference pass uses "
                                           "per_device_eval_batch_size"),
    # --- the loss ---
    "f_divergence_type": only("reverse_kl", "f-DPO divergences are not offered: prefopt's DPO family uses the "
                              "reverse KL (f_divergence_type: reverse_kl)"),
    "f_alpha_divergence_coef": no_effect("used by TRL only with f_divergence_type: alpha_divergence", note=False),
    "sync_ref_model": only(False, "sync_ref_model (TR-DPO) is not offered: the reference stays fixed"),
    "ref_model_mixup_alpha": no_effect("used by TRL only with sync_ref_model: true", note=False),
    "ref_model_sync_steps": no_effect("used by TRL only with sync_ref_model: true", note=False),
    "label_smoothing_factor": only(0.0, "label_smoothing_factor is the Trainer's cross-entropy smoothing; for "
                                   "DPO use label_smoothing"),
    "neftune_noise_alpha": only(None, "neftune_noise_alpha is not offered"),
    # --- optimisation ---
    "optim": alias("optimizer", "adamw_torch, adamw_torch_fused, adamw_hf, adamw are `optimizer: adamw` (fused "
                   "where possible); rmsprop is rmsprop; other optimizers are not offered", values=_OPTIM),
    "optim_args": only(None, "optim_args is not offered; the AdamW keys are adam_beta1, adam_beta2, adam_epsilon, "
                       "weight_decay"),
    "optim_target_modules": only(None, "optim_target_modules is not offered"),
    "lr_scheduler_kwargs": alias("min_lr_rate", "min_lr_rate, or min_lr (divided by learning_rate), for "
                                 "cosine_with_min_lr; num_cycles: 0.5 only", convert=_lr_scheduler_kwargs),
    "warmup_steps": alias("warmup_steps", "prefopt's key; a float below 1 is warmup_ratio (transformers 5)",
                          convert=_warmup_steps),
    "auto_find_batch_size": only(False, "auto_find_batch_size is not offered; set per_device_train_batch_size"),
    "data_seed": only(None, "data_seed is not offered: prefopt orders the data from `seed` (one seed for init and "
                      "order)"),
    "full_determinism": no_effect("full_determinism has no effect: prefopt's data order and dropout-free "
                                  "training are deterministic from `seed`; CUDA kernels may still vary"),
    "per_gpu_train_batch_size": alias("per_device_train_batch_size", "old name"),
    "per_gpu_eval_batch_size": alias("per_device_eval_batch_size", "old name"),
    "eval_accumulation_steps": no_effect("evaluation metrics are summed per batch; nothing to accumulate",
                                         note=False),
    "average_tokens_across_devices": no_effect("prefopt's loss is a mean over pairs of the whole step on every "
                                               "device count", note=False),
    "gradient_checkpointing_kwargs": no_effect("gradient_checkpointing_kwargs has no effect: prefopt uses "
                                               "non-reentrant checkpointing"),
    "torch_compile_backend": only(None, "torch_compile_backend is not offered: torch_compile uses inductor",
                                  ok=("inductor",)),
    "torch_compile_mode": only(None, "torch_compile_mode is not offered: torch_compile uses the default mode"),
    "torch_empty_cache_steps": no_effect("torch_empty_cache_steps has no effect: prefopt manages memory itself "
                                         "(return_freed_memory)"),
    "use_cpu": only(False, "use_cpu is not offered; hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on CPU"),
    "bf16_full_eval": only(False, "bf16_full_eval is not offered: evaluation runs in the training precision"),
    "fp16_full_eval": only(False, "fp16_full_eval is not offered: evaluation runs in the training precision"),
    "half_precision_backend": no_effect("mixed precision goes through Accelerate (bf16/fp16 keys)", note=False),
    "fp16_opt_level": no_effect("apex only; fp16 uses torch autocast", note=False),
    # --- evaluation, logging, saving ---
    "do_train": no_effect("not read by TRL's trainer either (it is for scripts)", note=False),
    "do_eval": no_effect("not read by TRL's trainer either; evaluation runs when eval_dataset is set", note=False),
    "do_predict": no_effect("not read by TRL's trainer either", note=False),
    "eval_strategy": alias("eval_steps", "`steps` (eval_steps defaults to logging_steps, as in transformers), `no` "
                           "(no evaluation); `epoch` refused", convert=_eval_strategy),
    "evaluation_strategy": alias("eval_steps", "old name of eval_strategy", convert=_eval_strategy),
    "eval_on_start": only(False, "eval_on_start is not offered; evaluation runs every eval_steps and at the end"),
    "eval_delay": only(0, "eval_delay is not offered"),
    "prediction_loss_only": no_effect("prefopt's evaluation computes losses and metrics only", note=False),
    "save_strategy": alias("save_steps", "`steps` (save_steps), `no` (save_steps: 0); `epoch`, `best` refused",
                           convert=_strategy("save_strategy", "save_steps", {"save_steps": 0})),
    "logging_strategy": alias("logging_steps", "`steps` only", convert=_strategy("logging_strategy",
                                                                                 "logging_steps", {})),
    "logging_first_step": no_effect("logging_first_step has no effect: prefopt logs every logging_steps"),
    "logging_nan_inf_filter": no_effect("a non-finite loss stops or skips the step (on_nonfinite); it is never "
                                        "averaged into a log", note=False),
    "log_level": no_effect("library logging is quiet; prefopt's own messages are fixed", note=False),
    "log_level_replica": no_effect("library logging is quiet; prefopt's own messages are fixed", note=False),
    "log_on_each_node": no_effect("prefopt logs from the main process only", note=False),
    "disable_tqdm": alias("progress_bar", "`disable_tqdm: true` is `progress_bar: false`", convert=_disable_tqdm),
    "include_tokens_per_second": alias("log_throughput", "tokens_per_second and pairs_per_second",
                                       convert=_include_tps),
    "include_num_input_tokens_seen": no_effect("tokens_per_second is logged (log_throughput)", note=False),
    "skip_memory_metrics": no_effect("memory metrics are not logged", note=False),
    "save_only_model": only(False, "save_only_model is not offered: checkpoints keep optimizer, schedule and RNG "
                            "state for exact resume (the final model is saved alone)"),
    "save_safetensors": only(True, "save_safetensors: false is not offered: models are saved as safetensors"),
    "save_on_each_node": no_effect("checkpoints are written by the main process", note=False),
    "load_best_model_at_end": only(False, "load_best_model_at_end is not offered: the final model is the last "
                                   "step's; checkpoints are kept (save_total_limit)"),
    "metric_for_best_model": no_effect("used by TRL only with load_best_model_at_end", note=False),
    "greater_is_better": no_effect("used by TRL only with load_best_model_at_end", note=False),
    "ignore_data_skip": only(False, "ignore_data_skip is not offered: resume always continues at the exact data "
                             "position"),
    "restore_callback_states_from_checkpoint": no_effect("prefopt has no callbacks", note=False),
    "push_to_hub": only(False, "push_to_hub is not offered; upload output_dir afterwards (`hf upload REPO "
                        "OUTPUT_DIR`)"),
    "hub_model_id": no_effect("used by TRL only with push_to_hub", note=False),
    "hub_strategy": no_effect("used by TRL only with push_to_hub", note=False),
    "hub_token": no_effect("used by TRL only with push_to_hub", note=False),
    "hub_private_repo": no_effect("used by TRL only with push_to_hub", note=False),
    "hub_always_push": no_effect("used by TRL only with push_to_hub", note=False),
    "hub_revision": no_effect("used by TRL only with push_to_hub", note=False),
    # --- distributed: the launcher's business ---
    "local_rank": no_effect("set by the launcher; prefopt reads the launcher's environment", note=False),
    "ddp_backend": no_effect("ddp_backend has no effect: " + _ACCEL),
    "ddp_timeout": no_effect("ddp_timeout has no effect: " + _ACCEL),
    "ddp_find_unused_parameters": no_effect("every parameter gets a gradient in prefopt's step", note=False),
    "ddp_bucket_cap_mb": no_effect("ddp_bucket_cap_mb has no effect: " + _ACCEL),
    "ddp_broadcast_buffers": no_effect("ddp_broadcast_buffers has no effect: " + _ACCEL),
    "fsdp": only(None, "fsdp in the training config is not offered; " + _ACCEL, ok=("",)),
    "fsdp_config": only(None, "fsdp_config in the training config is not offered; " + _ACCEL),
    "deepspeed": only(None, "deepspeed in the training config is not offered; " + _ACCEL),
    "accelerator_config": only(None, "accelerator_config is not offered; " + _ACCEL),
    "parallelism_config": only(None, "parallelism_config is not offered; " + _ACCEL),
    "ddp_static_graph": no_effect("ddp_static_graph has no effect: " + _ACCEL),
    # --- newer TrainingArguments ---
    "activation_checkpointing": only(None, "activation_checkpointing is not offered; use gradient_checkpointing",
                                     ok=(False,)),
    "activation_checkpointing_kwargs": only(None, "activation_checkpointing_kwargs is not offered; use "
                                            "gradient_checkpointing"),
    "use_cache": no_effect("the KV cache is off in training; sampling (prefopt eval) uses it", note=False),
    "liger_kernel_config": only(None, "liger_kernel_config is not needed: prefopt's chunked LM head never builds "
                                "the full logits"),
    "project": trackers("project"),
    "trackio_space_id": trackers("trackio_space_id"),
    "trackio_bucket_id": trackers("trackio_bucket_id"),
    "trackio_static_space_id": trackers("trackio_static_space_id"),
    "include_for_metrics": only(None, "include_for_metrics is not offered: prefopt has no compute_metrics; its "
                                "eval metrics are fixed (docs/evaluation.md)", ok=([],)),
    "batch_eval_metrics": only(False, "batch_eval_metrics is not offered: prefopt has no compute_metrics"),
    "eval_use_gather_object": no_effect("evaluation metrics are summed across processes", note=False),
    "eval_do_concat_batches": no_effect("evaluation metrics are summed per batch; nothing is concatenated",
                                        note=False),
    "enable_jit_checkpoint": only(False, "enable_jit_checkpoint is not offered: checkpoints every save_steps, and "
                                  "resume loses at most the steps since the last one"),
    "dataloader_multiprocessing_context": no_effect("no loader workers in prefopt", note=False),
    "dataloader_in_order": no_effect("prefopt's data order is a pure function of seed and epoch", note=False),
    "label_names": no_effect("preference batches have no label columns", note=False),
    "train_sampling_strategy": alias("shuffle", "`random` is `shuffle: true`, `sequential` is `shuffle: false`; "
                                     "`group_by_length` refused", values={"random": True, "sequential": False}),
    "length_column_name": no_effect("used by TRL only with group_by_length", note=False),
    "debug": only("", "debug (TrainingArguments' underflow/overflow tracing) is not offered; prefopt's --debug "
                  "flag shows tracebacks", ok=(None, [])),
}

# What other trainers call a key, for the "did you mean" of a key that is neither prefopt's nor TRL's
# (OpenRLHF, LLaMA-Factory, and short names people type). Suggestions only: these are refused.
MEANINGS: dict[str, str] = {
    "pretrain": "model_name_or_path", "model": "model_name_or_path", "model_name": "model_name_or_path",
    "ref_pretrain": "ref_model_name_or_path", "ref_model": "ref_model_name_or_path",
    "tokenizer": "tokenizer_name_or_path", "dataset_name": "dataset", "train_file": "dataset",
    "eval_file": "eval_dataset", "val_dataset": "eval_dataset", "eval_dataset_name": "eval_dataset",
    "pref_beta": "beta", "pref_loss": "loss_type", "pref_ftx": "rpo_alpha", "nll_loss_coef": "rpo_alpha",
    "simpo_gamma": "target_margin", "cutoff_len": "max_length", "max_len": "max_length",
    "prompt_max_len": "max_prompt_length", "max_source_length": "max_prompt_length",
    "max_target_length": "max_completion_length", "max_new_tokens": "max_completion_length",
    "lr": "learning_rate", "epochs": "num_train_epochs", "max_epochs": "num_train_epochs",
    "micro_train_batch_size": "per_device_train_batch_size", "batch_size": "per_device_train_batch_size",
    "micro_eval_batch_size": "per_device_eval_batch_size", "lr_warmup_ratio": "warmup_ratio",
    "save_path": "output_dir", "ckpt_path": "output_dir", "l2": "weight_decay", "grad_clip": "max_grad_norm",
    "lora_rank": "lora_r", "lora_target": "lora_target_modules", "target_modules": "lora_target_modules",
    "finetuning_type": "use_peft", "flash_attn": "attn_implementation", "zero_stage": "deepspeed",
    "gradient_checkpointing_enable": "gradient_checkpointing", "use_wandb": "report_to", "logger": "report_to",
    "ref_offload": "precompute_ref_log_probs", "dataset_probs": "dataset", "save_steps_interval": "save_steps",
}


def trl_hint(name: str, known: list[str]) -> str | None:
    """The key a user most likely meant: by meaning first (MEANINGS), then by spelling among
    prefopt's and TRL's keys (a close TRL name is then translated like any TRL key)."""
    if name in MEANINGS:
        return MEANINGS[name]
    hint = difflib.get_close_matches(name, list(known) + list(TRL_KEYS), n=1)
    return hint[0] if hint else None


def resolve_lr_floor(values: dict[str, Any]) -> None:
    """``min_lr`` (an absolute learning rate, transformers' lr_scheduler_kwargs) as prefopt's
    ``min_lr_rate``, once ``learning_rate`` is known; in place."""
    if "min_lr" in values:
        min_lr = values.pop("min_lr")
        lr = values.get("learning_rate") or 0.0
        if lr <= 0:
            raise ConfigError("lr_scheduler_kwargs.min_lr needs learning_rate > 0; or give min_lr_rate")
        values.setdefault("min_lr_rate", min_lr / lr)


# TRL / TrainingArguments keys that prefopt has under the same name, with the same meaning (and
# where TRL's default differs). With TRL_KEYS this is every key the table in docs/config.md lists.
SAME_NAMED: dict[str, str] = {
    "model_name_or_path": "", "torch_dtype": "also `bf16`, `fp16`, `fp32` as values", "disable_dropout": "",
    "attn_implementation": "TRL's ModelConfig; also read from model_init_kwargs",
    "max_length": "", "max_prompt_length": "TRL < 1.0; prefopt's default -1 is half of max_length",
    "max_completion_length": "TRL < 1.0", "truncation_mode": "applies to the prompt, as in TRL < 1.0",
    "dataset_num_proc": "",
    "precompute_ref_log_probs": "", "loss_type": "TRL's default `sigmoid` is prefopt's `dpo`", "loss_weights": "",
    "ld_alpha": "", "label_smoothing": "", "beta": "", "use_weighting": "", "discopop_tau": "",
    "rpo_alpha": "TRL < 1.0", "reference_free": "TRL < 1.0",
    "learning_rate": "", "lr_scheduler_type": "also `constant_with_warmup`, `cosine_with_min_lr`",
    "warmup_steps": "a float below 1 is a ratio, as in transformers 5", "warmup_ratio": "", "weight_decay": "",
    "adam_beta1": "", "adam_beta2": "", "adam_epsilon": "", "max_grad_norm": "",
    "per_device_train_batch_size": "", "per_device_eval_batch_size": "", "gradient_accumulation_steps": "",
    "num_train_epochs": "transformers' default is 3, prefopt's 1", "max_steps": "", "seed": "",
    "gradient_checkpointing": "DPOConfig's default is true, prefopt's false",
    "bf16": "DPOConfig's default is true, prefopt's false", "fp16": "", "tf32": "", "torch_compile": "",
    "output_dir": "", "overwrite_output_dir": "transformers < 5", "logging_steps": "", "eval_steps": "",
    "save_steps": "", "save_total_limit": "", "resume_from_checkpoint": "", "report_to": "a name, a list, `all` or `none`, through Accelerate's trackers",
    "run_name": "", "logging_dir": "default OUTPUT_DIR/runs",
    "use_peft": "TRL's ModelConfig", "lora_r": "TRL's ModelConfig", "lora_alpha": "TRL's ModelConfig",
    "lora_dropout": "TRL's ModelConfig", "lora_target_modules": "TRL's ModelConfig",
    "load_in_4bit": "TRL's ModelConfig",
}
