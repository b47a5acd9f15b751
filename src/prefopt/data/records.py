"""The one record type every input format is converted into, once, at the edge."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    score_chosen: float | None = None
    score_rejected: float | None = None
    # Where the pair came from, so any later problem can still name the file and row.
    source: str = ""
    row: int = 0
    row_label: str = "row"
    # True when the prompt text was rendered by a chat template that already holds BOS and the
    # like: the tokenizer must then add no special tokens of its own.
    templated: bool = False

    @property
    def has_scores(self) -> bool:
        return self.score_chosen is not None and self.score_rejected is not None

    @property
    def where(self) -> str:
        return f"{self.source}, {self.row_label} {self.row}"
