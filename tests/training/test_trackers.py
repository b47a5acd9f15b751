"""Trackers through Accelerate, read back offline (TensorBoard events, W&B's offline run file, an
MLflow file store through its client); the end-of-run summary; the model card; eval_max_pairs;
throughput without evaluation time."""

from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from prefopt.config import TrainConfig
from prefopt.data.prepare import seeded_subset
from prefopt.errors import ConfigError
from prefopt.evaluation.model_card import card_metadata, hub_id, read_card_metadata
from prefopt.training.metrics import hyperparameters, read_metrics, requested_trackers, run_summary
from tests.conftest import run_cli, run_main


def _train_args(model, data, out, *extra):
    return ["train", "--model_name_or_path", model, "--dataset", data["train"], "--eval_dataset", data["eval"],
            "--max_steps", "4", "--per_device_train_batch_size", "8", "--learning_rate", "1e-2",
            "--logging_steps", "1", "--eval_steps", "2", "--eval_max_pairs", "8", "--output_dir", out, *extra]


@pytest.fixture(scope="module")
def tracked_run(tiny_llama, easy_data, tmp_path_factory):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("tracked")
    env_before = dict(os.environ)
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", MLFLOW_ALLOW_FILE_STORE="true",
                      MLFLOW_TRACKING_URI=(root / "mlruns").as_uri(), MLFLOW_EXPERIMENT_NAME="prefopt-test")
    try:
        out = root / "run"
        result = run_cli(*_train_args(tiny_llama, easy_data, out, "--report_to", "tensorboard,wandb,mlflow",
                                      "--run_name", "tracked-run"))
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result, root / "mlruns"


