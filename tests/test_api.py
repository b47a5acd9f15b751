"""The public Python API: the README's notebook example runs as it stands, and its results are right."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.slow


def notebook_example() -> str:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- notebook example[^>]*-->\n```python\n(.*?)```", text, re.DOTALL)
    assert block, "README has no notebook example block"
    return block.group(1)


def test_the_readme_notebook_example_runs(tmp_path, monkeypatch):
    import prefopt
    from prefopt.losses.preference import LOSSES

    monkeypatch.chdir(tmp_path)
    LOSSES.pop("my_margin_hinge", None)  # the example registers it
    scope: dict = {}
    try:
        exec(compile(notebook_example(), "README.md", "exec"), scope)
        # trained: the run wrote a transformers model, and ODPO learned the easy preferences
        assert (tmp_path / "runs/notebook/odpo/model.safetensors").exists()
        assert scope["metrics"]["rewards/accuracies"] > 0.9
        assert math.isfinite(scope["rm_metrics"]["loss"])
        assert (tmp_path / "runs/notebook/rm/config.json").exists()
        # the loss by hand: h = (-4 - -5) - (-6 - -5) = 2, delta = log(0.9 - 0.2)
        z = 0.1 * 2.0 - math.log(0.7)
        assert float(scope["losses"][0]) == pytest.approx(-math.log(1 / (1 + math.exp(-z))), abs=1e-6)
        assert "my_margin_hinge" in LOSSES and LOSSES["my_margin_hinge"].takes_offset
        assert len(scope["pairs"]) == scope["stats"].pairs == 64
        assert set(prefopt.__all__) >= {"TrainConfig", "train", "train_reward_model", "preference_loss",
                                        "register_loss", "load_pairs", "PreferencePair"}
    finally:
        LOSSES.pop("my_margin_hinge", None)


def test_in_memory_rows_give_errors_that_name_the_row():
    import prefopt

    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": 3, "rejected": "c"}]
    with pytest.raises(prefopt.DataError, match=r"<in-memory dataset>, row 2, field 'chosen'"):
        prefopt.load_pairs(rows)


def test_a_datasets_dataset_reads_like_the_same_rows_in_a_list():
    import datasets

    import prefopt
    from prefopt.toy import easy_preferences

    rows = easy_preferences(12, seed=2)
    from_list, stats = prefopt.load_pairs(rows)
    from_dataset, _ = prefopt.load_pairs(datasets.Dataset.from_list(rows))
    assert from_list == from_dataset and stats.pairs == 12
    with pytest.raises(prefopt.PrefoptError, match="no split 'test'"):
        prefopt.load_pairs(datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}), split="test")
