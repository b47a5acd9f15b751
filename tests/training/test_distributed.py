"""Multi-process training on CPU (gloo): the same global batch split over 2 processes, over
micro-batches, or run whole must give the same losses and weights; FSDP2 sharding of the reference
(and its sharded reference) must match too; asking for an engine that cannot run is an error."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefopt.training.metrics import read_metrics
from tests.training.launch import assert_bit_identical, assert_same_run, launch_env, torchrun, train_args


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
    assert_bit_identical(fsdp2_run, out)


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
                         env=launch_env(**engine_env), capture_output=True, text=True, timeout=120)
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
