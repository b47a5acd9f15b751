"""``prefopt online``: rounds of sample -> score -> pair -> train, with the training of ``prefopt train``.

Each round ``N`` (1-based) lives in ``output_dir/rounds/N/`` and has three stages, each finished
by one atomically written file, so a run killed anywhere redoes at most the stage it was in:

  sample  ``generations.jsonl``   K completions per prompt from the policy at the start of the round
                                  (``evaluation.generation.sample_seeded``: each sample has its own
                                  seeded random stream, so a redone stage draws the same samples)
  score   ``samples.jsonl``       the samples with their scores (``scored_responses`` format),
          ``pairs.jsonl``         the pairs (``explicit`` format with ``score_chosen``/``score_rejected``),
          ``sample_stats.json``   reward mean/std, ties, KL to the initial policy (written last: the marker)
  train   ``train/``              ``recipes.train`` on ``pairs.jsonl`` (its own checkpoints and exact resume),
          ``train_result.json``   the marker, with the round's last training metrics

After the last round, round ``rounds + 1`` samples and scores the final policy once more (no pairs,
no training), so the reward and KL of the trained model are measured like every other round's.
``metrics.jsonl`` in ``output_dir`` is rebuilt from these files after every stage: one summary row
per round (``round``, ``samples/*``) followed by that round's training rows (``round``,
``round_step``, and ``step`` counted over all rounds). The final policy is saved to ``output_dir``.

Nothing here is a second training loop: a round's training is one call of ``recipes.train``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from prefopt.config import TrainConfig, save_config
from prefopt.errors import ConfigError, PrefoptError
from prefopt.evaluation.generation import sample_seeded
from prefopt.evaluation.policy import Sample, encode_prompts, kl_estimates, read_prompts, sample_logps
from prefopt.evaluation.scorers import load_scorer
from prefopt.io import write_jsonl_atomic, write_text_atomic
from prefopt.modeling.load import load_causal_lm, load_tokenizer
from prefopt.online.pairing import build_pairs
from prefopt.recipes import train
from prefopt.training.checkpoint import latest_checkpoint, test_hook
from prefopt.training.metrics import read_metrics
from prefopt.training.preflight import (
    check_fresh_start,
    check_model_paths,
    check_output_place,
    warn_config_changes,
)
from prefopt.training.run_dir import (
    PATH_KEYS,
    RunDirectory,
    RunRecord,
    contents,
)
from prefopt.training.run_lock import RunLock

# What `prefopt online` writes into output_dir besides the final model files (recorded in the run
# record, so --overwrite_output_dir moves exactly these aside).
ONLINE_NAMES = ("config.yaml", "metrics.jsonl", "online.png", "rounds")
FINAL_STAGING = ".tmp-final-model"
# Pair files use prefopt's default column names, whatever columns the prompts file had.
_DEFAULTS = TrainConfig()
PAIR_COLUMNS = {k: getattr(_DEFAULTS, k) for k in (
    "prompt_column", "chosen_column", "rejected_column", "score_chosen_column", "score_rejected_column")}


def unique_prompts(path: str, column: str) -> list[str]:
    """The prompts of ``path`` in file order, each once (a preference file repeats its prompts)."""
    return list(dict.fromkeys(read_prompts(path, column=column)))


def round_prompts(num_prompts: int, per_round: int, round_no: int, seed: int) -> list[int]:
    """Indices of the prompts of round ``round_no`` (1-based): consecutive slices of a seeded
    shuffle of all prompts, reshuffled (with the next seed) each time the file is used up (a round
    that straddles two passes may repeat a prompt). ``per_round`` 0, or at least the number of
    prompts = every prompt, in file order."""
    if per_round <= 0 or per_round >= num_prompts:
        return list(range(num_prompts))
    start = (round_no - 1) * per_round
    out: list[int] = []
    while len(out) < per_round:
        pass_no, offset = divmod(start + len(out), num_prompts)
        g = torch.Generator().manual_seed(seed * 1_000_003 + pass_no)
        order = torch.randperm(num_prompts, generator=g).tolist()
        out += order[offset : offset + per_round - len(out)]
    return out


def _plan_output_dir(cfg: TrainConfig) -> tuple[Path, bool, bool]:
    """(output_dir, resuming, overwriting). The rules of ``prefopt train``: a safe location (not the
    model, prompts or reward model, nor the current/home/root directory), writable, not in use, and
    a non-empty directory only with --resume or with --overwrite_output_dir over a recorded run."""
    out = check_output_place(cfg, keys=(*PATH_KEYS, "prompts", "reward_model"))
    occupied = bool(contents(out))
    if cfg.resume_from_checkpoint not in (None, "latest"):
        raise ConfigError("resume_from_checkpoint: prefopt online resumes the whole run (--resume, or `latest`); "
                          "a round's own checkpoints are found automatically")
    if cfg.resume_from_checkpoint:
        return out, occupied, False
    check_fresh_start(cfg, out, RunRecord.read(out) if out.is_dir() else None)
    return out, False, occupied


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_json(path: Path, value: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


class OnlineRun:
    """One ``prefopt online`` run: the loaded pieces shared by the rounds, and the stages."""

    def __init__(self, cfg: TrainConfig, *, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.out = Path(cfg.output_dir)
        self.prompts = unique_prompts(cfg.prompts, cfg.prompt_column)
        self.tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
        if self.tokenizer.pad_token_id is None:
            raise ConfigError(f"model_name_or_path: the tokenizer of {cfg.model_name_or_path} has no pad token")
        if cfg.reward_model and not Path(cfg.reward_model).is_dir():
            raise ConfigError(f"reward_model: not a directory: {cfg.reward_model}")
        self.score_fn = load_scorer(cfg.reward_model or cfg.scorer)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._initial = None
        self._policy: tuple[str, Any] | None = None  # (path, model): the last policy loaded

    # --- models
    def initial_model(self):
        """The initial policy, for the KL of every round (loaded once)."""
        if self._initial is None:
            self._initial = load_causal_lm(self.cfg.model_name_or_path).to(self.device)
        return self._initial

    def load_policy(self, path: str):
        if path == self.cfg.model_name_or_path:
            return self.initial_model()
        if self._policy is None or self._policy[0] != path:
            self._policy = None  # free the previous round's policy first
            self._policy = (path, load_causal_lm(path).to(self.device))
        return self._policy[1]

    def reference_for(self, policy_path: str) -> str | None:
        """``ref_model_name_or_path`` of a round's training: the initial policy (fixed) or none, which
        makes ``train`` use a frozen copy of the policy it starts from (per_round)."""
        if self.cfg.reference_update == "per_round":
            return None
        return self.cfg.ref_model_name_or_path or self.cfg.model_name_or_path

    # --- stages
    def sample_stage(self, round_no: int, rd: Path, policy_path: str) -> None:
        cfg = self.cfg
        started = time.perf_counter()
        indices = round_prompts(len(self.prompts), cfg.prompts_per_round, round_no, cfg.seed)
        texts = [self.prompts[i] for i in indices]
        policy = self.load_policy(policy_path)
        samples = sample_seeded(
            policy, encode_prompts(self.tokenizer, texts), num_samples=cfg.samples_per_prompt,
            max_new_tokens=cfg.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id, seed=cfg.seed, stream=round_no, temperature=cfg.temperature,
            top_p=cfg.top_p, batch_size=cfg.generation_batch_size, device=self.device)
        test_hook("online-sample", round_no)  # crash tests: killed with the samples drawn but not written
        rows = [{"prompt_index": indices[s.prompt_index], "sample_index": s.sample_index,
                 "prompt": texts[s.prompt_index],
                 "completion": self.tokenizer.decode(s.completion_ids, skip_special_tokens=True),
                 "prompt_ids": s.prompt_ids, "completion_ids": s.completion_ids} for s in samples]
        write_jsonl_atomic(rd / "generations.jsonl", rows)
        _write_json(rd / "sample_time.json", {"seconds": time.perf_counter() - started})

    def score_stage(self, round_no: int, rd: Path, policy_path: str, *, final: bool) -> None:
        cfg = self.cfg
        started = time.perf_counter()
        rows = _read_jsonl(rd / "generations.jsonl")
        # The scorer sees prompt + completion as `prefopt eval` gives them.
        texts = [f"{r['prompt']} {r['completion'].strip()}".strip() for r in rows]
        scores = self.score_fn(texts)
        test_hook("online-score", round_no)
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise PrefoptError(f"{rd / 'generations.jsonl'}, line {bad[0] + 1}: the scorer returned a non-finite "
                               f"score ({scores[bad[0]]}) for this sample")
        scored_seconds = time.perf_counter() - started
        # KL of the sampling policy to the initial one, estimated on these samples as `prefopt eval` does.
        samples = [Sample(n // cfg.samples_per_prompt, r["sample_index"], r["prompt_ids"], r["completion_ids"])
                   for n, r in enumerate(rows)]
        pad = self.tokenizer.pad_token_id
        policy = self.load_policy(policy_path)
        pol_logps = sample_logps(policy, samples, pad_token_id=pad, batch_size=cfg.generation_batch_size)
        init_logps = (pol_logps if policy is self.initial_model() else
                      sample_logps(self.initial_model(), samples, pad_token_id=pad, batch_size=cfg.generation_batch_size))
        kl = kl_estimates(pol_logps, init_logps)
        k = cfg.samples_per_prompt
        groups = [scores[i : i + k] for i in range(0, len(scores), k)]
        # An empty response has a score but is not trainable (a pair file refuses empty responses).
        pairable = [[s if rows[g * k + j]["completion"].strip() else None for j, s in enumerate(group)]
                    for g, group in enumerate(groups)]
        pair_list, pstats = build_pairs(pairable, cfg.pairing)
        write_jsonl_atomic(rd / "samples.jsonl", [
            {"prompt": r["prompt"], "completion": r["completion"], "score": s, "prompt_index": r["prompt_index"],
             "sample_index": r["sample_index"], "round": round_no} for r, s in zip(rows, scores)])
        if not final:
            write_jsonl_atomic(rd / "pairs.jsonl", [
                {"prompt": rows[g * k + c]["prompt"], "chosen": rows[g * k + c]["completion"],
                 "rejected": rows[g * k + j]["completion"], "score_chosen": groups[g][c],
                 "score_rejected": groups[g][j], "prompt_index": rows[g * k]["prompt_index"],
                 "chosen_sample": c, "rejected_sample": j, "round": round_no}
                for g, c, j in pair_list])
        mean = sum(scores) / len(scores)
        std = math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)) if len(scores) > 1 else 0.0
        stats = {
            "samples/reward_mean": mean, "samples/reward_std": std,
            "samples/reward_min": min(scores), "samples/reward_max": max(scores),
            "samples/tie_fraction": pstats.tie_fraction,
            "samples/empty_fraction": pstats.unusable_samples / len(rows),
            "samples/tied_sample_pairs": pstats.tied_sample_pairs / max(pstats.sample_pairs, 1),
            "samples/kl": kl["kl"], "samples/kl_k3": kl["kl_k3"], "samples/kl_stderr": kl["kl_stderr"],
            "samples/mean_length": sum(len(r["completion_ids"]) for r in rows) / len(rows),
            "prompts": len(groups), "samples": len(rows), "pairs": 0 if final else pstats.pairs,
            "time/score": scored_seconds,
            "time/kl": time.perf_counter() - started - scored_seconds,  # the KL's log-probs, pairing, writing
        }
        _write_json(rd / "sample_stats.json", stats)

    def train_stage(self, round_no: int, rd: Path, policy_path: str) -> None:
        cfg = self.cfg
        started = time.perf_counter()
        stats = json.loads((rd / "sample_stats.json").read_text())
        self._policy = None  # training loads its own copy
        result: dict[str, Any] = {"trained": False, "steps": 0, "policy": policy_path}
        if stats["pairs"]:
            train_dir = rd / "train"
            resume = train_dir.is_dir() and latest_checkpoint(train_dir) is not None
            # A round's training killed before its first checkpoint starts over (deterministic: same result).
            restart = train_dir.is_dir() and any(train_dir.iterdir()) and not resume
            round_cfg = dataclasses.replace(
                cfg, **PAIR_COLUMNS, model_name_or_path=policy_path, dataset=str(rd / "pairs.jsonl"),
                dataset_format="explicit", dataset_split="train", output_dir=str(train_dir),
                ref_model_name_or_path=self.reference_for(policy_path), tokenizer_name_or_path=None,
                resume_from_checkpoint="latest" if resume else None, overwrite_output_dir=restart)
            print(f"prefopt online: round {round_no}: training on {stats['pairs']} pairs "
                  f"(reference: {round_cfg.ref_model_name_or_path or 'the policy at the start of the round'})",
                  file=sys.stderr)
            final = train(round_cfg)
            rows = read_metrics(train_dir / "metrics.jsonl")
            result = {"trained": True, "steps": max((r.get("step", 0) for r in rows), default=0),
                      "policy": str(train_dir), "final_metrics": final}
        result["time/train"] = time.perf_counter() - started
        _write_json(rd / "train_result.json", result)

    # --- the run
    def run(self, run_dir: RunDirectory) -> list[dict[str, Any]]:
        cfg = self.cfg
        policy_path = cfg.model_name_or_path
        total = cfg.rounds + 1
        for round_no in range(1, total + 1):
            final = round_no == total
            rd = self.out / "rounds" / str(round_no)
            rd.mkdir(parents=True, exist_ok=True)
            what = "final policy" if final else f"round {round_no}/{cfg.rounds}"
            if not (rd / "generations.jsonl").is_file():
                print(f"prefopt online: {what}: sampling", file=sys.stderr, flush=True)
                self.sample_stage(round_no, rd, policy_path)
            if not (rd / "sample_stats.json").is_file():
                print(f"prefopt online: {what}: scoring", file=sys.stderr, flush=True)
                self.score_stage(round_no, rd, policy_path, final=final)
            stats = json.loads((rd / "sample_stats.json").read_text())
            print(f"prefopt online: {what}: reward {stats['samples/reward_mean']:.4f} "
                  f"(std {stats['samples/reward_std']:.4f}), KL {stats['samples/kl']:.4f}, "
                  f"ties {stats['samples/tie_fraction']:.3f}, {stats['pairs']} pairs", file=sys.stderr)
            if final:
                break
            if not (rd / "train_result.json").is_file():
                self.train_stage(round_no, rd, policy_path)
            run_dir.commit()  # a trained round exists: an earlier run moved aside is no longer needed
            policy_path = json.loads((rd / "train_result.json").read_text())["policy"]
            self.write_metrics()
        rows = self.write_metrics()
        self.save_final(policy_path, run_dir)
        return rows

    def write_metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl from the rounds' files (so a resumed run writes exactly what an uninterrupted one does)."""
        rows: list[dict[str, Any]] = []
        offset = 0
        for round_no in range(1, self.cfg.rounds + 2):
            rd = self.out / "rounds" / str(round_no)
            if not (rd / "sample_stats.json").is_file():
                break
            stats = json.loads((rd / "sample_stats.json").read_text())
            row = {"round": round_no, "rounds_trained": round_no - 1, "step": offset,
                   **{k: v for k, v in stats.items() if not k.startswith("time/")}}
            result_file = rd / "train_result.json"
            result = json.loads(result_file.read_text()) if result_file.is_file() else None
            if self.cfg.log_throughput:  # wall-clock: left out for bit-for-bit reproducible metrics
                seconds = json.loads((rd / "sample_time.json").read_text())["seconds"]
                row.update({"time/sample": seconds, "time/score": stats["time/score"], "time/kl": stats["time/kl"]})
                if result is not None:
                    row["time/train"] = result["time/train"]
            rows.append(row)
            if result is None:
                break
            if result["trained"]:
                for r in read_metrics(rd / "train" / "metrics.jsonl"):
                    rows.append({"round": round_no, "round_step": r.get("step"), **r,
                                 "step": offset + int(r.get("step", 0))})
            offset += result["steps"]
        write_jsonl_atomic(self.out / "metrics.jsonl", rows)
        return rows

    def save_final(self, policy_path: str, run_dir: RunDirectory) -> None:
        """The final policy into output_dir, loadable with ``from_pretrained(output_dir)``: written
        into a staging folder, then each file renamed into place (never half a model at the top)."""
        model = self.load_policy(policy_path)
        staging = self.out / FINAL_STAGING
        if staging.exists():
            shutil.rmtree(staging)
        model.save_pretrained(staging)
        self.tokenizer.save_pretrained(staging)
        run_dir.install_model(staging)
        print(f"prefopt online: final policy saved to {self.out}", file=sys.stderr)


