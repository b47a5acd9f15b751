"""Train the toy model for 20 steps with every loss and print a Markdown table (docs/losses.md).

    PYTHONPATH=src python benchmarks/loss_family_toy.py [WORK_DIR]

Columns: the first logged loss (policy == ref, so the closed form of docs/losses.md), the loss at
step 20, held-out preference accuracy (share of pairs with r_w > r_l) and wall seconds.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from prefopt.config import TrainConfig
from prefopt.recipes import train
from prefopt.toy import build_tiny_model, easy_preferences, write_jsonl
from prefopt.training.metrics import read_metrics

RUNS = [
    ("dpo", {}), ("hinge", {}), ("ipo", {}), ("robust", {"label_smoothing": 0.1}),
    ("exo_pair", {"label_smoothing": 1e-3}), ("nca_pair", {}), ("bco_pair", {}), ("sppo_hard", {}),
    ("aot", {}), ("aot_unpaired", {}), ("apo_zero", {}), ("apo_down", {}), ("discopop", {}),
    ("discopop", {"discopop_tau": 0.2}), ("sft", {}), ("sigmoid_norm", {}),
    ("simpo", {"beta": 2.0, "target_margin": 1.0}), ("odpo", {"alpha": 0.5}),
    ("hinge", {"use_offset": True, "alpha": 0.5}), ("dpo", {"ld_alpha": 0.5}), ("dpo", {"use_weighting": True}),
    ("dpo", {"rpo_alpha": 1.0}), ("sigmoid,bco_pair,sft", {"loss_weights": [0.8, 0.2, 1.0]}),
]


def main(work: Path) -> None:
    model = build_tiny_model(work / "model")
    train_file = write_jsonl(work / "train.jsonl", easy_preferences(64, seed=0))
    eval_file = write_jsonl(work / "eval.jsonl", easy_preferences(32, seed=1))
    print("| loss_type | options | step-1 loss | step-20 loss | eval accuracy | seconds |")
    print("|---|---|---|---|---|---|")
    for i, (loss_type, extra) in enumerate(RUNS):
        out = work / f"run{i}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.time()
        cfg = TrainConfig(
            model_name_or_path=str(model), dataset=str(train_file), eval_dataset=str(eval_file), output_dir=str(out),
            loss_type=loss_type, max_steps=20, per_device_train_batch_size=8, logging_steps=1,
            learning_rate=1e-3, progress_bar=False, report_to="none", save_steps=0, **extra,
        )
        final = train(cfg)
        rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
        print(f"| {loss_type} | {json.dumps(extra) if extra else ''} | {rows[0]['loss']:.4f} | "
              f"{rows[-1]['loss']:.4f} | {final['eval/rewards/accuracies']:.3f} | {time.time() - start:.1f} |",
              flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="prefopt-losses-")))
