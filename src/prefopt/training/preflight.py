"""Checks made before a run reads data or writes anything: model paths, where the output directory
may be, the output directory rule, and which checkpoint (if any) to resume from.

The output directory rule: a new run may start only in an ``output_dir`` that is absent or empty.
A directory holding anything else is refused, unless ``--resume`` (continue the run that is there)
or ``--overwrite_output_dir`` (start over: only what a prefopt run recorded writing there is moved
aside, and removed once the new run has its first checkpoint; see ``run_dir.py``). A directory in use
by a live run is refused whatever the flags (``run_lock.py``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from prefopt.data.fingerprint import same_data
from prefopt.errors import ConfigError, PrefoptError
from prefopt.modeling.load import looks_local
from prefopt.training.checkpoint import (
    checkpoint_step,
    damaged_text,
    intact_checkpoints,
    is_complete,
    read_manifest,
    verify,
)
from prefopt.training.run_dir import (
    BOOKKEEPING,
    PATH_KEYS,
    RunRecord,
    check_location,
    check_overwrite,
    check_writable,
    contents,
    may_write,
)
from prefopt.training.run_lock import RunLockedError, describe_holder, linked_bookkeeping, lock_holder

# Keys that may change between an interrupted run and its resumption without changing the result.
RESUME_FREE_KEYS = {
    "resume_from_checkpoint", "overwrite_output_dir", "output_dir", "progress_bar", "report_to",
    "save_total_limit", "log_throughput", "on_nonfinite", "max_skipped_steps", "ignore_data_change",
    "run_name", "logging_dir",
}


@dataclass
class RunPlan:
    resume_from: Path | None = None  # the checkpoint to restore, None for a fresh run
    overwrite: bool = False  # delete an earlier run's files before writing


def check_model_paths(cfg) -> None:
    for key in ("model_name_or_path", "ref_model_name_or_path", "tokenizer_name_or_path"):
        value = getattr(cfg, key)
        if value and looks_local(value) and not Path(value).expanduser().exists():
            raise PrefoptError(f"{key}: model path not found: {value}")


def describe_contents(out: Path) -> str:
    names = contents(out)
    ckpts = [n for n in names if checkpoint_step(Path(n)) is not None]
    shown = [n for n in names if n not in ckpts][:4]
    if ckpts:
        shown.append(f"{len(ckpts)} checkpoint(s)")
    return ", ".join(shown)


def check_not_in_use(out: Path) -> None:
    holder = lock_holder(out)
    if holder is not None:
        raise RunLockedError(f"output_dir {out} is in use by another prefopt run ({describe_holder(holder)}); "
                             "wait for it to finish or choose another output_dir")


def check_output_place(cfg, keys: tuple[str, ...] = PATH_KEYS) -> Path:
    """``output_dir`` may hold a run: a safe location (``check_location``, with ``keys`` naming the
    run's input paths), a directory if it exists, writable, and not in use by another run."""
    check_location(cfg, keys)
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a directory")
    check_writable(out)
    for name in BOOKKEEPING:  # the lock is truncated and written, the record trusted: never a link
        if (out / name).is_symlink():
            raise ConfigError(linked_bookkeeping(out / name))
    check_not_in_use(out)
    return out


def check_fresh_start(cfg, out: Path, record: RunRecord | None) -> None:
    """A new run (not a resume) in ``out``: an empty directory, or ``--overwrite_output_dir`` over
    what a recorded run wrote."""
    if not contents(out):
        return
    if not cfg.overwrite_output_dir:
        raise ConfigError(
            f"output_dir {out} already holds files ({describe_contents(out)}); pass --resume to continue "
            "that run, --overwrite_output_dir to start over, or choose another output_dir"
        )
    check_overwrite(out, record)


def plan_run(cfg) -> RunPlan:
    """Decide fresh run / resume / overwrite, or refuse. Reads only; writes nothing."""
    check_model_paths(cfg)
    out = check_output_place(cfg)
    record = RunRecord.read(out) if out.is_dir() else None
    occupied = bool(contents(out))
    resume = cfg.resume_from_checkpoint
    if resume:
        if resume == "latest":
            found, damaged = intact_checkpoints(out)
            if not found and damaged:
                raise ConfigError(f"--resume: no intact checkpoint in {out} ({damaged_text(damaged)}); pass "
                                  "--overwrite_output_dir to start over")
            for path, problem in damaged if _main_process() else ():
                print(f"prefopt: warning: {path} is damaged ({problem}); skipping it", file=sys.stderr)
            ckpt = found[0] if found else None
            if ckpt is None:
                if occupied and only_unfinished_run(out, record):
                    # Killed before its first checkpoint: nothing to resume, nothing worth keeping.
                    print(f"prefopt: no complete checkpoint in {out}; starting the run over", file=sys.stderr)
                    return RunPlan(overwrite=True)
                if occupied:
                    raise ConfigError(
                        f"--resume: no complete checkpoint in {out} to resume from (it holds: "
                        f"{describe_contents(out)}); pass --overwrite_output_dir instead to start over"
                    )
                print(f"prefopt: no checkpoint in {out} yet; starting a new run", file=sys.stderr)
                return RunPlan()
        else:
            ckpt = Path(resume).expanduser()
            if not ckpt.is_dir():
                raise ConfigError(f"resume_from_checkpoint: checkpoint not found: {ckpt}")
            if not is_complete(ckpt):
                raise ConfigError(f"resume_from_checkpoint: {ckpt} is not a complete checkpoint "
                                  "(no valid checkpoint.json; it may have been cut short)")
            problem = verify(ckpt)
            if problem is not None:
                raise ConfigError(f"resume_from_checkpoint: {ckpt} is damaged ({problem}); choose an earlier "
                                  "checkpoint")
            if ckpt.parent.resolve() != out.resolve() and occupied:
                raise ConfigError(f"output_dir {out} is not empty (it holds: {describe_contents(out)}); "
                                  f"resuming {ckpt} into it would mix two runs")
        warn_config_changes(cfg, ckpt.parent / "config.yaml")
        print(f"prefopt: resuming from {ckpt}", file=sys.stderr)
        return RunPlan(resume_from=ckpt)
    check_fresh_start(cfg, out, record)
    return RunPlan(overwrite=occupied)


def agree_on_plan(plan: RunPlan, accelerator) -> RunPlan:
    """The main process's plan, on every process. Each process makes its plan from what it sees on
    disk; a file system that shows the processes different things (a lagging network mount, a file
    damaged between two reads) could make them pick different checkpoints, and each would then restore
    its own step: a silently mixed state. So the main process's choice is sent to all of them."""
    if accelerator.num_processes <= 1:
        return plan
    from accelerate.utils import broadcast_object_list

    message = [(str(plan.resume_from) if plan.resume_from is not None else None, plan.overwrite)]
    broadcast_object_list(message, from_process=0)
    resume_from, overwrite = message[0]
    return RunPlan(resume_from=Path(resume_from) if resume_from is not None else None, overwrite=overwrite)


def check_resume_engine(plan: RunPlan, engine: str, num_processes: int) -> None:
    """The checkpoint to resume must hold optimizer state this engine can load. DeepSpeed ZeRO keeps
    one partition per process in the engine's own files (``global_stepSTEP/``), which load only with
    as many processes as wrote them; the other engines keep one whole state in ``training_state.pt``.
    Checked from the manifest before anything is written."""
    if plan.resume_from is None:
        return
    try:
        manifest = read_manifest(plan.resume_from)
    except (OSError, ValueError):
        return  # verified when the plan was made
    saved, saved_procs = manifest.get("engine"), manifest.get("num_processes")
    if engine == "deepspeed" and saved != "deepspeed":
        writer = f"under {saved}" if saved else "by an earlier prefopt, which kept only the main process's partition"
        raise ConfigError(f"{plan.resume_from} holds no per-process DeepSpeed ZeRO optimizer partitions (written "
                          f"{writer}); resume it with the engine that wrote it, or start over with "
                          "--overwrite_output_dir")
    if engine != "deepspeed" and saved == "deepspeed":
        raise ConfigError(f"{plan.resume_from} was written under DeepSpeed ZeRO by {saved_procs} processes (one "
                          f"optimizer partition per process): resume it under DeepSpeed with {saved_procs} processes")
    if engine == "deepspeed" and saved_procs != num_processes:
        raise ConfigError(f"{plan.resume_from} was written by {saved_procs} DeepSpeed processes (one ZeRO optimizer "
                          f"partition per process): resume it with {saved_procs} processes, not {num_processes}")


def _main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # before the accelerator exists: torchrun / accelerate's variable


def check_resume_data(cfg, plan: RunPlan, train_pairs) -> None:
    """A resumed run must train on the data it started with: the tokenized training pairs'
    fingerprint must equal the one the checkpoint recorded, unless ``ignore_data_change``."""
    if plan.resume_from is None:
        return
    try:
        saved = read_manifest(plan.resume_from).get("data_fingerprint")
    except (OSError, ValueError):
        return  # verified when the plan was made; nothing to compare with here
    if not saved or same_data(saved, train_pairs):
        return
    if cfg.ignore_data_change:
        if _main_process():
            print(f"prefopt: warning: the training data differs from the data {plan.resume_from} was trained on; "
                  "resuming anyway (ignore_data_change)", file=sys.stderr)
        return
    raise ConfigError(f"the training data ({cfg.dataset or 'rows in memory'}) differs from the data "
                      f"{plan.resume_from} was trained on (its tokenized contents changed); set "
                      "ignore_data_change: true to resume anyway, or start a new run")


def only_unfinished_run(out: Path, record: RunRecord | None) -> bool:
    """True when ``out`` holds nothing but what a recorded run wrote before its first checkpoint or
    model: its config, metrics, logs and temporaries."""
    if record is None:
        return False
    return all(record.owns(n) and may_write(n) and not n.startswith("checkpoint-")
               and not n.endswith((".safetensors", ".bin")) for n in contents(out))


def warn_config_changes(cfg, saved_path: Path) -> list[str]:
    """A resumed run is exact only with the same settings; name the keys that differ."""
    if not saved_path.is_file():
        return []
    try:
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return []
    now = cfg.to_dict()
    changed = sorted(k for k in now if k not in RESUME_FREE_KEYS and k in saved and saved[k] != now[k])
    if changed:
        print(f"prefopt: warning: resuming with changed settings ({', '.join(changed)}); the result will "
              "differ from an uninterrupted run", file=sys.stderr)
    return changed
