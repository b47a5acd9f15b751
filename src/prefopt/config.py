"""Configuration: one dataclass is the single source of keys, CLI flags, defaults and help text.

``prefopt train --config run.yaml --beta 0.2`` reads the YAML file, then applies ``--key value``
overrides; an unknown or mistyped key, or a value of the wrong type, is a ``ConfigError`` naming it
(with the closest valid key as a hint). Key names follow TRL's ``DPOConfig`` where the concept is
the same, so a TRL user's config mostly carries over.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import reprlib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prefopt.errors import ConfigError
from prefopt.io import simulate_full_disk, write_text_atomic
from prefopt.losses.combine import LossOptions
from prefopt.trl_compat import SAME_NAMED, TRL_KEYS, Refused, resolve_lr_floor, trl_hint

# The commands that read config keys. A YAML file may hold keys of any of them (one file serves
# train, validate and logps); a command's --help and flags list only the keys it reads.
TRAIN, REWARD_TRAIN, VALIDATE, LOGPS, REWARD_SCORE, REWARD_EVAL = (
    "train", "reward train", "validate", "logps", "reward score", "reward eval")
CONFIG_COMMANDS = (TRAIN, REWARD_TRAIN, VALIDATE, LOGPS, REWARD_SCORE, REWARD_EVAL)
TRAINING = (TRAIN, REWARD_TRAIN)
# Which commands read a key, by its group, unless the key says otherwise (``commands=``).
_GROUP_COMMANDS = {
    "model": TRAINING, "data": CONFIG_COMMANDS, "objective": (TRAIN,), "training": TRAINING,
    "performance": (TRAIN,), "output": TRAINING, "reward model": (REWARD_TRAIN,), "scale": TRAINING,
    "TRL names": TRAINING, "attention": (TRAIN, LOGPS), "verification": TRAINING, "online": ("online",),
    "data store": (*TRAINING, VALIDATE),
}


def opt(default: Any, help: str, choices: tuple | None = None, group: str = "training", *,
        commands: tuple | None = None, help_for: dict[str, str] | None = None,
        aliases: dict[str, str] | None = None) -> Any:
    """A config field with its help text (and allowed values), the only place a key is described.
    ``commands``: the commands that read it (default: by group); ``help_for``: help text for one
    command where the key means something narrower there; ``aliases``: other spellings of values
    (TRL's, e.g. ``adamw_torch``) accepted for a choice."""
    return field(default=default, metadata={
        "help": help, "choices": choices, "group": group,
        "commands": tuple(commands if commands is not None else _GROUP_COMMANDS.get(group, TRAINING)),
        "help_for": help_for or {}, "aliases": aliases or {},
    })


@dataclass
class TrainConfig:
    # --- model ---
    model_name_or_path: str | None = opt(
        None, "Policy to train: a local directory or hub id.", group="model",
        commands=(*TRAINING, VALIDATE, LOGPS),
        help_for={REWARD_TRAIN: "Causal LM to start the reward model from (a scalar head is added): a local "
                                "directory or hub id.",
                  VALIDATE: "Model whose tokenizer tokenizes the data (no model is loaded); optional.",
                  LOGPS: "Model to score with (same as --model)."},
    )
    ref_model_name_or_path: str | None = opt(
        None, "Reference model; default: a frozen copy of the initial policy.", group="model", commands=(TRAIN,)
    )
    tokenizer_name_or_path: str | None = opt(None, "Tokenizer; default: the model's.", group="model",
                                             commands=CONFIG_COMMANDS)
    disable_dropout: bool = opt(True, "Turn off dropout in policy and reference.", group="model")
    fused_activations: bool = opt(
        True, "Run tanh-approximated GELUs (GPT-2's gelu_new, gelu_fast) as one fused kernel: the same function "
        "within float rounding, faster and with less activation memory. The saved model is unchanged.",
        group="model", commands=(*TRAINING, LOGPS),
    )
    # --- data ---
    dataset: str | None = opt(
        None, "Training pairs: .jsonl/.json/.parquet/.csv file, save_to_disk dir, or hub id.", group="data",
        help_for={VALIDATE: "Pairs to check: .jsonl/.json/.parquet/.csv file, save_to_disk dir, or hub id.",
                  LOGPS: "Pairs to score: .jsonl/.json/.parquet/.csv file, save_to_disk dir, or hub id.",
                  REWARD_SCORE: "Rows to score (pairs or rated responses): a file, save_to_disk dir or hub id.",
                  REWARD_EVAL: "Pairs to evaluate on: a file, save_to_disk dir or hub id."},
    )
    dataset_split: str = opt("train", "Split to read for hub datasets and dataset dicts.", group="data")
    eval_dataset: str | None = opt(None, "Held-out pairs, same formats as `dataset`.", group="data",
                                   commands=(*TRAINING, VALIDATE))
    eval_dataset_split: str = opt("train", "Split of `eval_dataset` to read.", group="data",
                                  commands=(*TRAINING, VALIDATE))
    dataset_format: str = opt(
        "auto",
        "Row format; `auto` detects it from the columns.",
        choices=("auto", "explicit", "implicit", "conversational", "rated", "scored_responses"),
        group="data",
    )
    prompt_column: str = opt("prompt", "Column holding the prompt.", group="data")
    chosen_column: str = opt("chosen", "Column holding the preferred response.", group="data")
    rejected_column: str = opt("rejected", "Column holding the dispreferred response.", group="data")
    score_chosen_column: str = opt("score_chosen", "Column with the chosen response's score.", group="data")
    score_rejected_column: str = opt(
        "score_rejected", "Column with the rejected response's score.", group="data"
    )
    responses_column: str = opt("responses", "Rated format: the list of responses.", group="data")
    scores_column: str = opt("scores", "Rated format: the list of scores (`rewards` also read).", group="data")
    max_length: int = opt(1024, "Max tokens of prompt + one response.", group="data")
    max_prompt_length: int | None = opt(
        -1, "Max prompt tokens, cut as truncation_mode says; -1: half of max_length; null: no prompt limit "
        "(max_length still applies).", group="data",
    )
    max_completion_length: int | None = opt(
        None, "Max tokens of each response, cut from its end, before max_length applies; null: max_length only.",
        group="data",
    )
    truncation_mode: str = opt(
        "keep_end", "Which part of a prompt longer than max_prompt_length is kept: keep_end (the end, next to "
        "the response: TRL < 1.0's default) or keep_start.", choices=("keep_end", "keep_start"), group="data",
    )
    # --- tokenized-pair store (docs/data.md) ---
    data_cache: bool = opt(
        True, "Keep the tokenized pairs in an on-disk store keyed by the data file's content, the tokenizer and "
        "every data setting: later runs and every process of a run memory-map it instead of tokenizing again. "
        "false: build a temporary store for this run only.", group="data store",
    )
    data_cache_dir: str | None = opt(
        None, "Where the stores live; default $PREFOPT_CACHE_DIR/data, else $XDG_CACHE_HOME/prefopt/data, else "
        "~/.cache/prefopt/data. `prefopt cache list|clear` shows or empties it.", group="data store",
    )
    dataset_num_proc: int | None = opt(
        None, "Worker processes that convert and tokenize the data while a store is built (TRL's key); "
        "none or 1: in the main process.", group="data store",
    )
    # --- objective ---
    loss_type: str = opt(
        "dpo", commands=(TRAIN, VALIDATE), help=
        "Preference loss (docs/losses.md), or several separated by commas (a YAML list also works): "
        "dpo/sigmoid, odpo, cdpo, ipo, hinge, robust, exo_pair, nca_pair, bco_pair, sppo_hard, aot, "
        "aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm, simpo.",
        group="objective",
    )
    beta: float = opt(0.1, "KL strength beta: the implicit reward is beta*(log pi - log ref).", group="objective",
                      commands=(TRAIN, REWARD_SCORE, REWARD_EVAL),
                      help_for={REWARD_SCORE: "Beta of the implicit reward beta*(log pi - log ref) (--policy/--ref).",
                                REWARD_EVAL: "Beta of the implicit reward beta*(log pi - log ref) (--policy/--ref)."})
    alpha: float = opt(1.0, "ODPO offset strength alpha.", group="objective")
    offset_scaling: str = opt(
        "log_diff",
        "ODPO offset f(s_w, s_l): log(s_w-s_l), s_w-s_l or log(s_w/s_l).",
        choices=("log_diff", "diff", "log_ratio"),
        group="objective",
    )
    nonpositive_score_diff: str = opt(
        "drop",
        "ODPO pairs with score_chosen <= score_rejected: drop them, raise an error, or clamp the diff.",
        choices=("drop", "error", "clamp"),
        group="objective", commands=(TRAIN, VALIDATE),
    )
    label_smoothing: float = opt(
        0.0, "Label smoothing epsilon in [0, 0.5): cDPO, robust, exo_pair, aot.", group="objective"
    )
    # --- the preference-loss family ---
    loss_weights: list[float] | None = opt(
        None, "Weights of the losses listed in loss_type (default: 1 each), e.g. 1.0,0.5.", group="objective"
    )
    use_offset: bool = opt(
        False, "Put the ODPO offset alpha*f(s_w, s_l) on the margin of every listed loss (needs scores).",
        group="objective", commands=(TRAIN, VALIDATE),
    )
    target_margin: float = opt(
        0.0, "SimPO's gamma: subtracted from the margin beta*h of every listed loss.", group="objective"
    )
    reference_free: bool = opt(
        False, "Use reference log-probs of 0 (no reference model is loaded).", group="objective"
    )
    length_normalize: bool = opt(
        False, "Divide every response log-prob by the response's token count.", group="objective"
    )
    ld_alpha: float | None = opt(
        None, "LD-DPO: weight in [0, 1] of the tokens beyond the shorter response's length.", group="objective"
    )
    rpo_alpha: float = opt(
        0.0, "RPO: add rpo_alpha * (mean per-token NLL of the chosen response) to the loss.", group="objective"
    )
    use_weighting: bool = opt(
        False, "WPO: weight each pair by the policy's length-normalised probability of both responses.",
        group="objective",
    )
    discopop_tau: float = opt(0.05, "DiscoPOP temperature tau.", group="objective")
    # --- optimisation ---
    learning_rate: float = opt(1e-6, "Peak learning rate.")
    optimizer: str = opt("adamw", "Optimizer (AdamW is fused where torch has a kernel).", choices=("adamw", "rmsprop"),
                         aliases={"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw"})
    weight_decay: float = opt(0.0, "Weight decay.")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_epsilon: float = opt(1e-8, "AdamW / RMSprop epsilon.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm; 0 disables clipping.")
    lr_scheduler_type: str = opt(
        "linear", "Schedule after the linear warm-up (every schedule warms up over warmup_steps/warmup_ratio): "
        "constant (= constant_with_warmup), linear or cosine decay to 0, cosine_with_min_lr (cosine down to "
        "min_lr_rate * learning_rate).",
        choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_min_lr"),
        aliases={"cosine_warmup_with_min_lr": "cosine_with_min_lr"},
    )
    warmup_steps: int = opt(0, "Linear warm-up steps.")
    per_device_train_batch_size: int = opt(8, "Pairs per device per micro-batch.")
    per_device_eval_batch_size: int = opt(8, "Pairs per device per eval batch.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.")
    max_steps: int = opt(-1, "Optimizer steps; -1 means use num_train_epochs.")
    num_train_epochs: float = opt(1.0, "Passes over the data when max_steps is -1.")
    shuffle: bool = opt(True, "Shuffle training pairs every epoch (seeded).")
    seed: int = opt(42, "Seed for initialisation, shuffling and dropout.")
    # --- performance ---
    layout: str = opt(
        "auto",
        "Batch layout: plain (two padded prompt+response rows per pair), prefix_shared (one "
        "[prompt|chosen|rejected] row per pair), packed (several pairs per row, no padding); "
        "auto picks the cheapest by a FLOP estimate on the data.",
        choices=("auto", "plain", "prefix_shared", "packed"), group="performance", commands=(TRAIN, LOGPS),
    )
    pack_row_tokens: int = opt(0, "Packed layout: tokens per row; 0 = the longest pair of each batch.",
                               group="performance", commands=(TRAIN, LOGPS))
    precompute_ref_log_probs: bool = opt(
        False, "Score all pairs with the reference once before training, cache them on disk, free the model.",
        group="performance",
    )
    ref_logps_cache_dir: str | None = opt(
        None, "Reference log-prob cache directory; default $PREFOPT_CACHE_DIR/ref_logps or "
        "~/.cache/prefopt/ref_logps.", group="performance", commands=(TRAIN, LOGPS),
    )
    return_freed_memory: bool = opt(
        True, "Linux/glibc: serve training's tensors of 1 MiB and more from their own memory maps, so memory "
        "freed between steps goes back to the system instead of fragmenting the heap (lower peak RSS on CPU); "
        "no-gradient passes and the backward reuse a kept heap instead (no page faults).",
        group="performance", commands=TRAINING,
    )
    # --- logging and output ---
    output_dir: str = opt("outputs/prefopt", "Where checkpoints, metrics and the final model go.", group="output")
    logging_steps: int = opt(10, "Log metrics every N optimizer steps.", group="output")
    eval_steps: int = opt(0, "Evaluate every N steps (0: only at the end, if eval_dataset).", group="output")
    save_steps: int = opt(500, "Checkpoint every N steps (0: no intermediate checkpoints).", group="output")
    progress_bar: bool = opt(True, "Show progress: a bar on a terminal, a line every 10 % when stderr is a "
                             "file or pipe.", group="output", commands=(*TRAINING, REWARD_SCORE, REWARD_EVAL))
    # --- reliability: resume, checkpoints, output directory, NaN guard ---
    resume_from_checkpoint: str | None = opt(
        None, "Resume from this checkpoint directory, or `latest`: the newest complete one in output_dir "
        "(`--resume` is short for latest).", group="output",
    )
    overwrite_output_dir: bool = opt(
        False, "Start a new run in an output_dir that holds another run, deleting its checkpoints and metrics.",
        group="output",
    )
    save_total_limit: int | None = opt(None, "Keep only the newest N checkpoints (none: keep all).", group="output")
    log_throughput: bool = opt(
        True, "Log tokens_per_second/pairs_per_second. They are wall-clock; false makes metrics.jsonl "
        "bit-for-bit reproducible on CPU.", group="output",
    )
    on_nonfinite: str = opt(
        "stop", "A non-finite loss or gradient: stop (the last checkpoint stays intact) or skip the update.",
        choices=("stop", "skip"),
    )
    max_skipped_steps: int = opt(10, "With on_nonfinite: skip, stop anyway after this many skipped steps.")
    # --- trackers and evaluation ---
    report_to: str = opt(
        "auto", "Trackers, through Accelerate (TRL's convention): a name or a list of tensorboard, wandb, mlflow, "
        "trackio, comet_ml, aim, clearml, dvclive, swanlab; `all` (every installed one), `none`, or `auto` "
        "(TensorBoard if installed). Metric names are metrics.jsonl's; the resolved config is logged as "
        "hyperparameters.", group="trackers and evaluation",
    )
    run_name: str | None = opt(
        None, "Run name shown by the trackers (W&B/MLflow run name, TensorBoard subdirectory); default: the "
        "output_dir's name.", group="trackers and evaluation",
    )
    logging_dir: str | None = opt(
        None, "Where trackers that write locally put their files (TensorBoard events in LOGGING_DIR/RUN_NAME, "
        "W&B's run folder in LOGGING_DIR/wandb); default: OUTPUT_DIR/runs.", group="trackers and evaluation",
    )
    eval_max_pairs: int | None = opt(
        256, "In-training evaluation scores a seeded subset of this many eval_dataset pairs, the same at every "
        "evaluation; none: every pair. 256 pairs give the reward accuracy to about +-3 points (one standard "
        "error) and cost about as much as 100 training pairs (a forward pass, no backward).",
        group="trackers and evaluation",
    )
    # --- reward model ---
    margin_from_scores: bool = opt(
        False,
        "Reward model: BT margin m = margin_scale * max(score_chosen - score_rejected, 0) inside the sigmoid.",
        group="reward model",
    )
    margin_scale: float = opt(1.0, "Reward model: factor on the score difference in the margin.", group="reward model")
    # --- online / iterative preference training (`prefopt online`) ---
    prompts: str | None = opt(
        None, "Online: prompts to sample from: a .txt file (one per line) or any table with the prompt column "
        "(a preference file's prompts are used once each).", group="online",
    )
    reward_model: str | None = opt(
        None, "Online: reward-model directory (`prefopt reward train` or any *ForSequenceClassification) that "
        "scores the samples; exclusive with `scorer`.", group="online",
    )
    scorer: str | None = opt(
        None, "Online: `module:function` mapping full texts (prompt + completion) to scores, as in "
        "`prefopt eval`; exclusive with `reward_model`.", group="online",
    )
    rounds: int = opt(1, "Online: rounds of sample -> score -> pair -> train.", group="online")
    prompts_per_round: int = opt(
        0, "Online: prompts per round, taken in a seeded shuffled order that cycles through the file; "
        "0 = every prompt every round.", group="online",
    )
    samples_per_prompt: int = opt(4, "Online: responses sampled per prompt and round (K >= 2).", group="online")
    temperature: float = opt(
        1.0, "Online: sampling temperature (the KL estimate is exact only at 1.0 with top_p 1.0).", group="online"
    )
    top_p: float = opt(1.0, "Online: nucleus sampling threshold in (0, 1]; 1.0 = off.", group="online")
    max_new_tokens: int = opt(64, "Online: longest sampled response, in tokens.", group="online")
    generation_batch_size: int = opt(64, "Online: sequences per generate call.", group="online")
    pairing: str = opt(
        "best_worst", "Online: best_worst = the highest- against the lowest-scored sample of a prompt; all = "
        "every two samples with different scores. Equal scores are never paired.",
        choices=("best_worst", "all"), group="online",
    )
    reference_update: str = opt(
        "fixed", "Online: fixed = the initial policy (or ref_model_name_or_path) is the reference in every "
        "round; per_round = the policy at the start of each round (iterative DPO). With use_peft neither "
        "copies the model (the adapter off, or a frozen copy of the starting adapter).",
        choices=("fixed", "per_round"), group="online",
    )
    # --- verified results: what a resumed run checks besides the checkpoint's checksums ---
    ignore_data_change: bool = opt(
        False, "Resume even when the tokenized training data differs from the data the checkpoint was trained "
        "on (by default such a resume is refused: the result would not be the run it continues).",
        group="verification",
    )
    # --- scale-out: precision, memory savers, LoRA/QLoRA ---
    bf16: bool = opt(False, "bf16 mixed precision (autocast through Accelerate).", group="scale")
    fp16: bool = opt(False, "fp16 mixed precision with dynamic loss scaling (GPU only).", group="scale")
    torch_dtype: str = opt(
        "auto", "dtype to load the weights in; auto: the checkpoint's (transformers' default). Use float32 "
        "with bf16/fp16 autocast for float32 master weights.",
        choices=("auto", "float32", "bfloat16", "float16"), group="scale",
        aliases={"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"},
    )
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.", group="scale")
    torch_compile: bool = opt(False, "Compile the policy with torch.compile (inductor) via Accelerate.", group="scale")
    use_peft: bool = opt(False, "Train a LoRA adapter; the reference is the base model with it switched off.",
                         group="scale", commands=(TRAIN,),
                         help_for={"online": "Train a LoRA adapter, continued from round to round; the fixed reference is "
                                   "the base with it switched off, per_round a frozen copy of the round's starting "
                                   "adapter."})
    lora_r: int = opt(16, "LoRA rank.", group="scale", commands=(TRAIN,))
    lora_alpha: int = opt(32, "LoRA scaling alpha (the update is scaled by alpha / r).", group="scale", commands=(TRAIN,))
    lora_dropout: float = opt(0.0, "Dropout on the LoRA branch.", group="scale", commands=(TRAIN,))
    lora_target_modules: str = opt(
        "all-linear", "Comma-separated module names to adapt (e.g. q_proj,v_proj), or all-linear.", group="scale", commands=(TRAIN,)
    )
    load_in_4bit: bool = opt(False, "QLoRA: load the base model in 4-bit NF4 (needs CUDA + bitsandbytes).",
                             group="scale", commands=(TRAIN,))
    merge_adapter_on_save: bool = opt(
        False, "With use_peft: also write the merged model (base + adapter) to OUTPUT_DIR/merged.", group="scale", commands=(TRAIN,)
    )
    # --- attention backend (GPU: FlexAttention's block masks for the shared layouts) ---
    attn_implementation: str = opt(
        "auto", "Attention kernel of the policy and reference loaded from a path: auto (transformers' default, "
        "sdpa), sdpa, eager, flex_attention (GPU: block masks that skip what prefix sharing and packing mask "
        "out), flash_attention_2/3 (plain layout only). layout: auto takes it into account.",
        choices=("auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"), group="attention",
    )
    # --- keys that TRL / transformers users set, with their meaning (prefopt.trl_compat maps the rest) ---
    warmup_ratio: float = opt(
        0.0, "Warm-up over ceil(warmup_ratio * total optimizer steps); exclusive with warmup_steps.",
        group="TRL names",
    )
    min_lr_rate: float = opt(
        0.0, "cosine_with_min_lr: the learning rate's floor as a share of learning_rate (transformers' "
        "lr_scheduler_kwargs min_lr_rate).", group="TRL names",
    )
    tf32: bool | None = opt(
        None, "CUDA: allow TF32 matmuls and convolutions (Ampere and later); null keeps torch's setting. No "
        "effect on CPU.", group="TRL names",
    )

    def prompt_limit(self) -> int | None:
        """The prompt length limit in tokens: ``max_prompt_length``, half of ``max_length`` when it is
        -1 (the default, so that ``max_length: 512`` alone works), ``None`` for no limit."""
        return self.max_length // 2 if self.max_prompt_length == -1 else self.max_prompt_length

    def warmup_for(self, total_steps: int) -> int:
        """Warm-up steps: ``warmup_steps``, or ``ceil(warmup_ratio * total_steps)`` as transformers does."""
        return self.warmup_steps if self.warmup_steps else math.ceil(self.warmup_ratio * total_steps)

    def validate(self, *, require_paths: bool = True) -> TrainConfig:
        """Check every key and their combinations; ``ConfigError`` names the key. With
        ``require_paths=False`` the model and dataset may come as Python objects instead of paths."""
        if require_paths and not self.model_name_or_path:
            raise ConfigError("model_name_or_path is required")
        if require_paths and not self.dataset:
            raise ConfigError("dataset is required")
        self.loss_options()
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {self.max_length}")
        if self.dataset_num_proc is not None and self.dataset_num_proc < 1:
            raise ConfigError(f"dataset_num_proc must be at least 1 (or none), got {self.dataset_num_proc}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1 and self.max_prompt_length != -1:
            raise ConfigError(f"max_prompt_length must be at least 1, -1 (half of max_length) or null; got "
                              f"{self.max_prompt_length}")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ConfigError(f"max_completion_length must be at least 1 or null; got {self.max_completion_length}")
        if self.warmup_ratio and self.warmup_steps:
            raise ConfigError("warmup_steps and warmup_ratio exclude each other; set one")
        if self.max_prompt_length not in (None, -1) and self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})"
            )
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("logging_steps",):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        self._check_numbers()
        self.output_dir = os.path.expanduser(str(self.output_dir))  # `~/runs/a` as a shell would read it
        if self.run_name is not None and (self.run_name in (".", "..") or any(c in self.run_name for c in "/\\\0")):
            # It names TensorBoard's folder LOGGING_DIR/RUN_NAME: a path there would write outside it.
            raise ConfigError(f"run_name {self.run_name!r} must be a plain name (no '/', not '.' or '..'); "
                              "set logging_dir to choose where the trackers write")
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs <= 0):
            raise ConfigError("set max_steps > 0 or num_train_epochs > 0")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(f"save_total_limit must be at least 1 (or none), got {self.save_total_limit}")
        if self.resume_from_checkpoint and self.overwrite_output_dir:
            raise ConfigError("resume_from_checkpoint and overwrite_output_dir exclude each other: resume the run "
                              "or start it over")
        if self.bf16 and self.fp16:
            raise ConfigError("bf16 and fp16 are exclusive; choose one")
        if self.use_peft and (self.lora_r < 1 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0):
            raise ConfigError("LoRA needs lora_r >= 1, lora_alpha > 0 and lora_dropout in [0, 1)")
        if (self.load_in_4bit or self.merge_adapter_on_save) and not self.use_peft:
            raise ConfigError("load_in_4bit and merge_adapter_on_save need use_peft: true")
        if self.eval_max_pairs is not None and self.eval_max_pairs < 1:
            raise ConfigError(f"eval_max_pairs must be at least 1 (or none: every pair), got {self.eval_max_pairs}")
        if not (math.isfinite(self.margin_scale) and self.margin_scale >= 0):
            raise ConfigError(f"margin_scale must be >= 0, got {self.margin_scale}")
        return self

    def validate_online(self) -> TrainConfig:
        """The checks of ``prefopt online``'s keys (``validate`` covers the training keys)."""
        if not self.model_name_or_path:
            raise ConfigError("model_name_or_path is required: the policy to start from")
        if not self.prompts:
            raise ConfigError("prompts is required: a file of prompts to sample from")
        if bool(self.reward_model) == bool(self.scorer):
            raise ConfigError("set exactly one of reward_model (a reward-model directory) and scorer "
                              "(module:function)")
        if self.dataset:
            raise ConfigError("dataset is not used by prefopt online (the pairs come from the policy's samples); "
                              "remove it")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}")
        if self.prompts_per_round < 0:
            raise ConfigError(f"prompts_per_round must be >= 0 (0: every prompt), got {self.prompts_per_round}")
        if self.samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt must be at least 2 to make pairs, got {self.samples_per_prompt}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("max_new_tokens", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        return self.validate(require_paths=False)

    def _check_numbers(self) -> None:
        """Every numeric key in its range, NaN and infinity included: a run must fail here, before an
        earlier run is touched, not at the optimizer's constructor or at step 2."""
        if not self.output_dir or not str(self.output_dir).strip():
            raise ConfigError("output_dir is empty; name a directory for the run (it would mean the current one)")
        for key, (low, high, closed_high) in NUMBER_RANGES.items():
            value = getattr(self, key)
            if value is None:
                continue
            inside = math.isfinite(value) and value >= low and (value <= high if closed_high else value < high)
            if not inside:
                span = f"in [{low:g}, {high:g}{']' if closed_high else ')'}" if math.isfinite(high) else f">= {low:g}"
                raise ConfigError(f"{key} must be a finite number {span}, got {value}")
        if self.max_steps < -1:
            raise ConfigError(f"max_steps must be -1 (use num_train_epochs) or > 0, got {self.max_steps}")

    def attention_kwargs(self) -> dict[str, str]:
        """``from_pretrained`` keywords for ``attn_implementation`` (none for auto: transformers' default)."""
        return {} if self.attn_implementation == "auto" else {"attn_implementation": self.attn_implementation}

    def loss_options(self) -> LossOptions:
        """The validated loss options these keys describe (built once per run, held by the objective)."""
        return LossOptions.create(
            self.loss_type, loss_weights=self.loss_weights, beta=self.beta, alpha=self.alpha,
            label_smoothing=self.label_smoothing, offset_scaling=self.offset_scaling,
            on_nonpositive=self.nonpositive_score_diff, use_offset=self.use_offset,
            target_margin=self.target_margin, reference_free=self.reference_free,
            length_normalize=self.length_normalize, rpo_alpha=self.rpo_alpha, discopop_tau=self.discopop_tau,
            ld_alpha=self.ld_alpha, use_weighting=self.use_weighting,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


INF = math.inf
# (lowest, highest, highest included?) of the numeric keys not checked elsewhere. A value outside,
# NaN or an infinity is refused up front: PyTorch's optimizers accept some (a NaN weight decay, a
# negative warm-up) and silently train something else.
NUMBER_RANGES: dict[str, tuple[float, float, bool]] = {
    "learning_rate": (0.0, INF, False),
    "weight_decay": (0.0, INF, False),
    "adam_beta1": (0.0, 1.0, False),
    "adam_beta2": (0.0, 1.0, False),
    "adam_epsilon": (0.0, INF, False),
    "max_grad_norm": (0.0, INF, False),
    "warmup_steps": (0, INF, False),
    "num_train_epochs": (0.0, INF, False),
    "eval_steps": (0, INF, False),
    "save_steps": (0, INF, False),
    "pack_row_tokens": (0, INF, False),
    "max_skipped_steps": (0, INF, False),
    "warmup_ratio": (0.0, 1.0, True),
    "min_lr_rate": (0.0, 1.0, True),
}

# ------------------------------------------------------------------------------------------------
# Generic machinery: any config dataclass built with `opt` gets YAML loading, CLI flags and checks.


def config_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def unknown_message(what: str, name: str, valid) -> str:
    hint = difflib.get_close_matches(name, list(valid), n=1)
    return f"unknown {what} {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")


def _field_type(cls, name: str):
    """(base type, optional?) of a field, from the annotations (which are strings here)."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return hint, False


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}
_NONE = {"none", "null", "~"}


def coerce_value(cls, name: str, value: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or raise ConfigError."""
    base, optional = _field_type(cls, name)
    f = config_fields(cls)[name]
    if isinstance(value, str) and value.strip().lower() in _NONE and optional:
        value = None  # only for optional keys: `report_to: none` is a choice, not an empty value
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {name!r} cannot be empty")
    if typing.get_origin(base) is list:  # a YAML list, or comma-separated values on the command line
        return _coerce_list(name, typing.get_args(base)[0], value)
    if base is str and isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        value = ",".join(value)  # e.g. loss_type: [sigmoid, sft]
    try:
        if base is bool:
            if isinstance(value, bool):
                out = value
            elif isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                out = value.lower() in _TRUE
            else:
                raise ValueError
        elif base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            out = int(value) if not isinstance(value, str) else int(value.strip())
        elif base is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)  # YAML reads 1e-6 as a string: float() accepts it
        elif base is str:
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ValueError
            out = str(value)
        else:  # pragma: no cover - only the types above are used
            out = value
    except (TypeError, ValueError):
        raise ConfigError(
            f"config key {name!r} expects {getattr(base, '__name__', base)}, got {_SHORT.repr(value)}"
        ) from None
    choices = f.metadata.get("choices")
    out = f.metadata.get("aliases", {}).get(out, out) if isinstance(out, str) else out
    if choices and out not in choices:
        raise ConfigError(f"config key {name!r} must be one of {', '.join(choices)}; got {out!r}")
    return out


