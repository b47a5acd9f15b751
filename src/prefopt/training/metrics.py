"""Where metrics go: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard when
installed, and the progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from prefopt.errors import ConfigError


class MetricsLogger:
    def __init__(self, output_dir: str | Path, *, report_to: str = "auto", enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        self.tb_dir: Path | None = None
        self._purge_step: int | None = None
        if enabled and report_to in ("auto", "tensorboard"):
            try:  # optional: tensorboard is not a requirement
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                if report_to == "tensorboard":
                    raise ConfigError("report_to: tensorboard needs the `tensorboard` package") from None
            else:
                # Opened at the first row, not here: the trainer is built before the output directory
                # is prepared, and creating tensorboard/ then would write into an earlier run.
                self.tb_dir = Path(output_dir) / "tensorboard"

    def _writer(self):
        if self.tb is None and self.tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            kwargs = {"purge_step": self._purge_step} if self._purge_step is not None else {}
            self.tb = SummaryWriter(log_dir=str(self.tb_dir), **kwargs)
        return self.tb

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _json_number(v) for k, v in row.items()}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")
        if self._writer() is not None:
            step = int(row.get("step", 0))
            for key, value in clean.items():
                if key != "step" and isinstance(value, int | float) and value is not None:
                    self.tb.add_scalar(key if "/" in key else f"train/{key}", value, step)

    def purge_after(self, step: int) -> None:
        """A resumed run: hide TensorBoard events past ``step`` that the killed run wrote
        (TensorBoard's own ``purge_step`` mechanism, applied when the writer opens)."""
        self._purge_step = step + 1
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _json_number(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a null is visible and parseable
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
