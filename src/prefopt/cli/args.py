"""Command-line pieces shared by the commands: the config flags (one per ``TrainConfig`` key the
command reads) and turning parsed flags into a checked config."""

from __future__ import annotations

import argparse

from prefopt.config import (
    TrainConfig,
    add_config_arguments,
    build_config,
    config_fields,
    overrides_from_namespace,
)
from prefopt.errors import ConfigError
from prefopt.trl_compat import TRL_KEYS, trl_hint


def config_command_args(parser: argparse.ArgumentParser, command: str) -> None:
    """``--config`` and the flags of the config keys ``command`` reads (``TrainConfig`` metadata)."""
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file of config keys (it may hold keys of other commands too); flags override it.")
    add_config_arguments(parser, TrainConfig, command)
    parser.set_defaults(config_command=command)
    parser.epilog = ("TRL's DPOConfig / TrainingArguments keys work too, in the file or as flags (--optim adamw_torch, "
                     "--eval_strategy steps, ...): docs/config.md, 'Coming from TRL'.")


def train_args(parser: argparse.ArgumentParser, command: str = "train") -> None:
    config_command_args(parser, command)
    parser.add_argument("--resume", action="store_true",
                        help="Resume from the newest complete checkpoint in output_dir (resume_from_checkpoint: latest).")


def config_from_args(args, unknown: list[str]) -> TrainConfig:
    command = getattr(args, "config_command", None)
    overrides = {**trl_flags(unknown, command), **overrides_from_namespace(args)}
    cfg = build_config(TrainConfig, args.config, overrides)
    if getattr(args, "resume", False) and not cfg.resume_from_checkpoint:
        cfg.resume_from_checkpoint = "latest"
    return cfg


def trl_flags(unknown: list[str], command: str | None) -> dict[str, str]:
    """TRL's flags (``--optim adamw_torch``, ``--eval_strategy=steps``) among the arguments argparse
    did not know, as config overrides; every other leftover is an error, all reported at once."""
    out: dict[str, str] = {}
    problems: list[str] = []
    fields = config_fields(TrainConfig)
    i = 0
    while i < len(unknown):
        token = unknown[i]
        i += 1
        if not token.startswith("--"):
            problems.append(f"unexpected argument {token!r}")
            continue
        name, eq, value = token[2:].partition("=")
        if not eq:  # the flag's value, if one follows, belongs to it, whatever becomes of the flag
            if i < len(unknown) and not unknown[i].startswith("--"):
                value, i = unknown[i], i + 1
            else:
                value = "true"  # a bare flag, as for prefopt's own booleans
        if name in TRL_KEYS and name not in fields:
            out[name] = value
        elif name in fields:
            problems.append(f"option '--{name}' is not used by `prefopt {command}` (see `prefopt {command} --help`)")
        else:
            hint = trl_hint(name, list(fields))
            problems.append(f"unknown option '--{name}'" + (f"; did you mean '--{hint}'?" if hint else ""))
    if problems:
        raise ConfigError("\n".join(problems))
    return out


def reject_extra(unknown: list[str]) -> None:
    if unknown:
        raise ConfigError("\n".join(f"unexpected argument {u!r}" for u in unknown))
