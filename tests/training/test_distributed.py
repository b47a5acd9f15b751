"""Multi-process training on CPU (gloo): the same global batch split over 2 processes, over
micro-batches, or run whole must give the same losses and weights; FSDP2 sharding of the reference
(and its sharded reference) must match too; asking for an engine that cannot run is an error."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefopt.toy import easy_preferences, write_jsonl
from prefopt.training.metrics import read_metrics

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _env(**extra) -> dict:
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
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=timeout)


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


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, tiny_llama) -> Path:
    # The initial weights beside the runs, to check that every tensor moved.
    path = tmp_path_factory.mktemp("runs")
    (path / "llama_init.safetensors").write_bytes((tiny_llama / "model.safetensors").read_bytes())
    # 20 eval pairs: with 2 processes x 8, the last eval batch leaves process 1 with nothing to do.
    write_jsonl(path / "eval20.jsonl", easy_preferences(20, seed=1))
    return path


@pytest.fixture(scope="module")
def single_run(runs_dir, tiny_llama, easy_data) -> Path:
    """The reference layout: one process, 8 pairs per micro-batch, 3 steps, checkpoint at step 2."""
    from tests.conftest import run_cli

    one = runs_dir / "one"
    res = run_cli(*train_args(tiny_llama, easy_data["train"], one, per_device_train_batch_size=8,
                              eval_dataset=runs_dir / "eval20.jsonl"))
    assert res.returncode == 0, res.stderr
    return one


@pytest.mark.slow
def test_two_processes_equal_one_process_same_global_batch(single_run, tiny_llama, easy_data, runs_dir):
    one, two = single_run, runs_dir / "two"
    res = torchrun(2, "-m", "prefopt", *train_args(tiny_llama, easy_data["train"], two, per_device_train_batch_size=4))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(one, two)
    # Checkpoints are written once, by the main process, and hold the same thing whatever the
    # process count: full (unsharded) weights and the full optimizer state.
    for run in (one, two):
        assert sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint", ".tmp"))) == ["checkpoint-2"]
        assert sum("loss" in r for r in read_metrics(run / "metrics.jsonl")) == 3  # one writer: no duplicated rows
    ca, cb = load_file(one / "checkpoint-2" / "model.safetensors"), load_file(two / "checkpoint-2" / "model.safetensors")
    for name in ca:
        torch.testing.assert_close(ca[name], cb[name], atol=1e-5, rtol=0)
    sa = torch.load(one / "checkpoint-2" / "training_state.pt", weights_only=False)
    sb = torch.load(two / "checkpoint-2" / "training_state.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 2
    assert sa["optimizer"]["state"].keys() == sb["optimizer"]["state"].keys()
    for k in sa["optimizer"]["state"]:
        for field in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa["optimizer"]["state"][k][field], sb["optimizer"]["state"][k][field],
                                       atol=1e-7, rtol=1e-4)


@pytest.mark.slow
def test_accumulation_one_by_eight_equals_eight_by_one(cli, single_run, tiny_llama, easy_data, runs_dir):
    whole, accumulated = single_run, runs_dir / "accumulated"
    res = cli(*train_args(tiny_llama, easy_data["train"], accumulated, per_device_train_batch_size=1,
                          gradient_accumulation_steps=8, save_steps=0))
    assert res.returncode == 0, res.stderr
    assert_same_run(whole, accumulated)


# Accelerate enables FSDP only on GPUs (state.py keeps MULTI_CPU on CPU). To run its FSDP2 code
# path (fully_shard, set_requires_gradient_sync, DTensor-aware clipping, get_state_dict) here,
# this launcher flips the distributed type after the Accelerator is built; everything else is the
# ordinary `prefopt train`.
FORCED_FSDP2 = textwrap.dedent(
    """
    import sys
    import prefopt.recipes as R
    import prefopt.training.distributed as D

    def forced_fsdp2(cfg):
        from accelerate import Accelerator
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                reshard_after_forward=True, state_dict_type="FULL_STATE_DICT")
        acc = Accelerator(cpu=True, fsdp_plugin=plugin)
        acc.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
        assert D.engine_of(acc) == "fsdp2"
        return acc

    def checked_reference(model, accelerator, _prepare=D.prepare_reference):
        model = _prepare(model, accelerator)
        kinds = {type(p).__name__ for p in model.parameters()}
        assert kinds == {"DTensor"}, kinds  # the frozen reference is sharded like the policy
        print("reference sharded", flush=True)
        return model

    R.build_accelerator = forced_fsdp2
    R.prepare_reference = checked_reference
    from prefopt.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def fsdp2_args(model, data, out, runs_dir) -> list:
    script = runs_dir / "forced_fsdp2.py"
    script.write_text(FORCED_FSDP2)
    return [script, "--debug", *train_args(model, data, out, per_device_train_batch_size=4,
                                           eval_dataset=runs_dir / "eval20.jsonl")]


