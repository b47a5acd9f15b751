"""The ``prefopt`` command. Thin: parse, build the config, call the library."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from prefopt import __version__
from prefopt.cli.args import config_command_args, config_from_args, reject_extra, train_args
from prefopt.cli.reward import configure as configure_reward
from prefopt.cli.reward import run as run_reward
from prefopt.errors import PrefoptError, RunInterrupted, SharedFailure

# The commands import the library (torch models, transformers, accelerate) when they run, not at
# the top, so that `prefopt --help` and argument errors answer at once.

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand: ``configure(parser)`` adds its flags, the function runs it."""

    def decorate(fn):
        COMMANDS[name] = (help, configure, fn)
        return fn

    return decorate


@command("train", "Train a policy with DPO, ODPO or another preference loss.", train_args)
def _train(args, unknown) -> int:
    from prefopt.recipes import train

    cfg = config_from_args(args, unknown)
    train(cfg)  # ends with the run's summary on stdout (steps, time, final metrics, where the model is)
    return 0


@command("online", "Online / iterative DPO and ODPO: sample from the policy, score, pair, train; repeat.",
         lambda parser: train_args(parser, "online"))
def _online(args, unknown) -> int:
    from prefopt.online.rounds import run_online

    cfg = config_from_args(args, unknown)
    run_online(cfg)
    return 0


def _logps_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="Model to score with (same as --model_name_or_path).")
    parser.add_argument("--output", required=True, help="JSONL file to write, one object per pair.")
    parser.add_argument("--batch_size", type=int, default=8, help="Pairs per forward pass. (default: %(default)s)")
    config_command_args(parser, "logps")


@command("logps", "Write per-pair chosen/rejected log-probs of a model on a dataset.", _logps_args)
def _logps(args, unknown) -> int:
    from prefopt.recipes import logps

    cfg = config_from_args(args, unknown)
    if args.model:
        cfg.model_name_or_path = args.model
    logps(cfg, args.output, batch_size=args.batch_size)
    return 0


def _validate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="Print the summary as JSON.")
    config_command_args(parser, "validate")


def _check_datasets(args, unknown, command: str) -> int:
    """``validate`` and ``prepare``: the same reading, checking and store building; print the summaries."""
    import json

    from prefopt.data.prepare import summary_text
    from prefopt.recipes import validate_datasets

    summaries = validate_datasets(config_from_args(args, unknown), command=command)
    if args.json:
        print(json.dumps(summaries, indent=2))
    else:
        for role, s in summaries.items():
            print(summary_text(role, s))
    return 0


@command("validate", "Check a dataset as training would and print what was read, kept and dropped.",
         _validate_args)
def _validate(args, unknown) -> int:
    return _check_datasets(args, unknown, "validate")


@command("prepare", "Tokenize the datasets into the cached store training opens (run before a multi-node launch).",
         _validate_args)
def _prepare(args, unknown) -> int:
    return _check_datasets(args, unknown, "prepare")


def _cache_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "clear"), help="list the tokenized-pair stores, or remove them all")
    parser.add_argument("--data_cache_dir", help="The cache directory (default: as data_cache_dir in docs/config.md).")


@command("cache", "List or clear the tokenized-pair stores (data_cache_dir).", _cache_args)
def _cache(args, unknown) -> int:
    from pathlib import Path

    from prefopt.data.store import clear_stores, default_data_cache_dir, list_stores

    reject_extra(unknown)
    root = Path(args.data_cache_dir).expanduser() if args.data_cache_dir else default_data_cache_dir()
    if args.action == "clear":
        n, freed = clear_stores(root)
        print(f"prefopt: removed {n} stores ({freed / 2**20:.1f} MiB) from {root}")
        return 0
    stores = list_stores(root)
    print(f"{root}: {len(stores)} stores, {sum(e['bytes'] for e in stores) / 2**20:.1f} MiB")
    for e in stores:
        what = (f"{e['pairs']} pairs from {e['source']}, {e['created']}" if e["complete"]
                else "incomplete (rebuilt when next needed; `prefopt cache clear` removes it)")
        print(f"  {e['key']}  {e['bytes'] / 2**20:9.1f} MiB  {what}")
    return 0


@command("reward", "Bradley-Terry reward models: train, score a dataset for ODPO, evaluate.", configure_reward)
def _reward(args, unknown) -> int:
    return run_reward(args, unknown)


