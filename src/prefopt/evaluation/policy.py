"""Evaluation of a policy against its reference: samples, ground-truth reward, KL, win rate,
preference accuracy (docs/evaluation.md).

- ``sample``: completions drawn with ``model.generate`` (pure ancestral sampling: temperature 1, no
  top-k / top-p, so the samples follow the policy's own distribution, which the KL estimate needs).
- ``sample_logps``: the summed log-prob of each sampled completion under any model, through the
  training code's own collator and ``modeling.logprobs.pair_logps`` (the KL is measured with exactly the
  log-probs DPO's implicit reward uses).
- ``kl_estimates``: ``mean(log pi(y|x) - log pi_ref(y|x))`` over ``y ~ pi`` (the papers' sequence
  KL) and the k3 estimator ``mean(r - 1 - log r)``, ``r = pi_ref(y|x) / pi(y|x)``, which is never
  negative per sample.
- ``preference_accuracy``: share of held-out pairs whose implicit reward orders them right.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from prefopt.config import TrainConfig
from prefopt.data.collate import PaddedPairCollator, to_device
from prefopt.data.formats import rows_to_pairs
from prefopt.data.prepare import prepare_dataset, seeded_subset
from prefopt.data.sources import read_rows
from prefopt.data.tokenize import TokenizedPair, adds_bos
from prefopt.errors import DataError, PrefoptError
from prefopt.evaluation.plots import frontier_entries, plot_frontier
from prefopt.evaluation.scorers import load_scorer
from prefopt.io import simulate_full_disk, write_text_atomic
from prefopt.modeling.attention import model_collator
from prefopt.modeling.load import first_line, load_causal_lm, load_tokenizer, looks_local
from prefopt.modeling.logprobs import pair_logps, score_pairs
from prefopt.objectives.reference_cache import ReferenceCache, cache_key, model_fingerprint, table_from_rows
from prefopt.training.checkpoint import write_errors


@dataclass(frozen=True)
class Sample:
    prompt_index: int  # which prompt
    sample_index: int  # which of its samples (0 .. num_samples-1)
    prompt_ids: list[int]
    completion_ids: list[int]  # generated tokens, up to and including EOS when one was generated


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt token ids exactly as training tokenizes them (``data.tokenize``): no special tokens,
    then BOS in front when the tokenizer adds one."""
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    if bos is not None:
        ids = [p if p and p[0] == bos else [bos, *p] for p in ids]
    return [list(p) for p in ids]


@torch.no_grad()
def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask of prompts padded on the left: every prompt ends at the same
    column, where generation starts."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        input_ids[r, width - len(p):] = torch.tensor(list(p))
        attention_mask[r, width - len(p):] = 1
    return input_ids, attention_mask


def sample(
    model,
    prompt_ids: list[list[int]],
    *,
    num_samples: int,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | None,
    seed: int = 0,
    batch_size: int = 64,
    device=None,
    progress: bool = False,
    desc: str = "sample",
) -> list[Sample]:
    """``num_samples`` completions per prompt, in (prompt, sample) order. Seeded: the same model,
    prompts and seed give the same samples."""
    from prefopt.progress import progress_bar

    device = device or next(model.parameters()).device
    model.eval()
    jobs = [(i, k) for i in range(len(prompt_ids)) for k in range(num_samples)]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    out: list[Sample] = []
    try:
        for start in progress_bar(range(0, len(jobs), batch_size), desc=desc, unit="batch", disable=not progress):
            chunk = jobs[start : start + batch_size]
            prompts = [prompt_ids[i] for i, _ in chunk]
            input_ids, attention_mask = left_pad(prompts, pad_token_id)
            width = input_ids.shape[1]
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                pad_token_id=pad_token_id, eos_token_id=eos_token_id,
            )[:, width:].tolist()
            for (i, k), p, tokens in zip(chunk, prompts, generated):
                if eos_token_id is not None and eos_token_id in tokens:
                    tokens = tokens[: tokens.index(eos_token_id) + 1]
                out.append(Sample(i, k, p, tokens))
    finally:
        torch.random.set_rng_state(generator_state)
    return out


