"""Reliability (issue 8): exact resume after SIGKILL, atomic checkpoints, the output directory rule,
bad input caught before training, the NaN guard, determinism.

Training runs are real ``python -m prefopt train`` subprocesses on a 2-layer model, killed with
SIGKILL by the ``PREFOPT_TEST_KILL`` hook (``os.kill(os.getpid(), SIGKILL)`` at a chosen point).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefopt.cli.main import main
from prefopt.toy import easy_preferences, write_jsonl
from prefopt.training.checkpoint import (
    MANIFEST,
    is_complete,
    keep_metrics_until,
    latest_checkpoint,
    list_checkpoints,
)
from prefopt.training.metrics import read_metrics

SRC = str(Path(__file__).resolve().parents[2] / "src")

# 8 steps of 3 pairs over 16 pairs (a ragged epoch end, a second shuffled epoch); checkpoints every
# 3 steps and a log row every 2, so a checkpoint falls between two log rows and the unlogged window
# must travel with it.
RUN = ["--max_steps", "8", "--save_steps", "3", "--logging_steps", "2", "--per_device_train_batch_size", "3",
       "--learning_rate", "1e-3", "--progress_bar", "false", "--report_to", "none", "--log_throughput", "false"]


def run_train(model, data, out, *extra, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PREFOPT_TEST_KILL", None)
    if kill_at:
        env["PREFOPT_TEST_KILL"] = kill_at
    args = ["train", "--model_name_or_path", model, "--dataset", data, "--output_dir", out, *RUN, *extra]
    return subprocess.run([sys.executable, "-m", "prefopt", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``directory``: content hash and modification time."""
    return {
        str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def data16(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("rel") / "pairs.jsonl", easy_preferences(16, seed=3))


@pytest.fixture(scope="module")
def reference_run(tiny_llama, data16, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one is compared with."""
    out = tmp_path_factory.mktemp("rel") / "uninterrupted"
    res = run_train(tiny_llama, data16, out)
    assert res.returncode == 0, res.stderr
    return out


# ------------------------------------------------------------------------------------------ resume
@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tiny_llama, data16, reference_run, tmp_path):
    out = tmp_path / "killed"
    res = run_train(tiny_llama, data16, out, kill_at="step:5")
    assert res.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [2, 4]  # row 4 is past the checkpoint
    assert not (out / "model.safetensors").exists()

    res = run_train(tiny_llama, data16, out, "--resume")
    assert res.returncode == 0, res.stderr
    assert f"resuming from {out / 'checkpoint-3'}" in res.stderr
    # Same logged losses (the whole file, byte for byte) and the same final weights, bit for bit.
    assert (out / "metrics.jsonl").read_bytes() == (reference_run / "metrics.jsonl").read_bytes()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [2, 4, 6, 8]
    a, b = weights(reference_run), weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # ...and the run did move away from the initial weights, so the comparison means something.
    assert not torch.equal(a["lm_head.weight"], weights(tiny_llama)["lm_head.weight"])


@pytest.mark.slow
def test_kill_during_checkpoint_save_resumes_from_previous_complete_one(tiny_llama, data16, reference_run, tmp_path):
    out = tmp_path / "killed_in_save"
    res = run_train(tiny_llama, data16, out, kill_at="save:6")
    assert res.returncode == -signal.SIGKILL
    # The half-written checkpoint holds its weights and state but no manifest, under a temporary name.
    partial = out / ".tmp-checkpoint-6"
    assert (partial / "training_state.pt").exists() and not (partial / MANIFEST).exists()
    assert not (out / "checkpoint-6").exists()
    assert latest_checkpoint(out) == out / "checkpoint-3"

    res = run_train(tiny_llama, data16, out, "--resume")
    assert res.returncode == 0, res.stderr
    assert f"resuming from {out / 'checkpoint-3'}" in res.stderr
    assert not partial.exists()  # leftovers are cleaned on resume
    assert (out / "metrics.jsonl").read_bytes() == (reference_run / "metrics.jsonl").read_bytes()
    a, b = weights(reference_run), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-6"]


@pytest.mark.slow
def test_same_config_and_seed_give_the_same_metrics_file(tiny_llama, data16, reference_run, tmp_path):
    res = run_train(tiny_llama, data16, tmp_path / "again")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "again" / "metrics.jsonl").read_bytes() == (reference_run / "metrics.jsonl").read_bytes()


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_discovery_ignores_temporary_and_damaged_directories(reference_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-6"]
    shutil.copytree(out / "checkpoint-6", out / ".tmp-checkpoint-9")  # a save that never finished
    shutil.copytree(out / "checkpoint-6", out / "checkpoint-12")
    with (out / "checkpoint-12" / "model.safetensors").open("r+b") as fh:  # damaged after the rename
        fh.truncate(100)
    assert latest_checkpoint(out) == out / "checkpoint-6"
    assert not is_complete(out / "checkpoint-12")
    assert is_complete(out / "checkpoint-6")


def test_metrics_cut_at_the_checkpoint_step_and_a_torn_line_dropped(tmp_path):
    src = tmp_path / "metrics.jsonl"
    src.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 2, "eval/loss": 0.6}\n'
                   '{"step": 3, "loss": 0.3}\n{"step": 4, "lo')
    assert keep_metrics_until(src, src, 2) == 3
    assert [json.loads(line)["step"] for line in src.read_text().splitlines()] == [1, 2, 2]


# ------------------------------------------------------------------------------------------ output dir
def test_overwrite_output_dir_starts_over_and_save_total_limit_keeps_newest(tiny_llama, data16, reference_run,
                                                                              tmp_path, capsys):
    out = tmp_path / "old"
    shutil.copytree(reference_run, out)
    before = snapshot(out)
    base = ["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data16), "--output_dir", str(out),
            *RUN[RUN.index("--per_device_train_batch_size"):]]
    # A new run into a directory holding another run is refused, and the run is untouched.
    assert main([*base, "--max_steps", "5", "--save_steps", "1", "--logging_steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "already holds" in err and "--resume" in err and "--overwrite_output_dir" in err
    assert snapshot(out) == before
    assert main([*base, "--max_steps", "5", "--save_steps", "1", "--logging_steps", "1", "--save_total_limit", "2",
                 "--overwrite_output_dir"]) == 0
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]  # old rows gone
    # checkpoint-3 is the new run's, not the old run's
    assert not any(torch.equal(weights(out / "checkpoint-3")[k], weights(reference_run / "checkpoint-3")[k])
                   for k in ("lm_head.weight",))


# ------------------------------------------------------------------------------------------ bad input
def _jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


GOOD = {"prompt": "the movie was", "chosen": "good great", "rejected": "bad awful",
        "score_chosen": 0.9, "score_rejected": 0.1}

# (case id, file name, file bytes, extra flags, text the one error line must contain)
BAD_INPUTS = [
    ("malformed_json", "d.jsonl", _jsonl(GOOD, b'{"prompt": "x", "chosen": '), [], ["d.jsonl", "line 2", "malformed JSON"]),
    ("missing_column", "d.jsonl", _jsonl(GOOD, {"prompt": "a", "chosen": "good"}), [],
     ["d.jsonl", "line 2", "field 'rejected'", "missing"]),
    ("misspelled_column", "d.jsonl", _jsonl({"prompt": "a", "chosen": "good", "rejectd": "bad"}), [],
     ["d.jsonl", "line 1", "field 'rejected'", "rejectd"]),
    ("wrong_type", "d.jsonl", _jsonl(GOOD, {**GOOD, "chosen": 5}), [],
     ["d.jsonl", "line 2", "field 'chosen'", "expected a string"]),
    ("empty_prompt", "d.jsonl", _jsonl(GOOD, GOOD, {**GOOD, "prompt": " "}), [],
     ["d.jsonl", "line 3", "field 'prompt'", "empty"]),
    ("empty_response", "d.jsonl", _jsonl(GOOD, {**GOOD, "chosen": ""}), [],
     ["d.jsonl", "line 2", "field 'chosen'", "empty"]),
    ("chosen_equals_rejected", "d.jsonl", _jsonl(GOOD, {**GOOD, "rejected": "good great"}), [],
     ["d.jsonl", "line 2", "field 'rejected'", "identical"]),
    ("nan_score", "d.jsonl", _jsonl(GOOD, b'{"prompt":"a","chosen":"good","rejected":"bad","score_chosen":NaN,'
                                    b'"score_rejected":0.1}'), [],
     ["d.jsonl", "line 2", "field 'score_chosen'", "finite"]),
    ("inf_score", "d.jsonl", _jsonl(GOOD, b'{"prompt":"a","chosen":"good","rejected":"bad","score_chosen":0.2,'
                                    b'"score_rejected":-Infinity}'), [],
     ["d.jsonl", "line 2", "field 'score_rejected'", "finite"]),
    ("nan_score_csv", "d.csv", b"prompt,chosen,rejected,score_chosen,score_rejected\nthe,good,bad,0.9,0.1\n"
                               b"the,great,awful,nan,0.1\n", [],
     ["d.csv", "line 3", "field 'score_chosen'", "finite"]),
    ("odpo_without_scores", "d.jsonl", _jsonl({"prompt": "a", "chosen": "good", "rejected": "bad"}),
     ["--loss_type", "odpo"], ["d.jsonl", "line 1", "field 'score_chosen'", "odpo"]),
    ("non_utf8_jsonl", "d.jsonl", _jsonl(GOOD, b'{"prompt":"caf\xe9","chosen":"a","rejected":"b"}'), [],
     ["d.jsonl", "line 2", "UTF-8"]),
    ("non_utf8_csv", "d.csv", b"prompt,chosen,rejected\nthe,good,bad\nthe,good,bad\ncaf\xe9,good,bad\n", [],
     ["d.csv", "line 4", "UTF-8"]),
    ("empty_dataset", "d.jsonl", b"", [], ["d.jsonl", "empty"]),
    ("all_dropped_by_truncation", "d.jsonl", _jsonl(GOOD, GOOD),
     ["--max_length", "3", "--max_prompt_length", "none"], ["d.jsonl", "every pair was dropped", "max_length"]),
    ("missing_model_path", "d.jsonl", _jsonl(GOOD), ["--model_name_or_path", "/nonexistent/model"],
     ["model_name_or_path", "/nonexistent/model", "not found"]),
    ("unknown_flag", "d.jsonl", _jsonl(GOOD), ["--learning_rat", "0.1"], ["--learning_rat", "did you mean '--learning_rate'"]),
    ("unknown_yaml_key", "d.jsonl", _jsonl(GOOD), ["--config", "CONFIG:learning_rat: 0.1"],
     ["c.yaml", "learning_rat", "did you mean 'learning_rate'"]),
    ("mistyped_yaml_value", "d.jsonl", _jsonl(GOOD), ["--config", "CONFIG:beta: abc"], ["c.yaml", "'beta'", "float"]),
    ("mistyped_flag_value", "d.jsonl", _jsonl(GOOD), ["--max_steps", "two"], ["'max_steps'", "int"]),
    ("unknown_value", "d.jsonl", _jsonl(GOOD), ["--loss_type", "dpoo"], ["loss_type", "dpoo", "did you mean 'dpo'"]),
    ("max_length_below_prompt", "d.jsonl", _jsonl(GOOD), ["--max_length", "64", "--max_prompt_length", "128"],
     ["max_prompt_length (128)", "max_length (64)"]),
]


def _materialise(case, directory: Path) -> list[str]:
    _, name, content, extra, _ = case
    (directory / name).write_bytes(content)
    args = []
    for a in extra:
        if a.startswith("CONFIG:"):
            (directory / "c.yaml").write_text(a[len("CONFIG:"):] + "\n")
            a = str(directory / "c.yaml")
        args.append(a)
    return [str(directory / name), *args]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_leaves_an_earlier_run_untouched(case, tiny_llama, reference_run,
                                                                           tmp_path, capsys):
    out = tmp_path / "earlier"
    shutil.copytree(reference_run, out)
    before = snapshot(out)
    dataset, *extra = _materialise(case, tmp_path)
    # --overwrite_output_dir: the earlier run may only be deleted once every input has been checked.
    code = main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", dataset, "--output_dir", str(out),
                 "--overwrite_output_dir", "--max_steps", "2", "--progress_bar", "false", *extra])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("prefopt: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for needle in case[4]:
        assert needle in errors[0], (needle, errors[0])
    assert snapshot(out) == before


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ["malformed_json", "missing_model_path", "mistyped_yaml_value"])
def test_bad_input_through_a_real_process(case_id, tiny_llama, tmp_path):
    case = next(c for c in BAD_INPUTS if c[0] == case_id)
    dataset, *extra = _materialise(case, tmp_path)
    env = dict(os.environ, PYTHONPATH=SRC)
    args = ["train", "--model_name_or_path", str(tiny_llama), "--dataset", dataset, "--output_dir",
            str(tmp_path / "out"), "--max_steps", "2", *extra]
    res = subprocess.run([sys.executable, "-m", "prefopt", *args], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("prefopt: error:"), res.stderr
    assert not (tmp_path / "out").exists()
    if case_id != "malformed_json":
        return
    # --debug after the subcommand shows the traceback instead
    res = subprocess.run([sys.executable, "-m", "prefopt", *args, "--debug"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_validate_prints_rows_read_kept_and_dropped(tiny_llama, tmp_path, capsys):
    long_prompt = " ".join(["the movie"] * 10)
    rows = [GOOD, {**GOOD, "prompt": long_prompt}, {**GOOD, "chosen": "nice"}, {**GOOD, "prompt": long_prompt}]
    data = tmp_path / "v.jsonl"
    data.write_bytes(_jsonl(*rows))
    # prompt "the movie was" = BOS + 3 tokens; the long ones 21 tokens, which leave no room in 12.
    assert main(["validate", "--dataset", str(data), "--model_name_or_path", str(tiny_llama),
                 "--max_length", "12", "--max_prompt_length", "none"]) == 0
    out = capsys.readouterr().out.strip()
    expected = f"train: {data} (explicit): 4 rows -> 2 pairs; dropped 2 prompt longer than max_length"
    assert out.startswith(expected + "; tokenized pairs stored in ")  # validate fills the store training opens
    assert main(["validate", "--dataset", str(data), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"]["rows_read"] == 4 and summary["train"]["pairs"] == 4
    assert main(["validate", "--dataset", str(data), "--loss_type", "odpo", "--nonpositive_score_diff", "error"]) == 0
    (tmp_path / "bad.jsonl").write_bytes(_jsonl(GOOD, {**GOOD, "score_chosen": 0.05}))
    assert main(["validate", "--dataset", str(tmp_path / "bad.jsonl"), "--loss_type", "odpo",
                 "--nonpositive_score_diff", "error"]) == 2
    assert "bad.jsonl, line 2, field 'score_chosen'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ NaN guard
def test_nonfinite_loss_stops_the_run_and_the_last_checkpoint_loads(tiny_llama, data16, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "diverged"
    # A learning rate of 1e30 makes the first update blow the weights up to ~1e30: finite, but the
    # next forward pass overflows to a non-finite loss.
    code = main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data16), "--output_dir", str(out),
                 "--max_steps", "5", "--save_steps", "1", "--logging_steps", "1", "--learning_rate", "1e30",
                 "--lr_scheduler_type", "constant", "--progress_bar", "false", "--report_to", "none"])
    err = capsys.readouterr().err
    assert code == 2
    line = next(x for x in err.splitlines() if x.startswith("prefopt: error:"))
    assert "step 2: non-finite loss" in line and "learning rate (1e+30) is too high" in line
    assert f"last good checkpoint: {out / 'checkpoint-1'}" in line
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert not (out / "model.safetensors").exists()  # no final model from a diverged run
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-1")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_mode_skips_nonfinite_steps_and_counts_them(tiny_llama, data16, tmp_path, capsys):
    out = tmp_path / "skipping"
    code = main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data16), "--output_dir", str(out),
                 "--max_steps", "4", "--save_steps", "1", "--logging_steps", "1", "--learning_rate", "1e30",
                 "--lr_scheduler_type", "constant", "--progress_bar", "false", "--report_to", "none",
                 "--on_nonfinite", "skip"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "skipped 3 steps" in err
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2, 3]
    # Skipped steps leave the weights as step 1 made them.
    a, b = weights(out / "checkpoint-1"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # With a limit of 1 skip, the second bad step stops the run.
    code = main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data16), "--output_dir",
                 str(tmp_path / "limited"), "--max_steps", "4", "--learning_rate", "1e30", "--progress_bar", "false",
                 "--report_to", "none", "--on_nonfinite", "skip", "--max_skipped_steps", "1"])
    assert code == 2
    assert "step 3: non-finite loss after 1 skipped steps" in capsys.readouterr().err


def test_resume_from_an_explicit_checkpoint_into_a_new_directory(tiny_llama, data16, reference_run, tmp_path, capsys):
    out = tmp_path / "continued"
    code = main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data16), "--output_dir", str(out),
                 *RUN, "--resume_from_checkpoint", str(reference_run / "checkpoint-6")])
    assert code == 0, capsys.readouterr().err
    assert (out / "metrics.jsonl").read_bytes() == (reference_run / "metrics.jsonl").read_bytes()
    a, b = weights(reference_run), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_latest_without_a_checkpoint(tmp_path, capsys):
    from prefopt.config import TrainConfig
    from prefopt.errors import ConfigError
    from prefopt.training.preflight import plan_run

    out = tmp_path / "run"
    cfg = TrainConfig(model_name_or_path=str(tmp_path), dataset="d.jsonl", output_dir=str(out),
                      resume_from_checkpoint="latest")
    assert plan_run(cfg).resume_from is None and not plan_run(cfg).overwrite  # nothing there: a new run
    out.mkdir()
    (out / "config.yaml").write_text("seed: 1\n")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / ".tmp-checkpoint-3").mkdir()  # killed before its first checkpoint was complete
    plan = plan_run(cfg)
    assert plan.resume_from is None and plan.overwrite  # started over
    (out / "model.safetensors").write_bytes(b"x")  # a finished model is never deleted implicitly
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        plan_run(cfg)
    with pytest.raises(ConfigError, match="not found"):
        plan_run(TrainConfig(model_name_or_path=str(tmp_path), dataset="d", output_dir=str(out),
                             resume_from_checkpoint=str(out / "checkpoint-9")))
