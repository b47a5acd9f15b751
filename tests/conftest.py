"""Shared fixtures: tiny models built from a config and saved to disk, easy preference files."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tokenized-pair stores and reference caches of the tests go to a temporary directory, not the user's cache
# (inherited by the subprocesses run_cli starts).
os.environ.setdefault("PREFOPT_CACHE_DIR", tempfile.mkdtemp(prefix="prefopt-test-cache-"))

from prefopt.toy import build_tiny_model, easy_preferences, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32) with a word-level tokenizer, saved with save_pretrained."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "llama", arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "gpt2", arch="gpt2", seed=0)


@pytest.fixture(scope="session")
def easy_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    return {
        "train": write_jsonl(d / "train.jsonl", easy_preferences(64, seed=0)),
        "eval": write_jsonl(d / "eval.jsonl", easy_preferences(32, seed=1)),
    }


def run_cli(*args: str, cwd: str | Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m prefopt ARGS`` in a real subprocess, as a user would."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "prefopt", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli
