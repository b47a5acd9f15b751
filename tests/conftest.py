"""Shared fixtures: tiny models built from a config and saved to disk, easy preference files."""

from __future__ import annotations

import contextlib
import io
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
# Under pytest-xdist (`make test` runs `-n 2`): each worker gets its own cache directory, so no test
# sees a store another worker's test built, and one thread per worker (and per process it starts),
# since the workers already use the cores; tiny models gain nothing from a second thread.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:
    os.environ["PREFOPT_CACHE_DIR"] = os.path.join(os.environ["PREFOPT_CACHE_DIR"], WORKER)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

from prefopt.toy import build_tiny_model, easy_preferences, write_jsonl  # noqa: E402

if WORKER:
    import torch

    torch.set_num_threads(1)


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


def run_main(*args: str, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """``prefopt ARGS`` through ``prefopt.cli.main.main`` in this process, answered like ``run_cli``
    (exit status, stdout, stderr). A new interpreter spends seconds importing torch and transformers
    before the command starts; use this where the process boundary is not what a test is about
    (signals, kills, tracebacks and several processes need ``run_cli``)."""
    from prefopt.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    before, argv = os.getcwd(), sys.argv
    sys.argv = ["prefopt", *map(str, args)]  # what the run lock and the model card record
    try:
        os.chdir(cwd or before)  # contextlib.chdir is Python 3.11+
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([*map(str, args)])
    except SystemExit as e:  # argparse's usage errors
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        os.chdir(before)
        sys.argv = argv
    return subprocess.CompletedProcess(["prefopt", *map(str, args)], code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def cli_here():
    """``run_main``: the command in this process."""
    return run_main
