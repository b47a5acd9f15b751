"""Time per `prefopt online` round, split into its stages, on the demo's model.

    python benchmarks/online_rounds.py                 # table printed and written into docs/benchmarks.md
    python benchmarks/online_rounds.py --sft runs/demo/sft --no-write

The policy is the demo's SFT model (a 2-layer Llama, hidden 64, on the toy review language): the
one in ``--sft`` (e.g. ``runs/demo/sft`` after ``prefopt demo``), else one trained here with the
quick demo's SFT settings. Each round runs the demo's online settings (its 60 distinct prompts x 4 samples of
up to 24 tokens, pairing ``all``, 2 epochs of batch 32, beta 1) twice, once per scorer: the demo's
sentiment function, and a reward model of the demo's architecture (the SFT weights with a new,
untrained scalar head: the timing is what matters). The split is read from the run's
``metrics.jsonl`` (``time/sample``, ``time/score``, ``time/kl``, ``time/train``), averaged over the
rounds; the share column says which stage dominates. Wall-clock on a shared machine: compare the
stages of one run with each other, not across runs.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.*
    from doc_sections import publish
except ImportError:
    from benchmarks.doc_sections import publish

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## `prefopt online`: time per round by stage"


def build_sft(directory: Path) -> Path:
    from prefopt.demo import world
    from prefopt.demo.run import QUICK
    from prefopt.demo.sft import build_sft_model, train_sft
    from prefopt.toy import word_tokenizer

    s = QUICK
    tokenizer = word_tokenizer(world.vocabulary())
    model = build_sft_model(directory, tokenizer, seed=s.seed, hidden_size=s.hidden_size, layers=s.layers)
    reviews = world.make_reviews(s.sft_reviews, seed=s.seed)
    train_sft(model, tokenizer, [f"{p} {c}" for p, c in reviews], steps=s.sft_steps, batch_size=s.sft_batch_size,
              learning_rate=s.sft_learning_rate, seed=s.seed, progress=False)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_reward_model(sft: Path, directory: Path) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1)
    model.config.pad_token_id = AutoTokenizer.from_pretrained(sft).pad_token_id
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(sft).save_pretrained(directory)
    return directory


def run(sft: Path, prompts: Path, out: Path, scorer_key: str, scorer: str, rounds: int) -> list[dict]:
    from prefopt.config import TrainConfig
    from prefopt.demo.run import FULL
    from prefopt.online.rounds import run_online

    s = FULL
    cfg = TrainConfig(
        model_name_or_path=str(sft), prompts=str(prompts), **{scorer_key: scorer}, rounds=rounds,
        prompts_per_round=s.online_prompts_per_round, samples_per_prompt=s.online_samples, pairing=s.online_pairing,
        max_new_tokens=s.max_new_tokens, loss_type="dpo", beta=1.0, learning_rate=s.learning_rate,
        per_device_train_batch_size=s.batch_size, num_train_epochs=s.online_epochs, seed=0, max_length=64,
        max_prompt_length=32, output_dir=str(out), logging_steps=5, save_steps=0, report_to="none", progress_bar=False,
    )
    rows = run_online(cfg, progress=False)
    return [r for r in rows if "time/train" in r]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", help="The demo's SFT model directory (default: train one with the quick settings).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo uses 1).")
    parser.add_argument("--no-write", action="store_true", help="Print only; do not update docs/benchmarks.md.")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()

    import torch
    import transformers

    from prefopt.demo import world
    from prefopt.toy import write_jsonl

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="prefopt-online-bench-"))
    try:
        sft = Path(args.sft) if args.sft else build_sft(work / "sft")
        prompts = write_jsonl(work / "prompts.jsonl", [{"prompt": p} for p in world.make_prompts(600, seed=1)])
        rm = build_reward_model(sft, work / "rm")
        table = []
        for label, key, scorer in (("sentiment function (the demo)", "scorer", "prefopt.demo.world:sentiment_score"),
                                   ("reward model, demo architecture", "reward_model", str(rm))):
            started = time.perf_counter()
            rows = run(sft, prompts, work / key, key, scorer, args.rounds)
            wall = time.perf_counter() - started
            mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("time/sample", "time/score", "time/kl", "time/train")}
            table.append((label, mean, sum(r["pairs"] for r in rows) / len(rows), wall))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    s_cfg = "the toy world's 60 distinct prompts x 4 samples (<= 24 new tokens), pairing all, 2 epochs of batch 32, DPO beta 1"
    lines = [SECTION, "",
             f"Command: `python benchmarks/online_rounds.py{' --sft ' + args.sft if args.sft else ''}` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Machine: {platform.machine()}, "
             f"torch {torch.__version__} ({args.threads} thread), transformers {transformers.__version__}.",
             "", f"The demo's SFT model (2-layer Llama, hidden 64); {args.rounds} rounds of {s_cfg}; "
             "seconds per round, the mean over the rounds. `kl` = the log-probs of the samples under the policy and "
             "the initial model for the round's KL, plus pairing and writing the files.", "",
             "| scorer | pairs/round | sample s | score s | kl s | train s | round s | slowest stage (share) | run s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, mean, pairs, wall in table:
        total = sum(mean.values())
        slowest = max(mean, key=mean.get)
        lines.append(f"| {label} | {pairs:.0f} | {mean['time/sample']:.2f} | {mean['time/score']:.2f} | "
                     f"{mean['time/kl']:.2f} | {mean['time/train']:.2f} | {total:.2f} | "
                     f"{slowest.split('/')[1]} ({mean[slowest] / total:.0%}) | {wall:.1f} |")
    report = "\n".join(lines) + "\n"
    publish(report, SECTION, Path(args.output), write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
