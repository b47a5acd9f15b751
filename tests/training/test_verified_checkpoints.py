"""Verified checkpoints: every file's SHA-256 in the manifest, checked on resume and by the
non-finite guard; the tokenized training data's fingerprint, checked on resume; a full disk during
a save named in one line."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from prefopt.cli.main import main
from prefopt.errors import PrefoptError
from prefopt.toy import easy_preferences, write_jsonl
from prefopt.training.checkpoint import (
    MANIFEST,
    intact_checkpoints,
    latest_intact_checkpoint,
    mount_point,
    read_training_state,
    verify,
    write_failure,
    write_manifest,
)
from prefopt.training.guard import NonFiniteError, StepHealth, check_step
from prefopt.training.metrics import read_metrics
from tests.tree_snapshot import snapshot

RUN = ["--max_steps", "6", "--save_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "4",
       "--learning_rate", "1e-3", "--progress_bar", "false", "--report_to", "none", "--log_throughput", "false"]


def train(model, data, out, *extra) -> int:
    return main(["train", "--model_name_or_path", str(model), "--dataset", str(data), "--output_dir", str(out),
                 *RUN, *extra])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("verified") / "pairs.jsonl", easy_preferences(16, seed=7))


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verified") / "run"
    assert train(tiny_llama, data, out) == 0
    return out


def flip_bit(path: Path, offset: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(raw))


# ------------------------------------------------------------------------------------------ the manifest
@pytest.mark.slow
def test_manifest_records_the_sha256_of_every_file(uninterrupted):
    ckpt = uninterrupted / "checkpoint-4"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert sorted(manifest["checksums"]) == files and "model.safetensors" in files and "training_state.pt" in files
    for name in files:  # an independent hash of each file's bytes
        assert manifest["checksums"][name] == hashlib.sha256((ckpt / name).read_bytes()).hexdigest(), name
    # The training store's columns fingerprint, known from its build (tests/data/test_store.py).
    assert manifest["data_fingerprint"].startswith("columns-v1:") and len(manifest["data_fingerprint"]) == 75
    assert verify(ckpt) is None


@pytest.mark.slow
def test_verify_names_flipped_bits_and_same_size_garbage(uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    flip_bit(run / "checkpoint-4" / "model.safetensors")
    state = run / "checkpoint-2" / "training_state.pt"
    size = state.stat().st_size
    state.write_bytes(b"x" * size)  # same size: the old size-only check passed this
    assert verify(run / "checkpoint-4") == "model.safetensors does not match its sha256 checksum"
    assert verify(run / "checkpoint-2") == "training_state.pt does not match its sha256 checksum"
    assert verify(uninterrupted / "checkpoint-4") is None  # the original is intact
    found, damaged = intact_checkpoints(run)
    assert found == [] and [p.name for p, _ in damaged] == ["checkpoint-4", "checkpoint-2"]


@pytest.mark.slow
def test_a_manifest_without_checksums_is_checked_by_size_and_garbage_state_is_one_error(uninterrupted, tmp_path):
    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(uninterrupted / "checkpoint-4", ckpt)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    del manifest["checksums"]  # as an earlier prefopt wrote it
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    state = ckpt / "training_state.pt"
    state.write_bytes(b"x" * state.stat().st_size)
    assert verify(ckpt) is None  # sizes match: nothing more to know
    with pytest.raises(PrefoptError, match="training_state.pt: unreadable"):
        read_training_state(ckpt)


@pytest.mark.slow
def test_resume_skips_a_damaged_checkpoint_and_ends_as_the_uninterrupted_run(tiny_llama, data, uninterrupted,
                                                                             tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    (run / "model.safetensors").unlink()
    flip_bit(run / "checkpoint-4" / "model.safetensors")
    capsys.readouterr()
    assert train(tiny_llama, data, run, "--resume") == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if " is damaged " in line]
    assert warnings == [f"prefopt: warning: {run / 'checkpoint-4'} is damaged (model.safetensors does not match "
                        "its sha256 checksum); skipping it"]
    assert f"resuming from {run / 'checkpoint-2'}" in err
    assert (run / "metrics.jsonl").read_bytes() == (uninterrupted / "metrics.jsonl").read_bytes()
    a, b = load_file(str(uninterrupted / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert verify(run / "checkpoint-4") is None  # rewritten by the resumed run


@pytest.mark.slow
def test_a_damaged_checkpoint_is_never_offered_as_the_last_good_one(uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    flip_bit(run / "checkpoint-4" / "training_state.pt")
    assert latest_intact_checkpoint(run, warn=False) == run / "checkpoint-2"
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(on_nonfinite="stop", max_skipped_steps=10), step=4, skipped_steps=0, output_dir=run,
        all_reduce_sum=lambda sums, counts=0.0: (sums, counts), scheduler=SimpleNamespace(get_last_lr=lambda: [1e-3]),
        model=torch.nn.Linear(2, 2), accelerator=SimpleNamespace(mixed_precision="no"),
    )
    with pytest.raises(NonFiniteError) as info:
        check_step(trainer, StepHealth(), math.nan, 1.0)
    message = str(info.value)
    assert f"last good checkpoint: {run / 'checkpoint-2'}" in message
    assert "skipped damaged: checkpoint-4: training_state.pt does not match its sha256 checksum" in message


# ------------------------------------------------------------------------------------------ the data
@pytest.mark.slow
def test_resume_with_changed_data_at_the_same_path_is_refused_unless_overridden(tiny_llama, tmp_path, capsys):
    rows = easy_preferences(16, seed=7)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    assert train(tiny_llama, data, out, "--max_steps", "2", "--save_steps", "1") == 0
    rows[3]["rejected"] = rows[3]["rejected"] + " bad"  # same path, same size class, other contents
    write_jsonl(data, rows)
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert train(tiny_llama, data, out, "--max_steps", "3", "--save_steps", "1", "--resume") == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("prefopt: error:")]
    assert "differs from the data" in line and "checkpoint-1" in line and "ignore_data_change: true" in line
    assert snapshot(tmp_path) == before
    # The explicit override resumes all the same, with a warning.
    assert train(tiny_llama, data, out, "--max_steps", "3", "--save_steps", "1", "--resume",
                 "--ignore_data_change", "true") == 0
    assert "differs from the data" in capsys.readouterr().err  # a warning now, and the run went on
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


# ------------------------------------------------------------------------------------------ full disk
@pytest.mark.slow
def test_write_failure_names_the_device_and_the_last_intact_checkpoint(uninterrupted, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    flip_bit(run / "checkpoint-4" / "model.safetensors")
    message = write_failure(OSError(errno.ENOSPC, "No space left on device"), run, "checkpoint-6")
    assert message == (f"disk full: no space left on {mount_point(run)} (the file system of {run}) while writing "
                       f"checkpoint-6; the last intact checkpoint is {run / 'checkpoint-2'} (resume with --resume)")
    assert mount_point(run).is_mount() or mount_point(run) == Path("/")
    assert "no checkpoint was written yet" in write_failure(OSError(errno.EIO, "I/O error"), tmp_path / "x", "c")


def test_manifest_written_by_write_manifest_verifies_and_catches_a_changed_byte(tmp_path):
    d = tmp_path / "checkpoint-1"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(bytes(range(256)) * 10)
    (d / "sub" / "b.txt").write_text("hello")
    write_manifest(d, 1, {"data_fingerprint": "f" * 64})
    assert verify(d) is None
    flip_bit(d / "sub" / "b.txt", offset=0)
    assert verify(d) == "sub/b.txt does not match its sha256 checksum"
    (d / "sub" / "b.txt").unlink()
    assert verify(d) == "sub/b.txt is missing"


def test_a_full_disk_reported_by_torch_as_a_runtime_error_is_named_too(tmp_path, monkeypatch):
    import prefopt.training.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "disk_nearly_full", lambda path: True)
    message = write_failure(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
                            tmp_path, "checkpoint-3", full=ckpt.disk_nearly_full(tmp_path))
    assert message.startswith(f"disk full: no space left on {mount_point(tmp_path)}")
    other = write_failure(OSError(errno.EROFS, "Read-only file system"), tmp_path, "checkpoint-3")
    assert other == f"cannot write checkpoint-3 in {tmp_path}: Read-only file system; no checkpoint was written yet"
