"""`torchrun --nproc_per_node 2 -m prefopt online` on CPU (gloo) against one process: each process
samples and scores its share of the prompts, so the samples (seeded per round, prompt and sample)
and the pairs must be byte-identical; training is the multi-process loop of `prefopt train` on the
same global batch, within the tolerance of its own tests. The 2-process run is killed (SIGKILL) in
round 1's training and resumed, and the run is LoRA with the per-round reference (the adapter
continued across rounds and its frozen snapshot, under DDP): the most state a resume must restore."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from prefopt.online.rounds import run_online
from tests.online.test_rounds import _cfg
from tests.training.launch import torchrun

pytest.importorskip("peft")

KEYS = dict(rounds=2, prompts_per_round=6, pairing="all", loss_type="odpo", alpha=0.5, max_steps=3, save_steps=1,
            use_peft=True, lora_r=4, lora_alpha=8, reference_update="per_round")


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_sample_score_pair_and_train_as_one(tiny_llama, easy_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_online(_cfg(tiny_llama, easy_data["train"], one, per_device_train_batch_size=8, **KEYS), progress=False)
    flags = {**_cfg(tiny_llama, easy_data["train"], two, per_device_train_batch_size=4).__dict__, **KEYS}
    args = [x for k in ("model_name_or_path", "prompts", "scorer", "samples_per_prompt", "max_new_tokens",
                        "learning_rate", "per_device_train_batch_size", "logging_steps", "report_to",
                        "progress_bar", "log_throughput", "output_dir", "seed", *KEYS)
            for x in (f"--{k}", str(flags[k]).lower() if isinstance(flags[k], bool) else str(flags[k]))]
    killed = torchrun(2, "-m", "prefopt", "online", *args, PREFOPT_TEST_KILL="step:2")  # round 1, after step 2
    assert killed.returncode != 0 and (two / "rounds" / "1" / "train" / "checkpoint-2").is_dir()
    assert not (two / "rounds" / "1" / "train_result.json").exists()
    res = torchrun(2, "-m", "prefopt", "online", *args, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr

    # the same samples and pairs in every round, and for the final policy (which depends on training)
    for name in ("rounds/1/samples.jsonl", "rounds/1/pairs.jsonl", "rounds/2/samples.jsonl",
                 "rounds/2/pairs.jsonl", "rounds/3/samples.jsonl"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert len(_rows(one / "rounds" / "2" / "pairs.jsonl")) > 16  # 8 pairs per step: 3 steps in one epoch

    rows_one, rows_two = _rows(one / "metrics.jsonl"), _rows(two / "metrics.jsonl")
    train_one, train_two = [r for r in rows_one if "loss" in r], [r for r in rows_two if "loss" in r]
    # written once, by the main process: no duplicated rows
    assert [(r["round"], r["round_step"]) for r in train_two] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert [r["round"] for r in rows_two if "samples/reward_mean" in r] == [1, 2, 3]
    for a, b in zip(train_one, train_two):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6), (a["step"], key)
    # per_round: round 2's reference is the adapter it starts from
    assert abs(train_two[3]["rewards/margins"]) < 1e-6 and train_two[4]["loss"] != train_two[3]["loss"]
    # The tolerance of tests/training/test_distributed.py relative to how far the weights move: there
    # 1e-5 for 3 steps of lr 1e-3, here 6 steps of lr 1e-2 (AdamW turns float-rounding differences in
    # near-zero gradients into up to ~0.2% of the movement), so 1e-4.
    wa, wb = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-4, rtol=0, msg=name)