def run_online(cfg: TrainConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """``prefopt online``: every round, then the final policy's samples; returns the metrics rows."""
    cfg.validate_online()
    if cfg.use_peft:
        raise ConfigError("use_peft is not supported by prefopt online yet: each round trains the full policy")
    check_model_paths(cfg)
    out, resuming, overwrite = _plan_output_dir(cfg)
    run = OnlineRun(cfg, progress=progress)  # reads the prompts, the tokenizer and the scorer: errors before writing
    if resuming:
        warn_config_changes(cfg, out / "config.yaml")
        print(f"prefopt online: resuming the run in {out}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out).acquire()
    run_dir = RunDirectory(out)
    try:
        run_dir.begin(overwrite=overwrite, resume=resuming)
        run_dir.wrote(*ONLINE_NAMES)
        save_config(cfg, out / "config.yaml")
        rows = run.run(run_dir)
        _plot(rows, out)
        run_dir.commit()
    except BaseException:
        run_dir.abort()
        raise
    finally:
        lock.release()
    return rows


def _plot(rows: list[dict[str, Any]], out: Path) -> None:
    try:
        from prefopt.evaluation.plots import plot_online

        plot_online(rows, out / "online.png")
    except ImportError:  # pragma: no cover - matplotlib is a dependency; a broken install should not lose the run
        pass
