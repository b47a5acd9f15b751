"""`prefopt eval --prompts` takes the prompts out of any file the training data path reads."""

from __future__ import annotations

import json

import pytest

from prefopt.errors import DataError
from prefopt.evaluation.policy import read_prompts


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prompts_from_every_preference_format(tmp_path):
    hh = _jsonl(tmp_path / "hh.jsonl", [  # Anthropic HH: no prompt column, the prompt is the shared start
        {"chosen": "\n\nHuman: Is tea hot?\n\nAssistant: Usually, yes.",
         "rejected": "\n\nHuman: Is tea hot?\n\nAssistant: No idea."},
        {"chosen": "\n\nHuman: Name a fruit.\n\nAssistant: An apple.",
         "rejected": "\n\nHuman: Name a fruit.\n\nAssistant: A chair."},
    ])
    assert read_prompts(hh) == ["\n\nHuman: Is tea hot?\n\nAssistant:", "\n\nHuman: Name a fruit.\n\nAssistant:"]
    explicit = _jsonl(tmp_path / "pairs.jsonl", [  # a prompt repeated over pairs is evaluated once
        {"prompt": "p1", "chosen": "a", "rejected": "b"}, {"prompt": "p2", "chosen": "a", "rejected": "b"},
        {"prompt": "p1", "chosen": "c", "rejected": "d"}])
    assert read_prompts(explicit) == ["p1", "p2"]
    rated = _jsonl(tmp_path / "rated.jsonl", [{"prompt": "q", "responses": ["a", "b", "c"], "scores": [1, 2, 3]}])
    assert read_prompts(rated) == ["q"]
    only = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "x"}, {"prompt": "y"}])
    assert read_prompts(only) == ["x", "y"]
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["one", "two"]


def test_a_bad_row_is_named(tmp_path):
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                          {"prompt": "p", "chosen": "a", "rejected": 3}])
    with pytest.raises(DataError, match="bad.jsonl, line 2, field 'rejected'"):
        read_prompts(bad)
