"""From a dataset to tokenized pairs, as training sees them, and the summary of what was read,
kept and dropped (printed by every command, saved as a run's ``data_summary.json``)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from collections import deque
from pathlib import Path
from typing import Any

import torch

from prefopt.data.fingerprint import ColumnsFingerprint
from prefopt.data.formats import FORMATS, Columns, LoadStats, check_some_pairs, convert_rows, detect_format
from prefopt.data.records import PreferencePair
from prefopt.data.sources import IN_MEMORY, RawRows, iter_row_chunks
from prefopt.data.store import (
    PairStore,
    build_temporary,
    cache_root,
    encode_pairs,
    get_or_build,
    source_fingerprint,
    store_key,
    tokenizer_fingerprint,
    write_pairs,
)
from prefopt.data.tokenize import TokenizeStats, tokenize_pairs
from prefopt.errors import DataError, PrefoptError
from prefopt.losses.combine import loss_needs_scores
from prefopt.losses.offsets import odpo_offset
from prefopt.progress import progress_bar


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
    check_offsets(kept, cfg)
    return kept, affected


CHUNK_ROWS = 1000  # rows converted and tokenized at a time: bounds memory, keeps the fast tokenizer busy


def data_settings(cfg, score_policy: bool) -> dict[str, Any]:
    """Every setting that changes which pairs a dataset gives and their tokens (part of the key of
    the tokenized-pair store)."""
    needs_scores = score_policy and loss_needs_scores(cfg.loss_type, cfg.use_offset)
    return {"format": cfg.dataset_format, "columns": dataclasses.asdict(Columns.from_config(cfg)),
            "max_length": cfg.max_length, "max_prompt_length": cfg.prompt_limit(),
            "max_completion_length": cfg.max_completion_length, "truncation_mode": cfg.truncation_mode,
            "scores": cfg.nonpositive_score_diff if needs_scores else "off"}


def check_offsets(pairs: list[PreferencePair], cfg) -> None:
    """Compute every pair's ODPO offset now, with the function training uses, so that a pair whose
    offset is undefined or infinite (``log_ratio`` on a non-positive score, scores of +-1e308 whose
    difference overflows) is named before a model loads, not found as a crash or a NaN loss mid-run."""
    if not pairs:
        return
    s_w = torch.tensor([p.score_chosen for p in pairs], dtype=torch.float64)
    s_l = torch.tensor([p.score_rejected for p in pairs], dtype=torch.float64)
    bad = s_l <= 0 if cfg.offset_scaling == "log_ratio" else torch.zeros(len(pairs), dtype=torch.bool)
    if not bad.any():
        offsets = odpo_offset(s_w, s_l, alpha=cfg.alpha, scaling=cfg.offset_scaling, on_nonpositive="clamp")
        bad = ~torch.isfinite(offsets)
    if bad.any():
        pair = pairs[int(bad.nonzero()[0])]
        why = (f"offset_scaling 'log_ratio' needs positive scores, got {cfg.score_rejected_column} "
               f"{pair.score_rejected}" if cfg.offset_scaling == "log_ratio" and pair.score_rejected <= 0 else
               f"the ODPO offset alpha*{cfg.offset_scaling}({pair.score_chosen}, {pair.score_rejected}) is not finite")
        field = cfg.score_rejected_column if "log_ratio" in why else cfg.score_chosen_column
        raise DataError(pair.source, pair.row, field, why, pair.row_label)


def prepare_dataset(cfg, spec, split: str, tokenizer, *, score_policy: bool = True) -> tuple[PairStore, dict]:
    """Read, validate, convert and tokenize one dataset; return the pairs and a summary.

    The pairs come from the tokenized-pair store (``data/store.py``): opened when one with the
    same data, tokenizer and settings exists, else built in chunks (``dataset_num_proc`` worker
    processes) and kept for later runs (``data_cache``). ``spec`` is a path or hub id, or rows in
    memory (a list of dicts, a ``datasets.Dataset``; these get a store for this run only).
    ``score_policy=False`` keeps every labelled pair whatever its scores (reward models and their
    evaluation: ODPO's rule on score differences is no business of theirs)."""
    source = str(spec) if isinstance(spec, str | Path) else IN_MEMORY

    parts = None

    def build(directory: Path) -> tuple[int, dict]:
        num_pairs, manifest = _build(cfg, spec, split, tokenizer, score_policy, directory)
        # The key's parts beside the pairs: what to compare when a run did not reuse a store.
        return num_pairs, manifest if parts is None else {**manifest, "key_parts": parts}

    root = cache_root(cfg)
    data = source_fingerprint(spec, split, root / "digests") if cfg.data_cache else None
    if data is not None:
        parts = {"data": data, "tokenizer": tokenizer_fingerprint(tokenizer),
                 "settings": data_settings(cfg, score_policy)}
        key = store_key(parts)
        directory, manifest, hit = get_or_build(root, key, build)
        cache = "hit" if hit else "built"
    else:
        directory, manifest = build_temporary(build)
        key, cache = None, "off"
    # The store may have been built from a copy of the file elsewhere: name the file of this run.
    summary = {**manifest["summary"], "source": source, "store": {"cache": cache, "path": str(directory)}}
    store = PairStore.open(directory, source=source, row_label=manifest["row_label"], fingerprint=key,
                           content=manifest.get("content"))
    return store, summary


def _build(cfg, spec, split: str, tokenizer, score_policy: bool, directory: Path) -> tuple[int, dict]:
    """Stream ``spec`` in chunks through conversion, the score policy and tokenization into
    ``directory``'s pairs file; the summary is that of converting the whole file at once."""
    columns = Columns.from_config(cfg)
    chunks = iter_row_chunks(spec, split, CHUNK_ROWS)
    first = next(chunks, None)
    if first is None:
        raise DataError(str(spec) if isinstance(spec, str | Path) else IN_MEMORY, None, None, "the dataset is empty")
    fmt = detect_format(first, columns) if cfg.dataset_format == "auto" else cfg.dataset_format
    if fmt not in FORMATS:
        raise PrefoptError(f"unknown dataset_format {fmt!r}; choose auto or one of {', '.join(FORMATS)}")
    chunks = itertools.chain([first], chunks)
    if fmt == "scored_responses":  # rows are grouped by prompt across the whole file
        chunks = iter([RawRows(first.source, first.row_label, [r for c in chunks for r in c.rows])])
    worker = _ChunkWorker(cfg, tokenizer, fmt, columns, score_policy)
    load, tok, nonpositive = LoadStats(first.source, fmt), TokenizeStats(), 0
    content = ColumnsFingerprint()  # the resume check's fingerprint, while the pairs pass by
    progress = progress_bar(desc="tokenizing", unit=" rows", disable=not cfg.progress_bar,
                    dynamic_ncols=True, leave=False)

    def batches():
        nonlocal nonpositive
        for rows_in, encoded, load_part, nonpositive_part, tok_part in _map_chunks(worker, chunks,
                                                                                   cfg.dataset_num_proc or 1):
            encoded["index"] += tok.pairs_in  # tokenize_pairs numbered the chunk's pairs from 0
            load.rows_read += load_part.rows_read
            load.pairs += load_part.pairs
            load.dropped.update(load_part.dropped)
            nonpositive += nonpositive_part
            for name in ("pairs_in", "pairs_kept", "prompt_truncated", "completion_truncated"):
                setattr(tok, name, getattr(tok, name) + getattr(tok_part, name))
            tok.dropped.update(tok_part.dropped)
            progress.update(rows_in)
            if len(encoded["index"]):
                content.update(encoded)
                yield encoded

    try:
        num_pairs = write_pairs(directory, batches())
    finally:
        progress.close()
    check_some_pairs(load)
    if not num_pairs:
        raise DataError(
            load.source, None, None,
            f"every pair was dropped ({json.dumps(tok.as_dict()['dropped'])}); "
            f"raise max_length ({cfg.max_length}) or "
            + (f"lower max_prompt_length ({cfg.prompt_limit()})" if cfg.prompt_limit() is not None
               else "set max_prompt_length to cut long prompts"),
        )
    summary = {**load.as_dict(), "nonpositive_score_diff": nonpositive,
               "nonpositive_policy": cfg.nonpositive_score_diff if nonpositive else None,
               "tokenization": tok.as_dict()}
    return num_pairs, {"summary": summary, "row_label": first.row_label, "content": content.hexdigest()}


class _ChunkWorker:
    """Rows -> pairs -> score policy -> tokens, for one chunk; runs in the main process or in a
    worker (everything it holds pickles: the config, the tokenizer)."""

    def __init__(self, cfg, tokenizer, fmt: str, columns: Columns, score_policy: bool):
        self.cfg, self.tokenizer, self.fmt, self.columns, self.score_policy = cfg, tokenizer, fmt, columns, score_policy

    def __call__(self, raw: RawRows):
        load = LoadStats(raw.source, self.fmt)
        pairs = convert_rows(raw, self.fmt, self.columns, self.tokenizer, load)
        pairs, nonpositive = apply_score_policy(pairs, self.cfg) if self.score_policy else (pairs, 0)
        tokenized, tok = tokenize_pairs(pairs, self.tokenizer, max_length=self.cfg.max_length,
                                        max_prompt_length=self.cfg.prompt_limit(),
                                        max_completion_length=self.cfg.max_completion_length,
                                        truncation_mode=self.cfg.truncation_mode)
        return len(raw), encode_pairs(tokenized), load, nonpositive, tok


_WORKER: _ChunkWorker | None = None


def _init_worker(worker: _ChunkWorker) -> None:
    global _WORKER
    _WORKER = worker


def _run_worker(raw: RawRows):
    return _WORKER(raw)


def _map_chunks(worker: _ChunkWorker, chunks, num_proc: int):
    """``worker`` over ``chunks``, results in input order (so the first bad row in the file is the
    one reported). With ``num_proc > 1`` the chunks go to worker processes, at most two per worker
    in flight, so reading never runs ahead of tokenizing and memory stays bounded."""
    if num_proc <= 1:
        yield from map(worker, chunks)
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(worker,)) as pool:
        pending: deque = deque()
        for raw in chunks:
            pending.append(pool.apply_async(_run_worker, (raw,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def prepare_train_eval(cfg, tokenizer, *, train_data=None, eval_data=None, score_policy: bool = True
                       ) -> tuple[PairStore, PairStore | None, dict]:
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
    store = s.get("store")
    if store and store["cache"] != "off":
        parts.append(("tokenized pairs reused from " if store["cache"] == "hit" else "tokenized pairs stored in ")
                     + store["path"])
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
