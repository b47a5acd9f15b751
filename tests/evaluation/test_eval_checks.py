"""``prefopt eval`` never writes a bare NaN and never counts one as a loss."""

from __future__ import annotations

import json
import math
import sys

import pytest

from prefopt.evaluation.policy import finite_json, run_eval, win_rate


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_win_rate_refuses_nan_instead_of_counting_it_as_a_loss():
    assert win_rate([1.0, 0.0, 2.0, 1.0], [0.5, 0.5, 2.0, 3.0]) == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    with pytest.raises(ValueError, match="finite"):
        win_rate([1.0, math.nan], [0.5, 0.5])


def test_finite_json_replaces_every_non_finite_number():
    value = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": 2}
    assert finite_json(value) == {"a": None, "b": [1.0, None, {"c": None}], "d": 2}


@pytest.mark.slow
def test_eval_files_are_strict_json_even_with_a_single_sample(tiny_llama, tmp_path, monkeypatch):
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "eval_check_scorer.py").write_text("def length(texts):\n    return [len(t) for t in texts]\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mod"))
    (tmp_path / "p.txt").write_text("the movie was\n")
    results = run_eval([str(tiny_llama)], str(tiny_llama), prompts=str(tmp_path / "p.txt"),
                       scorer="eval_check_scorer:length", num_samples=1, max_new_tokens=3,
                       output_dir=str(tmp_path / "out"))
    assert math.isnan(results[0]["kl_stderr"])  # one sample: no standard error
    written = _strict((tmp_path / "out" / f"eval_{tiny_llama.name}.json").read_text())
    assert written["kl_stderr"] is None and written["reward"] == results[0]["reward"]
    assert "eval_check_scorer" in sys.modules
