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


def _train_args(parser: argparse.ArgumentParser) -> None:
    _config_command_args(parser)
    parser.add_argument("--resume", action="store_true",
                        help="Resume from the newest complete checkpoint in output_dir (resume_from_checkpoint: latest).")


@command("train", "Train a policy with DPO, ODPO or another preference loss.", _train_args)
def _train(args, unknown) -> int:
    from prefopt.pipeline import train

    cfg = _config_from_args(args, unknown)
    if getattr(args, "resume", False) and not cfg.resume_from_checkpoint:
        cfg.resume_from_checkpoint = "latest"
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


def _validate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="Print the summary as JSON.")
    _config_command_args(parser)


@command("validate", "Check a dataset as training would and print what was read, kept and dropped.",
         _validate_args)
def _validate(args, unknown) -> int:
    import json

    from prefopt.validate import summary_text, validate_datasets

    summaries = validate_datasets(_config_from_args(args, unknown))
    if args.json:
        print(json.dumps(summaries, indent=2))
    else:
        for role, s in summaries.items():
            print(summary_text(role, s))
    return 0


def _reward_args(parser: argparse.ArgumentParser) -> None:
    from prefopt.reward_cli import configure

    configure(parser)


@command("reward", "Bradley-Terry reward models: train, score a dataset for ODPO, evaluate.", _reward_args)
def _reward(args, unknown) -> int:
    from prefopt.reward_cli import run

    return run(args, unknown)


# --- demo, eval, plot (issue 4) ---
def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default="runs/demo", help="Where the report and all runs go.")
    parser.add_argument("--quick", action="store_true", help="A smaller run (under a minute), used by the tests.")


@command("demo", "Offline controlled-sentiment experiment: SFT, DPO and ODPO on a toy language.", _demo_args)
def _demo(args, unknown) -> int:
    from prefopt.demo.run import run_demo

    _reject_extra(unknown)
    run_demo(args.output_dir, quick=args.quick)
    return 0


def _eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, metavar="POLICY",
                        help="Policy directory; repeat for several.")
    parser.add_argument("--ref", required=True, metavar="REF", help="Reference model directory (e.g. the SFT model).")
    parser.add_argument("--prompts", required=True, metavar="FILE", help=".txt (one per line) or a table with `prompt`.")
    parser.add_argument("--scorer", required=True, metavar="SCORER", help="module:function from texts to scores, or a reward-model directory.")
    parser.add_argument("--num_samples", type=int, default=4, help="Samples per prompt and model.")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Longest completion sampled.")
    parser.add_argument("--output_dir", default="eval", help="Where eval_*.json and frontier.png go.")
    parser.add_argument("--pairs", metavar="FILE", help="Pair file for the implicit reward's preference accuracy.")
    parser.add_argument("--beta", type=float, help="Beta of the implicit reward (default: the model's config.yaml).")
    parser.add_argument("--batch_size", type=int, default=32, help="Sequences per generate / forward call.")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed.")


@command("eval", "Sample from policies and report reward, KL from the reference, win rate, accuracy.", _eval_args)
def _eval(args, unknown) -> int:
    from prefopt.evaluate import run_eval

    _reject_extra(unknown)
    run_eval(args.model, args.ref, prompts=args.prompts, scorer=args.scorer, num_samples=args.num_samples,
             max_new_tokens=args.max_new_tokens, output_dir=args.output_dir, pairs=args.pairs, beta=args.beta,
             batch_size=args.batch_size, seed=args.seed)
    return 0


def _plot_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="Directory with metrics.jsonl and/or eval JSON files.")


@command("plot", "Draw training curves (metrics.jsonl) and the reward-KL frontier (eval JSON) in a directory.",
         _plot_args)
def _plot(args, unknown) -> int:
    from prefopt.plots import plot_directory

    _reject_extra(unknown)
    for path in plot_directory(args.output_dir):
        print(f"prefopt: wrote {path}", file=sys.stderr)
    return 0


def _reject_extra(unknown: list[str]) -> None:
    if unknown:
        raise ConfigError(f"unexpected argument {unknown[0]!r}")


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
