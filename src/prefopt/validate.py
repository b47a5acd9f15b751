"""``prefopt validate``: read, check and (with a tokenizer) tokenize the datasets exactly as training
would, and report what was read, kept and dropped, without loading a model or training.

The first bad row stops it with the same one-line error ``prefopt train`` would give.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prefopt.errors import ConfigError


def validate_datasets(cfg) -> dict[str, dict[str, Any]]:
    """Summaries per role (``train``, ``eval``), as saved in a run's ``data_summary.json``."""
    from prefopt.data.formats import Columns, load_pairs
    from prefopt.pipeline import apply_score_policy, prepare_dataset

    if not cfg.dataset:
        raise ConfigError("prefopt validate needs --dataset")
    # The same key checks as training; a model is not needed to read data.
    dataclasses.replace(cfg, model_name_or_path=cfg.model_name_or_path or "(unused)").validate()
    tokenizer_name = cfg.tokenizer_name_or_path or cfg.model_name_or_path
    tokenizer = None
    if tokenizer_name:
        from prefopt.modeling import load_tokenizer
        from prefopt.preflight import check_model_paths

        check_model_paths(cfg)
        tokenizer = load_tokenizer(tokenizer_name)
    summaries = {}
    for role, spec, split in (("train", cfg.dataset, cfg.dataset_split),
                              ("eval", cfg.eval_dataset, cfg.eval_dataset_split)):
        if not spec:
            continue
        if tokenizer is not None:
            summaries[role] = prepare_dataset(cfg, spec, split, tokenizer)[1]
            continue
        pairs, stats = load_pairs(spec, split=split, fmt=cfg.dataset_format, columns=Columns.from_config(cfg))
        pairs, nonpositive = apply_score_policy(pairs, cfg)
        summaries[role] = {**stats.as_dict(), "nonpositive_score_diff": nonpositive,
                           "nonpositive_policy": cfg.nonpositive_score_diff if nonpositive else None,
                           "tokenization": None, "pairs_after_scores": len(pairs)}
    return summaries


def summary_text(role: str, s: dict[str, Any]) -> str:
    from prefopt.pipeline import summary_line

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