def _coerce_list(name: str, item_type, value: Any) -> list:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"config key {name!r} expects a list, got {value!r}")
    out = []
    for item in items:
        try:
            if isinstance(item, bool):
                raise ValueError
            out.append(item_type(item.strip() if isinstance(item, str) else item))
        except (TypeError, ValueError):
            raise ConfigError(
                f"config key {name!r} expects a list of {item_type.__name__}, got {value!r}"
            ) from None
    return out


class DuplicateKeyError(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: plain YAML
    keeps the last one silently, so `beta: 0.1` above `beta: 0.5` would train with 0.5 unnoticed."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DuplicateKeyError(f"line {line}: config key {key!r} is given twice (first on line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# Values shown in an error line: a YAML alias bomb or a pasted blob is named, not printed in full.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; give a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except DuplicateKeyError as e:
        raise ConfigError(f"{p}: {e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of config keys at the top level")
    return data


def build_config(cls, yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                 notes: list[str] | None = None):
    """Defaults < YAML file < overrides. Every key is checked against the dataclass; TRL's keys
    are translated (``prefopt.trl_compat``). Every unknown key and bad value of a run is reported
    at once, one line each, in one ``ConfigError``. Keys accepted without an effect add a line to
    ``notes`` (printed to stderr when ``notes`` is None)."""
    known = config_fields(cls)
    values: dict[str, Any] = {}
    pending: dict[str, Any] = {}  # translations that need every key first (eval_strategy, min_lr)
    problems: list[str] = []
    said: list[str] = []
    sources = []
    if yaml_path is not None:
        sources.append((f"{yaml_path}", read_yaml(yaml_path)))
    if overrides:
        sources.append(("command line", overrides))
    for where, mapping in sources:
        set_by: dict[str, str] = {}
        for key, value in mapping.items():
            key = str(key)
            entry = TRL_KEYS.get(key)
            if key in known and not (entry and entry.target == key):
                updates = {key: value}
            elif entry is not None:
                try:
                    updates, note = entry.translate(value)
                except Refused as e:
                    problems.append(f"{where}: {key}: {e}")
                    continue
                if note:
                    said.append(f"{key}: {note}")
            else:
                hint = trl_hint(key, list(known))
                problems.append(f"{where}: unknown config key {key!r}" + (f"; did you mean {hint!r}?" if hint else ""))
                continue
            for name, v in updates.items():
                if name not in known:
                    pending[name] = v
                    continue
                try:
                    v = coerce_value(cls, name, v)
                except ConfigError as e:
                    problems.append(f"{where}: {e}" + (f" (from {key})" if key != name else ""))
                    continue
                if name in set_by and values.get(name) != v:
                    problems.append(f"{where}: {set_by[name]} and {key} both set {name}; keep one")
                    continue
                set_by[name] = key
                values[name] = v
    if problems:
        raise ConfigError("\n".join(problems))
    if pending.pop("eval_off", False):
        values["eval_dataset"] = None
    if pending.pop("eval_strategy_steps", False) and "eval_steps" not in values and "eval_steps" in known:
        values["eval_steps"] = values.get("logging_steps", known["logging_steps"].default)
    if "min_lr" in pending:  # an absolute floor: a share of the learning rate the run ends up with
        floor = {"min_lr": pending.pop("min_lr"),
                 "learning_rate": values.get("learning_rate", known["learning_rate"].default)}
        resolve_lr_floor(floor)
        values.setdefault("min_lr_rate", coerce_value(cls, "min_lr_rate", floor["min_lr_rate"]))
    if notes is None:
        for line in said:
            if os.environ.get("RANK", "0") == "0":
                print(f"prefopt: note: {line}", file=sys.stderr)
    else:
        notes.extend(said)
    return cls(**values)


def save_config(config, path: str | Path) -> None:
    """Atomic: a full disk while a resumed run rewrites it leaves the earlier file whole."""
    text = yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
    simulate_full_disk("config")
    write_text_atomic(path, text)


def command_fields(cls, command: str | None) -> dict[str, dataclasses.Field]:
    """The fields a command reads (all of them for ``None``)."""
    return {name: f for name, f in config_fields(cls).items()
            if command is None or command in f.metadata.get("commands", (command,))
            or (command == "online" and TRAIN in f.metadata.get("commands", ()))}  # online rounds train


def add_config_arguments(parser, cls, command: str | None = None) -> None:
    """One ``--key VALUE`` flag per field the command reads, typed as strings and coerced by
    ``coerce_value``; the help text is the command's own where the key says one."""
    groups: dict[str, Any] = {}
    for name, f in command_fields(cls, command).items():
        group_name = f.metadata.get("group", "training")
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(f"{group_name} options")
        choices = f.metadata.get("choices")
        help_text = f.metadata.get("help_for", {}).get(command) or f.metadata.get("help", "")
        if choices:
            help_text += f" One of: {', '.join(choices)}."
        help_text += f" (default: {'null' if f.default is None else f.default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        # A bare boolean flag (`--overwrite_output_dir`) means true; `--flag false` still works.
        bare = {"nargs": "?", "const": "true"} if _field_type(cls, name)[0] is bool else {}
        groups[group_name].add_argument(
            f"--{name}", dest=f"cfg__{name}", default=argparse_missing, metavar="VALUE", help=help_text, **bare
        )


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


argparse_missing = _Missing()


def overrides_from_namespace(namespace) -> dict[str, Any]:
    return {
        key[len("cfg__"):]: value
        for key, value in vars(namespace).items()
        if key.startswith("cfg__") and value is not argparse_missing
    }


def config_markdown(cls=TrainConfig) -> str:
    """The reference table of every config key, generated from the dataclass (docs/config.md)."""
    lines = [
        "# Configuration keys",
        "",
        "Generated from `prefopt.config.TrainConfig` by `python -m prefopt.config > docs/config.md`;",
        "a test fails when this file and the dataclass disagree. Every key works in the YAML file",
        "(`key: value`) and on the command line (`--key value`), which overrides the file.",
    ]
    group = None
    for name, f in config_fields(cls).items():
        g = f.metadata.get("group", "training")
        if g != group:
            group = g
            lines += ["", f"## {g}", "", "| key | default | meaning | commands |", "| --- | --- | --- | --- |"]
        help_text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            help_text += " One of: " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + "."
        default = "null" if f.default is None else f.default
        used = "all" if set(f.metadata["commands"]) == set(CONFIG_COMMANDS) else ", ".join(f.metadata["commands"])
        lines.append(f"| `{name}` | `{default}` | {help_text} | {used} |")
    return "\n".join(lines) + "\n" + trl_markdown(cls)


def trl_markdown(cls=TrainConfig) -> str:
    """The table of TRL ``DPOConfig`` / ``TrainingArguments`` keys and what each is here, from the
    same tables the config loader translates with (``prefopt.trl_compat``)."""
    fields = config_fields(cls)
    lines = [
        "", "## Coming from TRL", "",
        "A `DPOConfig` YAML (TRL 1.x, and TRL < 1.0's keys) runs as it is: each key below means the same",
        "here, is translated, has no effect on the result (in TRL either, or here: then a note is printed",
        "when the run starts), or is refused with a line that says what to use instead. Unknown keys are",
        "all reported at once. Commands use the keys they need (`prefopt COMMAND --help`).", "",
        "| TRL key | here | notes |", "| --- | --- | --- |",
    ]
    rows = {}
    for name, note in SAME_NAMED.items():
        entry = TRL_KEYS.get(name)
        if name in fields:
            rows[name] = ("same key", note)
        elif entry is not None:
            rows[name] = (entry.kind, entry.doc)
    for name, entry in TRL_KEYS.items():
        if name in rows:
            continue
        if name in fields and entry.target != name:
            rows[name] = ("same key", "")
        elif entry.kind == "alias":
            rows[name] = (f"`{entry.target}`", entry.doc)
        elif entry.kind == "refused unless default":
            rows[name] = (f"accepted at {entry.target}; else refused", entry.doc)
        else:
            rows[name] = (entry.kind, entry.doc)
    for name in sorted(rows):
        here, note = rows[name]
        lines.append(f"| `{name}` | {here} | {note} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(config_markdown(), end="")
