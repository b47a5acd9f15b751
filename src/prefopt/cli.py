"""The ``prefopt`` command. Thin: parse, build the config, call the library."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from prefopt import __version__
from prefopt.config import (
    TrainConfig,
    _unknown,
    add_config_arguments,
    build_config,
    config_fields,
    overrides_from_namespace,
)
from prefopt.errors import ConfigError, PrefoptError

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand: ``configure(parser)`` adds its flags, the function runs it."""

    def decorate(fn):
        COMMANDS[name] = (help, configure, fn)
        return fn

    return decorate


def _config_command_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of config keys; flags override it.")
    add_config_arguments(parser, TrainConfig)


def _config_from_args(args, unknown: list[str]) -> TrainConfig:
    _reject_unknown(unknown, TrainConfig)
    return build_config(TrainConfig, args.config, overrides_from_namespace(args))


def _reject_unknown(unknown: list[str], cls) -> None:
    if unknown:
        flag = next((u for u in unknown if u.startswith("--")), unknown[0])
        name = flag.lstrip("-").split("=")[0]
        if flag.startswith("--"):
            raise ConfigError(_unknown("option", f"--{name}", [f"--{k}" for k in config_fields(cls)]))
        raise ConfigError(f"unexpected argument {flag!r}")


@command("train", "Train a policy with DPO, ODPO or another preference loss.", _config_command_args)
def _train(args, unknown) -> int:
    from prefopt.pipeline import train

    cfg = _config_from_args(args, unknown)
    train(cfg)
    if os.environ.get("RANK", "0") == "0":  # once, not once per process (torchrun / accelerate launch)
        print(f"prefopt: model saved to {cfg.output_dir}", file=sys.stderr)
    return 0


def _logps_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="Model to score with (same as --model_name_or_path).")
    parser.add_argument("--output", required=True, help="JSONL file to write, one object per pair.")
    parser.add_argument("--batch_size", type=int, default=8, help="Pairs per forward pass.")
    _config_command_args(parser)


@command("logps", "Write per-pair chosen/rejected log-probs of a model on a dataset.", _logps_args)
def _logps(args, unknown) -> int:
    from prefopt.pipeline import logps

    cfg = _config_from_args(args, unknown)
    if args.model:
        cfg.model_name_or_path = args.model
    logps(cfg, args.output, batch_size=args.batch_size)
    return 0


def _merge_adapter_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="Base model the adapter was trained on.")
    parser.add_argument("--adapter", required=True, help="Directory with adapter_config.json (a LoRA run's output).")
    parser.add_argument("--output", required=True, help="Directory to write the merged model to.")


@command("merge-adapter", "Fold a LoRA adapter into its base model and save a plain model.", _merge_adapter_args)
def _merge_adapter(args, unknown) -> int:
    from pathlib import Path

    from prefopt.modeling import load_tokenizer
    from prefopt.peft_support import merge_adapter

    _reject_unknown(unknown, TrainConfig)
    if not (Path(args.adapter) / "adapter_config.json").is_file():
        raise PrefoptError(f"no adapter_config.json in {args.adapter}")
    out = merge_adapter(args.base, args.adapter, args.output)
    load_tokenizer(args.adapter if (Path(args.adapter) / "tokenizer_config.json").exists() else args.base
                   ).save_pretrained(out)
    print(f"prefopt: merged model saved to {out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefopt", description="Align causal LMs with preference data: DPO, ODPO, reward models.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"prefopt {__version__}")
    parser.add_argument("--debug", action="store_true", help="Show Python tracebacks for input errors.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, configure, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        configure(p)
        p.set_defaults(func=fn)
    return parser


def _quiet_libraries() -> None:
    """Library progress bars and notices (weight loading, shard writing) drown out ours."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args, unknown) or 0)
    except PrefoptError as e:
        if args.debug:
            raise
        print(f"prefopt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prefopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
