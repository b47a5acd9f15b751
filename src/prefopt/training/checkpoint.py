"""Checkpoints: atomic writing, discovery, exact restore, pruning, and the metrics file on resume.

A checkpoint is ``OUTPUT/checkpoint-STEP/``, written as ``OUTPUT/.tmp-checkpoint-STEP/`` and renamed
into place, so a directory named ``checkpoint-*`` is complete. It holds:

- the model, as the run saves it (``save_pretrained``: weights, config, tokenizer);
- ``training_state.pt``: step, optimizer, scheduler, the metrics window not yet logged, skip count;
- ``rng_state_RANK.pt``: Python, NumPy, torch and CUDA generator states, one file per process;
- under DeepSpeed only, the engine's own checkpoint (``global_stepSTEP/`` with one ZeRO optimizer
  partition per process, ``latest``, ``zero_to_fp32.py``), written by every process;
- ``checkpoint.json``: a manifest written last: the step, the size and SHA-256 of every file, and the
  fingerprint of the tokenized training data (``data.fingerprint``). Discovery checks the sizes
  (cheap: a truncated copy, a half-finished delete); resuming and the non-finite guard also check
  the checksums (``verify``), so flipped bits or same-size garbage are found, named, and the newest
  intact checkpoint is used instead.

The data order is a pure function of ``(seed, epoch)`` (``data_order.Schedule``), so restoring the step
restores the position in the data. Assumptions for several processes: every process sees the same
``output_dir`` (a shared file system). Under plain DDP the main process holds the whole optimizer state;
under FSDP2 every process takes part in gathering the full state (and, on restore, loads its shard of
it), so those checkpoints do not depend on the process count. Under DeepSpeed ZeRO each process saves
and restores its own partition, so a ZeRO checkpoint resumes with the process count that wrote it
(``preflight.check_resume_engine``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from prefopt.digest import ALGORITHM, file_digest
from prefopt.errors import PrefoptError
from prefopt.io import simulate_full_disk, write_text_atomic
from prefopt.training.distributed import engine_of, together

STATE_FILE = "training_state.pt"
MANIFEST = "checkpoint.json"
TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"^checkpoint-(\d+)$")
KILL_ENV = "PREFOPT_TEST_KILL"


# ------------------------------------------------------------------------------------------ discovery
def checkpoint_step(path: Path) -> int | None:
    m = _NAME.match(path.name)
    return int(m.group(1)) if m else None


def is_complete(path: Path) -> bool:
    """A checkpoint directory whose manifest exists and whose files all have the recorded sizes."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        return all((path / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first. ``.tmp-*`` directories never count."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in d.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return [p for _, p in sorted(found) if is_complete(p)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST).read_text(encoding="utf-8"))


def verify(path: Path) -> str | None:
    """``None`` when every file of the checkpoint has its recorded size and checksum, else what is
    wrong (a short phrase naming the file). A manifest without checksums (an older prefopt) is
    checked by sizes only."""
    try:
        manifest = read_manifest(path)
        files, sums = manifest["files"], manifest.get("checksums") or {}
        for name, size in files.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != size:
                return f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
            if name in sums and file_digest(file) != sums[name]:
                return f"{name} does not match its {ALGORITHM} checksum"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__})"
    return None


