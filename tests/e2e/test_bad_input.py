"""Bad input gives one line and exit status 2, never a traceback, and changes nothing.

Table-driven: every case builds its inputs in a fresh directory, runs one ``prefopt`` command
(in-process through the CLI entry point, a few also as a real subprocess), and asserts

- the exit status (2),
- exactly one ``prefopt: error:`` line, containing the case's needles (file, row, field or key),
- no ``Traceback`` on stderr,
- every file that existed before (the case's directory and the models it used) is byte-identical
  afterwards, and no file was added (except where a case names a directory a run may write to).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from prefopt.cli.main import main
from prefopt.toy import easy_preferences, write_jsonl
from tests.tree_snapshot import snapshot

SRC = str(Path(__file__).resolve().parents[2] / "src")
GOOD = {"prompt": "the movie was", "chosen": "good great", "rejected": "bad awful"}
FAST = ["--progress_bar", "false", "--report_to", "none", "--log_throughput", "false"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
RAISING_TEMPLATE = "{{ raise_exception('this template refuses every conversation') }}"
SCORERS = '''
import math

def nan(texts): return [float("nan")] * len(texts)
def inf(texts): return [0.5] * (len(texts) - 1) + [math.inf]
def none(texts): return None
def bare_int(texts): return 3
def strings(texts): return ["0.5"] * len(texts)
def none_items(texts): return [None] * len(texts)
def raises(texts): raise RuntimeError("the scoring service is down")
def fine(texts): return [float(len(t)) for t in texts]
'''


def _jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _with_template(src: Path, dst: Path, template: str) -> Path:
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.chat_template = template
    tok.save_pretrained(dst)
    return dst


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _same_size_garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage" * (path.stat().st_size // 8) + b"g" * (path.stat().st_size % 8))


@pytest.fixture(scope="module")
def env(tiny_llama, tmp_path_factory):
    """Models (plain, with a chat template, with a template that raises), a scorer module, and an
    earlier run with two checkpoints (2 and 4) to resume."""
    d = tmp_path_factory.mktemp("bad_input")
    (d / "scorer_mod").mkdir()
    (d / "scorer_mod" / "bad_input_scorers.py").write_text(SCORERS)
    sys.path.insert(0, str(d / "scorer_mod"))
    data = write_jsonl(d / "pairs.jsonl", easy_preferences(16, seed=3))
    run = d / "run"
    assert main(["train", "--model_name_or_path", str(tiny_llama), "--dataset", str(data), "--output_dir", str(run),
                 "--max_steps", "5", "--save_steps", "2", "--per_device_train_batch_size", "4",
                 "--learning_rate", "1e-3", *FAST]) == 0
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    yield {
        "llama": tiny_llama,
        "chat": _with_template(tiny_llama, d / "chat", CHAT_TEMPLATE),
        "raising_chat": _with_template(tiny_llama, d / "raising_chat", RAISING_TEMPLATE),
        "run": run,
        "data": data,
    }
    sys.path.remove(str(d / "scorer_mod"))


@dataclass
class Case:
    id: str
    setup: Callable[[Path, dict], list[str]]  # writes the inputs under the case's directory, returns argv
    needles: list[str]
    may_write: str | None = None  # a directory (relative to the case's) where a run may leave new files
    env: dict[str, str] = field(default_factory=dict)
    after: Callable[[Path], None] | None = None  # more checks of what the case's directory holds afterwards


def train(t: Path, e: dict, data: str | Path, *extra: str, model: str = "llama") -> list[str]:
    return ["train", "--model_name_or_path", str(e[model]), "--dataset", str(data), "--output_dir", str(t / "out"),
            "--max_steps", "2", *FAST, *extra]


def data_file(t: Path, name: str, text: str) -> Path:
    (t / name).write_text(text, encoding="utf-8")
    return t / name


def deep_jsonl(t, e):
    return train(t, e, data_file(t, "d.jsonl", _jsonl(GOOD, "[" * 200_000 + "]" * 200_000)))


def deep_json(t, e):
    return train(t, e, data_file(t, "d.json", "[" + json.dumps(GOOD) + "," + "[" * 200_000 + "]" * 200_000 + "]"))


SURROGATE = '{"prompt": "the movie \\ud800 was", "chosen": "good", "rejected": "bad"}'


def surrogate_train(t, e):
    return train(t, e, data_file(t, "d.jsonl", _jsonl(GOOD, SURROGATE)))


def surrogate_validate(t, e):
    return ["validate", "--dataset", str(data_file(t, "d.jsonl", _jsonl(GOOD, SURROGATE))),
            "--model_name_or_path", str(e["llama"])]


CONV = {"prompt": [{"role": "user", "content": "the movie was"}],
        "chosen": [{"role": "assistant", "content": "good great"}],
        "rejected": [{"role": "assistant", "content": "bad awful"}]}


def chat_template_raises(t, e):
    return train(t, e, data_file(t, "d.jsonl", _jsonl(CONV)), model="raising_chat")


def empty_message_content(t, e):
    bad = {**CONV, "rejected": [{"role": "assistant", "content": " "}]}
    return train(t, e, data_file(t, "d.jsonl", _jsonl(CONV, bad)), model="chat")


def fifo_dataset(t, e):
    os.mkfifo(t / "pipe.jsonl")
    return train(t, e, t / "pipe.jsonl")


def missing_relative_model(t, e):
    (t / "models").mkdir()
    os.chdir(t)  # restored by the test
    return ["logps", "--model", "models/sft", "--dataset", str(data_file(t, "d.jsonl", _jsonl(GOOD))),
            "--output", str(t / "o.jsonl")]


def logps_output_is_directory(t, e):
    (t / "o.jsonl").mkdir()
    return ["logps", "--model", str(e["llama"]), "--dataset", str(data_file(t, "d.jsonl", _jsonl(GOOD))),
            "--output", str(t / "o.jsonl")]


def logps_batch_size_zero(t, e):
    return ["logps", "--model", str(e["llama"]), "--dataset", str(data_file(t, "d.jsonl", _jsonl(GOOD))),
            "--output", str(t / "o.jsonl"), "--batch_size", "0"]


def score_output_is_directory(t, e):
    (t / "scored.jsonl").mkdir()
    return ["reward", "score", "--model", str(e["llama"]), "--dataset", str(data_file(t, "d.jsonl", _jsonl(GOOD))),
            "--output", str(t / "scored.jsonl")]


def score_with_plain_lm(t, e):
    return ["reward", "score", "--model", str(e["llama"]), "--dataset", str(data_file(t, "d.jsonl", _jsonl(GOOD))),
            "--output", str(t / "scored.jsonl")]


def eval_with(scorer: str, *extra: str, models: tuple[str, ...] = ()):
    def setup(t, e):
        (t / "prompts.txt").write_text("the movie was\nthe film is\n")
        argv = ["eval", "--model", str(e["llama"])]
        for m in models:
            argv += ["--model", m.replace("TMP", str(t))]
        return [*argv, "--ref", str(e["llama"]), "--prompts", str(t / "prompts.txt"), "--scorer", scorer,
                "--num_samples", "2", "--max_new_tokens", "3", "--output_dir", str(t / "eval"), *extra]
    return setup


def eval_prompts(name: str, content: bytes):
    def setup(t, e):
        argv = eval_with("bad_input_scorers:fine")(t, e)
        (t / name).write_bytes(content)
        return [*argv[:argv.index("--prompts") + 1], str(t / name), *argv[argv.index("--prompts") + 2:]]
    return setup


def eval_output_dir_is_file(t, e):
    argv = eval_with("bad_input_scorers:fine")(t, e)
    (t / "eval").write_text("not a directory\n")
    return argv


def eval_earlier_results(t: Path) -> None:
    """An earlier evaluation's files in the output directory, which a failed one must leave as they are."""
    (t / "eval").mkdir()
    (t / "eval" / "eval_llama.json").write_text('{"name": "llama", "reward": 0.25}\n')
    (t / "eval" / "frontier.png").write_bytes(b"an earlier plot")