@pytest.fixture(scope="module")
def fsdp2_run(tiny_llama, easy_data, runs_dir) -> Path:
    fsdp = runs_dir / "fsdp2"
    res = torchrun(2, *fsdp2_args(tiny_llama, easy_data["train"], fsdp, runs_dir), timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("reference sharded") == 2
    return fsdp


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_process_on_cpu(single_run, fsdp2_run):
    fsdp = fsdp2_run
    assert_same_run(single_run, fsdp)  # includes the eval metrics over the uneven eval set
    assert any("eval/loss" in r for r in read_metrics(fsdp / "metrics.jsonl"))  # final weights gathered from the shards into one full file
    weights = load_file(fsdp / "checkpoint-2" / "model.safetensors")
    full = load_file(single_run / "checkpoint-2" / "model.safetensors")
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in full.items()}


@pytest.mark.slow
def test_fsdp2_stopped_by_sigterm_on_one_process_resumes_to_the_same_weights(fsdp2_run, tiny_llama, easy_data,
                                                                             runs_dir):
    """Only process 1 gets SIGTERM after step 1: both stop after that step (the flag is all-reduced),
    the checkpoint carries the sharded optimizer state gathered whole, and the resumed 2-process run
    ends with the uninterrupted run's weights, bit for bit."""
    out = runs_dir / "fsdp2_cut"
    args = fsdp2_args(tiny_llama, easy_data["train"], out, runs_dir)
    res = torchrun(2, *args, timeout=180, PREFOPT_TEST_KILL="term:1@1")
    assert res.returncode != 0
    assert res.stderr.count("stopped by SIGTERM after step 1 of 3") == 1, res.stderr[-3000:]  # said once
    assert [p.name for p in out.iterdir() if p.name.startswith("checkpoint-")] == ["checkpoint-1"]
    state = torch.load(out / "checkpoint-1" / "training_state.pt", weights_only=False)
    moments = state["optimizer"]["state"]
    assert {type(v["exp_avg"]) for v in moments.values()} == {torch.Tensor}  # whole tensors, not shards
    full = load_file(out / "checkpoint-1" / "model.safetensors")
    assert all(moments[name]["exp_avg"].shape == full[name].shape for name in moments if name in full)
    res = torchrun(2, *args, "--resume", timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load_file(fsdp2_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def timeless(path):  # the wall-clock columns differ between any two runs
        return [{k: v for k, v in r.items() if not (k.endswith("_per_second") or k == "eval/runtime")}
                for r in read_metrics(path)]

    rows, whole = timeless(out / "metrics.jsonl"), timeless(fsdp2_run / "metrics.jsonl")
    assert rows == whole


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


def deepspeed_args(model, data, out, runs_dir, stage, **keys) -> list:
    script = runs_dir / "forced_deepspeed.py"
    script.write_text(FORCED_DEEPSPEED)
    per_device, accumulation = ZERO_LAYOUTS[stage]
    return [script, "--debug", *train_args(model, data, out, per_device_train_batch_size=per_device,
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
    partition is in the checkpoint and in its manifest. Resumed from checkpoint 2, and (in a copy) with
    process 1's partition of checkpoint 2 damaged, so resumed from checkpoint 1: both end with the
    uninterrupted 2-process run's weights and metrics, bit for bit."""
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


def assert_bit_identical(whole: Path, resumed: Path) -> None:
    """The same final weights, bit for bit, and the same metrics but for the wall-clock columns."""
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def timeless(path):
        return [{k: v for k, v in r.items() if not (k.endswith("_per_second") or k == "eval/runtime")}
                for r in read_metrics(path)]

    rows = timeless(resumed / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows == timeless(whole / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("engine_env", [
    {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
    {"ACCELERATE_USE_DEEPSPEED": "true"},
])
@pytest.mark.slow
def test_requested_engine_that_cannot_run_is_an_error_not_a_silent_ddp(tiny_llama, easy_data, tmp_path, engine_env):
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine these engines can run")
    res = subprocess.run([sys.executable, "-m", "prefopt", *train_args(tiny_llama, easy_data["train"], tmp_path / "x")],
                         env=_env(**engine_env), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("prefopt: error:")
    assert "needs CUDA GPUs" in res.stderr or "deepspeed" in res.stderr.lower()
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp2", "FSDP"), ("zero2", "DEEPSPEED"),
                                        ("zero3", "DEEPSPEED")])
def test_accelerate_config_files_load_with_accelerate(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert str(config.distributed_type).endswith(kind)
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_reshard_after_forward"] is True
    if name.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
        # prefopt owns accumulation and clipping (see distributed.configure_deepspeed)
        assert config.deepspeed_config.get("gradient_accumulation_steps", 1) == 1
