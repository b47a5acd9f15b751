"""Peak host memory of `prefopt online` against `prefopt train` on the same pairs, same run.

    python benchmarks/online_memory.py                 # table printed and written into docs/benchmarks.md
    python benchmarks/online_memory.py --no-write

What `prefopt online` holds besides a round's training (the policy it samples from, the initial
policy for the KL, the scorer) shows as its peak RSS above the peak of `prefopt train` on that
round's pairs with the same training keys. Two models: the demo's architecture (2-layer Llama,
hidden 64: the models are small next to torch itself) and a Llama of 8 layers, hidden 512 (about
25M parameters, 100 MB in float32), where one more copy of the weights is visible. Each command
runs in its own process (peak RSS from ``getrusage``), one torch thread, reference fixed (training
holds the policy, a frozen reference copy, gradients and AdamW's two moments).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.*
    from doc_sections import publish
except ImportError:
    from benchmarks.doc_sections import publish

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## `prefopt online`: peak memory against `prefopt train`"
# Runs a prefopt command in this process and reports its peak RSS (KiB on Linux) on the last stderr line.
RUNNER = ("import resource, sys, torch; torch.set_num_threads(1); from prefopt.cli.main import main; "
          "rc = main(sys.argv[1:]); "
          "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")
MODELS = {
    "demo architecture (hidden 64, 2 layers)": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2),
    "Llama hidden 512, 8 layers (25M params)": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                                   num_attention_heads=8, num_key_value_heads=8),
}
TRAIN_KEYS = dict(loss_type="dpo", beta=0.1, learning_rate=1e-4, per_device_train_batch_size=16, max_steps=4,
                  logging_steps=1, save_steps=0, report_to="none", progress_bar="false", max_length=64,
                  max_prompt_length=32, seed=0)
ONLINE_KEYS = dict(scorer="prefopt.toy:good_word_score", rounds=2, prompts_per_round=32, samples_per_prompt=4,
                   pairing="all", max_new_tokens=16, generation_batch_size=64)


def peak_rss_mb(command: str, keys: dict) -> float:
    args = [x for k, v in keys.items() for x in (f"--{k}", str(v))]
    res = subprocess.run([sys.executable, "-c", RUNNER, *command.split(), *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"prefopt {command} failed:\n{res.stderr[-3000:]}")
    line = [x for x in res.stderr.splitlines() if x.startswith("MAXRSS ")][-1]
    return int(line.split()[1]) / 1024


def measure(model: Path, prompts: Path, work: Path) -> tuple[float, float]:
    online = work / "online"
    online_mb = peak_rss_mb("online", {**TRAIN_KEYS, **ONLINE_KEYS, "model_name_or_path": model,
                                       "prompts": prompts, "output_dir": online})
    train_mb = peak_rss_mb("train", {**TRAIN_KEYS, "model_name_or_path": model,
                                     "dataset": online / "rounds" / "1" / "pairs.jsonl", "output_dir": work / "train"})
    return online_mb, train_mb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="Print only; do not update docs/benchmarks.md.")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()

    import torch
    import transformers

    from prefopt.toy import build_tiny_model, easy_preferences, write_jsonl

    work = Path(tempfile.mkdtemp(prefix="prefopt-online-memory-"))
    table = []
    try:
        prompts = write_jsonl(work / "prompts.jsonl", easy_preferences(64, seed=0))
        for label, overrides in MODELS.items():
            run_dir = work / str(len(table))
            model = build_tiny_model(run_dir / "model", arch="llama", seed=0, **overrides)
            weights_mb = (model / "model.safetensors").stat().st_size / 2**20
            table.append((label, weights_mb, *measure(model, prompts, run_dir)))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [SECTION, "",
             f"Command: `python benchmarks/online_memory.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). "
             f"Machine: {platform.machine()}, torch {torch.__version__} (1 thread), "
             f"transformers {transformers.__version__}.", "",
             "`prefopt online`: 2 rounds of 32 prompts x 4 samples (<= 16 new tokens), pairing all, fixed "
             "reference, 4 steps of batch 16 per round; `prefopt train`: the same keys on round 1's pairs. "
             "Peak RSS of each command's process.", "",
             "| model | weights MB | online peak MB | train peak MB | online − train MB | online / train |",
             "|---|---|---|---|---|---|"]
    for label, weights, online_mb, train_mb in table:
        lines.append(f"| {label} | {weights:.1f} | {online_mb:.0f} | {train_mb:.0f} | {online_mb - train_mb:+.0f} | "
                     f"{online_mb / train_mb:.2f} |")
    report = "\n".join(lines) + "\n"
    publish(report, SECTION, Path(args.output), write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
