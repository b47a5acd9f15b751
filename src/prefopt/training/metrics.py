"""Where metrics go: ``metrics.jsonl`` (one JSON object per logged step) and the trackers of
``report_to`` through Accelerate's tracker API (TensorBoard, Weights & Biases, MLflow, Trackio,
Comet, Aim, ClearML, DVCLive, SwanLab), every one under the same metric names as metrics.jsonl.

``report_to`` follows TRL's convention: one name, a comma-separated list (a YAML list works too),
``all`` (every installed tracker), ``none``; ``auto`` (prefopt's default) is TensorBoard when it is
installed. A tracker asked for by name that is not installed is a ``ConfigError`` raised by
``resolve_trackers`` before any data is read.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from prefopt.errors import ConfigError, PrefoptError
from prefopt.io import FULL_DISK_ENV, simulate_full_disk

# The pip package that provides each tracker (the import name differs for some).
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny", "trackio": "trackio",
    "comet_ml": "comet-ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
}
DEFAULT_PROJECT = "prefopt"  # W&B project / MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say


def requested_trackers(report_to: str) -> list[str]:
    """The names in a ``report_to`` value (no availability check): ``"wandb, mlflow"`` ->
    ``["wandb", "mlflow"]``; ``none`` -> ``[]``; ``all`` and ``auto`` stay as they are."""
    names = [n.strip().lower() for n in str(report_to).split(",") if n.strip()]
    if not names or names == ["none"]:
        return []
    for n in names:
        if n not in TRACKER_PACKAGES and n not in ("all", "auto"):
            import difflib

            hint = difflib.get_close_matches(n, list(TRACKER_PACKAGES) + ["all", "none", "auto"], n=1)
            raise ConfigError(f"report_to: unknown tracker {n!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                              + f" (known: {', '.join(TRACKER_PACKAGES)}, all, none, auto)")
    if len(names) > 1 and ({"all", "auto", "none"} & set(names)):
        raise ConfigError(f"report_to: {report_to!r} mixes all/auto/none with tracker names; give one or the other")
    return names


def resolve_trackers(report_to: str) -> list[str]:
    """The trackers to start. Raises ``ConfigError`` (one line: what to install) for a tracker
    named explicitly whose package is missing; ``all``/``auto`` take what is installed."""
    names = requested_trackers(report_to)
    if not names:
        return []
    from accelerate.tracking import get_available_trackers

    available = [str(t) for t in get_available_trackers()]
    if names == ["auto"]:
        return ["tensorboard"] if "tensorboard" in available else []
    if names == ["all"]:
        return [n for n in TRACKER_PACKAGES if n in available]
    missing = [n for n in names if n not in available]
    if missing:
        packages = " ".join(TRACKER_PACKAGES[n] for n in missing)
        raise ConfigError(f"report_to: {', '.join(missing)} is not installed: pip install {packages} "
                          "(or drop it from report_to)")
    return list(dict.fromkeys(names))


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config as flat scalars every tracker accepts (TensorBoard's hparams take
    only bool/int/float/str): lists become comma-separated strings, None becomes ``"none"``."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, list | tuple):
            value = ",".join(str(v) for v in value)
        elif value is None:
            value = "none"
        elif not isinstance(value, bool | int | float | str):
            value = str(value)
        out[key] = value
    return out


def build_tracker(name: str, *, run_name: str, logging_dir: Path, purge_step: int | None = None):
    """One Accelerate tracker, configured so its files stay with the run: TensorBoard events in
    ``LOGGING_DIR/RUN_NAME``, W&B's run folder in ``LOGGING_DIR/wandb``, Aim's repository in
    ``LOGGING_DIR``; MLflow's store is the user's (``MLFLOW_TRACKING_URI``)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    cls = LOGGER_TYPE_TO_CLASS[name]
    project = DEFAULT_PROJECT
    if name == "tensorboard":
        # purge_step: a resumed run hides the events the killed run wrote after its checkpoint.
        kwargs = {"purge_step": purge_step} if purge_step is not None else {}
        return cls(run_name, str(logging_dir), **kwargs)
    if name == "wandb":
        logging_dir.mkdir(parents=True, exist_ok=True)
        return cls(os.environ.get("WANDB_PROJECT", project), name=run_name, dir=str(logging_dir))
    if name == "mlflow":
        return cls(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", project), run_name=run_name)
    if cls.requires_logging_directory:
        return cls(run_name, str(logging_dir))
    return cls(run_name)


class MetricsLogger:
    """``metrics.jsonl`` always (main process), and the ``report_to`` trackers once ``start`` is
    called with the run's hyperparameters."""

    def __init__(self, output_dir: str | Path, *, report_to: str = "auto", enabled: bool = True,
                 run_name: str | None = None, logging_dir: str | Path | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tracker_names = resolve_trackers(report_to) if enabled else []
        self.run_name = run_name or Path(output_dir).resolve().name
        self.logging_dir = Path(logging_dir) if logging_dir else Path(output_dir) / "runs"
        self.trackers: list = []
        self.purge_step: int | None = None

    def start(self, config: dict[str, Any] | None = None) -> None:
        """Start the trackers and log the resolved config as hyperparameters (once)."""
        if not self.enabled or self.trackers or not self.tracker_names:
            return
        for name in self.tracker_names:
            tracker = build_tracker(name, run_name=self.run_name, logging_dir=self.logging_dir,
                                    purge_step=self.purge_step)
            try:
                tracker.start()
            except Exception as e:  # a tracker's own setup (server, store, login): one line, not a traceback
                self.close()
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise PrefoptError(f"report_to: {name} could not start: {first}") from None
            self.trackers.append(tracker)
        if config is not None:
            params = hyperparameters(config)
            for tracker in self.trackers:
                tracker.store_init_configuration(params)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _json_number(v) for k, v in row.items()}
        append_line(self.path, json.dumps(clean) + "\n", step=int(row.get("step", 0)))
        if self.trackers:
            step = int(row.get("step", 0))
            # The same names as metrics.jsonl; a null (non-finite) value is left out.
            values = {k: v for k, v in clean.items() if k != "step" and isinstance(v, int | float)
                      and not isinstance(v, bool)}
            for tracker in self.trackers:
                tracker.log(values, step=step)

    def purge_after(self, step: int) -> None:
        """A resumed run: TensorBoard hides the events past ``step`` that the killed run wrote
        (its ``purge_step``). Called before ``start``; a started TensorBoard writer is reopened."""
        self.purge_step = step + 1
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                tracker.writer.close()
                tracker.writer = SummaryWriter(tracker.logging_dir, purge_step=self.purge_step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def append_line(path: Path, line: str, *, step: int | None = None) -> None:
    """Append one whole line or nothing: a failed write (a full disk) cuts the file back to its
    earlier rows, so no half-written line is left for a resumed run to trip over. Unbuffered, so
    nothing is left in a buffer to be flushed (and fail again) later."""
    data = line.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            if os.environ.get(FULL_DISK_ENV) == f"metrics:{step}":
                os.write(fd, data[: len(data) // 2])  # tests: half the line lands, as on a disk that fills up
            simulate_full_disk("metrics", step)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            try:
                os.ftruncate(fd, size)
            except OSError:  # pragma: no cover - cannot even shrink it: a resume drops a torn last line
                pass
            raise
    finally:
        os.close(fd)


def _json_number(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a null is visible and parseable
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# The metrics the end-of-run summary shows, in this order, when present (DPO family and reward models).
SUMMARY_KEYS = ("loss", "rewards/accuracies", "accuracy", "rewards/margins", "rewards/chosen", "rewards/rejected")


def format_duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _metric_text(row: dict[str, Any], prefix: str = "") -> str:
    parts = []
    for key in SUMMARY_KEYS:
        value = row.get(prefix + key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            parts.append(f"{key} {value:.4f}")
    return ", ".join(parts)


def run_summary(final: dict[str, Any], *, steps: int, seconds: float, output_dir: str | Path,
                what: str = "model", extra_dirs: dict[str, str | Path] | None = None) -> list[str]:
    """The end-of-run lines: steps and wall time, the final train and eval metrics, where the
    model and the run's files are."""
    lines = [f"prefopt: done: {steps} steps in {format_duration(seconds)}"]
    train = _metric_text(final)
    if train:
        lines.append(f"prefopt: final train (last logged window): {train}")
    held_out = _metric_text(final, "eval/")
    if held_out:
        lines.append(f"prefopt: final eval: {held_out}")
    lines.append(f"prefopt: {what} saved to {output_dir}")
    for name, path in (extra_dirs or {}).items():
        lines.append(f"prefopt: {name} saved to {path}")
    lines.append(f"prefopt: metrics in {Path(output_dir) / 'metrics.jsonl'}; model card {Path(output_dir) / 'README.md'}")
    return lines