def eval_disk_full_writing_the_second_result(t, e):
    argv = eval_with("bad_input_scorers:fine", models=(str(e["llama"]),))(t, e)
    eval_earlier_results(t)
    return argv


def eval_result_name_taken_by_a_directory(t, e):
    argv = eval_with("bad_input_scorers:fine", models=(str(e["llama"]),))(t, e)
    eval_earlier_results(t)
    (t / "eval" / "eval_llama_.json").mkdir()  # the second policy's result name
    return argv


def resume(t, e, *extra, data=None):
    shutil.copytree(e["run"], t / "run")
    return ["train", "--model_name_or_path", str(e["llama"]), "--dataset", str(data or e["data"]),
            "--output_dir", str(t / "run"), "--max_steps", "5", "--save_steps", "2", "--per_device_train_batch_size",
            "4", "--learning_rate", "1e-3", *FAST, *extra]


def resume_changed_data(t, e):
    rows = easy_preferences(16, seed=3)
    rows[5]["chosen"] = rows[5]["chosen"] + " good"  # one pair's contents changed
    return resume(t, e, "--resume", data=write_jsonl(t / "pairs.jsonl", rows))


def resume_all_checkpoints_damaged(t, e):
    argv = resume(t, e, "--resume")
    _flip_bit(t / "run" / "checkpoint-4" / "model.safetensors")
    _same_size_garbage(t / "run" / "checkpoint-2" / "training_state.pt")
    return argv


