"""Scorers: the ground-truth reward of ``prefopt eval`` and ``prefopt demo``.

A scorer is a callable ``score(texts: list[str]) -> list[float]`` taking full texts (prompt +
completion). ``load_scorer(spec)`` turns a command-line spec into one; it is a small dispatch so
that new kinds of spec (reward-model directories) are one more branch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from prefopt.errors import PrefoptError

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
    import json

    config = Path(directory) / "config.json"
    architectures = json.loads(config.read_text()).get("architectures") or [] if config.is_file() else []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise PrefoptError(
            f"scorer {directory!r}: not a reward model directory (expected a *ForSequenceClassification "
            "model saved by `prefopt reward train`)"
        )
    from prefopt.reward_model import reward_model_scorer

    return _checked(reward_model_scorer(directory), directory)


def _python_scorer(spec: str) -> Scorer:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise PrefoptError(f"scorer {spec!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PrefoptError(f"scorer {spec!r}: cannot import {module_name!r}: {e}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise PrefoptError(f"scorer {spec!r}: {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise PrefoptError(f"scorer {spec!r}: {attr!r} is not callable")
    return _checked(fn, spec)


def _checked(fn: Callable, spec: str) -> Scorer:
    """Wrap a user's callable so a wrong return shape is a clear error, not a crash later."""

    def score(texts: list[str]) -> list[float]:
        out = list(fn(list(texts)))
        if len(out) != len(texts):
            raise PrefoptError(f"scorer {spec!r} returned {len(out)} scores for {len(texts)} texts")
        try:
            return [float(s) for s in out]
        except (TypeError, ValueError):
            raise PrefoptError(f"scorer {spec!r} returned a non-number score") from None

    return score
