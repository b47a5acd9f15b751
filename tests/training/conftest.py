"""Fixtures of the multi-process tests (one instance per test module)."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefopt.toy import easy_preferences, write_jsonl
from tests.training.launch import train_args


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
