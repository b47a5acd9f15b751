"""Build everything a run needs from a config: tokenizer, pairs, models, objective, trainer."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from prefopt.config import TrainConfig, save_config
from prefopt.data.formats import Columns, load_pairs
from prefopt.data.layouts import choose_layout, make_collator
from prefopt.data.records import PreferencePair
from prefopt.data.tokenize import TokenizedPair, tokenize_pairs
from prefopt.errors import DataError
from prefopt.losses import loss_needs_reference, loss_needs_scores


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


def prepare_dataset(cfg, spec: str, split: str, tokenizer) -> tuple[list[TokenizedPair], dict]:
    """Read, validate, convert and tokenize one dataset; return the pairs and a summary."""
    pairs, load_stats = load_pairs(
        spec, split=split, fmt=cfg.dataset_format, columns=Columns.from_config(cfg), tokenizer=tokenizer
    )
    pairs, nonpositive = apply_score_policy(pairs, cfg)
    tokenized, tok_stats = tokenize_pairs(
        pairs, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length
    )
    summary = {**load_stats.as_dict(), "nonpositive_score_diff": nonpositive,
               "nonpositive_policy": cfg.nonpositive_score_diff if nonpositive else None,
               "tokenization": tok_stats.as_dict()}
    if not tokenized:
        raise DataError(
            spec, None, None,
            f"every pair was dropped ({json.dumps(tok_stats.as_dict()['dropped'])}); "
            f"raise max_length ({cfg.max_length}) or "
            + (f"lower max_prompt_length ({cfg.max_prompt_length})" if cfg.max_prompt_length is not None
               else "set max_prompt_length to cut long prompts"),
        )
    return tokenized, summary


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
    return "; ".join(parts)


def prepare_train_eval(cfg, tokenizer, data_cfg=None) -> tuple[list[TokenizedPair], list[TokenizedPair] | None, dict]:
    """The training pairs, the eval pairs (or None) and their summaries; ``data_cfg`` (default
    ``cfg``) decides the data rules, ``cfg`` where the data is."""
    data_cfg = data_cfg or cfg
    train_pairs, train_summary = prepare_dataset(data_cfg, cfg.dataset, cfg.dataset_split, tokenizer)
    summaries = {"train": train_summary}
    eval_pairs = None
    if cfg.eval_dataset:
        eval_pairs, summaries["eval"] = prepare_dataset(data_cfg, cfg.eval_dataset, cfg.eval_dataset_split,
                                                        tokenizer)
    return train_pairs, eval_pairs, summaries


def print_summaries(summaries: dict, accelerator) -> None:
    if accelerator.is_main_process:
        for role, s in summaries.items():
            print(f"prefopt: {summary_line(role, s)}", file=sys.stderr)


def start_output_dir(cfg, plan, summaries: dict, accelerator) -> Path:
    """Clear an old run if allowed (every input is checked by now), then write the resolved config
    and the data summary. Main process only."""
    from prefopt.preflight import prepare_output_dir

    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        prepare_output_dir(cfg, plan)
        save_config(cfg, output_dir / "config.yaml")
        (output_dir / "data_summary.json").write_text(json.dumps(summaries, indent=2) + "\n")
    return output_dir


def run_trainer(trainer, plan) -> dict[str, Any]:
    """Restore the checkpoint the plan names, if any, then train."""
    if plan.resume_from is not None:
        from prefopt.checkpoint import restore

        restore(trainer, plan.resume_from)
    return trainer.train()


def train(cfg: TrainConfig) -> dict[str, Any]:
    """``prefopt train``: DPO/ODPO/... on ``cfg``. Returns the last logged metrics."""
    from accelerate.utils import set_seed

    from prefopt.distributed import build_accelerator, build_models, load_dtype
    from prefopt.dpo import PreferenceObjective
    from prefopt.modeling import load_tokenizer
    from prefopt.preflight import plan_run
    from prefopt.train import Trainer

    cfg.validate()
    plan = plan_run(cfg)  # output_dir rule, model paths, checkpoint to resume: before anything is read
    if cfg.return_freed_memory:
        from prefopt.memory import return_freed_memory

        return_freed_memory()  # lower peak RSS on CPU (memory.py)

    accelerator = build_accelerator(cfg)  # engine, mixed precision, torch.compile (issue 7)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    train_pairs, eval_pairs, summaries = prepare_train_eval(cfg, tokenizer)
    print_summaries(summaries, accelerator)

    # Policy (+ LoRA adapter) and the reference callable, placed for the running engine. A
    # precomputed reference (issue 6) replaces the live one: no second model is loaded for it.
    precompute = cfg.precompute_ref_log_probs and loss_needs_reference(cfg.loss_type, cfg.reference_free)
    policy, reference = build_models(cfg, accelerator, live_reference=not precompute)
    collator = make_collator(choose_layout(cfg.layout, train_pairs, cfg.per_device_train_batch_size, policy,
                                           cfg.pack_row_tokens), tokenizer.pad_token_id, cfg.pack_row_tokens)
    if precompute:
        from prefopt.reference import cached_reference

        reference, eval_pairs = cached_reference(cfg, policy, train_pairs, eval_pairs, collator, accelerator)

    output_dir = start_output_dir(cfg, plan, summaries, accelerator)

    def save_model(model, directory: Path, **kwargs) -> None:
        model.save_pretrained(directory, **kwargs)  # a PEFT model writes only its adapter
        tokenizer.save_pretrained(directory)

    trainer = Trainer(
        cfg,
        model=policy,
        train_data=train_pairs,
        eval_data=eval_pairs,
        collator=collator,
        objective=PreferenceObjective(cfg, reference),
        save_model=save_model,
        accelerator=accelerator,
    )
    final = run_trainer(trainer, plan)
    if cfg.use_peft and cfg.merge_adapter_on_save:
        from prefopt.peft_support import merge_adapter

        # From the saved adapter files, on one process: the same for every engine.
        if accelerator.is_main_process:
            merged = merge_adapter(cfg.model_name_or_path, output_dir, output_dir / "merged", dtype=load_dtype(cfg))
            tokenizer.save_pretrained(merged)
        accelerator.wait_for_everyone()
    return final


def compute_pair_logps(model, pairs: list[TokenizedPair], collator, *, batch_size: int, device, progress: bool = True):
    """Per-pair summed log-probs of ``model`` in input order, batched, no gradients."""
    import torch
    from tqdm.auto import tqdm

    from prefopt.logprobs import pair_logps
    from prefopt.memory import transient_heap
    from prefopt.train import iterate_in_order, to_device

    model.eval()
    rows = []
    with torch.no_grad(), transient_heap():
        for indices in tqdm(list(iterate_in_order(len(pairs), batch_size)), desc="logps", disable=not progress):
            batch = to_device(collator([pairs[i] for i in indices]), device)
            out = {k: v.tolist() for k, v in pair_logps(model, batch).items()}
            for j, i in enumerate(indices):
                rows.append({"index": pairs[i].index, **{k: out[k][j] for k in out}})
    return rows


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> None:
    """Write to a temporary file beside ``path`` and rename: a failure never leaves half a file."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def logps(cfg: TrainConfig, output: str, batch_size: int = 8) -> int:
    """``prefopt logps``: per-pair log-probs of ``cfg.model_name_or_path`` with training's tokenization."""
    import torch

    from prefopt.modeling import load_causal_lm, load_tokenizer

    if not cfg.model_name_or_path or not cfg.dataset:
        from prefopt.errors import ConfigError

        raise ConfigError("prefopt logps needs --model and --dataset")
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    pairs, summary = prepare_dataset(cfg, cfg.dataset, cfg.dataset_split, tokenizer)
    print(f"prefopt: {summary_line('logps', summary)}", file=sys.stderr)
    model = load_causal_lm(cfg.model_name_or_path, disable_dropout_=True, fused_activations=cfg.fused_activations)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    collator = make_collator(choose_layout(cfg.layout, pairs, batch_size, model, cfg.pack_row_tokens),
                             tokenizer.pad_token_id, cfg.pack_row_tokens)
    rows = compute_pair_logps(model, pairs, collator, batch_size=batch_size, device=device)
    write_jsonl_atomic(output, rows)
    print(f"prefopt: wrote {len(rows)} pairs to {output}", file=sys.stderr)
    from prefopt.reference import store_rows

    cached = store_rows(cfg, cfg.model_name_or_path, pairs, rows)
    print(f"prefopt: reference log-prob cache entry {cached}", file=sys.stderr)
    return len(rows)