@pytest.mark.slow
def test_tensorboard_events_hold_the_metrics_jsonl_values(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = tracked_run
    rows = read_metrics(out / "metrics.jsonl")
    acc = EventAccumulator(str(out / "runs" / "tracked-run"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "rewards/accuracies", "eval/loss", "eval/rewards/accuracies"} <= tags  # metrics.jsonl's names
    for name in ("loss", "eval/loss", "rewards/margins"):
        logged = {r["step"]: r[name] for r in rows if name in r}
        events = {e.step: e.value for e in acc.Scalars(name)}
        assert events.keys() == logged.keys()
        assert events == pytest.approx(logged, rel=1e-6)
    hparams = [yaml.safe_load(Path(p).read_text()) for p in glob.glob(str(out / "runs" / "tracked-run" / "*" / "hparams.yml"))]
    assert hparams and hparams[0]["beta"] == 0.1 and hparams[0]["eval_max_pairs"] == 8


@pytest.mark.slow
def test_wandb_offline_run_folder_holds_config_and_metrics(tracked_run):
    out, _, _ = tracked_run
    files = glob.glob(str(out / "runs" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    blob = Path(files[0]).read_bytes()
    rows = read_metrics(out / "metrics.jsonl")
    # W&B stores each logged value as its JSON text in the run's record file.
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, float):
                assert key.encode() in blob and json.dumps(value).encode() in blob, key
    assert b"tracked-run" in blob and b"eval_max_pairs" in blob


@pytest.mark.slow
def test_mlflow_file_store_read_back_through_its_client(tracked_run):
    from mlflow.tracking import MlflowClient

    out, _, store = tracked_run
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        client = MlflowClient(tracking_uri=store.as_uri())
        experiment = client.get_experiment_by_name("prefopt-test")
        (run,) = client.search_runs([experiment.experiment_id])
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
    assert run.info.run_name == "tracked-run"
    assert run.data.params["beta"] == "0.1" and run.data.params["loss_type"] == "dpo"
    rows = read_metrics(out / "metrics.jsonl")
    history = client.get_metric_history(run.info.run_id, "eval/loss")
    assert {m.step: m.value for m in history} == pytest.approx({r["step"]: r["eval/loss"] for r in rows
                                                               if "eval/loss" in r}, rel=1e-6)
    assert run.data.metrics["loss"] == pytest.approx([r for r in rows if "loss" in r][-1]["loss"], rel=1e-6)


@pytest.mark.slow
def test_summary_card_and_eval_subset_of_the_tracked_run(tracked_run):
    out, result, _ = tracked_run
    rows = read_metrics(out / "metrics.jsonl")
    last_train = [r for r in rows if "loss" in r][-1]
    last_eval = [r for r in rows if "eval/loss" in r][-1]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("prefopt: done: 4 steps in ")
    assert f"loss {last_train['loss']:.4f}" in lines[1] and lines[1].startswith("prefopt: final train")
    assert f"loss {last_eval['eval/loss']:.4f}" in lines[2] and lines[2].startswith("prefopt: final eval")
    assert f"prefopt: model saved to {out}" in lines
    # eval_max_pairs: 8 of the 32 eval pairs, announced and recorded.
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["eval"]["evaluated_pairs"] == 8
    assert "seeded subset of 8 pairs" in result.stderr
    # The model card.
    meta = read_card_metadata(out / "README.md")
    assert meta["library_name"] == "transformers" and {"prefopt", "dpo"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local path is not a Hub id
    card = (out / "README.md").read_text()
    assert "| beta | 0.1 |" in card and "| optimizer steps | 4 |" in card
    assert f"| loss | {last_train['loss']:.4f} | {last_eval['eval/loss']:.4f} |" in card
    assert "![training curves](training_curves.png)" in card and (out / "training_curves.png").stat().st_size > 0
    assert "prefopt train --config config.yaml" in card and "--report_to tensorboard,wandb,mlflow" in card


@pytest.mark.slow
def test_reward_train_ends_with_a_summary_and_a_reward_model_card(tiny_llama, easy_data, tmp_path):
    out = tmp_path / "rm"
    result = run_main("reward", "train", "--model_name_or_path", tiny_llama, "--dataset", easy_data["train"],
                     "--max_steps", "2", "--per_device_train_batch_size", "8", "--output_dir", out,
                     "--report_to", "none", "--progress_bar", "false")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert result.stdout.splitlines()[0].startswith("prefopt: done: 2 steps")
    assert f"accuracy {rows[-1]['accuracy']:.4f}" in result.stdout
    assert f"prefopt: reward model saved to {out}" in result.stdout
    meta = read_card_metadata(out / "README.md")
    assert "reward-model" in meta["tags"] and meta["pipeline_tag"] == "text-classification"
    assert not (out / "runs").exists()  # report_to none: no tracker files


@pytest.mark.parametrize("report_to, message", [
    ("aim", "aim is not installed"),
    ("wandbb", "did you mean 'wandb'"),
    ("all,wandb", "mixes all/auto/none"),
])
def test_a_tracker_that_cannot_run_is_one_line_before_anything_is_written(tiny_llama, easy_data, tmp_path,
                                                                          report_to, message, capsys):
    from prefopt.cli.main import main

    out = tmp_path / "run"
    assert main([*map(str, _train_args(tiny_llama, easy_data, out, "--report_to", report_to))]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and message in err and "Traceback" not in err
    assert not out.exists()


def test_report_to_follows_trl_convention():
    assert requested_trackers("none") == [] and requested_trackers("") == []
    assert requested_trackers("wandb, MLflow") == ["wandb", "mlflow"]
    assert requested_trackers("all") == ["all"]
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'; did you mean 'tensorboard'"):
        requested_trackers("tensorbord")
    # A YAML list reaches the config as the same comma-separated string.
    from prefopt.config import build_config

    assert build_config(TrainConfig, overrides={"report_to": ["wandb", "mlflow"]}).report_to == "wandb,mlflow"


def test_hyperparameters_are_scalars_every_tracker_takes():
    params = hyperparameters(TrainConfig(loss_weights=[1.0, 0.5]).to_dict())
    assert params["loss_weights"] == "1.0,0.5" and params["model_name_or_path"] == "none"
    assert all(isinstance(v, bool | int | float | str) for v in params.values())
    assert params["beta"] == 0.1 and params["eval_max_pairs"] == 256


def test_seeded_subset():
    items = list(range(100))
    a = seeded_subset(items, 10, seed=3)
    assert a == seeded_subset(items, 10, seed=3) and a != seeded_subset(items, 10, seed=4)
    assert len(set(a)) == 10 and a == sorted(a) and a != list(range(10))  # file order, not the first ten
    assert seeded_subset(items, 200, seed=3) == items


def test_eval_max_pairs_must_be_positive():
    with pytest.raises(ConfigError, match="eval_max_pairs"):
        TrainConfig(eval_max_pairs=0).validate(require_paths=False)
    TrainConfig(eval_max_pairs=None).validate(require_paths=False)


def test_card_metadata_uses_hub_ids_only(tmp_path):
    local = tmp_path / "data.jsonl"
    local.write_text("")
    cfg = TrainConfig(model_name_or_path="org/base-model", dataset="org/prefs", eval_dataset=str(local),
                      loss_type="odpo")
    meta = card_metadata(cfg)
    assert meta["base_model"] == "org/base-model" and meta["datasets"] == ["org/prefs"]
    assert meta["tags"] == ["prefopt", "dpo", "odpo"] and meta["library_name"] == "transformers"
    assert hub_id("./models/sft") is None and hub_id("pairs.jsonl") is None and hub_id(str(tmp_path)) is None
    assert "lora" in card_metadata(TrainConfig(use_peft=True))["tags"]


def test_run_summary_lines():
    lines = run_summary({"loss": 0.5, "rewards/accuracies": 0.75, "eval/loss": 0.6, "eval/rewards/accuracies": 0.7},
                        steps=40, seconds=252.4, output_dir="out", extra_dirs={"merged model": "out/merged"})
    assert lines[0] == "prefopt: done: 40 steps in 4m12s"
    assert lines[1] == "prefopt: final train (last logged window): loss 0.5000, rewards/accuracies 0.7500"
    assert lines[2] == "prefopt: final eval: loss 0.6000, rewards/accuracies 0.7000"
    assert "prefopt: model saved to out" in lines and "prefopt: merged model saved to out/merged" in lines


@pytest.mark.slow
def test_throughput_leaves_out_evaluation_time(tiny_llama, easy_data, tmp_path, monkeypatch):
    """Every evaluation moves the trainer's clock on by 1000 s (a simulated slow evaluation);
    tokens_per_second and pairs_per_second must not see it."""
    import types

    import prefopt.training.trainer as trainer_module
    from prefopt.recipes import train

    offset = {"s": 0.0}
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset["s"])
    monkeypatch.setattr(trainer_module, "time", clock)
    real = trainer_module.Trainer.evaluate

    def slow_evaluate(self):
        offset["s"] += 1000.0
        return real(self)

    monkeypatch.setattr(trainer_module.Trainer, "evaluate", slow_evaluate)
    cfg = TrainConfig(model_name_or_path=str(tiny_llama), dataset=str(easy_data["train"]),
                      eval_dataset=str(easy_data["eval"]), max_steps=4, per_device_train_batch_size=8,
                      logging_steps=2, eval_steps=1, eval_max_pairs=8, output_dir=str(tmp_path / "run"),
                      report_to="none", progress_bar=False, save_steps=0)
    train(cfg)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "pairs_per_second" in r]
    assert len(rows) == 2 and offset["s"] == 4000.0  # evaluations after steps 1, 2, 3 and at the end
    for r in rows:  # each window: 2 steps of 16 pairs in all, with one or two evaluations inside it
        assert 16 / r["pairs_per_second"] < 100.0


@pytest.mark.slow
def test_tensorboard_after_a_killed_and_resumed_run_shows_each_step_once(tiny_llama, tmp_path):
    """Killed after step 5 (checkpoint at 3, TensorBoard already holds step 4), then resumed: the
    stale step-4 event is purged, and TensorBoard shows what metrics.jsonl shows."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from prefopt.toy import easy_preferences, write_jsonl
    from tests.training.test_checkpoint import run_train

    data = write_jsonl(tmp_path / "pairs.jsonl", easy_preferences(16, seed=3))
    out = tmp_path / "run"
    tb = ["--report_to", "tensorboard", "--run_name", "r"]
    killed = run_train(tiny_llama, data, out, *tb, kill_at="step:5")
    assert killed.returncode != 0
    before = EventAccumulator(str(out / "runs" / "r"))
    before.Reload()
    assert [e.step for e in before.Scalars("loss")] == [2, 4]
    resumed = run_train(tiny_llama, data, out, *tb, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    events = EventAccumulator(str(out / "runs" / "r"))
    events.Reload()
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == [r["step"] for r in rows] == [2, 4, 6, 8]
    assert [e.value for e in scalars] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