@torch.no_grad()
def sample_logps(model, samples: list[Sample], *, pad_token_id: int, batch_size: int = 64, device=None,
                 progress: bool = False, desc: str = "logps") -> torch.Tensor:
    """``log model(y|x)`` summed over the completion tokens of every sample: ``[N]`` float32.

    Samples of the same prompt are paired up and scored with the training collator, whose pairs
    share a prompt; an odd one out is paired with itself.
    """
    device = device or next(model.parameters()).device
    model.eval()
    by_prompt: dict[int, list[int]] = {}
    for n, s in enumerate(samples):
        by_prompt.setdefault(s.prompt_index, []).append(n)
    slots: list[tuple[int, int]] = []
    for members in by_prompt.values():
        for j in range(0, len(members), 2):
            a = members[j]
            slots.append((a, members[j + 1] if j + 1 < len(members) else a))
    collator = PaddedPairCollator(pad_token_id)
    out = torch.zeros(len(samples), dtype=torch.float32)
    from prefopt.progress import progress_bar

    for start in progress_bar(range(0, len(slots), batch_size), desc=desc, unit="batch", disable=not progress):
        chunk = slots[start : start + batch_size]
        pairs = [TokenizedPair(samples[a].prompt_ids, samples[a].completion_ids, samples[b].completion_ids,
                               None, None, k) for k, (a, b) in enumerate(chunk)]
        logps = pair_logps(model, to_device(collator(pairs), device))
        for (a, b), la, lb in zip(chunk, logps["chosen_logps"].tolist(), logps["rejected_logps"].tolist()):
            out[a], out[b] = la, lb
    return out


