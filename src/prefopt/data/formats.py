"""Convert rows of any supported shape into PreferencePair records, validating every field.

Formats (``dataset_format``; ``auto`` looks at the columns of the first row):

- ``explicit``: ``prompt``, ``chosen``, ``rejected`` strings (+ optional ``score_chosen``/``score_rejected``).
- ``implicit``: only ``chosen``/``rejected`` full texts; the prompt is their shared prefix, cut at the
  last assistant turn marker, else at a whitespace boundary (never mid-word).
- ``conversational``: ``prompt``/``chosen``/``rejected`` as lists of ``{role, content}`` messages,
  rendered with the tokenizer's chat template; without ``prompt`` the shared message prefix is it.
- ``rated``: ``prompt``, ``responses`` (list), ``scores`` or ``rewards`` (list): every two responses
  with different scores make a pair, the higher-scored one chosen, both scores kept.
- ``scored_responses``: one response per row (``prompt``, ``text``/``response``/``completion``,
  ``reward``/``score``), grouped by prompt and expanded like ``rated`` (the IMDb file's shape).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from prefopt.data.records import PreferencePair
from prefopt.data.sources import RawRows, decode_list_cells, read_rows
from prefopt.errors import DataError, PrefoptError

FORMATS = ("explicit", "implicit", "conversational", "rated", "scored_responses")
TURN_MARKERS = ("\n\nAssistant:", "Assistant:", "<|im_start|>assistant\n", "[/INST]", "<start_of_turn>model\n")
RESPONSE_KEYS = ("text", "response", "completion")
SCORE_KEYS = ("reward", "score")


@dataclass
class Columns:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    score_chosen: str = "score_chosen"
    score_rejected: str = "score_rejected"
    responses: str = "responses"
    scores: str = "scores"

    @classmethod
    def from_config(cls, cfg: Any) -> Columns:
        return cls(**{k: getattr(cfg, f"{k}_column") for k in cls.__dataclass_fields__})


@dataclass
class LoadStats:
    """What happened to the rows of one file; printed and saved with the run."""

    source: str
    format: str
    rows_read: int = 0
    pairs: int = 0
    dropped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "format": self.format, "rows_read": self.rows_read,
                "pairs": self.pairs, "dropped": dict(self.dropped)}


def load_pairs(
    spec,
    *,
    split: str = "train",
    fmt: str = "auto",
    columns: Columns | None = None,
    tokenizer: Any = None,
) -> tuple[list[PreferencePair], LoadStats]:
    """Read a dataset and return its preference pairs in input order, plus what was dropped.

    ``spec``: a file (.jsonl/.json/.parquet/.csv), a ``save_to_disk`` directory, a hub id, or rows
    in memory (a list of dicts, a ``datasets.Dataset``). Bad rows raise ``DataError`` naming the
    source, the row and the field."""
    raw = read_rows(spec, split)
    return rows_to_pairs(raw, fmt=fmt, columns=columns or Columns(), tokenizer=tokenizer)


def rows_to_pairs(
    raw: RawRows, *, fmt: str = "auto", columns: Columns | None = None, tokenizer: Any = None
) -> tuple[list[PreferencePair], LoadStats]:
    columns = columns or Columns()
    if len(raw) == 0:
        raise DataError(raw.source, None, None, "the dataset is empty")
    if fmt == "auto":
        fmt = detect_format(raw, columns)
    if fmt not in FORMATS:
        raise PrefoptError(f"unknown dataset_format {fmt!r}; choose auto or one of {', '.join(FORMATS)}")
    stats = LoadStats(raw.source, fmt)
    pairs = convert_rows(raw, fmt, columns, tokenizer, stats)
    check_some_pairs(stats)
    return pairs, stats


def convert_rows(raw: RawRows, fmt: str, columns: Columns, tokenizer: Any, stats: LoadStats) -> list[PreferencePair]:
    """The pairs of ``raw`` in format ``fmt`` (not ``auto``), counted into ``stats``. Rows may come
    in pieces: every format but ``scored_responses`` (which groups rows by prompt across the file)
    converts each row on its own, so converting the pieces in order gives the same pairs."""
    raw = decode_list_cells(raw, list_columns(fmt, columns))
    reader = _RowReader(raw, columns, tokenizer, stats)
    pairs = {
        "explicit": reader.explicit,
        "implicit": reader.implicit,
        "conversational": reader.conversational,
        "rated": reader.rated,
        "scored_responses": reader.scored_responses,
    }[fmt]()
    stats.rows_read += len(raw)
    stats.pairs += len(pairs)
    return pairs


def check_some_pairs(stats: LoadStats) -> None:
    if not stats.pairs:
        raise DataError(stats.source, None, None, f"no preference pairs in the dataset ({_dropped_text(stats)})")


def list_columns(fmt: str, c: Columns) -> list[str]:
    """The columns a format defines as lists (the only CSV cells decoded from JSON)."""
    if fmt == "rated":
        return [c.responses, c.scores, "rewards"]
    if fmt == "conversational":
        return [c.prompt, c.chosen, c.rejected]
    return []


def _dropped_text(stats: LoadStats) -> str:
    if not stats.dropped:
        return f"{stats.rows_read} rows read"
    return f"{stats.rows_read} rows read; dropped: " + ", ".join(f"{n} {why}" for why, n in stats.dropped.items())


def detect_format(raw: RawRows, c: Columns) -> str:
    row_no, first = raw.rows[0]
    keys = set(first)
    if c.responses in keys:
        return "rated"
    if c.chosen in keys and c.rejected in keys:
        if isinstance(first[c.chosen], list):
            return "conversational"
        return "explicit" if c.prompt in keys else "implicit"
    if c.prompt in keys and any(k in keys for k in RESPONSE_KEYS) and any(k in keys for k in SCORE_KEYS):
        return "scored_responses"
    missing = c.chosen if c.chosen not in keys else c.rejected
    found = ", ".join(sorted(map(str, keys))) or "none"
    raise DataError(
        raw.source, row_no, missing,
        f"missing; expected columns {c.prompt}/{c.chosen}/{c.rejected} or {c.prompt}/{c.responses}/{c.scores} "
        f"(found: {found})",
        raw.row_label,
    )


class _RowReader:
    """Field access with errors that name the file, the row and the field."""

    def __init__(self, raw: RawRows, columns: Columns, tokenizer: Any, stats: LoadStats):
        self.raw, self.c, self.tokenizer, self.stats = raw, columns, tokenizer, stats

    def error(self, row: int, fieldname: str | None, problem: str) -> DataError:
        return DataError(self.raw.source, row, fieldname, problem, self.raw.row_label)

    def get(self, row_no: int, row: dict, key: str) -> Any:
        if key not in row:
            found = ", ".join(sorted(map(str, row))) or "none"
            return _raise(self.error(row_no, key, f"missing (row has: {found})"))
        return row[key]

    def text(self, row_no: int, row: dict, key: str, allow_empty: bool = False) -> str:
        value = self.get(row_no, row, key)
        if not isinstance(value, str):
            raise self.error(row_no, key, f"expected a string, got {_type_name(value)}")
        if not allow_empty and not value.strip():
            raise self.error(row_no, key, "is empty")
        return self.unicode(row_no, key, value)

    def unicode(self, row_no: int, key: str, value: str) -> str:
        """Text a tokenizer can take: a lone UTF-16 surrogate (JSON's "\\ud800") is not a character."""
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise self.error(row_no, key, f"not valid Unicode text (a lone surrogate {value[e.start]!r} at "
                                          f"character {e.start})") from None
        return value

    def number(self, row_no: int, value: Any, key: str) -> float:
        if isinstance(value, bool) or value is None:
            raise self.error(row_no, key, f"expected a number, got {_type_name(value)}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise self.error(row_no, key, f"expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise self.error(row_no, key, f"must be finite, got {out}")
        return out

    def optional_score(self, row_no: int, row: dict, key: str) -> float | None:
        value = row.get(key)
        if value is None or value == "":
            return None
        return self.number(row_no, value, key)

    def pair(self, row_no, prompt, chosen, rejected, s_w=None, s_l=None, templated=False) -> PreferencePair:
        if chosen == rejected:
            raise self.error(row_no, self.c.rejected, "is identical to the chosen response")
        if (s_w is None) != (s_l is None):
            missing = self.c.score_rejected if s_l is None else self.c.score_chosen
            raise self.error(row_no, missing, "missing while the other score is given")
        return PreferencePair(prompt, chosen, rejected, s_w, s_l, self.raw.source, row_no,
                              self.raw.row_label, templated)

    # ---- formats ----
    def explicit(self) -> list[PreferencePair]:
        c, out = self.c, []
        for row_no, row in self.raw:
            out.append(self.pair(
                row_no,
                self.text(row_no, row, c.prompt),
                self.text(row_no, row, c.chosen),
                self.text(row_no, row, c.rejected),
                self.optional_score(row_no, row, c.score_chosen),
                self.optional_score(row_no, row, c.score_rejected),
            ))
        return out

    def implicit(self) -> list[PreferencePair]:
        c, out = self.c, []
        for row_no, row in self.raw:
            chosen, rejected = self.text(row_no, row, c.chosen), self.text(row_no, row, c.rejected)
            if chosen == rejected:
                raise self.error(row_no, c.rejected, "is identical to the chosen response")
            cut = shared_prompt_length(chosen, rejected)
            if cut == 0:
                raise self.error(row_no, c.chosen, "chosen and rejected share no prompt prefix (implicit format)")
            out.append(self.pair(
                row_no, chosen[:cut], chosen[cut:], rejected[cut:],
                self.optional_score(row_no, row, c.score_chosen),
                self.optional_score(row_no, row, c.score_rejected),
            ))
        return out

    def conversational(self) -> list[PreferencePair]:
        c, out = self.c, []
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise PrefoptError(
                f"{self.raw.source}: conversational data needs a tokenizer with a chat template"
            )
        for row_no, row in self.raw:
            chosen = self.messages(row_no, row, c.chosen)
            rejected = self.messages(row_no, row, c.rejected)
            if c.prompt in row:
                prompt = self.messages(row_no, row, c.prompt)
            else:
                n = 0
                while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                    n += 1
                if n == 0:
                    raise self.error(row_no, c.chosen, "chosen and rejected share no prompt messages")
                prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
            prompt_text = self.render(row_no, c.prompt, prompt, add_generation_prompt=True)
            texts = []
            for key, completion in ((c.chosen, chosen), (c.rejected, rejected)):
                full = self.render(row_no, key, prompt + completion)
                if not full.startswith(prompt_text):
                    raise self.error(row_no, key, "the chat template does not render the prompt as a prefix")
                texts.append(full[len(prompt_text):])
            out.append(self.pair(
                row_no, prompt_text, texts[0], texts[1],
                self.optional_score(row_no, row, c.score_chosen),
                self.optional_score(row_no, row, c.score_rejected),
                templated=True,
            ))
        return out

    def render(self, row_no: int, key: str, messages: list[dict[str, str]], **kwargs) -> str:
        """The tokenizer's chat template applied to ``messages``; a template that raises (a Jinja
        error, ``raise_exception`` on a role order it refuses) names the row."""
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        except Exception as e:  # jinja2 errors and whatever the template raises
            text = str(e).strip().splitlines()
            raise self.error(row_no, key, f"the chat template failed: {type(e).__name__}: "
                                          f"{text[0] if text else '(no message)'}") from None

    def messages(self, row_no: int, row: dict, key: str) -> list[dict[str, str]]:
        value = self.get(row_no, row, key)
        if isinstance(value, str):
            value = [{"role": "assistant" if key != self.c.prompt else "user", "content": value}]
        if not isinstance(value, list) or not value:
            raise self.error(row_no, key, f"expected a non-empty list of messages, got {_type_name(value)}")
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise self.error(row_no, f"{key}[{i}]", "expected a message {'role': str, 'content': str}")
            if not m["content"].strip():
                raise self.error(row_no, f"{key}[{i}].content", "is empty")
            self.unicode(row_no, f"{key}[{i}].content", m["content"])
            self.unicode(row_no, f"{key}[{i}].role", m["role"])
        return [{"role": m["role"], "content": m["content"]} for m in value]

    def rated(self) -> list[PreferencePair]:
        c, out = self.c, []
        for row_no, row in self.raw:
            prompt = self.text(row_no, row, c.prompt)
            responses = self.get(row_no, row, c.responses)
            score_key = c.scores if c.scores in row or "rewards" not in row else "rewards"
            scores = self.get(row_no, row, score_key)
            if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
                raise self.error(row_no, c.responses, "expected a list of strings")
            for i, r in enumerate(responses):
                self.unicode(row_no, f"{c.responses}[{i}]", r)
            if not isinstance(scores, list):
                raise self.error(row_no, score_key, f"expected a list of numbers, got {_type_name(scores)}")
            if len(scores) != len(responses):
                raise self.error(
                    row_no, score_key, f"has {len(scores)} scores for {len(responses)} responses"
                )
            values = [self.number(row_no, s, f"{score_key}[{i}]") for i, s in enumerate(scores)]
            out.extend(self._expand(row_no, prompt, responses, values))
        return out

    def scored_responses(self) -> list[PreferencePair]:
        c = self.c
        groups: dict[str, tuple[int, list[str], list[float]]] = {}
        for row_no, row in self.raw:
            prompt = self.text(row_no, row, c.prompt)
            text_key = next((k for k in RESPONSE_KEYS if k in row), RESPONSE_KEYS[0])
            score_key = next((k for k in SCORE_KEYS if k in row), SCORE_KEYS[0])
            text = self.text(row_no, row, text_key, allow_empty=True)
            score = self.number(row_no, self.get(row_no, row, score_key), score_key)
            first_row, texts, scores = groups.setdefault(prompt, (row_no, [], []))
            texts.append(text)
            scores.append(score)
        out = []
        for prompt, (row_no, texts, scores) in groups.items():
            out.extend(self._expand(row_no, prompt, texts, scores))
        return out

    def _expand(self, row_no: int, prompt: str, responses: list[str], scores: list[float]) -> list[PreferencePair]:
        """Every two responses with different scores, in index order, the higher-scored one chosen.

        Rated data holds *samples*, not curated pairs: an empty sample (a generation that produced
        nothing) is dropped and counted rather than stopping the run."""
        out = []
        empty = [i for i, r in enumerate(responses) if not r.strip()]
        if empty:
            self.stats.dropped["empty responses"] += len(empty)
            keep = [i for i in range(len(responses)) if i not in empty]
            responses, scores = [responses[i] for i in keep], [scores[i] for i in keep]
        for i in range(len(responses)):
            for j in range(i + 1, len(responses)):
                if scores[i] == scores[j]:
                    self.stats.dropped["tied scores"] += 1
                    continue
                w, lo = (i, j) if scores[i] > scores[j] else (j, i)
                if responses[w] == responses[lo]:
                    self.stats.dropped["identical responses"] += 1
                    continue
                out.append(PreferencePair(prompt, responses[w], responses[lo], scores[w], scores[lo],
                                          self.raw.source, row_no, self.raw.row_label))
        return out


def shared_prompt_length(chosen: str, rejected: str) -> int:
    """Length of the implicit prompt: the shared prefix, cut after the last turn marker in it, else
    before its last whitespace run (so a response starts at a word, as BPE tokenizers expect)."""
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    common = chosen[:n]
    marker_end = max((common.rfind(m) + len(m) if m in common else -1) for m in TURN_MARKERS)
    if marker_end > 0:
        return marker_end
    cut = n
    if n < limit or n == len(chosen) or n == len(rejected):
        # the prefix ends inside a word (or one response ends there): back up to a word boundary
        while cut > 0 and not common[cut - 1].isspace():
            cut -= 1
    while cut > 0 and common[cut - 1].isspace():
        cut -= 1
    return cut


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _raise(err: Exception):
    raise err
