"""``prefopt demo``: the papers' controlled-sentiment experiment in a small offline world.

Stages (each with its own progress bar):
  1. world     the toy review language, its tokenizer and the SFT corpus
  2. sft       a tiny Llama trained on the reviews (the reference policy)
  3. data      preference pairs from SFT samples scored by the ground-truth scorer, and the same
               pairs labelled by simulated annotators with Bradley–Terry noise (no scores)
  4. reward    a BT reward model trained on the noisy labels (``prefopt reward train``'s code), its
               held-out accuracy, and its scores written into the noisy pairs (``reward score``)
  5. train     DPO and ODPO from the SFT model with ``prefopt.pipeline.train`` (``prefopt train``'s
               code); and at ``noisy_betas``, DPO on the noisy labels, ODPO on the noisy labels with
               the reward model's scores as offsets, and DPO on the pairs that ODPO run keeps
  6. eval      every run on held-out prompts: reward, KL from the SFT model, accuracy on held-out pairs
  7. report    report.json, report.md, frontier.png, training_curves.png

Seeds are fixed everywhere, so a rerun on the same machine writes the same report.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefopt.config import TrainConfig
from prefopt.demo import world
from prefopt.demo.labels import sample_bt_labels
from prefopt.demo.online import online_run_specs, spread, train_online_run
from prefopt.demo.rm import reward_model_stage
from prefopt.demo.sft import build_sft_model, train_sft
from prefopt.evaluation.plots import plot_frontier, plot_training_curves, scorer_label
from prefopt.evaluation.policy import evaluate_policy, sample_and_score
from prefopt.evaluation.scorers import load_scorer
from prefopt.modeling.load import load_causal_lm, load_tokenizer
from prefopt.recipes import train
from prefopt.toy import word_tokenizer, write_jsonl

SCORER = "prefopt.demo.world:sentiment_score"

# Where each method's labels and ODPO offsets come from (the report's `labels` and `offsets`).
RUN_SOURCES = {
    "dpo": {"labels": "scorer", "offsets": None},
    "odpo": {"labels": "scorer", "offsets": "scorer"},
    "dpo_noisy": {"labels": "bt_noise", "offsets": None},
    "dpo_rm_filtered": {"labels": "bt_noise_rm_agrees", "offsets": None},
    "odpo_rm": {"labels": "bt_noise", "offsets": "reward_model"},
    # online: pairs from the policy's own samples each round, ordered (and offset) by the scorer
    "online_dpo": {"labels": "scorer_online", "offsets": None},
    "online_odpo": {"labels": "scorer_online", "offsets": "scorer"},
}
ONLINE_METHODS = ("online_dpo", "online_odpo")


@dataclass(frozen=True)
class DemoSettings:
    seed: int = 0
    # world + SFT
    sft_reviews: int = 4000
    sft_steps: int = 500
    sft_batch_size: int = 64
    sft_learning_rate: float = 3e-3
    hidden_size: int = 64
    layers: int = 2
    # preference data: prompts x samples (pairs are samples (0,1), (2,3), ...)
    train_prompts: int = 600
    samples_per_prompt: int = 4
    heldout_pair_prompts: int = 100
    # preference training (same keys as `prefopt train`)
    # Large betas by LM standards: the tiny model reaches the beta-dependent equilibrium (where
    # sigma(-beta*h) saturates) within a few epochs only when beta*h saturates at a small h.
    betas: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5, 0.25)
    odpo_alpha: float = 0.5
    learning_rate: float = 5e-4
    batch_size: int = 32
    epochs: float = 4.0
    # evaluation
    eval_prompts: int = 200
    eval_samples: int = 4
    max_new_tokens: int = 24
    methods: tuple[str, ...] = field(default=("dpo", "odpo"))
    # --- the papers' full pipeline: noisy labels -> reward model -> learned offsets ---
    # P(a preferred over b) = sigmoid((s_a - s_b) / label_temperature): about 18 % of the pairs flip
    label_temperature: float = 0.2
    # the reward model: the SFT model with a new scalar head, same batch size and max lengths
    rm_learning_rate: float = 3e-3
    rm_epochs: float = 4.0
    noisy_betas: tuple[float, ...] = (2.0, 1.0, 0.5)
    # --- online DPO / ODPO (`prefopt online`): rounds of sample -> score -> pair -> train from SFT ---
    online_betas: tuple[float, ...] = (1.0,)
    online_seeds: tuple[int, ...] = (0, 1, 2)
    online_rounds: int = 3
    online_prompts_per_round: int = 64
    online_samples: int = 4
    online_pairing: str = "all"
    online_epochs: float = 2.0


QUICK = DemoSettings(sft_reviews=1000, sft_steps=120, train_prompts=96, heldout_pair_prompts=24,
                     betas=(1.0,), epochs=1.0, eval_prompts=24, eval_samples=2, rm_epochs=1.0,
                     noisy_betas=(1.0,), online_seeds=(0,), online_rounds=1, online_prompts_per_round=16,
                     online_epochs=1.0)
FULL = DemoSettings()


def _stage(n: int, total: int, text: str) -> None:
    print(f"prefopt demo [{n}/{total}] {text}", file=sys.stderr, flush=True)


def run_demo(output_dir: str | Path, *, quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run every stage and write the report files into ``output_dir``; return report.json's content."""
    settings = QUICK if quick else FULL
    s = settings
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # One thread: the model is tiny (threads buy little), results do not depend on the core count,
    # and a busy machine does not make OpenMP threads spin against each other.
    torch.set_num_threads(1)
    total = 7

    _stage(1, total, "world: vocabulary, tokenizer, review corpus")
    tokenizer = word_tokenizer(world.vocabulary())
    reviews = world.make_reviews(s.sft_reviews, seed=s.seed)
    scorer = load_scorer(SCORER)

    _stage(2, total, f"sft: tiny Llama on {len(reviews)} reviews, {s.sft_steps} steps")
    sft_dir = out / "sft"
    model = build_sft_model(sft_dir, tokenizer, seed=s.seed, hidden_size=s.hidden_size, layers=s.layers)
    train_sft(model, tokenizer, [f"{p} {c}" for p, c in reviews], steps=s.sft_steps, batch_size=s.sft_batch_size,
              learning_rate=s.sft_learning_rate, seed=s.seed, progress=progress)
    model.save_pretrained(sft_dir)
    tokenizer.save_pretrained(sft_dir)
    tokenizer = load_tokenizer(str(sft_dir))
    sft = load_causal_lm(str(sft_dir))

    _stage(3, total, f"data: {s.samples_per_prompt} SFT samples per prompt, scored, paired")
    data_dir = out / "data"
    pair_files = {}
    data_stats = {}
    for role, n_prompts, seed in (("train", s.train_prompts, s.seed + 1), ("heldout", s.heldout_pair_prompts, s.seed + 2)):
        prompts = world.make_prompts(n_prompts, seed=seed)
        got = sample_and_score(sft, tokenizer, prompts, scorer, num_samples=s.samples_per_prompt,
                               max_new_tokens=s.max_new_tokens, seed=seed, progress=progress, desc=f"{role} samples")
        k = s.samples_per_prompt
        comps = [got.completions[i * k:(i + 1) * k] for i in range(n_prompts)]
        scores = [got.scores[i * k:(i + 1) * k] for i in range(n_prompts)]
        rows, ties = world.build_pairs(prompts, comps, scores)
        pair_files[role] = write_jsonl(data_dir / f"{role}_pairs.jsonl", rows)
        data_stats[role] = {"prompts": n_prompts, "pairs": len(rows), "ties_skipped": ties}
        # The same pairs as simulated annotators label them: Bradley–Terry noise, no scores.
        noisy, stats = sample_bt_labels(rows, temperature=s.label_temperature, seed=seed + 100)
        pair_files[f"{role}_noisy"] = write_jsonl(data_dir / f"{role}_pairs_noisy.jsonl", noisy)
        data_stats[f"{role}_noisy"] = {"pairs": stats["pairs"], "flipped": stats["flipped"],
                                       "flip_rate": stats["flipped"] / max(stats["pairs"], 1),
                                       "expected_flip_rate": stats["expected_flipped"] / max(stats["pairs"], 1)}
    # The online runs sample from the offline runs' training prompts.
    write_jsonl(data_dir / "train_prompts.jsonl", [{"prompt": p} for p in world.make_prompts(s.train_prompts,
                                                                                                seed=s.seed + 1)])
    eval_prompts = world.make_prompts(s.eval_prompts, seed=s.seed + 3)
    write_jsonl(data_dir / "eval_prompts.jsonl", [{"prompt": p} for p in eval_prompts])

    _stage(4, total, f"reward: a reward model on {data_stats['train_noisy']['pairs']} noisy labels, "
                     "held-out accuracy, scores for ODPO")
    pair_files["train_rm"] = data_dir / "train_pairs_noisy_rm.jsonl"
    pair_files["heldout_rm"] = data_dir / "heldout_pairs_rm.jsonl"
    pair_files["train_agreed"] = data_dir / "train_pairs_noisy_rm_agrees.jsonl"
    rm_report = reward_model_stage(out / "reward_model", sft_dir, pair_files,
                                   {"train": pair_files["train_rm"], "heldout": pair_files["heldout_rm"],
                                    "train_agreed": pair_files["train_agreed"]},
                                   settings=s, progress=progress)

    # (name, method, loss_type, beta, train file, eval file); the eval file gives the training-time
    # eval rows only, the report's accuracy is always on the ground-truth held-out pairs.
    runs = [(f"{m}_beta{beta}" + (f"_alpha{s.odpo_alpha}" if m == "odpo" else ""), m, m, beta, "train", "heldout")
            for m in s.methods for beta in s.betas]
    runs += [(f"dpo_noisy_beta{beta}", "dpo_noisy", "dpo", beta, "train_noisy", "heldout") for beta in s.noisy_betas]
    # the control: DPO on exactly the pairs odpo_rm keeps, so odpo_rm - dpo_rm_filtered is the offsets' effect
    runs += [(f"dpo_rm_filtered_beta{beta}", "dpo_rm_filtered", "dpo", beta, "train_agreed", "heldout")
             for beta in s.noisy_betas]
    runs += [(f"odpo_rm_beta{beta}_alpha{s.odpo_alpha}", "odpo_rm", "odpo", beta, "train_rm", "heldout_rm")
             for beta in s.noisy_betas]
    online = online_run_specs(s)
    methods = list(dict.fromkeys([r[1] for r in runs] + [r[1] for r in online]))
    _stage(5, total, f"train: {len(runs) + len(online)} runs ({', '.join(methods)})")
    run_dirs = []
    for name, method, loss_type, beta, train_file, eval_file in runs:
        run_dir = out / "runs" / name
        _train_run(run_dir, sft_dir, pair_files[train_file], pair_files[eval_file], loss_type=loss_type, beta=beta,
                   settings=s, progress=progress)
        run_dirs.append((name, method, beta, run_dir))
    seeds = {}
    for name, method, loss_type, beta, seed in online:
        run_dir = out / "runs" / name
        train_online_run(run_dir, sft_dir, data_dir / "train_prompts.jsonl", SCORER, loss_type=loss_type, beta=beta,
                         seed=seed, settings=s, progress=progress)
        run_dirs.append((name, method, beta, run_dir))
        seeds[name] = seed

    _stage(6, total, f"eval: {len(run_dirs) + 1} models on {len(eval_prompts)} held-out prompts")
    eval_kwargs = dict(num_samples=s.eval_samples, max_new_tokens=s.max_new_tokens, seed=s.seed + 4)
    ref_set = sample_and_score(sft, tokenizer, eval_prompts, scorer, progress=progress, desc="sft samples",
                               **eval_kwargs)
    entries = [{"name": "sft", "method": "sft", "labels": None, "offsets": None, "beta": None, "alpha": None,
                "reward": ref_set.mean_score,
                "kl": 0.0, "kl_k3": 0.0, "accuracy": None, "win_rate": 0.5, "mean_length": ref_set.mean_length}]
    for name, method, beta, run_dir in run_dirs:
        policy = load_causal_lm(str(run_dir))
        result = evaluate_policy(policy, sft, tokenizer, eval_prompts, scorer, ref_set=ref_set,
                                 pairs_file=str(pair_files["heldout"]), beta=beta, progress=progress,
                                 desc=f"{name} samples", **eval_kwargs)
        (run_dir / "eval.json").write_text(json.dumps(_rounded(result), indent=2) + "\n")
        entries.append({"name": name, "method": method, **RUN_SOURCES[method], "beta": beta,
                        "alpha": s.odpo_alpha if method in ("odpo", "odpo_rm", "online_odpo") else None,
                        **({"seed": seeds[name]} if name in seeds else {}),
                        **{k: result[k] for k in ("reward", "kl", "kl_k3", "accuracy", "win_rate",
                                                  "reward_margin", "mean_length", "kl_stderr")}})
    online_spread = spread(entries, ONLINE_METHODS)

    _stage(7, total, f"report: {out}/report.json, report.md, frontier.png")
    report = _rounded({"scorer": SCORER, "quick": quick, "settings": asdict(s), "data": data_stats,
                       "reward_model": rm_report, "runs": entries, "online_spread": online_spread})
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(report))

    # The online methods as one point per setting: the mean over seeds, with their spread as error bars.
    plot_frontier([e for e in entries if e["method"] not in ONLINE_METHODS] + online_spread, out / "frontier.png",
                  title="Toy controlled sentiment: reward vs KL from SFT",
                  reward_label=f"mean ground-truth {scorer_label(SCORER)} of samples")
    plot_training_curves({name: run_dir / "metrics.jsonl" for name, _, _, run_dir in run_dirs},
                         out / "training_curves.png")
    print(f"prefopt demo: done in {time.perf_counter() - started:.0f} s; report in {out / 'report.md'}",
          file=sys.stderr)
    return report


