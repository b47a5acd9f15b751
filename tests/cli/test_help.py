"""Each command's --help lists the keys that command reads, with defaults, in its own words."""

from __future__ import annotations

import argparse
import functools
import re

import pytest

from prefopt.cli.main import build_parser, main
from prefopt.config import CONFIG_COMMANDS, TrainConfig, config_fields


@functools.lru_cache(maxsize=1)
def parser_tree() -> argparse.ArgumentParser:
    return build_parser()  # read-only below, so one parser serves every test


def subparser(*names: str) -> argparse.ArgumentParser:
    parser = parser_tree()
    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--")}


OWN = {  # each command's flags that are not config keys
    "train": {"--help", "--config", "--resume", "--debug"},
    "reward train": {"--help", "--config", "--resume", "--debug"},
    "validate": {"--help", "--config", "--json", "--debug"},
    "logps": {"--help", "--config", "--model", "--output", "--batch_size", "--debug"},
    "reward score": {"--help", "--config", "--model", "--policy", "--ref", "--batch_size", "--output", "--debug"},
    "reward eval": {"--help", "--config", "--model", "--policy", "--ref", "--batch_size", "--output", "--plot",
                    "--bins", "--debug"},
}


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_flags_are_the_keys_the_command_reads(command):
    fields = config_fields(TrainConfig)
    keys = {f"--{n}" for n, f in fields.items() if command in f.metadata["commands"]}
    assert options(subparser(*command.split())) == keys | OWN[command]


def test_reward_train_help_speaks_of_reward_models():
    text = subparser("reward", "train").format_help()
    assert "Policy to train" not in text and "reward model" in text
    for flag in ("--ref_model_name_or_path", "--beta", "--loss_type", "--use_peft", "--precompute_ref_log_probs"):
        assert flag not in text, flag
    assert "--margin_from_scores" in text and "--learning_rate" in text


@pytest.mark.parametrize("command,absent,present", [
    ("validate", ["--learning_rate", "--beta", "--output_dir", "--bf16"], ["--dataset", "--loss_type", "--eval_dataset"]),
    ("logps", ["--learning_rate", "--beta", "--loss_type", "--eval_dataset"], ["--dataset", "--layout"]),
    ("reward score", ["--learning_rate", "--loss_type", "--layout", "--eval_dataset"], ["--dataset", "--beta"]),
    ("reward eval", ["--learning_rate", "--loss_type", "--model_name_or_path"], ["--dataset", "--beta"]),
])
def test_small_commands_list_only_their_keys(command, absent, present):
    text = subparser(*command.split()).format_help()
    for flag in absent:
        assert not re.search(rf"{flag}\b", text), flag
    for flag in present:
        assert re.search(rf"{flag}\b", text), flag


def test_every_help_shows_defaults():
    text = " ".join(subparser("eval").format_help().split())
    for default in ("Samples per prompt and model. (default: 4)", "(default: 64)", "(default: eval)",
                    "(default: 32)", "(default: 0)"):
        assert default in text, default
    assert "(default: -1)" in " ".join(subparser("train").format_help().split())  # max_prompt_length
    assert "(default: 16)" in subparser("reward", "score").format_help()


def test_flags_of_other_commands_and_unknown_flags_all_reported(capsys, tmp_path):
    rc = main(["reward", "train", "--dataset", str(tmp_path / "d.jsonl"), "--beta", "0.2", "--lerning_rate", "1",
               "--loss_type", "dpo"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2
    assert err == [
        "prefopt: error: option '--beta' is not used by `prefopt reward train` (see `prefopt reward train --help`)",
        "prefopt: error: unknown option '--lerning_rate'; did you mean '--learning_rate'?",
        "prefopt: error: option '--loss_type' is not used by `prefopt reward train` (see `prefopt reward train --help`)",
    ]


def test_trl_flags_on_the_command_line(tmp_path):
    from prefopt.cli.args import config_from_args

    parser = subparser("train")
    args, unknown = parser.parse_known_args(["--optim", "adamw_torch", "--eval_strategy=no", "--padding_free",
                                             "--beta", "0.3"])
    cfg = config_from_args(args, unknown)
    assert (cfg.optimizer, cfg.eval_dataset, cfg.layout, cfg.beta) == ("adamw", None, "packed", 0.3)