def kl_estimates(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> dict[str, float]:
    """Sequence KL(pi || pi_ref) from samples ``y ~ pi``: ``[N]`` log-probs under each model.

    ``kl`` = mean(log pi - log pi_ref) (unbiased, can be negative on few samples), ``kl_k3`` =
    mean(r - 1 - log r) with ``r = pi_ref / pi`` (unbiased, every term >= 0), ``kl_stderr`` the
    standard error of ``kl``.
    """
    log_ratio = policy_logps.double() - ref_logps.double()
    n = log_ratio.numel()
    k3 = torch.expm1(-log_ratio) + log_ratio
    stderr = float(log_ratio.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return {"kl": float(log_ratio.mean()), "kl_k3": float(k3.mean()), "kl_stderr": stderr}


def win_rate(policy_scores: Sequence[float], ref_scores: Sequence[float]) -> float:
    """Share of policy samples that beat the reference's sample for the same prompt and sample
    index (ties count half)."""
    if len(policy_scores) != len(ref_scores) or not policy_scores:
        raise ValueError("win_rate needs two equally long, non-empty score lists")
    if not all(math.isfinite(x) for x in (*policy_scores, *ref_scores)):
        raise ValueError("win_rate needs finite scores (a NaN would silently count as a loss)")
    wins = sum(1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy_scores, ref_scores))
    return wins / len(policy_scores)


def full_texts(tokenizer, prompts: Sequence[str], samples: list[Sample]) -> tuple[list[str], list[str]]:
    """(completion texts, prompt + " " + completion texts) of the samples, special tokens removed."""
    completions = [tokenizer.decode(s.completion_ids, skip_special_tokens=True).strip() for s in samples]
    texts = [f"{prompts[s.prompt_index]} {c}".strip() for s, c in zip(samples, completions)]
    return completions, texts


def load_eval_pairs(pairs_file: str, tokenizer, *, max_length: int = 1024, max_pairs: int | None = None,
                    seed: int = 0) -> tuple[list[TokenizedPair], int]:
    """The pairs of a pair file (any format ``prefopt train`` reads) tokenized as training
    tokenizes them, and how many the file holds; ``max_pairs``: a seeded subset of them."""
    # Training's defaults for everything but the lengths (scoring needs no prompt cut).
    cfg = TrainConfig(dataset=pairs_file, max_length=max_length, max_prompt_length=None)
    pairs, _ = prepare_dataset(cfg, pairs_file, "train", tokenizer)
    total = len(pairs)
    if max_pairs is not None:
        pairs = seeded_subset(pairs, max_pairs, seed)
    return pairs, total


def reference_pair_logps(ref, ref_path: str | None, pairs: list[TokenizedPair], collator, *, batch_size: int,
                         device, progress: bool = False, cache_dir: str | None = None) -> tuple[list[dict], bool]:
    """The reference's per-pair log-probs: from the reference log-prob cache when ``prefopt logps``,
    a ``precompute_ref_log_probs`` run or an earlier eval stored them for this model and these
    exact tokens, else computed once and stored there (a second policy, or a rerun, reuses them).
    Returns the rows and whether they came from the cache."""
    cache = key = None
    if ref_path is not None:
        cache = ReferenceCache(cache_dir)
        key = cache_key(model_fingerprint(ref_path), pairs)
        table = cache.load(key)
        if table is not None and len(table["index"]) == len(pairs):
            by_index = {int(i): (float(c), float(r)) for i, c, r in
                        zip(table["index"], table["chosen_logps"], table["rejected_logps"])}
            if all(p.index in by_index for p in pairs):
                return [{"index": p.index, "chosen_logps": by_index[p.index][0],
                         "rejected_logps": by_index[p.index][1]} for p in pairs], True
    rows = score_pairs(ref, pairs, collator, batch_size=batch_size, device=device, progress=progress,
                       desc="accuracy: reference")
    if cache is not None:
        try:
            cache.save(key, table_from_rows(rows), {"model": ref_path, "pairs": len(pairs)})
        except PrefoptError as e:  # a read-only cache costs the reuse, not the evaluation
            print(f"prefopt: warning: {e}", file=sys.stderr)
    return rows, False


def preference_accuracy(policy, ref, pairs_file: str | list[TokenizedPair], tokenizer, *, beta: float,
                        batch_size: int = 32, max_length: int = 1024, device=None, ref_path: str | None = None,
                        progress: bool = False, ref_rows: list[dict] | None = None) -> dict[str, float]:
    """Implicit-reward accuracy on a pair file (or its ``load_eval_pairs`` pairs): the share of
    pairs with ``beta*(log pi(y_w)-log ref(y_w)) > beta*(log pi(y_l)-log ref(y_l))``, the mean
    margin and its standard error. Tokenized exactly as training tokenizes. ``ref_rows``: the
    reference's log-probs of these pairs, already known (else ``reference_pair_logps``)."""
    # A file is read here; pairs already loaded (a list, or the store ``load_eval_pairs`` returns) are used.
    pairs = (load_eval_pairs(str(pairs_file), tokenizer, max_length=max_length)[0]
             if isinstance(pairs_file, str | os.PathLike) else pairs_file)
    device = device or next(policy.parameters()).device
    # Training's `layout: auto` (a long prompt runs once for both responses): the same log-probs as
    # the plain padded layout, at a fraction of the cost on long-prompt data such as TL;DR.
    collator = model_collator("auto", pairs, batch_size, policy, tokenizer.pad_token_id,
                              device_type=torch.device(device).type)
    if ref_rows is None:
        ref_rows = reference_pair_logps(ref, ref_path, pairs, collator, batch_size=batch_size, device=device,
                                        progress=progress)[0]
    pol_rows = score_pairs(policy, pairs, collator, batch_size=batch_size, device=device, progress=progress,
                           desc="accuracy: policy")
    margins = [beta * ((a["chosen_logps"] - b["chosen_logps"]) - (a["rejected_logps"] - b["rejected_logps"]))
               for a, b in zip(pol_rows, ref_rows)]
    return {"accuracy": sum(m > 0 for m in margins) / len(margins),
            "reward_margin": sum(margins) / len(margins), "num_pairs": len(margins)}


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean: sample standard deviation / sqrt(n) (NaN for fewer than 2)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


@dataclass
class SampleSet:
    """One model's samples on the evaluation prompts, their texts and scores."""

    samples: list[Sample]
    completions: list[str]
    scores: list[float]

    @property
    def mean_score(self) -> float:
        return sum(self.scores) / len(self.scores)

    @property
    def score_stderr(self) -> float:
        return mean_stderr(self.scores)

    @property
    def mean_length(self) -> float:
        return sum(len(s.completion_ids) for s in self.samples) / len(self.samples)


def sample_and_score(model, tokenizer, prompts: Sequence[str], scorer: Callable[[list[str]], list[float]], *,
                     num_samples: int, max_new_tokens: int, seed: int, batch_size: int = 64,
                     progress: bool = False, desc: str = "sample") -> SampleSet:
    ids = encode_prompts(tokenizer, prompts)
    samples = sample(model, ids, num_samples=num_samples, max_new_tokens=max_new_tokens,
                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, seed=seed,
                     batch_size=batch_size, progress=progress, desc=desc)
    completions, texts = full_texts(tokenizer, prompts, samples)
    return SampleSet(samples, completions, score_texts(scorer, texts, progress=progress, desc=f"{desc}: score"))


def score_texts(scorer: Callable[[list[str]], list[float]], texts: list[str], *, chunk: int = 256,
                progress: bool = False, desc: str = "score") -> list[float]:
    """``scorer`` over ``texts`` in chunks, so a slow scorer (a reward model) shows progress."""
    from prefopt.progress import progress_bar

    scores: list[float] = []
    for start in progress_bar(range(0, len(texts), chunk), desc=desc, unit="chunk", disable=not progress or len(texts) <= chunk):
        scores.extend(scorer(texts[start : start + chunk]))
    return scores


def evaluate_policy(policy, ref, tokenizer, prompts: Sequence[str], scorer, *, ref_set: SampleSet,
                    num_samples: int, max_new_tokens: int, seed: int, batch_size: int = 64,
                    pairs_file: str | list[TokenizedPair] | None = None, beta: float | None = None,
                    progress: bool = False, desc: str = "sample", num_examples: int = 3,
                    ref_pair_rows: list[dict] | None = None, ref_path: str | None = None) -> dict[str, Any]:
    """Every number of ``prefopt eval`` for one policy. ``ref_set`` holds the reference's own
    samples (for the win rate and the reference's reward), drawn once for all policies;
    ``ref_pair_rows`` the reference's log-probs of the pairs, likewise."""
    pol_set = sample_and_score(policy, tokenizer, prompts, scorer, num_samples=num_samples,
                               max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                               progress=progress, desc=desc)
    pad = tokenizer.pad_token_id
    pol_logps = sample_logps(policy, pol_set.samples, pad_token_id=pad, batch_size=batch_size, progress=progress,
                             desc="KL: policy logps")
    ref_logps = sample_logps(ref, pol_set.samples, pad_token_id=pad, batch_size=batch_size, progress=progress,
                             desc="KL: reference logps")
    result: dict[str, Any] = {
        "reward": pol_set.mean_score,
        "reward_stderr": pol_set.score_stderr,
        "reward_ref": ref_set.mean_score,
        "reward_ref_stderr": ref_set.score_stderr,
        **kl_estimates(pol_logps, ref_logps),
        "win_rate": win_rate(pol_set.scores, ref_set.scores),
        "mean_length": pol_set.mean_length,
        "num_prompts": len(prompts),
        "num_samples": num_samples,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
    }
    if pairs_file is not None:
        if beta is None:
            raise PrefoptError("preference accuracy on a pair file needs --beta")
        result.update(preference_accuracy(policy, ref, pairs_file, tokenizer, beta=beta, batch_size=batch_size,
                                          ref_rows=ref_pair_rows, ref_path=ref_path, progress=progress))
    result["examples"] = [{"prompt": prompts[s.prompt_index], "completion": c, "score": sc}
                          for s, c, sc in list(zip(pol_set.samples, pol_set.completions, pol_set.scores))
                          [:num_examples]]
    return result


def eval_plan(models: list[str], ref: str, total_prompts: int, prompts: int, num_samples: int, max_new_tokens: int,
              pairs: str | None, total_pairs: int, num_pairs: int) -> str:
    """The one line ``prefopt eval`` prints before it starts: what it is about to do."""
    subset = f" (seeded subset of {total_prompts})" if prompts < total_prompts else ""
    text = (f"prefopt: eval plan: {len(models)} model{'s' if len(models) != 1 else ''} + reference {ref}; "
            f"{prompts} prompts{subset} x {num_samples} samples (up to {max_new_tokens} new tokens) per model")
    if pairs:
        sub = f" (seeded subset of {total_pairs}; --max_pairs)" if num_pairs < total_pairs else ""
        text += f"; preference accuracy on {num_pairs} pairs{sub} of {pairs}"
    return text


def read_prompts(path: str, tokenizer=None, column: str = "prompt") -> list[str]:
    """Prompts from a ``.txt`` file (one per non-empty line), a table's ``prompt`` column (or
    ``column``), or any preference file ``prefopt train`` reads: its prompts, read by the training
    data path (implicit-prompt files like Anthropic HH: the shared start of chosen and rejected;
    conversational rows: rendered with ``tokenizer``'s chat template), each prompt once, in order."""
    p = Path(path)
    if p.suffix.lower() == ".txt":
        if not p.is_file():
            raise PrefoptError(f"prompts file not found: {path}")
        raw_bytes = p.read_bytes()
        try:
            text = raw_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw_bytes[: e.start].count(b"\n") + 1
            raise DataError(path, line, None, f"not valid UTF-8 (byte {e.start})", "line") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        raw = read_rows(path)
        if raw.rows and column == "prompt" and {"chosen", "rejected", "responses"} & set(raw.rows[0][1]):
            pairs, _ = rows_to_pairs(raw, tokenizer=tokenizer)  # as the training data path reads them
            prompts = list(dict.fromkeys(pair.prompt for pair in pairs))
        else:
            prompts = []
            for row_no, row in raw:
                value = row.get(column)
                if not isinstance(value, str) or not value.strip():
                    raise DataError(raw.source, row_no, column, "missing or not a non-empty string", raw.row_label)
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in JSON): no tokenizer takes it
                    raise DataError(raw.source, row_no, column, f"not valid Unicode text (a lone surrogate "
                                    f"{value[e.start]!r} at character {e.start})", raw.row_label) from None
                prompts.append(value)
    if not prompts:
        raise PrefoptError(f"{path}: no prompts")
    return prompts


