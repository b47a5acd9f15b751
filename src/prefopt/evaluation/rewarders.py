"""Score a preference dataset with a reward, and evaluate a reward on held-out pairs.

Two kinds of reward, one interface (``Rewarder``: token sequences in, one float per response out):

- a trained Bradley–Terry reward model (``modeling/reward_model.py``);
- the implicit reward of a DPO-trained policy, ``beta * (log pi(y|x) - log ref(y|x))``
  (MATH.md section 2), from the same per-pair log-probs as ``prefopt logps``.

``score_dataset`` writes the input rows back, in input order and otherwise unchanged, with
``score_chosen``/``score_rejected`` added (pair formats) or ``scores`` (rated format, one per
response): the file is ready for ``loss_type: odpo``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefopt.data.collate import PaddedPairCollator
from prefopt.data.formats import Columns, detect_format, list_columns, rows_to_pairs
from prefopt.data.prepare import prepare_dataset, summary_line
from prefopt.data.responses import ResponseItem, tokenize_responses
from prefopt.data.sources import RawRows, decode_list_cells, read_rows
from prefopt.data.tokenize import TokenizedPair
from prefopt.data.writers import writer_for
from prefopt.errors import ConfigError, DataError, PrefoptError
from prefopt.evaluation.calibration import plot_reliability, preference_report
from prefopt.io import write_jsonl_atomic, write_text_atomic
from prefopt.losses.combine import check_beta
from prefopt.modeling.load import load_causal_lm, load_tokenizer
from prefopt.modeling.logprobs import score_pairs
from prefopt.modeling.reward_model import device_for_inference, load_reward_model, score_sequences

PAIR_FORMATS = ("explicit", "implicit", "conversational")


# ----------------------------------------------------------------------------------------------
# Rewarders


class ModelRewarder:
    """A trained reward model: the score of ``prompt_ids + response_ids``."""

    kind = "reward_model"

    def __init__(self, path: str, *, batch_size: int, tokenizer_path: str | None = None, progress: bool = True):
        self.tokenizer = load_tokenizer(tokenizer_path or path)
        self.model = load_reward_model(path, pad_token_id=self.tokenizer.pad_token_id, trained_head=True)
        self.device = device_for_inference()
        self.model.to(self.device)
        self.batch_size, self.progress = batch_size, progress
        self.description = f"reward model {path}"

    def score_responses(self, encoded: list[tuple[list[int], list[int]]], groups: list[list[int]]) -> list[float]:
        return score_sequences(self.model, [p + r for p, r in encoded], pad_token_id=self.tokenizer.pad_token_id,
                               batch_size=self.batch_size, device=self.device, progress=self.progress)

    def score_pairs(self, pairs: list[TokenizedPair]) -> tuple[list[float], list[float]]:
        seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
        scores = score_sequences(self.model, seqs, pad_token_id=self.tokenizer.pad_token_id,
                                 batch_size=self.batch_size, device=self.device, progress=self.progress)
        return scores[: len(pairs)], scores[len(pairs):]


def implicit_rewards(policy, ref, pairs: list[TokenizedPair], collator, *, beta: float, batch_size: int, device,
                     progress: bool = False) -> tuple[list[float], list[float]]:
    """DPO's implicit reward ``beta * (log pi(y|x) - log ref(y|x))`` of every pair's chosen and
    rejected response (MATH.md section 2), from the same per-pair log-probs as ``prefopt logps``."""
    kw = dict(batch_size=batch_size, device=device, progress=progress)
    pol = score_pairs(policy, pairs, collator, **kw)
    ref_rows = score_pairs(ref, pairs, collator, **kw)
    chosen = [beta * (a["chosen_logps"] - b["chosen_logps"]) for a, b in zip(pol, ref_rows)]
    rejected = [beta * (a["rejected_logps"] - b["rejected_logps"]) for a, b in zip(pol, ref_rows)]
    return chosen, rejected


class ImplicitRewarder:
    """``beta * (log pi - log ref)`` of a policy against its reference, per response."""

    kind = "implicit"

    def __init__(self, policy: str, ref: str, *, beta: float, batch_size: int, tokenizer_path: str | None = None,
                 progress: bool = True):
        self.tokenizer = load_tokenizer(tokenizer_path or policy)
        self.device = device_for_inference()
        self.policy = load_causal_lm(policy, disable_dropout_=True).to(self.device)
        self.ref = load_causal_lm(ref, disable_dropout_=True).to(self.device)
        self.beta, self.batch_size, self.progress = beta, batch_size, progress
        self.description = f"implicit reward {beta} * (log pi - log ref), pi = {policy}, ref = {ref}"

    def score_pairs(self, pairs: list[TokenizedPair]) -> tuple[list[float], list[float]]:
        return implicit_rewards(self.policy, self.ref, pairs, PaddedPairCollator(self.tokenizer.pad_token_id),
                                beta=self.beta, batch_size=self.batch_size, device=self.device,
                                progress=self.progress)

    def score_responses(self, encoded: list[tuple[list[int], list[int]]], groups: list[list[int]]) -> list[float]:
        """Responses of one row share a prompt, so they are scored two at a time as the chosen and
        rejected side of a pair (the last one of an odd group with itself): the same code path
        as ``prefopt logps``."""
        pairs, slots = [], []
        for group in groups:
            for k in range(0, len(group), 2):
                a, b = group[k], group[min(k + 1, len(group) - 1)]
                pairs.append(TokenizedPair(encoded[a][0], encoded[a][1], encoded[b][1], None, None, len(pairs)))
                slots.append((a, b))
        chosen, rejected = self.score_pairs(pairs)
        out = [0.0] * len(encoded)
        for (a, b), s_a, s_b in zip(slots, chosen, rejected):
            out[a], out[b] = s_a, s_b
        return out


def build_rewarder(cfg, *, model: str | None, policy: str | None, ref: str | None, batch_size: int):
    """``--model RM`` or ``--policy P --ref R`` (``--beta`` from the config keys), not both."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if model and (policy or ref):
        raise ConfigError("give either --model (a reward model) or --policy and --ref (implicit reward), not both")
    if model:
        return ModelRewarder(model, batch_size=batch_size, tokenizer_path=cfg.tokenizer_name_or_path,
                             progress=cfg.progress_bar)
    if policy or ref:
        if not (policy and ref):
            raise ConfigError("the implicit reward needs both --policy and --ref")
        return ImplicitRewarder(policy, ref, beta=check_beta(cfg.beta), batch_size=batch_size,
                                tokenizer_path=cfg.tokenizer_name_or_path, progress=cfg.progress_bar)
    raise ConfigError("give --model RM_DIR, or --policy P --ref R [--beta B] for the implicit reward")