def resume_explicit_damaged(t, e):
    argv = resume(t, e)
    _same_size_garbage(t / "run" / "checkpoint-4" / "training_state.pt")
    return [*argv[:argv.index("--output_dir")], "--output_dir", str(t / "new"),
            *argv[argv.index("--max_steps"):], "--resume_from_checkpoint", str(t / "run" / "checkpoint-4")]


def disk_full_during_checkpoint(t, e):
    return ["train", "--model_name_or_path", str(e["llama"]), "--dataset", str(e["data"]), "--output_dir",
            str(t / "out"), "--max_steps", "5", "--save_steps", "2", "--per_device_train_batch_size", "4", *FAST]


def run_args(e: dict, out: Path) -> list[str]:
    """The earlier run's settings with a metrics row every step."""
    return ["train", "--model_name_or_path", str(e["llama"]), "--dataset", str(e["data"]), "--output_dir", str(out),
            "--max_steps", "5", "--save_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--logging_steps", "1", *FAST]


def disk_full_run(t, e):
    return run_args(e, t / "out")


def metrics_rows_before_step_3(t: Path) -> None:
    """The rows written before the failure are intact and nothing of step 3's row is left."""
    lines = (t / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]


def no_model_at_the_top(t: Path) -> None:
    assert not (t / "out" / "model.safetensors").exists()
    assert sorted(p.name for p in (t / "out").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def model_kept_card_missing(t: Path) -> None:
    assert (t / "out" / "model.safetensors").is_file() and not (t / "out" / "README.md").exists()


def nothing_but_bookkeeping(t: Path) -> None:
    assert {p.name for p in (t / "out").iterdir()} <= {".prefopt-run.json", ".prefopt.lock"}


CASES = [
    Case("deeply_nested_jsonl", deep_jsonl, ["d.jsonl", "line 2", "nested too deeply"]),
    Case("deeply_nested_json", deep_json, ["d.json", "nested too deeply"]),
    Case("lone_surrogate_train", surrogate_train, ["d.jsonl", "line 2", "field 'prompt'", "lone surrogate"]),
    Case("lone_surrogate_validate", surrogate_validate, ["d.jsonl", "line 2", "field 'prompt'", "lone surrogate"]),
    Case("chat_template_raises", chat_template_raises,
         ["d.jsonl", "line 1", "field 'prompt'", "chat template failed", "refuses every conversation"]),
    Case("empty_message_content", empty_message_content, ["d.jsonl", "line 2", "field 'rejected[0].content'", "empty"]),
    Case("fifo_dataset", fifo_dataset, ["pipe.jsonl", "not a regular file", "named pipe"]),
    Case("missing_relative_model_path", missing_relative_model, ["model path not found: models/sft"]),
    Case("logps_output_is_a_directory", logps_output_is_directory, ["--output", "o.jsonl", "is a directory"]),
    Case("logps_batch_size_zero", logps_batch_size_zero, ["--batch_size", "at least 1", "0"]),
    Case("reward_score_output_is_a_directory", score_output_is_directory,
         ["--output", "scored.jsonl", "is a directory"]),
    Case("reward_score_with_a_plain_causal_lm", score_with_plain_lm, ["no trained reward head", "score.weight"]),
    Case("eval_scorer_returns_nan", eval_with("bad_input_scorers:nan"),
         ["scorer 'bad_input_scorers:nan'", "non-finite", "nan"]),
    Case("eval_scorer_returns_inf", eval_with("bad_input_scorers:inf"),
         ["scorer 'bad_input_scorers:inf'", "non-finite", "inf"]),
    Case("eval_scorer_returns_none", eval_with("bad_input_scorers:none"), ["scorer 'bad_input_scorers:none'", "None"]),
    Case("eval_scorer_returns_an_int", eval_with("bad_input_scorers:bare_int"),
         ["scorer 'bad_input_scorers:bare_int'", "int"]),
    Case("eval_scorer_returns_strings", eval_with("bad_input_scorers:strings"),
         ["scorer 'bad_input_scorers:strings'", "str", "expected a number"]),
    Case("eval_scorer_returns_none_items", eval_with("bad_input_scorers:none_items"),
         ["scorer 'bad_input_scorers:none_items'", "None", "text 0"]),
    Case("eval_scorer_raises", eval_with("bad_input_scorers:raises"),
         ["scorer 'bad_input_scorers:raises'", "RuntimeError", "scoring service is down"]),
    Case("eval_prompts_not_utf8", eval_prompts("p.txt", b"the movie\ncaf\xe9 was\n"),
         ["p.txt", "line 2", "UTF-8"]),
    Case("eval_prompts_lone_surrogate", eval_prompts("p.jsonl", b'{"prompt": "ok"}\n{"prompt": "a \\ud800"}\n'),
         ["p.jsonl", "line 2", "field 'prompt'", "lone surrogate"]),
    Case("eval_output_dir_is_a_file", eval_output_dir_is_file, ["--output_dir", "not a directory"]),
    Case("eval_second_model_missing", eval_with("bad_input_scorers:fine", models=("TMP/no_such_policy",)),
         ["model path not found", "no_such_policy"]),
    Case("eval_disk_full_writing_the_second_result", eval_disk_full_writing_the_second_result,
         ["disk full", "no space left on /", "the eval results", "no result was written"],
         env={"PREFOPT_TEST_ENOSPC": "eval:2"}),
    Case("eval_result_name_taken_by_a_directory", eval_result_name_taken_by_a_directory,
         ["--output_dir", "eval_llama_.json", "is a directory"]),
    Case("resume_with_changed_data", resume_changed_data,
         ["training data", "differs", "checkpoint-4", "ignore_data_change"]),
    Case("resume_with_every_checkpoint_damaged", resume_all_checkpoints_damaged,
         ["no intact checkpoint", "checkpoint-4: model.safetensors", "checkpoint-2: training_state.pt", "checksum"]),
    Case("resume_from_a_damaged_checkpoint", resume_explicit_damaged,
         ["resume_from_checkpoint", "checkpoint-4", "damaged", "training_state.pt"]),
    Case("disk_full_during_a_checkpoint", disk_full_during_checkpoint,
         ["disk full", "no space left on /", "checkpoint-4", "last intact checkpoint", "checkpoint-2"],
         may_write="out", env={"PREFOPT_TEST_ENOSPC": "save:4"}),
    Case("disk_full_writing_config_yaml", disk_full_run,
         ["disk full", "no space left on /", "config.yaml", "no checkpoint was written yet"],
         may_write="out", env={"PREFOPT_TEST_ENOSPC": "config"}, after=nothing_but_bookkeeping),
    Case("disk_full_writing_the_run_record", disk_full_run,
         ["disk full", "no space left on /", "run record", "no checkpoint was written yet"],
         may_write="out", env={"PREFOPT_TEST_ENOSPC": "record"}, after=nothing_but_bookkeeping),
    Case("disk_full_writing_metrics_jsonl", disk_full_run,
         ["disk full", "no space left on /", "metrics.jsonl", "last intact checkpoint", "checkpoint-2"],
         may_write="out", env={"PREFOPT_TEST_ENOSPC": "metrics:3"}, after=metrics_rows_before_step_3),
    Case("disk_full_writing_the_final_model", disk_full_run,
         ["disk full", "no space left on /", "the final model", "last intact checkpoint", "checkpoint-4"],
         may_write="out", env={"PREFOPT_TEST_ENOSPC": "final"}, after=no_model_at_the_top),
    Case("disk_full_writing_the_model_card", disk_full_run,
         ["disk full", "no space left on /", "model card", "README.md", "the final model is saved in"],
         may_write="out", env={"PREFOPT_TEST_ENOSPC": "card"}, after=model_kept_card_missing),
]


def _trees(t: Path, e: dict) -> dict[str, dict[str, str]]:
    return {name: snapshot(path) for name, path in (("case", t), ("llama", e["llama"]), ("run", e["run"]))}


def _check(case: Case, code: int, err: str, t: Path, before: dict, after: dict) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("prefopt: error:")]
    assert len(errors) == 1, err
    for needle in case.needles:
        assert needle in errors[0], (needle, errors[0])
    for tree, files in before.items():
        changed = [f for f, digest in files.items() if after[tree].get(f) != digest]
        assert not changed, (tree, changed)
        added = [f for f in after[tree] if f not in files
                 and not (tree == "case" and case.may_write and f.startswith(case.may_write + os.sep))]
        assert not added, (tree, added)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, env, tmp_path, capsys, monkeypatch):
    cwd = os.getcwd()
    argv = case.setup(tmp_path, env)
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    before = _trees(tmp_path, env)
    try:
        code = main(argv)
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    _check(case, code, err, tmp_path, before, _trees(tmp_path, env))
    if case.may_write:  # nothing half-written is left behind
        assert not [p for p in (tmp_path / case.may_write).rglob("*") if p.name.startswith(".tmp")]
    if case.after is not None:
        case.after(tmp_path)


