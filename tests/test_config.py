import pytest

from prefopt.config import TrainConfig, build_config
from prefopt.errors import ConfigError


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model_name_or_path: m\ndataset: d.jsonl\nbeta: 0.2\nlearning_rate: 1e-6\nmax_prompt_length: null\n")
    cfg = build_config(TrainConfig, path, {"beta": "0.5", "shuffle": "false", "max_steps": "7"})
    assert cfg.beta == 0.5 and cfg.learning_rate == 1e-6 and cfg.shuffle is False and cfg.max_steps == 7
    assert cfg.max_prompt_length is None
    assert cfg.loss_type == "dpo"  # default


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"betta": 0.1}, "unknown config key 'betta'; did you mean 'beta'?"),
        ({"beta": "high"}, "'beta' expects float"),
        ({"max_steps": 1.5}, "'max_steps' expects int"),
        ({"optimizer": "sgd"}, "must be one of adamw, rmsprop"),
        ({"shuffle": "maybe"}, "'shuffle' expects bool"),
    ],
)
def test_bad_keys_and_values(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("(", r"\(")):
        build_config(TrainConfig, None, overrides)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"max_length": 128, "max_prompt_length": 256}, "max_prompt_length"),
        ({"loss_type": "dpx"}, "unknown loss_type value 'dpx'"),
        ({"beta": -1.0}, "beta must be > 0"),
        ({"dataset": None}, "dataset is required"),
    ],
)
def test_validation(overrides, message):
    base = {"model_name_or_path": "m", "dataset": "d.jsonl"}
    cfg = build_config(TrainConfig, None, {**base, **overrides})
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        build_config(TrainConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config(TrainConfig, bad)


def test_every_field_has_help():
    import dataclasses

    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f.name


def test_docs_config_md_lists_every_key():
    from pathlib import Path

    from prefopt.config import config_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text() == config_markdown(), "regenerate: python -m prefopt.config > docs/config.md"


def test_lr_schedules():
    from prefopt.training.optim import lr_multiplier

    assert [lr_multiplier(s, kind="linear", warmup_steps=2, total_steps=6) for s in range(7)] == [
        0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_multiplier(4, kind="cosine", warmup_steps=2, total_steps=6) == pytest.approx(0.5)
    assert lr_multiplier(5, kind="constant", warmup_steps=2, total_steps=6) == 1.0