# ----------------------------------------------------------------------------------------------
# `prefopt reward score`


@dataclass
class _Slot:
    row: int  # position in the input rows
    key: str  # the column it goes to
    index: int | None  # the position in the `scores` list (rated format)


def _items(raw: RawRows, fmt: str, c: Columns, tokenizer) -> tuple[list[ResponseItem], list[_Slot], list[list[int]]]:
    """What to score in every row; ``groups`` lists the items of each row (they share a prompt)."""
    items, slots, groups = [], [], []
    if fmt in PAIR_FORMATS:
        pairs, _ = rows_to_pairs(raw, fmt=fmt, columns=c, tokenizer=tokenizer)
        position = {row_no: i for i, (row_no, _) in enumerate(raw.rows)}
        for pair in pairs:  # one pair per row in these formats, in row order
            first = len(items)
            for key, text in ((c.score_chosen, pair.chosen), (c.score_rejected, pair.rejected)):
                items.append(ResponseItem(pair.prompt, text, pair.templated))
                slots.append(_Slot(position[pair.row], key, None))
            groups.append([first, first + 1])
        return items, slots, groups
    if fmt == "rated":
        for pos, (row_no, row) in enumerate(raw.rows):
            prompt = row.get(c.prompt)
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataError(raw.source, row_no, c.prompt, "expected a non-empty string", raw.row_label)
            responses = row.get(c.responses)
            if not isinstance(responses, list) or not responses:
                raise DataError(raw.source, row_no, c.responses, "expected a non-empty list of strings", raw.row_label)
            first = len(items)
            for k, text in enumerate(responses):
                # an empty sample is scored too (prompt + EOS): every response gets a number, and
                # the rated loader drops empty samples itself
                if not isinstance(text, str):
                    raise DataError(raw.source, row_no, f"{c.responses}[{k}]", f"expected a string, got "
                                    f"{type(text).__name__}", raw.row_label)
                items.append(ResponseItem(prompt, text))
                slots.append(_Slot(pos, c.scores, k))
            groups.append(list(range(first, len(items))))
        return items, slots, groups
    raise PrefoptError(
        f"{raw.source}: `prefopt reward score` writes scores for the explicit, implicit, conversational and rated "
        f"formats, not {fmt!r}; group one-response-per-row data into rated rows (prompt, responses)"
    )