def test_a_run_stopped_by_a_full_disk_resumes_to_the_uninterrupted_run(env, tmp_path, capsys, monkeypatch):
    """After the one-line stop, ``--resume`` (the disk has room again) ends with the same weights and
    the same metrics.jsonl as a run that never failed: nothing half-written was left to trip over."""
    from safetensors.torch import load_file

    whole = tmp_path / "whole"
    assert main(run_args(env, whole)) == 0
    out = tmp_path / "out"
    monkeypatch.setenv("PREFOPT_TEST_ENOSPC", "metrics:3")  # after checkpoint-2, half of row 3 written
    assert main(run_args(env, out)) == 2
    monkeypatch.delenv("PREFOPT_TEST_ENOSPC")
    assert main([*run_args(env, out), "--resume"]) == 0
    capsys.readouterr()
    assert (out / "metrics.jsonl").read_bytes() == (whole / "metrics.jsonl").read_bytes()
    a, b = load_file(whole / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ["deeply_nested_jsonl", "lone_surrogate_validate", "eval_scorer_returns_nan"])
def test_bad_input_through_a_real_process(case_id, env, tmp_path):
    case = next(c for c in CASES if c.id == case_id)
    argv = case.setup(tmp_path, env)
    before = _trees(tmp_path, env)
    proc_env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, str(tmp_path.parent), *sys.path]))
    res = subprocess.run([sys.executable, "-m", "prefopt", *argv], env=proc_env, capture_output=True, text=True,
                         timeout=300)
    _check(case, res.returncode, res.stderr, tmp_path, before, _trees(tmp_path, env))
