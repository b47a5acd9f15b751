"""The demo's online runs: DPO and ODPO that sample their own pairs from the policy each round
(``prefopt online``'s code), scored by the ground-truth scorer, from the SFT model, over several
seeds; and the spread of their results over those seeds."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from prefopt.config import TrainConfig
from prefopt.online.rounds import run_online


def online_run_specs(settings) -> list[tuple[str, str, str, float, int]]:
    """(name, method, loss_type, beta, seed) of every online run."""
    s = settings
    return [(f"online_{m}_beta{beta}" + (f"_alpha{s.odpo_alpha}" if m == "odpo" else "") + f"_seed{seed}",
             f"online_{m}", m, beta, seed)
            for m in ("dpo", "odpo") for beta in s.online_betas for seed in s.online_seeds]


def train_online_run(run_dir: Path, sft_dir: Path, prompts_file: Path, scorer: str, *, loss_type: str, beta: float,
                     seed: int, settings, progress: bool) -> None:
    """One online run through ``run_online``: the offline runs' training settings, per round."""
    s = settings
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = TrainConfig(
        model_name_or_path=str(sft_dir), prompts=str(prompts_file), scorer=scorer, rounds=s.online_rounds,
        prompts_per_round=s.online_prompts_per_round, samples_per_prompt=s.online_samples,
        pairing=s.online_pairing, max_new_tokens=s.max_new_tokens, reference_update="fixed",
        loss_type=loss_type, beta=beta, alpha=s.odpo_alpha, learning_rate=s.learning_rate,
        per_device_train_batch_size=s.batch_size, per_device_eval_batch_size=64, num_train_epochs=s.online_epochs,
        warmup_steps=0, lr_scheduler_type="linear", seed=seed, max_length=64, max_prompt_length=32,
        output_dir=str(run_dir), logging_steps=5, save_steps=0, report_to="none", progress_bar=progress,
    )
    run_online(cfg, progress=progress)


def spread(entries: list[dict[str, Any]], methods: tuple[str, ...]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of reward and KL, per (method, beta): one entry each,
    usable as a frontier point with error bars (``reward_std``, ``kl_std``)."""
    groups: dict[tuple, list[dict]] = {}
    for e in entries:
        if e["method"] in methods:
            groups.setdefault((e["method"], e["beta"], e["alpha"]), []).append(e)
    out = []
    for (method, beta, alpha), runs in groups.items():
        row = {"name": f"{method}_beta{beta}", "method": method, "beta": beta, "alpha": alpha, "seeds": len(runs),
               "offsets": runs[0].get("offsets"), "labels": runs[0].get("labels")}
        for key in ("reward", "kl", "win_rate", "accuracy"):
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                mean = sum(values) / len(values)
                row[key] = mean
                row[f"{key}_std"] = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                                     if len(values) > 1 else 0.0)
        out.append(row)
    return out
