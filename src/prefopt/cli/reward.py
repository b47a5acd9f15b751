"""``prefopt reward train|score|eval``: the subcommands of the ``reward`` command. Thin, like main.py."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prefopt.cli.args import config_command_args, config_from_args, train_args


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="reward_command", metavar="SUBCOMMAND", required=True)

    def add(name: str, help_text: str, fn) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.set_defaults(reward_func=fn)
        return p

    add("train", "Train a Bradley-Terry reward model (same config keys, loop and outputs as `prefopt train`).",
        _train)
    train_args(sub.choices["train"], "reward train")  # the keys reward training reads, and --resume

    for name, help_text, fn in (
        ("score", "Add each response's reward to a dataset (score_chosen/score_rejected, or scores), "
                  "ready for `loss_type: odpo`.", _score),
        ("eval", "Preference accuracy and calibration (ECE, reliability plot) of a reward.", _eval),
    ):
        p = add(name, help_text, fn)
        p.add_argument("--model", help="Reward model directory (from `prefopt reward train`).")
        p.add_argument("--policy", help="Implicit reward: the DPO-trained policy ...")
        p.add_argument("--ref", help="... and its reference; the reward is beta * (log pi - log ref), --beta B.")
        p.add_argument("--batch_size", type=int, default=16,
                       help="Sequences (or pairs) per forward pass. (default: %(default)s)")
        if name == "score":
            p.add_argument("--output", required=True,
                           help="File to write: .jsonl, .json, .parquet or .csv (the input rows plus scores).")
        else:
            p.add_argument("--output", help="Write the report as JSON here (and per-pair rewards beside it).")
            p.add_argument("--plot", help="Write the reliability diagram here (PNG).")
            p.add_argument("--bins", type=int, default=10, help="Calibration bins on [0, 1]. (default: %(default)s)")
        config_command_args(p, f"reward {name}")


def run(args, unknown) -> int:
    return int(args.reward_func(args, unknown) or 0)


def _train(args, unknown) -> int:
    from prefopt.recipes import train_reward_model  # heavy: imported when the command runs (main.py)

    cfg = config_from_args(args, unknown)
    train_reward_model(cfg)  # ends with the run's summary on stdout
    return 0


def _rewarder(args, unknown):
    from prefopt.evaluation.rewarders import build_rewarder

    cfg = config_from_args(args, unknown)
    rewarder = build_rewarder(cfg, model=args.model, policy=args.policy, ref=args.ref, batch_size=args.batch_size)
    return cfg, rewarder


def _score(args, unknown) -> int:
    from prefopt.data.writers import writer_for
    from prefopt.evaluation.rewarders import score_dataset
    from prefopt.recipes import check_output_file

    writer_for(Path(args.output))  # a bad --output fails before any model loads
    check_output_file(args.output)
    cfg, rewarder = _rewarder(args, unknown)
    s = score_dataset(cfg, rewarder, args.output)
    note = ""
    if s.get("pairs_chosen_not_above_rejected"):
        note = (f"; {s['pairs_chosen_not_above_rejected']} pairs have score_chosen <= score_rejected "
                "(ODPO drops them unless nonpositive_score_diff says otherwise)")
    print(f"prefopt: scored {s['responses']} responses in {s['rows']} rows ({s['format']}) with {s['rewarder']}; "
          f"wrote {s['output']}{note}", file=sys.stderr)
    return 0


def _eval(args, unknown) -> int:
    from prefopt.evaluation.rewarders import evaluate_rewarder

    cfg, rewarder = _rewarder(args, unknown)
    result = evaluate_rewarder(cfg, rewarder, n_bins=args.bins, output=args.output, plot=args.plot)
    short = {k: result[k] for k in ("pairs", "accuracy", "ties", "ece", "mean_margin", "mean_prob")}
    print(json.dumps(short))
    if args.plot:
        print(f"prefopt: reliability plot written to {args.plot}", file=sys.stderr)
    return 0
