"""Run safety: a run never loses a user's work. Each refused case asserts exit status 2, one line on
stderr naming the key or path, no traceback, and that every file that existed before (the earlier
run, the model, the data, foreign files) is byte-identical afterwards. Then what a run may do:
start over keeping foreign files, restore the earlier run when the new one fails before its first
checkpoint, one run per directory (a real second process), and SIGTERM (a real signal): checkpoint,
exit 143, resume bit-identical to the uninterrupted run.

The refusals run in-process through the CLI entry point (``main``), which is what a user's command
runs, in a fraction of a second each; a few also as real subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefopt.cli.main import main
from prefopt.toy import easy_preferences, write_jsonl
from prefopt.training.checkpoint import list_checkpoints
from prefopt.training.run_dir import RECORD_FILE
from prefopt.training.run_lock import LOCK_FILE
from tests.conftest import run_cli
from tests.training.launch import torchrun_each_logged
from tests.tree_snapshot import assert_unchanged
from tests.tree_snapshot import tree_state as snapshot

SRC = str(Path(__file__).resolve().parents[2] / "src")
RUN = ["--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "4",
       "--learning_rate", "1e-3", "--progress_bar", "false", "--report_to", "none", "--log_throughput", "false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("safety") / "pairs.jsonl", easy_preferences(16, seed=3))


@pytest.fixture(scope="module")
def earlier_run(tiny_llama, data, tmp_path_factory) -> Path:
    """A finished run (model, 1 checkpoint, metrics, record) that the cases may try to overwrite."""
    out = tmp_path_factory.mktemp("safety") / "earlier"
    assert main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(out),
                 *RUN]) == 0
    assert (out / RECORD_FILE).is_file() and (out / "model.safetensors").is_file()
    return out


def train_argv(model, data, out, *extra) -> list[str]:
    return ["train", "--model_name_or_path", str(model), "--dataset", str(data), "--output_dir", str(out), *RUN,
            *map(str, extra)]


@dataclass
class Ctx:
    tmp: Path
    model: Path
    data: Path
    out: Path  # a copy of the earlier run, with a foreign file beside it

    def yaml(self, text: str) -> str:
        path = self.tmp / "c.yaml"
        path.write_text(text)
        return str(path)

    def rows(self, *rows: dict) -> str:
        return str(write_jsonl(self.tmp / "odpo.jsonl", list(rows)))


def _pair(sw, sl):
    return {"prompt": "the movie was", "chosen": "good great", "rejected": "bad awful", "score_chosen": sw,
            "score_rejected": sl}


# Seven nested levels of 9 aliases each: a few lines of YAML, millions of items once expanded.
ALIAS_BOMB = ("beta: [&a [x, x, x, x, x, x, x, x, x], &b [*a, *a, *a, *a, *a, *a, *a, *a, *a], "
              "&c [*b, *b, *b, *b, *b, *b, *b, *b, *b], &d [*c, *c, *c, *c, *c, *c, *c, *c, *c], "
              "&e [*d, *d, *d, *d, *d, *d, *d, *d, *d], &f [*e, *e, *e, *e, *e, *e, *e, *e, *e], "
              "[*f, *f, *f, *f, *f, *f, *f, *f, *f]]\n")

# (id, extra arguments from the context (replacing --output_dir / --dataset where given), needles of the one line)
CASES = [
    # --- every setting checked before the earlier run is touched (all with --overwrite_output_dir)
    ("adam_beta1_above_1", lambda c: ["--adam_beta1", "1.5"], ["adam_beta1", "1.5"]),
    ("adam_beta2_nan", lambda c: ["--config", c.yaml("adam_beta2: .nan\n")], ["adam_beta2", "nan"]),
    ("learning_rate_inf", lambda c: ["--learning_rate", "inf"], ["learning_rate", "inf"]),
    ("learning_rate_nan", lambda c: ["--learning_rate", "nan"], ["learning_rate", "nan"]),
    ("weight_decay_nan", lambda c: ["--config", c.yaml("weight_decay: .nan\n")], ["weight_decay", "nan"]),
    ("adam_epsilon_negative", lambda c: ["--adam_epsilon=-1e-8"], ["adam_epsilon"]),
    ("num_train_epochs_inf", lambda c: ["--max_steps", "-1", "--config", c.yaml("num_train_epochs: .inf\n")],
     ["num_train_epochs", "inf"]),
    ("warmup_steps_negative", lambda c: ["--warmup_steps", "-5"], ["warmup_steps", "-5"]),
    ("save_steps_negative", lambda c: ["--save_steps", "-1"], ["save_steps", "-1"]),
    ("eval_steps_negative", lambda c: ["--eval_steps", "-2"], ["eval_steps", "-2"]),
    ("max_grad_norm_nan", lambda c: ["--config", c.yaml("max_grad_norm: .nan\n")], ["max_grad_norm", "nan"]),
    ("max_steps_below_minus_1", lambda c: ["--max_steps", "-3"], ["max_steps", "-3"]),
    ("alpha_nan", lambda c: ["--loss_type", "odpo", "--config", c.yaml("alpha: .nan\n")], ["alpha", "nan"]),
    ("beta_inf", lambda c: ["--config", c.yaml("beta: .inf\n")], ["beta", "inf"]),
    ("max_prompt_length_negative", lambda c: ["--max_prompt_length", "-4"], ["max_prompt_length", "-4"]),
    ("duplicate_yaml_key", lambda c: ["--config", c.yaml("beta: 0.1\nseed: 1\nbeta: 0.5\n")],
     ["c.yaml", "line 3", "'beta'", "twice", "line 1"]),
    # --- data-dependent failures found before anything is removed
    ("odpo_log_ratio_negative_score", lambda c: ["--loss_type", "odpo", "--offset_scaling", "log_ratio",
                                                 "--dataset", c.rows(_pair(2.0, 1.0), _pair(0.5, -1.0))],
     ["odpo.jsonl", "line 2", "score_rejected", "log_ratio", "positive"]),
    ("odpo_infinite_offset", lambda c: ["--loss_type", "odpo", "--dataset", c.rows(_pair(2.0, 1.0), _pair(1e308, -1e308))],
     ["odpo.jsonl", "line 2", "score_chosen", "not finite"]),
    ("odpo_diff_infinite_offset", lambda c: ["--loss_type", "odpo", "--offset_scaling", "diff", "--dataset",
                                             c.rows(_pair(1e308, -1e308))], ["odpo.jsonl", "line 1", "not finite"]),
    # --- where output_dir may not be
    ("output_dir_is_the_model", lambda c: ["--output_dir", c.model], ["output_dir", "is model_name_or_path"]),
    ("output_dir_inside_the_model", lambda c: ["--output_dir", c.model / "run"], ["lies inside model_name_or_path"]),
    ("output_dir_inside_the_reference", lambda c: ["--ref_model_name_or_path", c.tmp / "tok", "--output_dir",
                                                   c.tmp / "tok" / "sub"], ["lies inside ref_model_name_or_path"]),
    ("output_dir_is_the_tokenizer", lambda c: ["--tokenizer_name_or_path", c.tmp / "tok", "--output_dir", c.tmp / "tok"],
     ["is tokenizer_name_or_path"]),
    ("output_dir_contains_the_dataset", lambda c: ["--dataset", c.out / "pairs.jsonl"], ["contains dataset"]),
    ("output_dir_is_the_eval_dataset_folder", lambda c: ["--eval_dataset", c.tmp / "evaldir", "--output_dir",
                                                         c.tmp / "evaldir"], ["is eval_dataset"]),
    ("output_dir_empty", lambda c: ["--output_dir", ""], ["output_dir is empty"]),
    ("output_dir_root", lambda c: ["--output_dir", "/"], ["output_dir /", "root directory"]),
    ("output_dir_home_tilde", lambda c: ["--output_dir", "~"], ["home directory"]),
    ("output_dir_current_dir", lambda c: ["--output_dir", "."], ["current directory"]),
    ("output_dir_above_current_dir", lambda c: ["--output_dir", c.tmp], ["output_dir", "contains"]),
    ("output_dir_is_a_file", lambda c: ["--output_dir", c.tmp / "evaldir" / "e.jsonl"], ["output_dir", "not a directory"]),
    # --- what an overwrite may touch
    ("foreign_dir_without_record", lambda c: ["--output_dir", c.tmp / "home" / "project"],
     ["no prefopt run recorded", "project"]),
    ("foreign_vocab_json_beside_a_run", lambda c: ["--output_dir", c.tmp / "mixed"],
     ["vocab.json", "not written by a prefopt run"]),
    ("tensorboard_symlink", lambda c: ["--output_dir", c.tmp / "linked"], ["tensorboard is a symbolic link"]),
    ("record_naming_a_path_outside", lambda c: ["--output_dir", c.tmp / "forged"], ["unreadable run record", "'../model'"]),
    ("lock_file_is_a_symlink", lambda c: ["--output_dir", c.tmp / "locklink"],
     [".prefopt.lock is a symbolic link", "outside"]),
    ("run_record_is_a_symlink", lambda c: ["--output_dir", c.tmp / "recordlink"],
     [".prefopt-run.json is a symbolic link", "outside"]),
    ("run_name_is_a_path", lambda c: ["--run_name", "../../escaped"], ["run_name", "'../../escaped'", "plain name"]),
    ("logging_dir_inside_the_model", lambda c: ["--logging_dir", c.model / "tb"],
     ["logging_dir", "lies inside model_name_or_path"]),
    ("yaml_alias_bomb", lambda c: ["--config", c.yaml(ALIAS_BOMB)], ["'beta'", "expects float", "[[...], [...], [...], [...], ...], ...]"]),
    ("read_only_output_dir", lambda c: ["READONLY"], ["output_dir", "not writable"]),
    ("output_dir_in_use", lambda c: ["LOCKED"], ["in use by another prefopt run", "pid 4242", "prefopt train --other"]),
]


def _prepare(ctx: Ctx) -> None:
    """The files the cases point at: a tokenizer dir, an eval-data dir, a project folder without a record,
    a run with a foreign config.json, a run whose tensorboard/ is a link to a folder outside."""
    shutil.copytree(ctx.model, ctx.tmp / "tok")
    (ctx.tmp / "evaldir").mkdir()
    write_jsonl(ctx.tmp / "evaldir" / "e.jsonl", easy_preferences(4, seed=1))
    project = ctx.tmp / "home" / "project"
    project.mkdir(parents=True)
    for name in ("other_model.safetensors", "spm.model", "config.json"):
        (project / name).write_text(name)
    (project / ".tmp-build").mkdir()
    (project / ".tmp-build" / "x.o").write_text("x")
    shutil.copytree(ctx.out, ctx.tmp / "mixed", symlinks=True)
    (ctx.tmp / "mixed" / "vocab.json").write_text('{"mine": 1}')  # a name the new run's tokenizer may write
    shutil.copytree(ctx.out, ctx.tmp / "linked", symlinks=True)
    (ctx.tmp / "outside").mkdir()
    (ctx.tmp / "outside" / "events").write_text("keep me")
    os.symlink(ctx.tmp / "outside", ctx.tmp / "linked" / "tensorboard")
    for name, link in (("locklink", LOCK_FILE), ("recordlink", RECORD_FILE)):  # bookkeeping files as links
        shutil.copytree(ctx.out, ctx.tmp / name, symlinks=True)
        (ctx.tmp / name / link).unlink(missing_ok=True)
        os.symlink(ctx.tmp / "outside" / "events", ctx.tmp / name / link)
    (ctx.tmp / "forged").mkdir()  # a record that would send an overwrite outside the directory
    (ctx.tmp / "forged" / RECORD_FILE).write_text(json.dumps({"entries": ["config.yaml", "../model"]}))
    (ctx.tmp / "forged" / "config.yaml").write_text("seed: 1\n")
    (ctx.out / "pairs.jsonl").write_bytes(ctx.data.read_bytes())
    (ctx.out / "notes.txt").write_text("foreign")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused_with_one_line_and_nothing_changed(case, tiny_llama, data, earlier_run, tmp_path, capsys, monkeypatch):
    ctx = Ctx(tmp_path, tmp_path / "model", tmp_path / "pairs.jsonl", tmp_path / "earlier")
    shutil.copytree(tiny_llama, ctx.model)
    shutil.copy(data, ctx.data)
    shutil.copytree(earlier_run, ctx.out, symlinks=True)
    _prepare(ctx)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    extra = [str(a) for a in case[1](ctx)]
    if extra == ["READONLY"]:
        import prefopt.training.run_dir as run_dir

        # Running as root, chmod cannot make a directory unwritable: the check itself is what is tested.
        monkeypatch.setattr(run_dir, "writable", lambda path: Path(path) != ctx.out)
        extra = []
    if extra == ["LOCKED"]:
        import fcntl

        lock = (ctx.out / LOCK_FILE).open("w")
        fcntl.flock(lock, fcntl.LOCK_EX)  # another open file: conflicts like another process would
        lock.write(json.dumps({"pid": 4242, "host": "node7", "command": "prefopt train --other"}))
        lock.flush()
        extra = []
    before = snapshot(tmp_path)
    code = main([*train_argv(ctx.model, ctx.data, ctx.out, "--overwrite_output_dir"), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("prefopt: error:")]
    assert len(errors) == 1, err
    for needle in case[2]:
        assert needle in errors[0], (needle, errors[0])
    if case[0] not in ("odpo_log_ratio_negative_score", "odpo_infinite_offset", "odpo_diff_infinite_offset"):
        # Refused before any data was read or model loaded (nothing but the error line).
        assert err.strip() == errors[0], err
    assert_unchanged(before, tmp_path)
    assert not list(tmp_path.rglob(".prefopt-old-*"))


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ["output_dir_is_the_model", "foreign_dir_without_record"])
def test_refused_through_a_real_process(case_id, tiny_llama, data, earlier_run, tmp_path):
    ctx = Ctx(tmp_path, tmp_path / "model", tmp_path / "pairs.jsonl", tmp_path / "earlier")
    shutil.copytree(tiny_llama, ctx.model)
    shutil.copy(data, ctx.data)
    shutil.copytree(earlier_run, ctx.out, symlinks=True)
    _prepare(ctx)
    case = next(c for c in CASES if c[0] == case_id)
    before = snapshot(tmp_path)
    res = run_cli(*train_argv(ctx.model, ctx.data, ctx.out, "--overwrite_output_dir"), *case[1](ctx), cwd=tmp_path,
                  timeout=120)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("prefopt: error:"), res.stderr
    assert all(n in res.stderr for n in case[2])
    assert_unchanged(before, tmp_path)


# ------------------------------------------------------------------------------------------ starting over
def test_overwrite_replaces_only_what_the_earlier_run_recorded(tiny_llama, data, earlier_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(earlier_run, out, symlinks=True)
    foreign = {"other_model.safetensors": "w", "spm.model": "s", "notes.txt": "n", ".tmp-build/x.o": "o"}
    for name, text in foreign.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text(text)
    kept = snapshot(*(out / name for name in foreign))
    old_weights = load_file(out / "model.safetensors")
    assert main(train_argv(tiny_llama, data, out, "--overwrite_output_dir", "--learning_rate", "3e-3")) == 0
    capsys.readouterr()
    assert_unchanged(kept, *(out / name for name in foreign))  # foreign files: byte-identical
    assert not list(out.glob(".prefopt-old-*"))  # the earlier run was removed once the new one had a checkpoint
    new_weights = load_file(out / "model.safetensors")
    assert not torch.equal(new_weights["lm_head.weight"], old_weights["lm_head.weight"])  # a new model (other lr)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    record = json.loads((out / RECORD_FILE).read_text())
    assert not set(foreign) & set(record["entries"]) and "model.safetensors" in record["entries"]


def test_new_run_failing_before_its_first_checkpoint_restores_the_earlier_run(tiny_llama, data, earlier_run,
                                                                             tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(earlier_run, out, symlinks=True)
    (out / "notes.txt").write_text("foreign")
    before = snapshot(out)
    names = sorted(p.name for p in out.iterdir())
    # lr 1e30: step 1 is finite, step 2 diverges; the guard stops the run before checkpoint 4.
    code = main(train_argv(tiny_llama, data, out, "--overwrite_output_dir", "--learning_rate", "1e30",
                           "--save_steps", "4", "--max_grad_norm", "0"))
    err = capsys.readouterr().err
    assert code == 2 and "non-finite" in err and "restored" in err, err
    assert_unchanged(before, out)
    assert sorted(p.name for p in out.iterdir()) == names  # and nothing of the new run is left


# ------------------------------------------------------------------------------------------ one run per directory
HOLD_LOCK = """
import sys, time
from prefopt.training.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_second_run_refused_while_the_first_holds_the_directory_and_sigkill_frees_it(tiny_llama, data, tmp_path,
                                                                                    capsys):
    out = tmp_path / "run"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), "--marker"], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(train_argv(tiny_llama, data, out)) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "--marker" in err and "in use" in err, err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        holder.kill()  # SIGKILL: the kernel drops the flock
        holder.wait()
    assert main(train_argv(tiny_llama, data, out)) == 0
    err = capsys.readouterr().err
    assert f"stale lock in {out} from pid {holder.pid}" in err  # the dead holder is named, then taken over
    assert (out / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ preemption
@pytest.mark.parametrize("signal_name, code", [("int", 130), ("term", 143)])
def test_signal_after_a_step_checkpoints_and_the_resumed_run_equals_the_uninterrupted_one(
        signal_name, code, tiny_llama, data, earlier_run, tmp_path, capsys, monkeypatch):
    """In-process (the handler is the same): the signal arrives after step 1 (step 2 is a save step),
    so the run writes checkpoint-1 itself; resumed, it ends where the uninterrupted run did."""
    out = tmp_path / "run"
    monkeypatch.setenv("PREFOPT_TEST_KILL", f"{signal_name}:1")
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)  # pytest-xdist workers ignore SIGINT
    assert main(train_argv(tiny_llama, data, out)) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"stopped by SIG{signal_name.upper()} after step 1 of 4; checkpoint {out / 'checkpoint-1'} written" in err
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"] and not (out / "model.safetensors").exists()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back
    monkeypatch.delenv("PREFOPT_TEST_KILL")
    assert main(train_argv(tiny_llama, data, out, "--resume")) == 0
    a, b = load_file(earlier_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "metrics.jsonl").read_bytes() == (earlier_run / "metrics.jsonl").read_bytes()