def score_dataset(cfg, rewarder, output: str | Path) -> dict[str, Any]:
    """Score every response of ``cfg.dataset`` and write the rows, with the scores added, to
    ``output`` (format from its extension: .jsonl, .json, .parquet, .csv)."""
    if not cfg.dataset:
        raise ConfigError("prefopt reward score needs --dataset")
    output = Path(output)
    writer = writer_for(output)
    raw = read_rows(cfg.dataset, cfg.dataset_split)
    if len(raw) == 0:
        raise DataError(raw.source, None, None, "the dataset is empty")
    c = Columns.from_config(cfg)
    fmt = detect_format(raw, c) if cfg.dataset_format == "auto" else cfg.dataset_format
    raw = decode_list_cells(raw, list_columns(fmt, c))
    items, slots, groups = _items(raw, fmt, c, rewarder.tokenizer)
    encoded, stats = tokenize_responses(items, rewarder.tokenizer, max_length=cfg.max_length,
                                        max_prompt_length=cfg.max_prompt_length)
    scores = rewarder.score_responses(encoded, groups)
    rows = [dict(row) for _, row in raw.rows]
    if fmt == "rated":
        for row in rows:
            row[c.scores] = [None] * len(row[c.responses])
    for slot, score in zip(slots, scores):
        if slot.index is None:
            rows[slot.row][slot.key] = score
        else:
            rows[slot.row][slot.key][slot.index] = score
    writer(output, rows)
    summary = {"rows": len(rows), "responses": len(items), "format": fmt, "rewarder": rewarder.description,
               "prompt_truncated": stats.prompt_truncated, "response_truncated": stats.response_truncated,
               "prompt_cut_to_fit": stats.prompt_cut_to_fit, "output": str(output)}
    if fmt in PAIR_FORMATS:
        summary["pairs_chosen_not_above_rejected"] = sum(
            1 for r in rows if not r[c.score_chosen] > r[c.score_rejected]
        )
    return summary


# ----------------------------------------------------------------------------------------------
# `prefopt reward eval`


def evaluate_rewarder(cfg, rewarder, *, n_bins: int = 10, output: str | Path | None = None,
                      plot: str | Path | None = None) -> dict[str, Any]:
    """Preference accuracy and calibration of ``sigmoid(r_w - r_l)`` on ``cfg.dataset``'s pairs
    (the pairs training would see: same formats, tokenization and filters)."""
    if not cfg.dataset:
        raise ConfigError("prefopt reward eval needs --dataset")
    if n_bins < 1:
        raise ConfigError(f"--bins must be at least 1, got {n_bins}")
    # ODPO's score policy (drop pairs whose scores disagree with the label) is no business of a
    # reward's evaluation: every labelled pair counts.
    pairs, summary = prepare_dataset(cfg, cfg.dataset, cfg.dataset_split, rewarder.tokenizer, score_policy=False)
    print(f"prefopt: {summary_line('eval', summary)}", file=sys.stderr)
    chosen, rejected = rewarder.score_pairs(pairs)
    report = preference_report(chosen, rejected, n_bins=n_bins)
    result = {"dataset": cfg.dataset, "rewarder": rewarder.description, **report.as_dict()}
    if output:
        write_text_atomic(output, json.dumps(result, indent=2) + "\n")
        write_jsonl_atomic(Path(output).with_suffix(".pairs.jsonl"), [
            {"index": p.index, "reward_chosen": a, "reward_rejected": b} for p, a, b in zip(pairs, chosen, rejected)
        ])
    if plot:
        plot_reliability(report, plot, title=f"{rewarder.kind.replace('_', ' ')}: {Path(cfg.dataset).name}")
        result["plot"] = str(plot)
    return result
