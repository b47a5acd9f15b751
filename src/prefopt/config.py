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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prefopt.errors import ConfigError


def opt(default: Any, help: str, choices: tuple | None = None, group: str = "training") -> Any:
    """A config field with its help text (and allowed values), the only place a key is described."""
    return field(default=default, metadata={"help": help, "choices": choices, "group": group})


@dataclass
class TrainConfig:
    # --- model ---
    model_name_or_path: str | None = opt(None, "Policy to train: a local directory or hub id.", group="model")
    ref_model_name_or_path: str | None = opt(
        None, "Reference model; default: a frozen copy of the initial policy.", group="model"
    )
    tokenizer_name_or_path: str | None = opt(None, "Tokenizer; default: the policy's.", group="model")
    disable_dropout: bool = opt(True, "Turn off dropout in policy and reference.", group="model")
    # --- data ---
    dataset: str | None = opt(
        None, "Training pairs: .jsonl/.json/.parquet/.csv file, save_to_disk dir, or hub id.", group="data"
    )
    dataset_split: str = opt("train", "Split to read for hub datasets and dataset dicts.", group="data")
    eval_dataset: str | None = opt(None, "Held-out pairs, same formats as `dataset`.", group="data")
    eval_dataset_split: str = opt("train", "Split of `eval_dataset` to read.", group="data")
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
    max_prompt_length: int | None = opt(512, "Max prompt tokens (cut from the left).", group="data")
    # --- objective ---
    loss_type: str = opt("dpo", "Preference loss: dpo (sigmoid), odpo, cdpo, ipo, hinge.", group="objective")
    beta: float = opt(0.1, "KL strength beta: the implicit reward is beta*(log pi - log ref).", group="objective")
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
        group="objective",
    )
    label_smoothing: float = opt(0.0, "cDPO label smoothing epsilon in [0, 0.5).", group="objective")
    # --- optimisation ---
    learning_rate: float = opt(1e-6, "Peak learning rate.")
    optimizer: str = opt("adamw", "Optimizer.", choices=("adamw", "rmsprop"))
    weight_decay: float = opt(0.0, "Weight decay.")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_epsilon: float = opt(1e-8, "AdamW / RMSprop epsilon.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm; 0 disables clipping.")
    lr_scheduler_type: str = opt(
        "linear", "Schedule after warm-up.", choices=("constant", "linear", "cosine")
    )
    warmup_steps: int = opt(0, "Linear warm-up steps.")
    per_device_train_batch_size: int = opt(8, "Pairs per device per micro-batch.")
    per_device_eval_batch_size: int = opt(8, "Pairs per device per eval batch.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.")
    max_steps: int = opt(-1, "Optimizer steps; -1 means use num_train_epochs.")
    num_train_epochs: float = opt(1.0, "Passes over the data when max_steps is -1.")
    shuffle: bool = opt(True, "Shuffle training pairs every epoch (seeded).")
    seed: int = opt(42, "Seed for initialisation, shuffling and dropout.")
    # --- performance (issue 6) ---
    layout: str = opt(
        "auto",
        "Batch layout: plain (two padded prompt+response rows per pair), prefix_shared (one "
        "[prompt|chosen|rejected] row per pair), packed (several pairs per row, no padding); "
        "auto picks the cheapest by a FLOP estimate on the data.",
        choices=("auto", "plain", "prefix_shared", "packed"), group="performance",
    )
    pack_row_tokens: int = opt(0, "Packed layout: tokens per row; 0 = the longest pair of each batch.",
                               group="performance")
    precompute_ref_log_probs: bool = opt(
        False, "Score all pairs with the reference once before training, cache them on disk, free the model.",
        group="performance",
    )
    ref_logps_cache_dir: str | None = opt(
        None, "Reference log-prob cache directory; default $PREFOPT_CACHE_DIR/ref_logps or "
        "~/.cache/prefopt/ref_logps.", group="performance",
    )
    # --- logging and output ---
    output_dir: str = opt("outputs/prefopt", "Where checkpoints, metrics and the final model go.", group="output")
    logging_steps: int = opt(10, "Log metrics every N optimizer steps.", group="output")
    eval_steps: int = opt(0, "Evaluate every N steps (0: only at the end, if eval_dataset).", group="output")
    save_steps: int = opt(500, "Checkpoint every N steps (0: no intermediate checkpoints).", group="output")
    report_to: str = opt(
        "auto", "Extra loggers: auto (TensorBoard if installed), tensorboard, none.",
        choices=("auto", "tensorboard", "none"), group="output",
    )
    progress_bar: bool = opt(True, "Show a progress bar on the terminal.", group="output")

    def validate(self) -> TrainConfig:
        from prefopt.losses import LOSSES

        if not self.model_name_or_path:
            raise ConfigError("model_name_or_path is required")
        if not self.dataset:
            raise ConfigError("dataset is required")
        if self.loss_type not in LOSSES:
            raise ConfigError(_unknown("loss_type value", self.loss_type, LOSSES))
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {self.max_length}")
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})"
            )
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("logging_steps",):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs <= 0):
            raise ConfigError("set max_steps > 0 or num_train_epochs > 0")
        if self.learning_rate < 0:
            raise ConfigError(f"learning_rate must be >= 0, got {self.learning_rate}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------
# Generic machinery: any config dataclass built with `opt` gets YAML loading, CLI flags and checks.


def config_fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unknown(what: str, name: str, valid) -> str:
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
    if isinstance(value, str) and value.strip().lower() in _NONE:
        value = None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {name!r} cannot be empty")
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
            f"config key {name!r} expects {getattr(base, '__name__', base)}, got {value!r}"
        ) from None
    choices = f.metadata.get("choices")
    if choices and out not in choices:
        raise ConfigError(f"config key {name!r} must be one of {', '.join(choices)}; got {out!r}")
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of config keys at the top level")
    return data


def build_config(cls, yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """Defaults < YAML file < overrides. Every key is checked against the dataclass."""
    known = config_fields(cls)
    values: dict[str, Any] = {}
    sources = []
    if yaml_path is not None:
        sources.append((f"{yaml_path}", read_yaml(yaml_path)))
    if overrides:
        sources.append(("command line", overrides))
    for where, mapping in sources:
        for key, value in mapping.items():
            if key not in known:
                raise ConfigError(f"{where}: " + _unknown("config key", str(key), known))
            values[key] = coerce_value(cls, key, value)
    return cls(**values)


def save_config(config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False), encoding="utf-8")


def add_config_arguments(parser, cls) -> None:
    """One ``--key VALUE`` flag per field, typed as strings and coerced by ``coerce_value``."""
    groups: dict[str, Any] = {}
    for name, f in config_fields(cls).items():
        group_name = f.metadata.get("group", "training")
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(f"{group_name} options")
        choices = f.metadata.get("choices")
        help_text = f.metadata.get("help", "")
        if choices:
            help_text += f" One of: {', '.join(choices)}."
        help_text += f" (default: {f.default})"
        groups[group_name].add_argument(
            f"--{name}", dest=f"cfg__{name}", default=argparse_missing, metavar="VALUE", help=help_text
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