def _train_run(run_dir: Path, sft_dir: Path, train_file: Path, eval_file: Path, *, loss_type: str, beta: float,
               settings: DemoSettings, progress: bool) -> None:
    """One preference run through the exact code of ``prefopt train``."""
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
    cfg = TrainConfig(
        model_name_or_path=str(sft_dir), dataset=str(train_file), eval_dataset=str(eval_file),
        loss_type=loss_type, beta=beta, alpha=settings.odpo_alpha, learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.batch_size, per_device_eval_batch_size=64,
        num_train_epochs=settings.epochs, warmup_steps=0, lr_scheduler_type="linear", seed=settings.seed,
        max_length=64, max_prompt_length=32, output_dir=str(run_dir), logging_steps=5, save_steps=0,
        report_to="none", progress_bar=progress, eval_max_pairs=None,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the demo reports its own stages, not 19 run summaries
        train(cfg)


def _rounded(value: Any, digits: int = 4) -> Any:
    """Round floats for the report (reruns then compare equal even across tiny float noise)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v, digits) for v in value]
    return value


def report_markdown(report: dict[str, Any]) -> str:
    def fmt(v):
        return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["# prefopt demo: toy controlled sentiment", "",
             f"Ground-truth scorer `{report['scorer']}`; KL is the sequence KL from the SFT model, "
             "estimated on the held-out prompts' samples; accuracy is the implicit reward's preference "
             "accuracy on held-out pairs (ordered by the ground-truth scorer). Labels: `scorer` = the "
             "ground-truth ordering, `bt_noise` = simulated annotators; offsets: where ODPO's scores came from.", "",
             "| run | method | labels | offsets | beta | alpha | reward | KL | KL (k3) | win rate vs SFT | accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['name']} | {r['method']} | {fmt(r.get('labels'))} | {fmt(r.get('offsets'))} | "
                     f"{fmt(r['beta'])} | {fmt(r['alpha'])} | {fmt(r['reward'])} | "
                     f"{fmt(r['kl'])} | {fmt(r['kl_k3'])} | {fmt(r['win_rate'])} | {fmt(r['accuracy'])} |")
    d = report["data"]
    lines += ["", f"Preference data: {d['train']['pairs']} training pairs from {d['train']['prompts']} prompts "
              f"({d['train']['ties_skipped']} tied sample pairs skipped), {d['heldout']['pairs']} held-out pairs."]
    if "train_noisy" in d:
        n, t = d["train_noisy"], report["settings"]["label_temperature"]
        lines += ["", f"Noisy labels (Bradley–Terry annotators, P(a > b) = sigmoid((s_a - s_b) / {t:g})): "
                  f"{n['flipped']} of {n['pairs']} training labels flipped ({n['flip_rate']:.1%}; "
                  f"expected {n['expected_flip_rate']:.1%})."]
    rm = report.get("reward_model")
    if rm:
        lines += ["", f"Reward model (trained on the noisy labels, {rm['steps']} steps): held-out accuracy "
                  f"{rm['heldout_accuracy']:.3f} against the ground-truth ordering of {rm['heldout_pairs']} pairs, "
                  f"{rm['heldout_accuracy_noisy_labels']:.3f} against the noisy labels of the same pairs "
                  f"(ECE {rm['heldout_ece_noisy_labels']:.3f}); it disagrees with {rm['train_pairs_rm_disagrees']} "
                  f"of {rm['train_pairs']} training labels ({rm['train_pairs_rm_disagrees_flipped']} of them flipped by the "
                  f"noise, of {rm['train_pairs_flipped']} flipped in all), which the learned-offset ODPO runs drop."]
    if report.get("online_spread"):
        lines += ["", "Online runs (`prefopt online`), mean ± standard deviation over seeds:", "",
                  "| method | beta | alpha | seeds | reward | KL | win rate vs SFT | accuracy |", "|---|---|---|---|---|---|---|---|"]
        for r in report["online_spread"]:
            def pm(key, r=r):
                return "—" if r.get(key) is None else f"{r[key]:.3f} ± {r.get(key + '_std', 0.0):.3f}"
            lines.append(f"| {r['method']} | {fmt(r['beta'])} | {fmt(r['alpha'])} | {r['seeds']} | {pm('reward')} | "
                         f"{pm('kl')} | {pm('win_rate')} | {pm('accuracy')} |")
    lines += ["", "![reward against KL](frontier.png)", "", "Training curves: `training_curves.png`.", ""]
    return "\n".join(lines)
