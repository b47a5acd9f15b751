"""Multi-process training on CPU (gloo): the same global batch split over 2 processes, over
micro-batches, or run whole must give the same losses and weights; FSDP2 sharding of the reference
must not change its log-probs; asking for an engine that cannot run is an error."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefopt.metrics import read_metrics

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # two processes on a small machine: no thread oversubscription
    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "FSDP_VERSION"):
        env.pop(var, None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *map(str, args)]
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
    rows_a, rows_b = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
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


@pytest.fixture
def runs_dir(tmp_path, tiny_llama) -> Path:
    # The initial weights beside the runs, to check that every tensor moved.
    (tmp_path / "llama_init.safetensors").write_bytes((tiny_llama / "model.safetensors").read_bytes())
    return tmp_path


def test_two_processes_equal_one_process_same_global_batch(cli, tiny_llama, easy_data, runs_dir):
    one, two = runs_dir / "one", runs_dir / "two"
    res = cli(*train_args(tiny_llama, easy_data["train"], one, per_device_train_batch_size=8))
    assert res.returncode == 0, res.stderr
    res = torchrun(2, "-m", "prefopt", *train_args(tiny_llama, easy_data["train"], two, per_device_train_batch_size=4))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(one, two)
    # Checkpoints are written once, by the main process, and hold the same thing whatever the
    # process count: full (unsharded) weights and the full optimizer state.
    for run in (one, two):
        assert sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint", ".tmp"))) == ["checkpoint-2"]
        assert len(read_metrics(run / "metrics.jsonl")) == 3  # one writer: no duplicated rows
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


def test_accumulation_one_by_eight_equals_eight_by_one(cli, tiny_llama, easy_data, runs_dir):
    whole, accumulated = runs_dir / "whole", runs_dir / "accumulated"
    res = cli(*train_args(tiny_llama, easy_data["train"], whole, per_device_train_batch_size=8, save_steps=0))
    assert res.returncode == 0, res.stderr
    res = cli(*train_args(tiny_llama, easy_data["train"], accumulated, per_device_train_batch_size=1,
                          gradient_accumulation_steps=8, save_steps=0))
    assert res.returncode == 0, res.stderr
    assert_same_run(whole, accumulated)


FSDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from prefopt.data.collate import PaddedPairCollator
    from prefopt.data.formats import Columns, load_pairs
    from prefopt.data.tokenize import tokenize_pairs
    from prefopt.distributed import fully_shard_layers
    from prefopt.logprobs import pair_logps
    from prefopt.modeling import frozen_copy, load_causal_lm, load_tokenizer

    model_dir, data = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tok = load_tokenizer(model_dir)
    pairs, _ = load_pairs(data, split="train", fmt="auto", columns=Columns(), tokenizer=tok)
    tokenized, _ = tokenize_pairs(pairs[:6], tok, max_length=64, max_prompt_length=32)
    batch = PaddedPairCollator(tok.pad_token_id)(tokenized)
    full = frozen_copy(load_causal_lm(model_dir))
    expected = pair_logps(full, batch)
    sharded = fully_shard_layers(frozen_copy(load_causal_lm(model_dir)))
    weight = sharded.model.layers[0].mlp.up_proj.weight
    assert type(weight).__name__ == "DTensor", type(weight)
    assert weight.to_local().shape[0] * 2 == full.model.layers[0].mlp.up_proj.weight.shape[0]
    with torch.no_grad():
        got = pair_logps(sharded, batch)
    for key in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0)
    print(f"rank {rank} ok", flush=True)
    dist.destroy_process_group()
    """
)


def test_fsdp2_sharded_reference_gives_the_same_logps_on_cpu(tmp_path, tiny_llama, easy_data):
    script = tmp_path / "fsdp_ref.py"
    script.write_text(FSDP_SCRIPT)
    res = torchrun(2, script, tiny_llama, easy_data["train"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rank 0 ok" in res.stdout and "rank 1 ok" in res.stdout


@pytest.mark.parametrize("engine_env", [
    {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
    {"ACCELERATE_USE_DEEPSPEED": "true"},
])
def test_requested_engine_that_cannot_run_is_an_error_not_a_silent_ddp(tiny_llama, easy_data, tmp_path, engine_env):
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine these engines can run")
    res = subprocess.run([sys.executable, "-m", "prefopt", *train_args(tiny_llama, easy_data["train"], tmp_path / "x")],
                         env=_env(**engine_env), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("prefopt: error:")
    assert "needs CUDA GPUs" in res.stderr or "deepspeed" in res.stderr.lower()
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


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