def _train_process(model, data, out, *extra, env_extra=None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PREFOPT_TEST_KILL", None)
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "prefopt", *train_argv(model, data, out, *extra)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigterm_from_outside_exits_143_and_resume_is_bit_identical(tiny_llama, data, earlier_run, tmp_path):
    """A real SIGTERM sent by another process (as SLURM or Kubernetes would) to a real training process,
    which waits after step 2 (a save step: the checkpoint just written is the one named)."""
    killed_dir = tmp_path / "killed"
    killed = _train_process(tiny_llama, data, killed_dir, env_extra={"PREFOPT_TEST_KILL": "pause:2"})
    for line in killed.stderr:
        if line.startswith("prefopt-test: paused after step 2"):
            break
    else:
        pytest.fail(f"the run ended before step 2: {killed.communicate()}")
    killed.send_signal(signal.SIGTERM)
    _, err = killed.communicate(timeout=120)
    assert killed.returncode == 143, err
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if "stopped by SIGTERM" in x]
    assert len(line) == 1 and "--resume" in line[0] and f"{killed_dir / 'checkpoint-2'} written" in line[0], err
    assert [p.name for p in list_checkpoints(killed_dir)] == ["checkpoint-2"]
    assert not (killed_dir / "model.safetensors").exists()

    (killed_dir / ".tmp-build").mkdir()  # a user's temporary folder: resuming cleans only prefopt's own
    (killed_dir / ".tmp-build" / "x.o").write_text("x")
    resumed = _train_process(tiny_llama, data, killed_dir, "--resume")
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert (killed_dir / ".tmp-build" / "x.o").read_text() == "x"
    assert f"resuming from {killed_dir / 'checkpoint-2'}" in err
    # The same weights and metrics as the uninterrupted run of these settings, bit for bit.
    a, b = load_file(earlier_run / "model.safetensors"), load_file(killed_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (killed_dir / "metrics.jsonl").read_bytes() == (earlier_run / "metrics.jsonl").read_bytes()


# ------------------------------------------------------------------------------------------ several processes
# (id, environment of the run, needles of the main process's one line). A metrics row failing on the main
# process goes through the same settling (``Trainer.log_row``); it is left out to keep the suite short.
MULTI_PROCESS_CASES = [
    ("disk_full_on_the_main_process_during_a_checkpoint", {"PREFOPT_TEST_ENOSPC": "save:2"},
     ["disk full", "checkpoint-2", "no checkpoint was written yet"]),
    ("output_dir_locked_by_another_run", {}, ["in use by another prefopt run", "--marker"]),
    # Every process reads the data; the row is bad on all of them, and said once.
    ("a_bad_row_in_the_dataset", {}, ["bad.jsonl", "line 3", "rejected"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", MULTI_PROCESS_CASES, ids=[c[0] for c in MULTI_PROCESS_CASES])
def test_a_failure_on_the_main_process_stops_every_process_with_one_line(case, tiny_llama, data, tmp_path):
    """A write that fails on the main process only (the others are waiting to go on), or an
    output_dir locked by another run: every process exits with status 2, exactly one
    ``prefopt: error:`` line (from the main process), no traceback, no process left waiting, and a
    locked directory is left exactly as it was."""
    case_id, env_extra, needles = case
    out = tmp_path / "out"
    holder = None
    if case_id == "output_dir_locked_by_another_run":
        out.mkdir()
        env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
        holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), "--marker"], env=env,
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "locked"
    if case_id == "a_bad_row_in_the_dataset":
        rows = easy_preferences(8, seed=3)
        del rows[2]["rejected"]
        data = write_jsonl(tmp_path / "bad.jsonl", rows)
    before = snapshot(tmp_path)
    try:
        codes, errs = torchrun_each_logged(["-m", "prefopt", *train_argv(tiny_llama, data, out,
                                                                         "--per_device_train_batch_size", "2")],
                                           tmp_path / "logs", env_extra)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    assert codes == {0: 2, 1: 2}, (codes, errs)
    assert sorted(errs) == [0, 1] and not any("Traceback" in e for e in errs.values()), errs
    lines = [line for e in errs.values() for line in e.splitlines() if line.startswith("prefopt: error:")]
    assert len(lines) == 1 and lines[0] in errs[0], errs
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp")]  # no half-written checkpoint or model
    if case_id == "a_bad_row_in_the_dataset":
        assert not out.exists()  # refused before the output directory was made
    if holder is not None:  # nothing written into the locked directory
        assert_unchanged(before, out)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
