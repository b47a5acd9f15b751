"""The output directory of a run: where it may be, what a run owns in it, and starting over safely.

- **Where**: never the current directory, the home directory or ``/`` (nor a folder above them), and
  never a directory that is, contains or lies inside a model, tokenizer or dataset path of the run
  (``check_location``). It must be writable, checked before anything loads (``check_writable``).
- **What a run owns**: every name a run writes at the top of ``output_dir`` is first recorded in
  ``.prefopt-run.json`` (``RunRecord``), before the file exists, so a kill at any moment leaves
  nothing unrecorded. ``--overwrite_output_dir`` touches only recorded names; other files stay, and a
  directory with no record that holds anything is refused rather than cleaned.
- **Starting over**: the recorded names of the earlier run are renamed into
  ``.prefopt-old-TIME/`` (one ``rename`` each, same file system), not deleted. That folder is
  removed once the new run has written its first checkpoint (or its final model); if the new run
  fails before that, its own files are removed and the earlier run is moved back (``abort``).

The lock that keeps a second run out is in ``run_lock.py``; the plan (fresh, resume, overwrite)
in ``preflight.py``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefopt.errors import ConfigError
from prefopt.io import simulate_full_disk, write_text_atomic
from prefopt.training.run_lock import LOCK_FILE, RunLock

RECORD_FILE = ".prefopt-run.json"
ASIDE_PREFIX = ".prefopt-old-"
BOOKKEEPING = (RECORD_FILE, LOCK_FILE)
TMP_PREFIXES = (".tmp-old-", ".tmp-del-", ".tmp-")  # checkpoint.py's temporaries, longest first
_ATOMIC_TMP = re.compile(r"^\.(.+)\.\d+\.tmp$")  # io.atomic_path's temporary of NAME

# The names a run writes at the top of output_dir: its files, checkpoints and temporaries, and the
# final model as save_pretrained writes it (weights, config, tokenizer, adapter). A foreign file with
# one of these names would be overwritten, so starting over next to one is refused; any other foreign
# file is simply left alone.
RUN_NAMES = (
    "config.yaml", "metrics.jsonl", "data_summary.json", "tensorboard", "runs", "merged", ".tmp-final-model",
    "training_curves.png",
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "adapter_model.safetensors", "adapter_config.json", "README.md",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja",
)
RUN_PATTERNS = ("checkpoint-*", ".tmp-checkpoint-*", "model-*-of-*.safetensors")
PATH_KEYS = ("model_name_or_path", "ref_model_name_or_path", "tokenizer_name_or_path", "dataset", "eval_dataset")


def may_write(name: str) -> bool:
    return name in RUN_NAMES or any(fnmatch.fnmatch(name, p) for p in RUN_PATTERNS)


# ------------------------------------------------------------------------------------------ location
def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def check_location(cfg, keys: tuple[str, ...] = PATH_KEYS) -> None:
    """Refuse an output_dir where a run (or an overwrite) could damage something that is not the run's
    (``keys``: the config keys holding the run's input paths)."""
    out = _resolved(cfg.output_dir)
    places = [("the root directory", Path("/")), ("the current directory", Path.cwd())]
    try:
        places.insert(1, ("your home directory", Path.home()))
    except RuntimeError:  # no HOME and no passwd entry (some containers): nothing to protect there
        pass
    for what, place in places:
        place = place.resolve()
        if out == place or out in place.parents:
            relation = "is" if out == place else "contains"
            raise ConfigError(f"output_dir {cfg.output_dir} {relation} {what} ({place}); a run writes and, on "
                              "--overwrite_output_dir, deletes there: choose a directory of its own")
    _apart_from_inputs(cfg, "output_dir", out, keys)
    if getattr(cfg, "logging_dir", None):  # the trackers' files go there: not into a model or the data either
        _apart_from_inputs(cfg, "logging_dir", _resolved(cfg.logging_dir), keys)


def _apart_from_inputs(cfg, name: str, out: Path, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = getattr(cfg, key, None)
        if not isinstance(value, str | os.PathLike) or not value or not Path(value).expanduser().exists():
            continue  # a hub id, or data given as rows: nothing on disk to protect
        other = _resolved(value)
        if out == other:
            relation = "is"
        elif other in out.parents:
            relation = "lies inside"
        elif out in other.parents:
            relation = "contains"
        else:
            continue
        raise ConfigError(f"{name} {getattr(cfg, name)} {relation} {key} {value}; a run there could overwrite or "
                          f"delete it: choose another {name}")


def writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def check_writable(out: Path) -> None:
    """The directory (or the nearest folder above it that exists, where it will be created) can be
    written: found now, not after the models have loaded."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"output_dir {out}: {probe} exists and is not a directory")
    if not writable(probe):
        where = "" if probe == out else f" (it would be created in {probe})"
        raise ConfigError(f"output_dir {out} is not writable{where}: check its permissions or choose another")


# ------------------------------------------------------------------------------------------ the record
class RunRecord:
    """``.prefopt-run.json``: the top-level names a prefopt run wrote, and the folder an earlier run
    was moved aside into (``aside``, with the names it held), if any."""

    def __init__(self, out: Path, entries=(), aside: dict | None = None):
        self.out = Path(out)
        self.entries: set[str] = set(entries)
        self.aside = aside

    @classmethod
    def read(cls, out: Path) -> RunRecord | None:
        path = Path(out) / RECORD_FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entries = [str(n) for n in data["entries"]]
            bad = [n for n in entries if n in ("", ".", "..") or "/" in n or os.sep in n]
            if bad:  # a record names entries of this directory only, never a path leading elsewhere
                raise ValueError(f"entry {bad[0]!r}")
            return cls(out, entries, data.get("aside"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}: unreadable run record ({e.__class__.__name__}: {e}); prefopt will not guess "
                              "what it may delete: move the directory's contents away or choose another "
                              "output_dir") from None

    def write(self) -> None:
        simulate_full_disk("record", len(self.entries))
        write_text_atomic(self.out / RECORD_FILE, json.dumps(
            {"prefopt_run": 1, "entries": sorted(self.entries), "aside": self.aside}, indent=1) + "\n")

    def add(self, *names: str) -> None:
        new = set(names) - self.entries
        if new:
            self.entries |= new
            self.write()

    def owns(self, name: str) -> bool:
        """A recorded name, or a temporary that prefopt's atomic writers make of one."""
        if name in self.entries or name in BOOKKEEPING:
            return True
        m = _ATOMIC_TMP.match(name)
        if m and m.group(1) in self.entries | {RECORD_FILE}:
            return True
        for prefix in TMP_PREFIXES:
            if name.startswith(prefix) and name[len(prefix):] in self.entries:
                return True
        return False


def contents(out: Path) -> list[str]:
    """The names in ``out`` other than the record and the lock."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name not in BOOKKEEPING)


def check_overwrite(out: Path, record: RunRecord | None) -> None:
    """Starting over in ``out`` is safe: a record says what is the run's, no link would be followed,
    and no foreign file would be overwritten by the new run."""
    names = contents(out)
    if record is None:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ConfigError(f"output_dir {out} holds files that no prefopt run recorded writing ({shown}); "
                          "--overwrite_output_dir deletes only what a run recorded: empty it yourself or "
                          "choose another output_dir")
    for name in names:
        path = out / name
        if path.is_symlink() and (may_write(name) or record.owns(name)):
            raise ConfigError(f"output_dir {out}: {name} is a symbolic link (to {os.readlink(path)}); prefopt neither "
                              "follows nor deletes links in a run directory: remove it or choose another output_dir")
        if not record.owns(name) and may_write(name):
            raise ConfigError(f"output_dir {out}: {name} was not written by a prefopt run and the new run would "
                              "overwrite it: move it away or choose another output_dir")


# ------------------------------------------------------------------------------------------ a run in it
class RunDirectory:
    """The output directory of the running run (main process). ``begin`` moves an earlier run
    aside; ``wrote`` records names before they are written; ``commit`` drops the earlier run once
    this one has something to show; ``abort`` puts the earlier run back."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.record = RunRecord(self.out)
        self.aside: Path | None = None
        self.old_record: RunRecord | None = None

    def begin(self, *, overwrite: bool, resume: bool) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        existing = RunRecord.read(self.out)
        if resume and existing is not None:
            self.record = existing  # a resumed run continues the same record
            return
        if not overwrite:
            self.record.write()
            return
        if existing is None:  # checked by the plan; the directory may have changed since
            check_overwrite(self.out, existing)
        self.old_record = existing
        names = [n for n in contents(self.out) if existing.owns(n)]
        aside = self.out / f"{ASIDE_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        # Recorded first, so a kill during the moves leaves every name accounted for.
        self.record = RunRecord(self.out, set(existing.entries) | {aside.name},
                                {"dir": aside.name, "entries": names})
        self.record.write()
        aside.mkdir()
        for name in names:
            os.replace(self.out / name, aside / name)
        self.record.entries = {aside.name}
        self.record.write()
        self.aside = aside

    def wrote(self, *names: str) -> None:
        self.record.add(*names)

    def commit(self) -> None:
        """The new run has a checkpoint or a model: the earlier run is no longer needed."""
        if self.aside is None:
            return
        shutil.rmtree(self.aside, ignore_errors=True)
        self.record.entries.discard(self.aside.name)
        self.record.aside = None
        self.record.write()
        self.aside = None

    def abort(self) -> None:
        """The new run failed before its first checkpoint: remove what it wrote, restore the earlier run."""
        if self.aside is None or self.old_record is None:
            return
        moved = self.record.aside["entries"] if self.record.aside else []
        for name in sorted(self.record.entries - {self.aside.name}):
            path = self.out / name
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
        for name in moved:
            if (self.aside / name).exists() or (self.aside / name).is_symlink():
                os.replace(self.aside / name, self.out / name)
        shutil.rmtree(self.aside, ignore_errors=True)
        self.old_record.write()
        self.aside = None
        print(f"prefopt: the earlier run in {self.out} was restored (the new run stopped before its first "
              "checkpoint)", file=sys.stderr)

    def install_model(self, staging: Path) -> None:
        """Move the final model's files from ``staging`` (written and flushed there) to the top of
        output_dir, recorded first. A file there that no prefopt run wrote is never replaced (the
        plan refuses the usual names up front; this catches an unusual tokenizer file name)."""
        for p in sorted(staging.iterdir()):
            dst = self.out / p.name
            if (dst.exists() or dst.is_symlink()) and not self.record.owns(p.name):
                print(f"prefopt: warning: kept {dst} (not written by prefopt); the model's {p.name} is in "
                      f"{staging}", file=sys.stderr)
                continue
            self.wrote(p.name)
            if p.is_dir() and dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            os.replace(p, dst)
        if not any(staging.iterdir()):
            staging.rmdir()


def move_files(staging: Path, out: Path) -> None:
    """Each entry of ``staging`` renamed to ``out`` (one atomic rename each: a name there is the old
    file or the new one, never half of one), then ``staging`` removed."""
    for src in sorted(staging.iterdir()):
        dst = out / src.name
        if src.is_dir() and dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(src, dst)
    if not any(staging.iterdir()):
        staging.rmdir()


def abandon(run_dir: RunDirectory | None, lock: RunLock | None) -> None:
    """A run that failed before its first checkpoint: what it wrote goes, the earlier run it moved
    aside comes back, then the directory's lock is freed (``None``: not taken yet, or not the main process)."""
    if run_dir is not None:
        run_dir.abort()
    if lock is not None:
        lock.release()


@contextmanager
def guarded(run_dir: RunDirectory | None, lock: RunLock | None) -> Iterator[None]:
    """The body of a started run: abandoned if it fails, the lock freed when it ends either way."""
    try:
        yield
    except BaseException:
        abandon(run_dir, lock)
        raise
    if lock is not None:
        lock.release()
