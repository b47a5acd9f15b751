"""Helpers of the multi-process tests: launching 2 processes on CPU (torchrun, gloo), the CLI
arguments of a short run, and comparing two runs."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefopt.training.metrics import read_metrics

SRC = str(Path(__file__).resolve().parents[2] / "src")


def launch_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # two processes on a small machine: no thread oversubscription
    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "FSDP_VERSION"):
        env.pop(var, None)
    env.update(extra)
    return env


def torchrun(nproc: int, *args, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    # --standalone: torchrun picks a free port itself (no race with other jobs on the machine)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           *map(str, args)]
    return subprocess.run(cmd, env=launch_env(**env), capture_output=True, text=True, timeout=timeout)


def train_args(model, data, out, **keys) -> list[str]:
    base = {"model_name_or_path": model, "dataset": data, "output_dir": out, "max_steps": 3,
            "logging_steps": 1, "learning_rate": 1e-3, "progress_bar": "false", "save_steps": 2}
    base.update(keys)
    return ["train", *[x for k, v in base.items() for x in (f"--{k}", str(v))]]


def assert_same_run(a: Path, b: Path, *, loss_tol: float = 1e-6, weight_tol: float = 1e-5) -> None:
    """Same metrics and weights. The weights move by 3 x lr = 3e-3; float32 summation order differs
    between layouts (~1e-8 in gradients), and AdamW's m / sqrt(v) turns that into up to ~3e-6 on
    the rare elements whose gradient is almost 0, hence 1e-5 (0.3% of the movement) for weights."""
    all_a, all_b = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    rows_a, rows_b = [r for r in all_a if "loss" in r], [r for r in all_b if "loss" in r]
    eval_a, eval_b = [r for r in all_a if "eval/loss" in r], [r for r in all_b if "eval/loss" in r]
    for ra, rb in zip(eval_a, eval_b):  # compared when both runs evaluated
        for key in ("eval/loss", "eval/rewards/margins", "eval/logps/chosen"):
            assert ra[key] == pytest.approx(rb[key], rel=loss_tol, abs=loss_tol), key
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2, 3]
    assert rows_a[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    for ra, rb in zip(rows_a, rows_b):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=loss_tol, abs=loss_tol), (ra["step"], key)
    assert rows_a[-1]["loss"] < rows_a[0]["loss"] - 1e-3  # it trained: the comparison is not vacuous
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    initial = load_file(a.parent / "llama_init.safetensors") if (a.parent / "llama_init.safetensors").exists() else None
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=weight_tol, rtol=0, msg=name)
        if initial is not None:
            assert not torch.equal(wa[name], initial[name]), f"{name} did not move"


def assert_bit_identical(whole: Path, resumed: Path) -> None:
    """The same final weights, bit for bit, and the same metrics but for the wall-clock columns."""
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def timeless(path):
        return [{k: v for k, v in r.items() if not (k.endswith("_per_second") or k == "eval/runtime")}
                for r in read_metrics(path)]

    rows = timeless(resumed / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3] and rows == timeless(whole / "metrics.jsonl")


def torchrun_each_logged(program: list, log_dir: Path, env_extra: dict, timeout: int = 240
                         ) -> tuple[dict[int, int], dict[int, str]]:
    """``torchrun --nproc_per_node 2 PROGRAM...`` on CPU (gloo) (``program``: ``["-m", "prefopt", ...]`` or
    a script and its arguments), each process's stderr in its own file. Returns
    ({rank: exit status}, {rank: stderr}). A hang fails the test at ``timeout`` (the whole process
    group is killed) instead of blocking the suite."""
    env = launch_env(**env_extra)
    if "PREFOPT_TEST_KILL" not in env_extra:
        env.pop("PREFOPT_TEST_KILL", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(log_dir), "--redirects", "3", *map(str, program)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, launcher_err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the 2-process run did not end within {timeout} s (a process waits forever)")
    errs = {int(p.parent.name): p.read_text() for p in log_dir.rglob("stderr.log")}
    # torchrun reports each failed process as "rank : R (local_rank: R)" followed by "exitcode : N".
    codes = {}
    for block in launcher_err.split("rank      : ")[1:]:
        rank = int(block.split()[0])
        codes[rank] = int(block.split("exitcode  : ")[1].split()[0])
    if proc.returncode == 0:
        codes = {0: 0, 1: 0}
    return codes, errs
