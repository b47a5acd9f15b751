"""Command-line pieces shared by the commands: the config flags (one per ``TrainConfig`` key) and
turning parsed flags into a checked config."""

from __future__ import annotations

import argparse

from prefopt.config import (
    TrainConfig,
    add_config_arguments,
    build_config,
    config_fields,
    overrides_from_namespace,
    unknown_message,
)
from prefopt.errors import ConfigError


def config_command_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of config keys; flags override it.")
    add_config_arguments(parser, TrainConfig)


def train_args(parser: argparse.ArgumentParser) -> None:
    config_command_args(parser)
    parser.add_argument("--resume", action="store_true",
                        help="Resume from the newest complete checkpoint in output_dir (resume_from_checkpoint: latest).")


def config_from_args(args, unknown: list[str]) -> TrainConfig:
    reject_unknown(unknown, TrainConfig)
    cfg = build_config(TrainConfig, args.config, overrides_from_namespace(args))
    if getattr(args, "resume", False) and not cfg.resume_from_checkpoint:
        cfg.resume_from_checkpoint = "latest"
    return cfg


def reject_unknown(unknown: list[str], cls) -> None:
    if unknown:
        flag = next((u for u in unknown if u.startswith("--")), unknown[0])
        name = flag.lstrip("-").split("=")[0]
        if flag.startswith("--"):
            raise ConfigError(unknown_message("option", f"--{name}", [f"--{k}" for k in config_fields(cls)]))
        raise ConfigError(f"unexpected argument {flag!r}")


def reject_extra(unknown: list[str]) -> None:
    if unknown:
        raise ConfigError(f"unexpected argument {unknown[0]!r}")