def run_config(model_dir: str) -> dict[str, Any]:
    """``method``, ``beta``, ``alpha`` of a model trained by ``prefopt train`` (its config.yaml),
    or an empty dict for any other model."""
    path = Path(model_dir) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return {}
    if not isinstance(cfg, dict) or "loss_type" not in cfg:
        return {}
    out = {"method": cfg["loss_type"], "beta": cfg.get("beta")}
    offset = cfg["loss_type"] == "odpo" or bool(cfg.get("use_offset"))  # use_offset: any loss + ODPO's offset
    out["alpha"] = cfg.get("alpha") if offset else None
    return out


def check_model(path: str) -> None:
    """A model directory (or hub id) whose config loads: checked before any sampling."""
    from transformers import AutoConfig

    if looks_local(path) and not Path(path).expanduser().exists():
        raise PrefoptError(f"model path not found: {path}")
    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise PrefoptError(f"cannot load a model from {path!r}: {first_line(e)}") from None


def finite_json(value):
    """``value`` with every non-finite float replaced by None (JSON has no NaN; e.g. ``kl_stderr``
    of a single sample)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def run_eval(models: list[str], ref: str, *, prompts: str, scorer: str, num_samples: int = 4,
             max_new_tokens: int = 64, output_dir: str = "eval", pairs: str | None = None,
             beta: float | None = None, batch_size: int = 32, seed: int = 0, max_prompts: int | None = None,
             max_pairs: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """``prefopt eval``: evaluate each policy against ``ref``; write ``eval_<name>.json`` per policy
    and ``frontier.png`` into ``output_dir``. The policies' tokenizer is used for all models.
    ``max_prompts`` / ``max_pairs``: seeded subsets (by ``seed``) of the prompts / pairs."""
    if num_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise PrefoptError("--num_samples, --max_new_tokens and --batch_size must be at least 1")
    for flag, value in (("--max_prompts", max_prompts), ("--max_pairs", max_pairs)):
        if value is not None and value < 1:
            raise PrefoptError(f"{flag} must be at least 1 (leave it out for all), got {value}")
    out_dir = Path(output_dir)
    names = result_names(models)
    check_result_place(out_dir, [f"eval_{n}.json" for n in names] + ["frontier.png"])
    for model_path in [*models, ref]:  # every model is checked before any result is written
        check_model(model_path)
    score = load_scorer(scorer)
    tokenizer = load_tokenizer(models[0])
    prompt_list = read_prompts(prompts, tokenizer)
    total_prompts = len(prompt_list)
    if max_prompts is not None:
        prompt_list = seeded_subset(prompt_list, max_prompts, seed)
    pair_list, total_pairs = (load_eval_pairs(pairs, tokenizer, max_pairs=max_pairs, seed=seed) if pairs
                              else (None, 0))
    print(eval_plan(models, ref, total_prompts, len(prompt_list), num_samples, max_new_tokens, pairs,
                    total_pairs, len(pair_list) if pair_list is not None else 0), file=sys.stderr, flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ref_model = load_causal_lm(ref).to(device)
    common = dict(num_samples=num_samples, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    ref_set = sample_and_score(ref_model, tokenizer, prompt_list, score, progress=progress, desc="ref samples",
                               **common)
    ref_pair_rows = None
    if pair_list is not None:
        ref_pair_rows, cached = reference_pair_logps(
            ref_model, ref, pair_list, model_collator("auto", pair_list, batch_size, ref_model, tokenizer.pad_token_id,
                                                      device_type=device.type),
            batch_size=batch_size, device=device, progress=progress)
        if cached:
            print(f"prefopt: reference log-probs of the {len(pair_list)} pairs reused from the cache",
                  file=sys.stderr)
    results = []
    for model_path, name in zip(models, names):
        info = run_config(model_path)
        model_beta = beta if beta is not None else info.get("beta")
        policy = load_causal_lm(model_path).to(device)
        result = evaluate_policy(policy, ref_model, tokenizer, prompt_list, score, ref_set=ref_set,
                                 pairs_file=pair_list, beta=model_beta, progress=progress,
                                 desc=f"{Path(model_path).name} samples", ref_pair_rows=ref_pair_rows,
                                 ref_path=ref, **common)
        result["num_prompts_total"] = total_prompts
        if pair_list is not None:
            result["num_pairs_total"] = total_pairs
        result = {"name": name, "model": model_path, "ref": ref, "scorer": scorer, "method": info.get("method"),
                  "beta": model_beta, "alpha": info.get("alpha"), **result}
        results.append(result)
        acc = f", accuracy {result['accuracy']:.3f}" if "accuracy" in result else ""
        print(f"prefopt: {name}: reward {result['reward']:.4f} ± {result['reward_stderr']:.4f} "
              f"(ref {result['reward_ref']:.4f} ± {result['reward_ref_stderr']:.4f}), "
              f"KL {result['kl']:.4f} (k3 {result['kl_k3']:.4f}), win rate {result['win_rate']:.3f}{acc}",
              file=sys.stderr)
    written = write_results(out_dir, results)
    print(f"prefopt: wrote {len(written)} eval files and {out_dir / 'frontier.png'}", file=sys.stderr)
    return results


def result_names(models: list[str]) -> list[str]:
    """The name of each policy's result (``eval_NAME.json``): its directory's name, made unique."""
    names: list[str] = []
    for model_path in models:
        name = Path(model_path).resolve().name
        while name in names:
            name += "_"
        names.append(name)
    return names


def check_result_place(out_dir: Path, files: list[str]) -> None:
    """Before any model runs: ``out_dir`` is (or can be made) a writable directory and no result
    name in it is taken by a directory."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PrefoptError(f"--output_dir {out_dir} exists and is not a directory")
    probe = out_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise PrefoptError(f"--output_dir {out_dir}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PrefoptError(f"--output_dir {out_dir} is not writable" + (f" (it would be created in {probe})"
                                                                        if probe != out_dir else ""))
    for name in files:
        if (out_dir / name).is_dir() or (out_dir / name).is_symlink() and not (out_dir / name).exists():
            raise PrefoptError(f"--output_dir {out_dir}: {name} is a directory or a broken link; move it away")


