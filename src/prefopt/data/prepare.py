"""From a dataset to tokenized pairs, as training sees them, and the summary of what was read,
kept and dropped (printed by every command, saved as a run's ``data_summary.json``)."""

from __future__ import annotations

import json
import random
from typing import Any

from prefopt.data.formats import Columns, load_pairs
from prefopt.data.records import PreferencePair
from prefopt.data.tokenize import TokenizedPair, tokenize_pairs
from prefopt.errors import DataError
from prefopt.losses.combine import loss_needs_scores


def apply_score_policy(pairs: list[PreferencePair], cfg) -> tuple[list[PreferencePair], int]:
    """For losses that need scores (ODPO): every pair must have both, and pairs whose chosen score
    is not above the rejected one are dropped, rejected with an error, or kept for clamping,
    as ``nonpositive_score_diff`` says. Returns the pairs kept and how many were affected."""
    if not loss_needs_scores(cfg.loss_type, cfg.use_offset):
        return pairs, 0
    kept, affected = [], 0
    for pair in pairs:
        if not pair.has_scores:
            raise DataError(
                pair.source, pair.row, cfg.score_chosen_column,
                f"missing; loss_type {cfg.loss_type!r}{' with use_offset' if cfg.use_offset else ''} "
                "needs a score for both responses of every pair",
                pair.row_label,
            )
        if pair.score_chosen <= pair.score_rejected:
            affected += 1
            if cfg.nonpositive_score_diff == "error":
                raise DataError(
                    pair.source, pair.row, cfg.score_chosen_column,
                    f"{pair.score_chosen} is not above {cfg.score_rejected_column} {pair.score_rejected}; "
                    "the ODPO offset is undefined (set nonpositive_score_diff: drop or clamp)",
                    pair.row_label,
                )
            if cfg.nonpositive_score_diff == "drop":
                continue
        kept.append(pair)
    return kept, affected


def prepare_dataset(cfg, spec, split: str, tokenizer, *, score_policy: bool = True) -> tuple[list[TokenizedPair], dict]:
    """Read, validate, convert and tokenize one dataset; return the pairs and a summary.

    ``spec`` is a path or hub id, or rows in memory (a list of dicts, a ``datasets.Dataset``).
    ``score_policy=False`` keeps every labelled pair whatever its scores (reward models and their
    evaluation: ODPO's rule on score differences is no business of theirs)."""
    pairs, load_stats = load_pairs(
        spec, split=split, fmt=cfg.dataset_format, columns=Columns.from_config(cfg), tokenizer=tokenizer
    )
    pairs, nonpositive = apply_score_policy(pairs, cfg) if score_policy else (pairs, 0)
    tokenized, tok_stats = tokenize_pairs(
        pairs, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length
    )
    summary = {**load_stats.as_dict(), "nonpositive_score_diff": nonpositive,
               "nonpositive_policy": cfg.nonpositive_score_diff if nonpositive else None,
               "tokenization": tok_stats.as_dict()}
    if not tokenized:
        raise DataError(
            load_stats.source, None, None,
            f"every pair was dropped ({json.dumps(tok_stats.as_dict()['dropped'])}); "
            f"raise max_length ({cfg.max_length}) or "
            + (f"lower max_prompt_length ({cfg.max_prompt_length})" if cfg.max_prompt_length is not None
               else "set max_prompt_length to cut long prompts"),
        )
    return tokenized, summary


def prepare_train_eval(cfg, tokenizer, *, train_data=None, eval_data=None, score_policy: bool = True
                       ) -> tuple[list[TokenizedPair], list[TokenizedPair] | None, dict]:
    """The training pairs, the eval pairs (or None) and their summaries. ``train_data`` /
    ``eval_data`` are rows in memory that take the place of ``cfg.dataset`` / ``cfg.eval_dataset``."""
    train_spec = train_data if train_data is not None else cfg.dataset
    train_pairs, train_summary = prepare_dataset(cfg, train_spec, cfg.dataset_split, tokenizer,
                                                 score_policy=score_policy)
    summaries = {"train": train_summary}
    eval_pairs = None
    eval_spec = eval_data if eval_data is not None else cfg.eval_dataset
    if eval_spec is not None:
        eval_pairs, summaries["eval"] = prepare_dataset(cfg, eval_spec, cfg.eval_dataset_split, tokenizer,
                                                        score_policy=score_policy)
        limit = getattr(cfg, "eval_max_pairs", None)
        if limit is not None and len(eval_pairs) > limit:
            eval_pairs = seeded_subset(eval_pairs, limit, cfg.seed)
            summaries["eval"]["evaluated_pairs"] = len(eval_pairs)
    return train_pairs, eval_pairs, summaries


def seeded_subset(items: list, k: int, seed: int) -> list:
    """``k`` of ``items`` drawn without replacement by ``seed``, kept in their file order: the same
    subset for every evaluation of a run (curves stay comparable) and for every rerun."""

    if k >= len(items):
        return list(items)
    chosen = sorted(random.Random(seed).sample(range(len(items)), k))
    return [items[i] for i in chosen]


def summary_line(role: str, s: dict) -> str:
    tok = s["tokenization"]
    dropped = {**s["dropped"], **tok["dropped"]}
    if s.get("nonpositive_score_diff") and s.get("nonpositive_policy") == "drop":
        dropped["score_chosen <= score_rejected"] = s["nonpositive_score_diff"]
    parts = [f"{role}: {s['source']} ({s['format']}): {s['rows_read']} rows -> {tok['pairs_kept']} pairs"]
    if dropped:
        parts.append("dropped " + ", ".join(f"{n} {why}" for why, n in dropped.items()))
    if tok["prompt_truncated"] or tok["completion_truncated"]:
        parts.append(f"truncated {tok['prompt_truncated']} prompts, {tok['completion_truncated']} completions")
    if s.get("nonpositive_score_diff") and s.get("nonpositive_policy") == "clamp":
        parts.append(f"clamped {s['nonpositive_score_diff']} offsets")
    if s.get("evaluated_pairs") is not None:
        parts.append(f"evaluating a seeded subset of {s['evaluated_pairs']} pairs (eval_max_pairs)")
    return "; ".join(parts)


def summary_text(role: str, s: dict[str, Any]) -> str:
    if s.get("tokenization") is not None:
        return summary_line(role, s)
    dropped = dict(s["dropped"])
    if s.get("nonpositive_score_diff") and s.get("nonpositive_policy") == "drop":
        dropped["score_chosen <= score_rejected"] = s["nonpositive_score_diff"]
    parts = [f"{role}: {s['source']} ({s['format']}): {s['rows_read']} rows -> {s['pairs_after_scores']} pairs"]
    if dropped:
        parts.append("dropped " + ", ".join(f"{n} {why}" for why, n in dropped.items()))
    parts.append("truncation not checked (no tokenizer: pass --model_name_or_path or --tokenizer_name_or_path)")
    return "; ".join(parts)
