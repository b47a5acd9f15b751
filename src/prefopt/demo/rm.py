"""The reward-model stage of ``prefopt demo``: from noisy labels to learned ODPO offsets.

Everything goes through the functions behind the ``prefopt reward`` commands:
``train_reward_model`` (``reward train``), ``evaluate_rewarder`` (``reward eval``) and
``score_dataset`` (``reward score``), configured with a ``TrainConfig`` like ``prefopt train``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
from pathlib import Path
from typing import Any

from prefopt.config import TrainConfig
from prefopt.evaluation.rewarders import ModelRewarder, evaluate_rewarder, score_dataset
from prefopt.recipes import train_reward_model
from prefopt.toy import write_jsonl


def reward_model_stage(rm_dir: Path, sft_dir: Path, files: dict[str, Path], scored: dict[str, Path], *,
                       settings, progress: bool) -> dict[str, Any]:
    """Train a BT reward model from the SFT model on ``files["train_noisy"]``, evaluate it on the
    held-out pairs (``files["heldout"]``: labelled by the ground-truth scorer; ``files["heldout_noisy"]``:
    labelled by the noisy annotators), then write the reward model's scores into
    ``scored["train"]`` (the noisy training pairs) and ``scored["heldout"]`` (the held-out pairs).
    ``scored["train_agreed"]`` gets the noisy training pairs whose label the reward model agrees
    with (``score_chosen > score_rejected``, the pairs ODPO keeps), without scores: the control run
    that separates ODPO's filtering from its offsets.

    Returns the numbers of the report's ``reward_model`` section."""

    s = settings
    shutil.rmtree(rm_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
    cfg = TrainConfig(
        model_name_or_path=str(sft_dir), dataset=str(files["train_noisy"]), eval_dataset=str(files["heldout"]),
        learning_rate=s.rm_learning_rate, per_device_train_batch_size=s.batch_size, per_device_eval_batch_size=64,
        num_train_epochs=s.rm_epochs, warmup_steps=0, lr_scheduler_type="linear", seed=s.seed,
        max_length=64, max_prompt_length=32, output_dir=str(rm_dir), logging_steps=5, save_steps=0,
        report_to="none", progress_bar=progress, eval_max_pairs=None,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the demo reports its own stages, not the run's summary
        last = train_reward_model(cfg)
    rewarder = ModelRewarder(str(rm_dir), batch_size=64, progress=progress)
    clean = evaluate_rewarder(dataclasses.replace(cfg, dataset=str(files["heldout"])), rewarder,
                              output=rm_dir / "eval_heldout.json")
    noisy = evaluate_rewarder(dataclasses.replace(cfg, dataset=str(files["heldout_noisy"])), rewarder,
                              output=rm_dir / "eval_heldout_noisy.json")
    train_scored = score_dataset(dataclasses.replace(cfg, dataset=str(files["train_noisy"])), rewarder,
                                 scored["train"])
    score_dataset(dataclasses.replace(cfg, dataset=str(files["heldout"])), rewarder, scored["heldout"])
    disagrees, disagrees_flipped, flipped = _disagreements(files["train"], scored["train"])

    write_jsonl(scored["train_agreed"], [{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                         for r in _read_jsonl(scored["train"])
                                         if r["score_chosen"] > r["score_rejected"]])
    return {
        "train_pairs": train_scored["rows"],
        "steps": last.get("step"),
        # against the ground-truth scorer's ordering of the held-out pairs
        "heldout_accuracy": clean["accuracy"],
        "heldout_pairs": clean["pairs"],
        # against the noisy annotators' labels of the same pairs (what a user could measure)
        "heldout_accuracy_noisy_labels": noisy["accuracy"],
        "heldout_ece_noisy_labels": noisy["ece"],
        # training pairs whose reward-model scores disagree with their label: ODPO drops them
        # (nonpositive_score_diff: drop), so the learned-offset run trains on the rest
        "train_pairs_rm_disagrees": disagrees,
        # ... and how many of those labels were flipped by the annotators' noise (of `flipped` in all)
        "train_pairs_rm_disagrees_flipped": disagrees_flipped,
        "train_pairs_flipped": flipped,
    }


def _disagreements(clean_file: Path, scored_file: Path) -> tuple[int, int, int]:
    """Pairs whose reward-model scores disagree with their (noisy) label, how many of those labels
    are flipped relative to the ground-truth ordering in ``clean_file``, and all flipped labels."""
    clean, scored = _read_jsonl(clean_file), _read_jsonl(scored_file)
    disagrees = disagrees_flipped = flipped = 0
    for c, s in zip(clean, scored, strict=True):
        is_flipped = s["chosen"] != c["chosen"]
        is_disagreeing = not s["score_chosen"] > s["score_rejected"]
        flipped += is_flipped
        disagrees += is_disagreeing
        disagrees_flipped += is_flipped and is_disagreeing
    return disagrees, disagrees_flipped, flipped


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