def write_results(out_dir: Path, results: list[dict[str, Any]]) -> list[Path]:
    """All result files and the frontier plot, or none of them: written into a staging folder
    inside ``out_dir`` (a full disk leaves every earlier file as it was), then renamed into place; a
    rename that fails puts back what was there before. Returns the written paths."""
    staging = out_dir / f".tmp-eval-{os.getpid()}"
    untouched = "no result was written (files already there are unchanged)"
    with write_errors(out_dir, "the eval results", cleanup=staging, kept=untouched):
        staging.mkdir(parents=True)
        for i, result in enumerate(results, 1):
            simulate_full_disk("eval", i)
            path = staging / f"eval_{result['name']}.json"
            write_text_atomic(path, json.dumps(finite_json(result), indent=2, allow_nan=False) + "\n")
        files = [staging / f"eval_{r['name']}.json" for r in results]
        plot_frontier(frontier_entries(files), staging / "frontier.png")
        files.append(staging / "frontier.png")
        backup = staging / ".before"
        backup.mkdir()
        moved: list[Path] = []  # installed so far, undone if a later rename fails
        try:
            for src in files:
                dst = out_dir / src.name
                if dst.exists():
                    os.replace(dst, backup / src.name)
                os.replace(src, dst)
                moved.append(dst)
        except OSError:
            for dst in moved:
                dst.unlink(missing_ok=True)
            for old in backup.iterdir():
                os.replace(old, out_dir / old.name)
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return [out_dir / f.name for f in files]
