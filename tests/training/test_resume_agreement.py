"""Which checkpoint a resumed run restores, and whether the running engine can restore it: every
process takes the main process's choice, and a DeepSpeed ZeRO checkpoint (one optimizer partition per
process) needs DeepSpeed and as many processes as wrote it. The whole ZeRO kill-and-resume runs are in
test_deepspeed.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prefopt.errors import ConfigError
from prefopt.training.preflight import RunPlan, check_resume_engine

SRC = str(Path(__file__).resolve().parents[2] / "src")

# Each process "finds" a different newest checkpoint, as on a file system that shows the processes
# different things; after agree_on_plan all of them must resume the main process's.
AGREE = textwrap.dedent(
    """
    from pathlib import Path
    from types import SimpleNamespace
    from accelerate import PartialState
    from prefopt.training.preflight import RunPlan, agree_on_plan

    state = PartialState(cpu=True)
    mine = RunPlan(resume_from=Path(f"out/checkpoint-{2 - state.process_index}"))
    agreed = agree_on_plan(mine, SimpleNamespace(num_processes=state.num_processes))
    print(f"rank {state.process_index}: found {mine.resume_from.name}, resumes {agreed.resume_from.name}", flush=True)
    """
)


def test_every_process_resumes_the_checkpoint_the_main_process_chose(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rank 0: found checkpoint-2, resumes checkpoint-2" in res.stdout
    assert "rank 1: found checkpoint-1, resumes checkpoint-2" in res.stdout


def _checkpoint(tmp_path: Path, **manifest) -> RunPlan:
    ckpt = tmp_path / "out" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "checkpoint.json").write_text(json.dumps({"step": 4, "files": {}, **manifest}))
    return RunPlan(resume_from=ckpt)


@pytest.mark.parametrize("saved, running, message", [
    ({"engine": "ddp", "num_processes": 2}, ("deepspeed", 2),
     "holds no per-process DeepSpeed ZeRO optimizer partitions (written under ddp); resume it with the engine "
     "that wrote it"),
    ({}, ("deepspeed", 2), "written by an earlier prefopt, which kept only the main process's partition"),
    ({"engine": "deepspeed", "num_processes": 2}, ("ddp", 2),
     "was written under DeepSpeed ZeRO by 2 processes (one optimizer partition per process): resume it under "
     "DeepSpeed with 2 processes"),
    ({"engine": "deepspeed", "num_processes": 2}, ("fsdp2", 2), "resume it under DeepSpeed with 2 processes"),
    ({"engine": "deepspeed", "num_processes": 2}, ("deepspeed", 4),
     "was written by 2 DeepSpeed processes (one ZeRO optimizer partition per process): resume it with 2 "
     "processes, not 4"),
])
def test_a_checkpoint_the_engine_cannot_restore_is_refused_before_anything_is_written(tmp_path, saved, running,
                                                                                       message):
    plan = _checkpoint(tmp_path, **saved)
    with pytest.raises(ConfigError) as e:
        check_resume_engine(plan, *running)
    assert message in str(e.value) and str(plan.resume_from) in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("saved, running", [
    ({"engine": "deepspeed", "num_processes": 2}, ("deepspeed", 2)),
    ({"engine": "ddp", "num_processes": 2}, ("ddp", 4)),  # whole optimizer state: any process count (warned)
    ({"engine": "single", "num_processes": 1}, ("fsdp2", 2)),
    ({}, ("single", 1)),  # an earlier prefopt's checkpoint, outside DeepSpeed: as before
])
def test_a_checkpoint_the_engine_can_restore_passes(tmp_path, saved, running):
    check_resume_engine(_checkpoint(tmp_path, **saved), *running)
    check_resume_engine(RunPlan(), *running)  # a fresh run: nothing to check