# --- demo, eval, plot ---
def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default="runs/demo", help="Where the report and all runs go. (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="A smaller run (under a minute), used by the tests.")


@command("demo", "Offline controlled-sentiment experiment: SFT, DPO and ODPO on a toy language.", _demo_args)
def _demo(args, unknown) -> int:
    from prefopt.demo.run import run_demo

    reject_extra(unknown)
    run_demo(args.output_dir, quick=args.quick)
    return 0


def _eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, metavar="POLICY",
                        help="Policy directory; repeat for several.")
    parser.add_argument("--ref", required=True, metavar="REF", help="Reference model directory (e.g. the SFT model).")
    parser.add_argument("--prompts", required=True, metavar="FILE", help=".txt (one prompt per line), or any preference or prompt file: the prompts are taken from it "
                        "(the `prompt` column, or the shared start of chosen/rejected).")
    parser.add_argument("--scorer", required=True, metavar="SCORER", help="module:function from texts to scores, or a reward-model directory.")
    parser.add_argument("--num_samples", type=int, default=4, help="Samples per prompt and model. (default: %(default)s)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Longest completion sampled. (default: %(default)s)")
    parser.add_argument("--output_dir", default="eval", help="Where eval_*.json and frontier.png go. (default: %(default)s)")
    parser.add_argument("--pairs", metavar="FILE", help="Pair file for the implicit reward's preference accuracy.")
    parser.add_argument("--beta", type=float, help="Beta of the implicit reward (default: the model's config.yaml).")
    parser.add_argument("--batch_size", type=int, default=32, help="Sequences per generate / forward call. (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed, also picks the --max_* subsets. (default: %(default)s)")
    parser.add_argument("--max_prompts", type=int, metavar="N",
                        help="Evaluate a seeded subset of N prompts (default: all).")
    parser.add_argument("--max_pairs", type=int, metavar="N",
                        help="Preference accuracy on a seeded subset of N pairs of --pairs (default: all).")


@command("eval", "Sample from policies and report reward, KL from the reference, win rate, accuracy.", _eval_args)
def _eval(args, unknown) -> int:
    from prefopt.evaluation.policy import run_eval

    reject_extra(unknown)
    run_eval(args.model, args.ref, prompts=args.prompts, scorer=args.scorer, num_samples=args.num_samples,
             max_new_tokens=args.max_new_tokens, output_dir=args.output_dir, pairs=args.pairs, beta=args.beta,
             batch_size=args.batch_size, seed=args.seed, max_prompts=args.max_prompts, max_pairs=args.max_pairs)
    return 0


def _plot_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="Directory with metrics.jsonl and/or eval JSON files.")


@command("plot", "Draw training curves (metrics.jsonl) and the reward-KL frontier (eval JSON) in a directory.",
         _plot_args)
def _plot(args, unknown) -> int:
    from prefopt.evaluation.plots import plot_directory

    reject_extra(unknown)
    for path in plot_directory(args.output_dir):
        print(f"prefopt: wrote {path}", file=sys.stderr)
    return 0


def _merge_adapter_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="Base model the adapter was trained on.")
    parser.add_argument("--adapter", required=True, help="Directory with adapter_config.json (a LoRA run's output).")
    parser.add_argument("--output", required=True, help="Directory to write the merged model to.")


@command("merge-adapter", "Fold a LoRA adapter into its base model and save a plain model.", _merge_adapter_args)
def _merge_adapter(args, unknown) -> int:
    from pathlib import Path

    from prefopt.modeling.load import load_tokenizer
    from prefopt.modeling.peft import merge_adapter

    reject_extra(unknown)
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
    except RunInterrupted as e:  # SIGTERM / SIGINT: a checkpoint was written; the status names the signal
        if os.environ.get("RANK", "0") == "0":  # every process stops; one says so
            print(f"prefopt: {e}", file=sys.stderr)
        return e.exit_code
    except PrefoptError as e:
        if args.debug and not isinstance(e, SharedFailure):
            raise
        if not isinstance(e, SharedFailure):  # SharedFailure: another process failed; the main one says so
            for line in str(e).splitlines() or [""]:  # several problems: one line each
                print(f"prefopt: error: {line}", file=sys.stderr)
        if getattr(e, "settled", False):  # several processes failed together: they exit together
            from prefopt.training.distributed import exit_together

            exit_together(e, 2)
        return 2
    except KeyboardInterrupt:
        print("prefopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