def intact_checkpoints(output_dir: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(intact checkpoints newest first, stopping at the first intact one; damaged ones met on the
    way, with what is wrong). Only the newest intact checkpoint is hashed in full."""
    damaged = []
    for path in reversed(list_checkpoints(output_dir)):
        problem = verify(path)
        if problem is None:
            return [path], damaged
        damaged.append((path, problem))
    return [], damaged


def latest_intact_checkpoint(output_dir: str | Path, *, warn: bool = True) -> Path | None:
    """The newest checkpoint whose files all match the manifest's checksums; each damaged newer one
    is named in one warning line (``warn``) and skipped."""
    found, damaged = intact_checkpoints(output_dir)
    if warn:
        for path, problem in damaged:
            print(f"prefopt: warning: {path} is damaged ({problem}); skipping it", file=sys.stderr)
    return found[0] if found else None


def damaged_text(damaged: list[tuple[Path, str]]) -> str:
    return "; ".join(f"{p.name}: {problem}" for p, problem in damaged)


# ------------------------------------------------------------------------------------------ saving
def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        # as plain lists so that the file loads with torch.load(weights_only=True)
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list | tuple) else x


def write_manifest(directory: Path, step: int, extra: dict[str, Any] | None = None) -> None:
    """The manifest: step, size and SHA-256 of every file (plus ``extra``), written last."""
    names = [p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST]
    files = {str(p.relative_to(directory)): p.stat().st_size for p in names}
    checksums = {str(p.relative_to(directory)): file_digest(p) for p in names}
    fsync_tree(directory)
    path = directory / MANIFEST
    with path.open("w", encoding="utf-8") as fh:
        json.dump({"step": step, "files": files, "checksums": checksums, "checksum_algorithm": ALGORITHM,
                   **(extra or {})}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Rename ``tmp_dir`` to ``final_dir``. An existing ``final_dir`` is first renamed aside, so at
    no moment does a partly deleted directory carry a checkpoint's name."""
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f"{TMP_PREFIX}old-{final_dir.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    _fsync_parent(final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_parent(path: Path) -> None:
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def remove_dir(path: Path) -> None:
    """Delete a checkpoint: renamed to ``.tmp-*`` first, so a kill mid-delete leaves no remnant that
    looks like a checkpoint."""
    doomed = path.with_name(f"{TMP_PREFIX}del-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune_checkpoints(output_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints; returns the ones deleted."""
    if keep is None or keep <= 0:
        return []
    found = list_checkpoints(output_dir)
    doomed = found[:-keep]
    for path in doomed:
        remove_dir(path)
    return doomed


_TEMPORARY = re.compile(r"^\.tmp-((old-|del-)?checkpoint-\d+|final-model)$")


def clean_temporaries(output_dir: str | Path, owns=None) -> None:
    """Remove what a killed save or delete left behind: prefopt's own ``.tmp-checkpoint-*``-style
    directories only (a user's ``.tmp-build/`` is not ours), and with ``owns`` (the run record's
    test) only those the record lists."""
    d = Path(output_dir)
    if d.is_dir():
        for p in d.iterdir():
            if p.is_dir() and not p.is_symlink() and _TEMPORARY.match(p.name) and (owns is None or owns(p.name)):
                shutil.rmtree(p, ignore_errors=True)


def save(trainer) -> Path:
    """Write ``checkpoint-STEP/`` for ``trainer`` atomically; every process writes its RNG state,
    the main process the rest. Then keep only the newest ``save_total_limit`` checkpoints. A full
    disk (or another write error) removes the partial checkpoint and stops the run with one line
    naming the device and the last intact checkpoint; with several processes the outcome is settled
    after each part (``distributed.together``), so a failure on one process stops all of them."""
    acc, step = trainer.accelerator, trainer.step
    final_dir = trainer.output_dir / f"checkpoint-{step}"
    tmp_dir = trainer.output_dir / f"{TMP_PREFIX}checkpoint-{step}"
    run_dir = getattr(trainer, "run_dir", None)
    what = f"checkpoint-{step}"
    # Only the main process removes the partial checkpoint (another process removing it would pull
    # the directory from under the main process's writes), also when the failure was another's; after
    # write_errors has judged the free space, which removing it frees again.
    acc.wait_for_everyone()
    try:
        with together(acc), write_errors(trainer.output_dir, what):
            if acc.is_main_process:
                if run_dir is not None:
                    run_dir.wrote(tmp_dir.name, final_dir.name)  # recorded before they exist
                shutil.rmtree(tmp_dir, ignore_errors=True)
                tmp_dir.mkdir(parents=True)
        with together(acc), write_errors(trainer.output_dir, what):
            torch.save(rng_state(), tmp_dir / f"rng_state_{acc.process_index}.pt")
        state_dict = trainer.gather_model_state()  # a collective under FSDP / ZeRO-3: every process calls it
        optimizer_state = trainer.gather_optimizer_state()  # a collective under FSDP2 (None: not sharded)
        # Under DeepSpeed every process writes its ZeRO partition. DeepSpeed's save_checkpoint holds
        # collectives of its own; save_engine_state gets every process through them even when a write
        # fails, and raises the failure after, so it can be settled like the writes around it.
        with together(acc), write_errors(trainer.output_dir, what):
            trainer.save_engine_state(tmp_dir)
        with together(acc), write_errors(trainer.output_dir, what):
            if acc.is_main_process:
                trainer.save_model(tmp_dir, state_dict)
                torch.save(trainer.state_dict(optimizer_state), tmp_dir / STATE_FILE)
                test_hook("save", step)
                write_manifest(tmp_dir, step, {"data_fingerprint": getattr(trainer, "data_fingerprint", None),
                                               "engine": engine_of(acc), "num_processes": acc.num_processes})
                replace_dir(tmp_dir, final_dir)
                prune_checkpoints(trainer.output_dir, trainer.cfg.save_total_limit)
                if run_dir is not None:
                    run_dir.commit()  # the new run has a checkpoint: an earlier run moved aside can go
    except BaseException:
        if acc.is_main_process:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return final_dir


@contextlib.contextmanager
def write_errors(output_dir: Path, what: str, *, cleanup: Path | None = None, kept: str | None = None
                 ) -> Iterator[None]:
    """A failed write of ``what`` in ``output_dir`` becomes one line (``write_failure``: the mount
    point on a full disk, the last intact checkpoint or ``kept``); ``cleanup`` (a partial
    directory) is removed. Other errors pass unchanged."""
    try:
        yield
    except PrefoptError:
        raise
    except Exception as e:
        # torch.save reports a full disk as a RuntimeError ("file write failed"): judge by the free
        # space, measured before the partial files are removed (which frees it again).
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or disk_nearly_full(output_dir)
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        if full or isinstance(e, OSError):
            raise PrefoptError(write_failure(e, output_dir, what, full=full, kept=kept)) from None
        raise


def disk_nearly_full(path: Path, margin: int = 16 << 20) -> bool:
    try:
        return shutil.disk_usage(mount_point(path)).free < margin
    except OSError:
        return False


def write_failure(e: Exception, output_dir: Path, what: str, *, full: bool | None = None,
                  kept: str | None = None) -> str:
    """One line for a failed write: the device (mount point) and the last intact checkpoint (or
    ``kept``: what is safe instead, e.g. the final model when only its card failed)."""
    if kept is None:
        last = latest_intact_checkpoint(output_dir, warn=False)
        kept = (f"the last intact checkpoint is {last} (resume with --resume)" if last is not None
                else "no checkpoint was written yet")
    if full is None:
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    if full:
        return (f"disk full: no space left on {mount_point(output_dir)} (the file system of {output_dir}) while "
                f"writing {what}; {kept}")
    text = str(e).strip()
    reason = getattr(e, "strerror", None) or (text.splitlines()[0] if text else type(e).__name__)
    return f"cannot write {what} in {output_dir}: {reason}; {kept}"


def mount_point(path: Path) -> Path:
    """The mount point of the file system holding ``path``."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while p != p.parent and not os.path.ismount(p):
        p = p.parent
    return p


def test_hook(point: str, step: int) -> None:
    """Crash tests only: ``PREFOPT_TEST_KILL=step:K`` kills this process with SIGKILL after step K,
    ``save:K`` in the middle of writing checkpoint K, ``online-sample:N`` / ``online-score:N`` in
    round N of ``prefopt online`` before that stage's files are written; ``PREFOPT_TEST_ENOSPC=save:K``
    makes that write fail as on a full disk (``io.simulate_full_disk`` lists the other writes); ``term:K`` (``int:K``) sends SIGTERM (SIGINT) after step K
    (``term:K@R``: only the process of rank R); ``pause:K`` waits after step K until a signal
    arrives. Never set in normal use."""
    value = os.environ.get(KILL_ENV)
    simulate_full_disk(point, step)
    if not value:
        return
    if value == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "step" and value == f"pause:{step}":  # wait here (up to 2 minutes) for a signal from outside
        from prefopt.training.preemption import signals_received

        seen = signals_received()
        print(f"prefopt-test: paused after step {step}", file=sys.stderr, flush=True)
        for _ in range(2400):
            if signals_received() > seen:
                break
            time.sleep(0.05)
    target, _, rank = value.partition("@")
    if point == "step" and target in (f"term:{step}", f"int:{step}") and rank in ("", os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.SIGTERM if target.startswith("term") else signal.SIGINT)


# ------------------------------------------------------------------------------------------ restoring
def read_model_weights(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(p for p in directory.glob("*.safetensors") if p.name != "adapter_model.safetensors")
    if not files:
        raise PrefoptError(f"{directory}: no model weights (*.safetensors) in the checkpoint")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_model_weights(model: torch.nn.Module, directory: Path) -> None:
    """Copy the weights saved in ``directory`` into ``model`` in place (bit-exact)."""
    adapter = directory / "adapter_model.safetensors"
    if adapter.exists() and hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict  # optional: only a LoRA run has an adapter

        set_peft_model_state_dict(model, load_file(str(adapter)))
        return
    files = sorted(p for p in directory.glob("*.safetensors") if p.name != adapter.name)
    if not files:
        raise PrefoptError(f"{directory}: no model weights (*.safetensors) in the checkpoint")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    current = model.state_dict()
    unexpected = [k for k in state if k not in current]
    if unexpected:
        raise PrefoptError(f"{directory}: the checkpoint's weights do not fit this model (e.g. {unexpected[0]!r})")
    with torch.no_grad():
        loaded_ptrs = set()
        for k, v in state.items():
            current[k].copy_(v)
            loaded_ptrs.add(current[k].data_ptr())
    # Tied weights (lm_head = embeddings) are saved once; they were filled through their twin.
    missing = [k for k in current if k not in state and current[k].data_ptr() not in loaded_ptrs]
    if missing:
        raise PrefoptError(f"{directory}: the checkpoint lacks weights of this model (e.g. {missing[0]!r})")


def read_training_state(directory: Path) -> dict[str, Any]:
    try:
        return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # damaged beyond what the manifest records (e.g. an old manifest without checksums)
        raise PrefoptError(f"{directory / STATE_FILE}: unreadable ({type(e).__name__}); resume from an earlier "
                           "checkpoint with --resume_from_checkpoint") from None


def read_rng_state(directory: Path, rank: int) -> dict[str, Any] | None:
    path = directory / f"rng_state_{rank}.pt"
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def keep_metrics_until(source: Path, target: Path, step: int) -> int:
    """Write the rows of ``source`` (a metrics.jsonl) with ``step <= step`` to ``target``,
    atomically; a half-written last line (a kill during a write) is dropped. Returns rows kept."""
    rows = []
    if source.exists():
        lines = source.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    break  # torn last line
                raise PrefoptError(f"{source}, line {i + 1}: malformed metrics row") from None
            if int(row.get("step", 0)) <= step:
                rows.append(line)
    write_text_atomic(target, "".join(r + "\n" for r in rows))
    return len(rows)


def restore(trainer, directory: str | Path) -> int:
    """Put ``trainer`` back in the state it had right after saving ``directory``: model weights,
    optimizer, scheduler, RNG, step, the unlogged metrics window; cut the metrics file to match.
    Returns the step."""
    directory = Path(directory)
    acc = trainer.accelerator
    state = read_training_state(directory)
    engine = engine_of(acc)
    saved_procs = int(state.get("num_processes", acc.num_processes))
    if engine == "deepspeed":  # preflight.check_resume_engine made sure the checkpoint has the partitions
        trainer.load_engine_state(directory, state["deepspeed_tag"])  # weights and this process's partition
    elif engine == "fsdp2":
        trainer.load_model_state(read_model_weights(directory))  # every process loads its shard
    else:
        load_model_weights(trainer.unwrapped_model(), directory)
    trainer.load_state_dict(state)
    rng = read_rng_state(directory, acc.process_index) or read_rng_state(directory, 0)
    if rng is not None:
        set_rng_state(rng)
    if saved_procs != acc.num_processes and acc.is_main_process:
        print(f"prefopt: warning: {directory} was written by {saved_procs} processes, resuming with "
              f"{acc.num_processes}: the data order differs from the interrupted run", file=sys.stderr)
    with together(acc), write_errors(trainer.output_dir, "metrics.jsonl"):
        if acc.is_main_process:
            run_dir = getattr(trainer, "run_dir", None)
            clean_temporaries(trainer.output_dir, run_dir.record.owns if run_dir is not None else None)
            keep_metrics_until(directory.parent / "metrics.jsonl", trainer.output_dir / "metrics.jsonl", trainer.step)
            trainer.logger.purge_after(trainer.step)
    return trainer.step
