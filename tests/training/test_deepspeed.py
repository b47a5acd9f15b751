"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU (2 processes, gloo): the same global batch as one process,
and a run stopped on one process and resumed from every process's own partition ends as the
uninterrupted run, bit for bit. Needs the ``deepspeed`` package (in ``make test``'s install)."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from tests.training.launch import (
    assert_bit_identical,
    assert_same_run,
    torchrun,
    torchrun_each_logged,
    train_args,
)

# Accelerate enables DeepSpeed only with GPUs (`cpu=True` skips it). DeepSpeed itself has a CPU
# accelerator with gloo, so this launcher builds the Accelerator on CPU and switches it to DeepSpeed.
# DeepSpeed's CPU communication backend also builds its shared-memory all-reduce op (`deepspeed_shm_comm`,
# a C++ extension compiled with ninja on first use: minutes on a small machine). Only tensor-parallel
# inference uses that op (`inference_all_reduce`); ZeRO training goes through torch.distributed (gloo
# here), so the launcher turns the build off and nothing is compiled.
FORCED_DEEPSPEED = textwrap.dedent(
    """
    import importlib, os, sys
    import prefopt.recipes as R
    import prefopt.training.distributed as D

    # by module name: the attribute deepspeed.comm.torch is the torch package itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    def forced_deepspeed(cfg):
        from accelerate import Accelerator
        from accelerate.state import PartialState
        from accelerate.utils import DeepSpeedPlugin, DistributedType

        plugin = DeepSpeedPlugin(zero_stage=int(os.environ["ZERO_STAGE"]), gradient_accumulation_steps=1,
                                 zero3_init_flag=False)
        acc = Accelerator(cpu=True, deepspeed_plugin=plugin)
        acc.state.distributed_type = PartialState().distributed_type = DistributedType.DEEPSPEED
        plugin.set_mixed_precision("no")
        plugin.select(_from_accelerator_state=True)
        acc.state.deepspeed_plugins = plugin
        assert D.engine_of(acc) == "deepspeed"
        D.configure_deepspeed(acc, cfg)
        return acc

    R.build_accelerator = forced_deepspeed
    from prefopt.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


# ZeRO-2 with prefopt's own accumulation (2 procs x 2 pairs x 2 micro-batches); ZeRO-3 with a sharded
# reference engine (2 procs x 4 pairs): (per-device pairs, accumulation) per stage.
ZERO_LAYOUTS = {2: (2, 2), 3: (4, 1)}


def deepspeed_args(model, data, out, runs_dir, stage, *, debug: bool = True, **keys) -> list:
    """The launcher script and ``prefopt train``'s arguments (``--debug``: tracebacks in the failures'
    output, unless the test checks there is none)."""
    script = runs_dir / "forced_deepspeed.py"
    script.write_text(FORCED_DEEPSPEED)
    per_device, accumulation = ZERO_LAYOUTS[stage]
    return [script, *(["--debug"] if debug else []),
            *train_args(model, data, out, per_device_train_batch_size=per_device,
                        gradient_accumulation_steps=accumulation, **keys)]


@pytest.fixture(scope="module")
def zero_run(tiny_llama, easy_data, runs_dir):
    """``zero_run(stage)``: the uninterrupted 2-process ZeRO run of that stage, made once per module."""
    pytest.importorskip("deepspeed")
    done: dict[int, Path] = {}

    def run(stage: int) -> Path:
        if stage not in done:
            out = runs_dir / f"zero{stage}"
            res = torchrun(2, *deepspeed_args(tiny_llama, easy_data["train"], out, runs_dir, stage),
                           ZERO_STAGE=str(stage))
            assert res.returncode == 0, res.stderr[-3000:]
            done[stage] = out
        return done[stage]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(ZERO_LAYOUTS))
def test_deepspeed_zero_two_processes_equal_one_process_on_cpu(zero_run, single_run, stage):
    """ZeRO-2 and ZeRO-3 against one process x 8 pairs. Needs the deepspeed package."""
    assert_same_run(single_run, zero_run(stage))


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(ZERO_LAYOUTS))
def test_deepspeed_zero_stopped_and_resumed_ends_as_the_uninterrupted_run(zero_run, tiny_llama, easy_data,
                                                                          runs_dir, stage):
    """Process 1 alone gets SIGTERM after step 2 (checkpoints at steps 1 and 2). Every process's ZeRO
    partition is in the checkpoint and in its manifest. Resumed from checkpoint 2, and (ZeRO-2, in a
    copy) with process 1's partition of checkpoint 2 damaged, so resumed from checkpoint 1: both end
    with the uninterrupted 2-process run's weights and metrics, bit for bit. The damaged partition is
    tried at one stage only: finding it is the manifest's checksum, the same for both stages (whose
    partitions the manifest assertions above check), and each launch costs half a minute here."""
    whole = zero_run(stage)
    cut = runs_dir / f"zero{stage}_cut"
    args = deepspeed_args(tiny_llama, easy_data["train"], cut, runs_dir, stage, save_steps=1)
    res = torchrun(2, *args, ZERO_STAGE=str(stage), PREFOPT_TEST_KILL="term:2@1")
    assert res.returncode != 0
    assert res.stderr.count("stopped by SIGTERM after step 2 of 3") == 1, res.stderr[-3000:]
    assert sorted(p.name for p in cut.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-2"]
    manifest = json.loads((cut / "checkpoint-2" / "checkpoint.json").read_text())
    assert (manifest["engine"], manifest["num_processes"]) == ("deepspeed", 2)
    partitions = sorted(n for n in manifest["files"] if n.endswith("optim_states.pt"))
    assert [n.split("/")[0] for n in partitions] == ["global_step2"] * 2, partitions  # one per process
    assert all(n in manifest["checksums"] for n in partitions)
    state = torch.load(cut / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert state["optimizer"] is None and state["deepspeed_tag"] == "global_step2"  # not rank 0's partition only

    copy = runs_dir / f"zero{stage}_cut_damaged"
    shutil.copytree(cut, copy)
    res = torchrun(2, *args, "--resume", ZERO_STAGE=str(stage))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr and "checkpoint-2" in res.stderr
    assert_bit_identical(whole, cut)
    if stage != 2:
        return

    rank1 = copy / "checkpoint-2" / partitions[1]
    assert "rank_1_" in rank1.name
    data = bytearray(rank1.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the checksum can tell
    rank1.write_bytes(bytes(data))
    copy_args = deepspeed_args(tiny_llama, easy_data["train"], copy, runs_dir, stage, save_steps=1)
    res = torchrun(2, *copy_args, "--resume", ZERO_STAGE=str(stage))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{partitions[1]} does not match its sha256 checksum" in res.stderr, res.stderr[-3000:]
    assert f"resuming from {copy / 'checkpoint-1'}" in res.stderr
    assert_bit_identical(whole, copy)


@pytest.mark.slow
def test_a_full_disk_on_one_process_inside_the_zero_save_stops_every_process_with_one_line(
        tiny_llama, easy_data, runs_dir, tmp_path):
    """Process 1's write of its partition of checkpoint 2 fails as on a full disk, inside DeepSpeed's
    save_checkpoint, while process 0 goes on into that function's collectives: both processes exit
    with status 2, one line (from process 0) names the full disk, checkpoint 2 and the last intact
    checkpoint, no traceback, no process is left waiting, no partial checkpoint remains, and
    checkpoint 1 still lists both partitions."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    args = deepspeed_args(tiny_llama, easy_data["train"], out, runs_dir, 2, debug=False, save_steps=1)
    codes, errs = torchrun_each_logged(args, tmp_path / "logs",
                                       {"ZERO_STAGE": "2", "PREFOPT_TEST_ENOSPC": "partition1:2"})
    assert codes == {0: 2, 1: 2}, (codes, errs)
    assert not any("Traceback" in e for e in errs.values()), errs
    lines = [line for e in errs.values() for line in e.splitlines() if line.startswith("prefopt: error:")]
    assert len(lines) == 1 and lines[0] in errs[0], errs
    for needle in ("disk full", "checkpoint-2", f"the last intact checkpoint is {out / 'checkpoint-1'}"):
        assert needle in lines[0], (needle, lines[0], errs[1][-3000:])
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    manifest = json.loads((out / "checkpoint-1" / "checkpoint.json").read_text())
    assert sum(n.endswith("optim_states.pt") for n in manifest["files"]) == 2


def test_deepspeeds_cpu_fallback_notice_is_dropped_and_its_other_messages_kept():
    """Accelerate imports deepspeed on every save when it is installed, and on a machine without GPUs
    deepspeed prints "Setting accelerator to CPU..." on stdout, between prefopt's lines (seen in
    test_trackers.py's check of the run summary): prefopt drops that notice, and only that one."""
    import logging

    import prefopt.training.distributed  # noqa: F401 - installs the filter

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("DeepSpeed")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert seen == ["something else"]
