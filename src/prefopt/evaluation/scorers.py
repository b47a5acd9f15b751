"""Scorers: the ground-truth reward of ``prefopt eval`` and ``prefopt demo``.

A scorer is a callable ``score(texts: list[str]) -> list[float]`` taking full texts (prompt +
completion). ``load_scorer(spec)`` turns a command-line spec into one; it is a small dispatch so
that new kinds of spec (reward-model directories) are one more branch.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
from collections.abc import Callable
from pathlib import Path

import yaml

from prefopt.config import TrainConfig
from prefopt.data.responses import ResponseItem, tokenize_responses
from prefopt.errors import PrefoptError
from prefopt.modeling.load import load_tokenizer
from prefopt.modeling.reward_model import device_for_inference, load_reward_model, score_sequences

Scorer = Callable[[list[str]], list[float]]


def load_scorer(spec: str) -> Scorer:
    """``module:function`` -> that callable (it must map a list of texts to as many floats);
    a directory holding a reward model (``prefopt reward train``) -> its scores."""
    if Path(spec).is_dir():
        return _reward_model_scorer(spec)
    if ":" in spec:
        return _python_scorer(spec)
    raise PrefoptError(
        f"unknown scorer {spec!r}: expected module:function (a Python callable from texts to scores) "
        "or a reward-model directory"
    )


def _reward_model_scorer(directory: str) -> Scorer:
    config = Path(directory) / "config.json"
    architectures = json.loads(config.read_text()).get("architectures") or [] if config.is_file() else []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise PrefoptError(
            f"scorer {directory!r}: not a reward model directory (expected a *ForSequenceClassification "
            "model saved by `prefopt reward train`)"
        )
    return _checked(reward_model_scorer(directory), directory)


def _python_scorer(spec: str) -> Scorer:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise PrefoptError(f"scorer {spec!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises while it is imported
        raise PrefoptError(f"scorer {spec!r}: cannot import {module_name!r}: {type(e).__name__}: {_first_line(e)}"
                           ) from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise PrefoptError(f"scorer {spec!r}: {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise PrefoptError(f"scorer {spec!r}: {attr!r} is not callable")
    return _checked(fn, spec)


def _checked(fn: Callable, spec: str) -> Scorer:
    """Wrap a user's callable so that anything but one finite number per text (an exception, None,
    a bare number, a string, NaN, inf) is one clear error naming the scorer, not a crash later or a
    NaN in the results."""

    def score(texts: list[str]) -> list[float]:
        try:
            out = fn(list(texts))
        except PrefoptError:
            raise
        except Exception as e:
            raise PrefoptError(f"scorer {spec!r} raised {type(e).__name__}: {_first_line(e)}") from None
        if out is None or isinstance(out, str | bytes | dict) or not hasattr(out, "__iter__"):
            raise PrefoptError(f"scorer {spec!r} returned {_kind(out)}, expected a list of {len(texts)} numbers")
        out = list(out)
        if len(out) != len(texts):
            raise PrefoptError(f"scorer {spec!r} returned {len(out)} scores for {len(texts)} texts")
        return [_finite_score(v, i, spec) for i, v in enumerate(out)]

    return score


def _finite_score(value, i: int, spec: str) -> float:
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()  # a numpy or torch scalar
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise PrefoptError(f"scorer {spec!r} returned {_kind(value)} for text {i}, expected a number")
    out = float(value)
    if not math.isfinite(out):
        raise PrefoptError(f"scorer {spec!r} returned a non-finite score ({out}) for text {i}")
    return out


def _kind(value) -> str:
    return "None" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _saved_lengths(path: str | Path) -> tuple[int, int | None]:
    """``max_length``/``max_prompt_length`` the reward model was trained with (its config.yaml),
    else the TrainConfig defaults."""
    defaults = TrainConfig()
    cfg_file = Path(path) / "config.yaml"
    if cfg_file.is_file():
        try:
            saved = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            saved = {}
        if isinstance(saved, dict):
            return int(saved.get("max_length", defaults.max_length)), saved.get(
                "max_prompt_length", defaults.max_prompt_length
            )
    return defaults.max_length, defaults.max_prompt_length


def reward_model_scorer(path: str | Path, *, batch_size: int = 16, device=None) -> Callable[[list[str]], list[float]]:
    """A scorer for ``prefopt eval --scorer``: ``scorer(texts) -> rewards``, one float per text.

    Each text is scored as one whole sequence (prompt and response together, as the model saw them
    in training): BOS when the tokenizer adds one, EOS appended, cut to the ``max_length`` the model
    was trained with."""
    tokenizer = load_tokenizer(str(path))
    model = load_reward_model(str(path), pad_token_id=tokenizer.pad_token_id, trained_head=True)
    device = device or device_for_inference()
    model.to(device)
    max_length, max_prompt_length = _saved_lengths(path)

    def scorer(texts: list[str]) -> list[float]:
        encoded, _ = tokenize_responses([ResponseItem("", t) for t in texts], tokenizer,
                                        max_length=max_length, max_prompt_length=max_prompt_length)
        return score_sequences(model, [p + r for p, r in encoded], pad_token_id=tokenizer.pad_token_id,
                               batch_size=batch_size, device=device)

    return scorer
