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

With ``use_peft`` the policy is a LoRA adapter on the base model: each round continues training the
adapter the previous round ended with (``rounds/N/train`` holds it), sampling uses a copy of the base
with that adapter merged in, the fixed reference is the base with the adapter switched off, and the
per-round reference a frozen snapshot of the starting adapter beside the trained one. Under a
launcher (``torchrun``) every process samples and scores its share of the prompts and the shares are
gathered (``online.ranks``); only the main process writes.

Memory: besides training, at most one policy is held (sampling, then the KL pass), and the initial
policy is loaded only for the KL pass and released after it.
"""

from __future__ import annotations

import dataclasses
import gc
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
from prefopt.memory import return_freed_memory
from prefopt.modeling.load import load_causal_lm, load_tokenizer
from prefopt.modeling.peft import add_lora, is_adapter_dir, merge_adapter, merged_copy
from prefopt.online.pairing import build_pairs
from prefopt.online.ranks import Ranks
from prefopt.recipes import train
from prefopt.training.checkpoint import latest_checkpoint, test_hook, write_errors
from prefopt.training.distributed import load_dtype, together
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
    abandon,
    contents,
    guarded,
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

    def __init__(self, cfg: TrainConfig, *, ranks: Ranks | None = None, progress: bool = True):
        self.cfg = cfg
        self.ranks = ranks or Ranks()
        self.progress = progress
        self.out = Path(cfg.output_dir)
        self.prompts = unique_prompts(cfg.prompts, cfg.prompt_column)
        self.tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
        if self.tokenizer.pad_token_id is None:
            raise ConfigError(f"model_name_or_path: the tokenizer of {cfg.model_name_or_path} has no pad token")
        if cfg.reward_model and not Path(cfg.reward_model).is_dir():
            raise ConfigError(f"reward_model: not a directory: {cfg.reward_model}")
        self.score_fn = load_scorer(cfg.reward_model or cfg.scorer)
        self.device = self.ranks.device
        self._policy: tuple[str, Any] | None = None  # (path, model): the policy of the current round

    def say(self, message: str) -> None:
        if self.ranks.is_main:
            print(f"prefopt online: {message}", file=sys.stderr, flush=True)

    # --- models
    def _load(self, path: str):
        """A policy as a plain model: a model directory, or (use_peft) an adapter of the base merged into a copy."""
        if is_adapter_dir(path):
            return merged_copy(load_causal_lm(self.cfg.model_name_or_path), path).to(self.device)
        return load_causal_lm(path).to(self.device)

    def load_policy(self, path: str):
        """The policy at ``path``, kept from sampling to the KL pass of its round (one at a time)."""
        if self._policy is None or self._policy[0] != path:
            self.release_policy()  # free the previous round's policy first
            self._policy = (path, self._load(path))
        return self._policy[1]

    def release_policy(self) -> None:
        self._policy = None
        gc.collect()

    def reference_for(self, policy_path: str) -> str | None:
        """``ref_model_name_or_path`` of a round's training: the initial policy (fixed) or none, which
        makes ``train`` use a frozen copy of the policy it starts from (per_round). With use_peft
        none as well: ``train`` takes the base with the adapter off (fixed), or a frozen snapshot of
        the adapter the round starts from (per_round), without a second copy of the weights."""
        if self.cfg.reference_update == "per_round":
            return None
        if self.cfg.use_peft:
            return self.cfg.ref_model_name_or_path
        return self.cfg.ref_model_name_or_path or self.cfg.model_name_or_path

    def _logps(self, model, samples: list[Sample]) -> list[float]:
        """This process's samples' log-probs under ``model``, gathered from every process."""
        mine = (sample_logps(model, samples, pad_token_id=self.tokenizer.pad_token_id,
                             batch_size=self.cfg.generation_batch_size).tolist() if samples else [])
        return self.ranks.gather(mine)

    # --- stages
    def sample_stage(self, round_no: int, rd: Path, policy_path: str) -> None:
        cfg = self.cfg
        started = time.perf_counter()
        indices = round_prompts(len(self.prompts), cfg.prompts_per_round, round_no, cfg.seed)
        texts = [self.prompts[i] for i in indices]
        policy = self.load_policy(policy_path)
        # This process's share of the prompts, each keyed by its position in the round: a sample's
        # random stream is (seed, round, position, sample), whichever process draws it.
        mine = self.ranks.share(len(texts))
        samples = sample_seeded(
            policy, encode_prompts(self.tokenizer, [texts[i] for i in mine]), num_samples=cfg.samples_per_prompt,
            max_new_tokens=cfg.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id, seed=cfg.seed, stream=round_no, temperature=cfg.temperature,
            top_p=cfg.top_p, batch_size=cfg.generation_batch_size, prompt_keys=list(mine),
            device=self.device) if len(mine) else []
        test_hook("online-sample", round_no)  # crash tests: killed with the samples drawn but not written
        rows = self.ranks.gather([
            {"prompt_index": indices[mine[s.prompt_index]], "sample_index": s.sample_index,
             "prompt": texts[mine[s.prompt_index]],
             "completion": self.tokenizer.decode(s.completion_ids, skip_special_tokens=True),
             "prompt_ids": s.prompt_ids, "completion_ids": s.completion_ids} for s in samples])
        if self.ranks.is_main:
            write_jsonl_atomic(rd / "generations.jsonl", rows)
            _write_json(rd / "sample_time.json", {"seconds": time.perf_counter() - started})
        self.ranks.barrier()  # the others read the file once it is complete

    def score_stage(self, round_no: int, rd: Path, policy_path: str, *, final: bool) -> None:
        cfg = self.cfg
        started = time.perf_counter()
        rows = _read_jsonl(rd / "generations.jsonl")
        k = cfg.samples_per_prompt
        mine = self.ranks.share(len(rows) // k)  # this process's prompts, with all their samples
        my_rows = rows[mine.start * k : mine.stop * k]
        # The scorer sees prompt + completion as `prefopt eval` gives them.
        texts = [f"{r['prompt']} {r['completion'].strip()}".strip() for r in my_rows]
        scores = self.ranks.gather(list(self.score_fn(texts)) if texts else [])
        test_hook("online-score", round_no)
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise PrefoptError(f"{rd / 'generations.jsonl'}, line {bad[0] + 1}: the scorer returned a non-finite "
                               f"score ({scores[bad[0]]}) for this sample")
        scored_seconds = time.perf_counter() - started
        # KL of the sampling policy to the initial one, estimated on these samples as `prefopt eval` does.
        samples = [Sample(n // k, r["sample_index"], r["prompt_ids"], r["completion_ids"])
                   for n, r in enumerate(my_rows)]
        pol_logps = self._logps(self.load_policy(policy_path), samples)
        if policy_path == cfg.model_name_or_path:
            init_logps = pol_logps  # the policy is the initial one
        else:
            # The initial policy only for this pass: the round's policy is freed first, the
            # initial one right after (one model at a time besides training).
            self.release_policy()
            initial = load_causal_lm(cfg.model_name_or_path).to(self.device)
            init_logps = self._logps(initial, samples)
            del initial
            gc.collect()
        kl = kl_estimates(torch.tensor(pol_logps), torch.tensor(init_logps))
        groups = [scores[i : i + k] for i in range(0, len(scores), k)]
        # An empty response has a score but is not trainable (a pair file refuses empty responses).
        pairable = [[s if rows[g * k + j]["completion"].strip() else None for j, s in enumerate(group)]
                    for g, group in enumerate(groups)]
        pair_list, pstats = build_pairs(pairable, cfg.pairing)
        if not self.ranks.is_main:
            self.ranks.barrier()
            return
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
        self.ranks.barrier()

    def train_stage(self, round_no: int, rd: Path, policy_path: str) -> None:
        cfg = self.cfg
        started = time.perf_counter()
        stats = json.loads((rd / "sample_stats.json").read_text())
        self.release_policy()  # training loads its own copy
        result: dict[str, Any] = {"trained": False, "steps": 0, "policy": policy_path}
        if stats["pairs"]:
            train_dir = rd / "train"
            resume = train_dir.is_dir() and latest_checkpoint(train_dir) is not None
            # A round's training killed before its first checkpoint starts over (deterministic: same result).
            restart = train_dir.is_dir() and any(train_dir.iterdir()) and not resume
            # With use_peft every round trains the base model's adapter, continuing the one the
            # previous round saved; the merged model is written once, for the final policy.
            adapter = policy_path if cfg.use_peft and is_adapter_dir(policy_path) else None
            round_cfg = dataclasses.replace(
                cfg, **PAIR_COLUMNS, model_name_or_path=cfg.model_name_or_path if cfg.use_peft else policy_path,
                dataset=str(rd / "pairs.jsonl"), dataset_format="explicit", dataset_split="train",
                output_dir=str(train_dir), ref_model_name_or_path=self.reference_for(policy_path),
                tokenizer_name_or_path=None, resume_from_checkpoint="latest" if resume else None,
                overwrite_output_dir=restart, merge_adapter_on_save=False)
            per_round = cfg.reference_update == "per_round"
            reference = round_cfg.ref_model_name_or_path or (
                "the policy at the start of the round" if per_round else "the base model (adapter off)")
            self.say(f"round {round_no}: training on {stats['pairs']} pairs (reference: {reference})")
            final = train(round_cfg, adapter=adapter, adapter_reference=per_round)
            rows = read_metrics(train_dir / "metrics.jsonl")
            result = {"trained": True, "steps": max((r.get("step", 0) for r in rows), default=0),
                      "policy": str(train_dir), "final_metrics": final}
        result["time/train"] = time.perf_counter() - started
        if self.ranks.is_main:
            _write_json(rd / "train_result.json", result)
        self.ranks.barrier()

    # --- the run
    def run(self, run_dir: RunDirectory) -> list[dict[str, Any]]:
        cfg = self.cfg
        policy_path = cfg.model_name_or_path
        total = cfg.rounds + 1
        for round_no in range(1, total + 1):
            final = round_no == total
            rd = self.out / "rounds" / str(round_no)
            if self.ranks.is_main:
                rd.mkdir(parents=True, exist_ok=True)
            what = "final policy" if final else f"round {round_no}/{cfg.rounds}"
            # Every stage ends with a barrier: each process sees the same files here.
            if not (rd / "generations.jsonl").is_file():
                self.say(f"{what}: sampling")
                self.sample_stage(round_no, rd, policy_path)
            if not (rd / "sample_stats.json").is_file():
                self.say(f"{what}: scoring")
                self.score_stage(round_no, rd, policy_path, final=final)
            stats = json.loads((rd / "sample_stats.json").read_text())
            self.say(f"{what}: reward {stats['samples/reward_mean']:.4f} "
                     f"(std {stats['samples/reward_std']:.4f}), KL {stats['samples/kl']:.4f}, "
                     f"ties {stats['samples/tie_fraction']:.3f}, {stats['pairs']} pairs")
            if final:
                break
            if not (rd / "train_result.json").is_file():
                self.train_stage(round_no, rd, policy_path)
            policy_path = json.loads((rd / "train_result.json").read_text())["policy"]
            if self.ranks.is_main:
                run_dir.commit()  # a trained round exists: an earlier run moved aside is no longer needed
                self.write_metrics()
        rows = self.write_metrics() if self.ranks.is_main else []
        self.release_policy()
        if self.ranks.is_main:
            self.save_final(policy_path, run_dir)
        self.ranks.barrier()
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
        staging = self.out / FINAL_STAGING
        if staging.exists():
            shutil.rmtree(staging)
        if self.cfg.use_peft:
            self._save_adapter(policy_path, staging)
        else:
            self.load_policy(policy_path).save_pretrained(staging)
            self.release_policy()
        self.tokenizer.save_pretrained(staging)
        run_dir.install_model(staging)
        print(f"prefopt online: final policy saved to {self.out}", file=sys.stderr)


    def _save_adapter(self, policy_path: str, staging: Path) -> None:
        """What ``prefopt train`` with use_peft writes: the adapter (the last trained round's), and
        with merge_adapter_on_save the merged model in ``merged/``."""
        cfg = self.cfg
        if is_adapter_dir(policy_path):
            staging.mkdir(parents=True)
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy2(Path(policy_path) / name, staging / name)
        else:  # no round had a pair to train on: the new adapter, which leaves the base unchanged
            torch.manual_seed(cfg.seed)
            add_lora(load_causal_lm(cfg.model_name_or_path), cfg).save_pretrained(staging)
        if cfg.merge_adapter_on_save:
            merge_adapter(cfg.model_name_or_path, staging, staging / "merged", dtype=load_dtype(cfg))
            self.tokenizer.save_pretrained(staging / "merged")


def run_online(cfg: TrainConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """``prefopt online``: every round, then the final policy's samples; returns the metrics rows
    (on the main process; the others return an empty list)."""
    ranks = Ranks()
    # Every check on every process, settled together: one line for a refusal, no process left waiting.
    with together(ranks.state):
        cfg.validate_online()
        if cfg.load_in_4bit:
            raise ConfigError("load_in_4bit is not supported by prefopt online yet (sampling merges the adapter "
                              "into a full-precision copy of the base); use use_peft without it")
        check_model_paths(cfg)
        out, resuming, overwrite = _plan_output_dir(cfg)
        # reads the prompts, the tokenizer and the scorer: errors before writing
        run = OnlineRun(cfg, ranks=ranks, progress=progress)
    if cfg.return_freed_memory:
        # From the start, not from the first round's training on: the sampling and KL passes free
        # whole models, and glibc would otherwise keep serving later tensors from a heap that
        # never shrinks (memory.py).
        return_freed_memory()
    ranks.barrier()  # every process has checked output_dir before the main process writes into it

    def start() -> tuple[RunLock, RunDirectory]:
        if resuming:
            warn_config_changes(cfg, out / "config.yaml")
            print(f"prefopt online: resuming the run in {out}", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out).acquire()
        run_dir = None
        try:
            with write_errors(out, "the run's files (config.yaml, the run record)"):
                run_dir = RunDirectory(out)
                run_dir.begin(overwrite=overwrite, resume=resuming)
                run_dir.wrote(*ONLINE_NAMES)
                save_config(cfg, out / "config.yaml")
        except BaseException:
            abandon(run_dir, lock)  # as in train: an earlier run moved aside comes back
            raise
        return lock, run_dir

    lock, run_dir = ranks.on_main(start) or (None, None)
    with guarded(run_dir, lock):
        rows = run.run(run_dir)
        if ranks.is_main:
            _plot(rows, out)
            run_dir.commit()
    return rows


def _plot(rows: list[dict[str, Any]], out: Path) -> None:
    try:
        from prefopt.evaluation.plots import plot_online

        plot_online(rows, out / "online.png")
    except ImportError:  # pragma: no cover - matplotlib is a dependency; a broken install should not lose the run
        pass
