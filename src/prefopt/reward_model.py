"""Bradley–Terry reward models (MATH.md section 1): a language model with a scalar head.

The model is ``AutoModelForSequenceClassification`` with ``num_labels = 1``, so the saved directory
loads with ``transformers`` alone. Its score for a sequence is the head applied to the hidden state
of the **last real token**, found from the attention mask (never from ``pad_token_id``, which is
often the EOS token that ends every response), with positions counted over real tokens only, so
the score of a text does not depend on the padding side.

Training reuses everything of DPO training: ``prepare_dataset`` (formats, validation,
tokenization), the one ``Trainer`` (loop, checkpoints, ``metrics.jsonl``, eval rows); only the
collator (two plain sequences per pair) and the objective (the BT loss) are new.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prefopt.data.tokenize import TokenizedPair
from prefopt.errors import DataError, PrefoptError
from prefopt.reward_losses import bt_loss

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# Reading the score at the last real token


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last position with ``attention_mask == 1`` in every row, ``[N]``.

    Works for right padding (``sum - 1``), left padding (``L - 1``) and anything in between."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [N, L], got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    if not mask.any(dim=1).all():
        raise ValueError("a row of the batch has no real token")
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that count real tokens only (0, 1, 2, ... from the first real token), so a
    left-padded row gets the same positions as the same text right-padded."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)


class ScalarRewardModel(torch.nn.Module):
    """Wraps a ``*ForSequenceClassification`` model: ``forward(input_ids, attention_mask) -> [N]``.

    The wrapper is what the training loop prepares (so DDP sees the real forward pass); ``.hf`` is
    the ``transformers`` model that is saved.
    """

    def __init__(self, hf_model: torch.nn.Module):
        super().__init__()
        self.hf = hf_model
        head = getattr(hf_model, "score", None)
        if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
            raise PrefoptError(
                f"{type(hf_model).__name__} has no one-output `score` head; a reward model needs a decoder "
                "architecture whose sequence classifier is `score` (Llama, GPT-2, Mistral, Qwen, ...)"
            )

    # The state dict is the transformers model's own (no "hf." prefix), so checkpoints, resuming
    # and save_pretrained all see the same keys.
    def state_dict(self, *args, **kwargs):
        return self.hf.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.hf.load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        backbone = self.hf.base_model
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask), use_cache=False,
        ).last_hidden_state  # [N, L, H]
        last = last_token_index(attention_mask)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [N, H]
        return self.hf.score(picked).squeeze(-1).float()  # only N rows go through the head


def load_reward_model(name_or_path: str, *, pad_token_id: int | None, disable_dropout_: bool = True,
                      fused_activations: bool = True) -> ScalarRewardModel:
    """A causal LM checkpoint (new scalar head, initialised by ``transformers``) or a trained reward
    model, as ``AutoModelForSequenceClassification`` with one output."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from prefopt.modeling import _first_line, _looks_local, dropout_free_config, finish_loading

    if _looks_local(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise PrefoptError(f"model path not found: {name_or_path}")
    try:
        config = dropout_free_config(name_or_path) if disable_dropout_ else AutoConfig.from_pretrained(name_or_path)
        if getattr(config, "num_labels", 1) != 1 and any(
            a.endswith("ForSequenceClassification") for a in (config.architectures or [])
        ):
            raise PrefoptError(f"{name_or_path} is a classifier with {config.num_labels} labels, not a reward model")
        config.num_labels = 1
        config.problem_type = "regression"
        if pad_token_id is not None:
            # transformers' own forward pools at the last token != pad_token_id; ours uses the mask.
            config.pad_token_id = pad_token_id
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, config=config)
    except (OSError, ValueError) as e:
        raise PrefoptError(f"cannot load a reward model from {name_or_path!r}: {_first_line(e)}") from None
    return ScalarRewardModel(finish_loading(model, disable_dropout_=disable_dropout_,
                                            fused_activations=fused_activations))


# ----------------------------------------------------------------------------------------------
# Batches and the training objective


def pad_sequences(sequences: list[list[int]], pad_token_id: int, padding_side: str = "right") -> tuple[Tensor, Tensor]:
    """``input_ids`` and ``attention_mask`` ``[N, L]`` for token lists, padded on either side."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', not {padding_side!r}")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, seq in enumerate(sequences):
        span = slice(0, len(seq)) if padding_side == "right" else slice(width - len(seq), width)
        input_ids[r, span] = torch.tensor(seq, dtype=torch.long)
        attention_mask[r, span] = 1
    return input_ids, attention_mask


class RewardPairCollator:
    """``2B`` rows: ``prompt + chosen`` for every pair, then ``prompt + rejected`` for every pair.

    Scores are passed through (``score_chosen``/``score_rejected``, ``[B]``) when every pair has
    them; the objective turns them into BT margins when ``margin_from_scores`` is on."""

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        self.pad_token_id, self.padding_side = pad_token_id, padding_side

    def __call__(self, pairs: list[TokenizedPair]) -> dict[str, Tensor]:
        sequences = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
        input_ids, attention_mask = pad_sequences(sequences, self.pad_token_id, self.padding_side)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "num_pairs": torch.tensor(len(pairs)),
            "num_tokens": attention_mask.sum(),
            "pair_index": torch.tensor([p.index for p in pairs], dtype=torch.long),
        }
        if all(p.score_chosen is not None and p.score_rejected is not None for p in pairs):
            batch["score_chosen"] = torch.tensor([p.score_chosen for p in pairs], dtype=torch.float64)
            batch["score_rejected"] = torch.tensor([p.score_rejected for p in pairs], dtype=torch.float64)
        return batch


def score_margins(score_chosen: Tensor, score_rejected: Tensor, scale: float) -> Tensor:
    """The BT margin ``m = scale * max(s_w - s_l, 0)`` per pair (MATH.md: ``m >= 0``)."""
    return (scale * (score_chosen - score_rejected)).clamp_min(0.0)


class RewardObjective:
    """``objective(model, batch) -> (losses [B], metrics {name: [B]})`` for the training loop."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self, model, batch):
        n = int(batch["num_pairs"])
        scores = model(batch["input_ids"], batch["attention_mask"])  # [2B]
        chosen, rejected = scores[:n], scores[n:]
        margin = None
        if self.cfg.margin_from_scores:
            if "score_chosen" not in batch:
                raise PrefoptError("margin_from_scores needs score_chosen and score_rejected on every pair")
            margin = score_margins(batch["score_chosen"], batch["score_rejected"], self.cfg.margin_scale)
        losses = bt_loss(chosen, rejected, margin)
        chosen, rejected = chosen.detach(), rejected.detach()
        metrics = {
            "accuracy": (chosen > rejected).float(),
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
        }
        if margin is not None:
            metrics["margin"] = margin.float()
        return losses, metrics


def check_margin_scores(tokenized: list[TokenizedPair], cfg, source: str) -> int:
    """With ``margin_from_scores`` every pair needs both scores; returns how many pairs have
    ``s_w < s_l`` (their margin is clamped to 0)."""
    if not cfg.margin_from_scores:
        return 0
    missing = [p for p in tokenized if p.score_chosen is None or p.score_rejected is None]
    if missing:
        raise DataError(source, None, cfg.score_chosen_column,
                        f"margin_from_scores is on but {len(missing)} pair(s) have no scores")
    return sum(1 for p in tokenized if p.score_chosen < p.score_rejected)


# ----------------------------------------------------------------------------------------------
# `prefopt reward train`


def train_reward_model(cfg) -> dict[str, Any]:
    """Train a BT reward model on ``cfg`` (the ``TrainConfig`` of DPO training). Returns the last
    logged metrics; the model, tokenizer, config and metrics land in ``cfg.output_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from prefopt.errors import ConfigError
    from prefopt.modeling import load_tokenizer
    from prefopt.pipeline import prepare_train_eval, print_summaries, run_trainer, start_output_dir
    from prefopt.train import Trainer

    cfg.validate()
    if cfg.margin_scale < 0:
        raise ConfigError(f"margin_scale must be >= 0, got {cfg.margin_scale}")
    from prefopt.preflight import plan_run

    plan = plan_run(cfg)  # output_dir rule, model paths, checkpoint to resume: before anything is read
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    # ODPO's score policy does not apply: a reward model learns from every labelled pair.
    data_cfg = dataclasses.replace(cfg, loss_type="dpo")
    train_pairs, eval_pairs, summaries = prepare_train_eval(cfg, tokenizer, data_cfg)
    negative = check_margin_scores(train_pairs, cfg, cfg.dataset)
    if eval_pairs is not None:
        check_margin_scores(eval_pairs, cfg, cfg.eval_dataset)
    print_summaries(summaries, accelerator)
    if accelerator.is_main_process:
        if negative:
            print(f"prefopt: train: {negative} pairs have score_chosen < score_rejected; their margin is 0",
                  file=sys.stderr)

    model = load_reward_model(cfg.model_name_or_path, pad_token_id=tokenizer.pad_token_id,
                              disable_dropout_=cfg.disable_dropout, fused_activations=cfg.fused_activations)
    summaries["margin_clamped_to_zero"] = negative
    start_output_dir(cfg, plan, summaries, accelerator)

    def save_model(wrapper: ScalarRewardModel, directory: Path) -> None:
        wrapper.hf.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    trainer = Trainer(
        cfg,
        model=model,
        train_data=train_pairs,
        eval_data=eval_pairs,
        collator=RewardPairCollator(tokenizer.pad_token_id),
        objective=RewardObjective(cfg),
        save_model=save_model,
        accelerator=accelerator,
    )
    return run_trainer(trainer, plan)


# ----------------------------------------------------------------------------------------------
# Scoring with a trained reward model


def device_for_inference() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def score_sequences(
    model: ScalarRewardModel,
    sequences: list[list[int]],
    *,
    pad_token_id: int,
    batch_size: int = 16,
    device=None,
    progress: bool = False,
    desc: str = "score",
) -> list[float]:
    """The reward of every token sequence, in input order. Batches are formed from sequences of
    similar length (sorted), which cuts padding; the results are put back in input order."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise PrefoptError(f"batch_size must be at least 1, got {batch_size}")
    device = device or device_for_inference()
    model.eval()
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[float] = [0.0] * len(sequences)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
        input_ids, attention_mask = pad_sequences([sequences[i] for i in idx], pad_token_id)
        scores = model(input_ids.to(device), attention_mask.to(device)).tolist()
        for i, s in zip(idx, scores):
            out[i] = s
    return out


def _saved_lengths(path: str | Path) -> tuple[int, int | None]:
    """``max_length``/``max_prompt_length`` the reward model was trained with (its config.yaml),
    else the TrainConfig defaults."""
    import yaml

    from prefopt.config import TrainConfig

    defaults = TrainConfig()
    cfg_file = Path(path) / "config.yaml"
    if cfg_file.is_file():
        try:
            saved = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            saved = {}
        if isinstance(saved, dict):
            return int(saved.get("max_length", defaults.max_length)), saved.get(
                "max_prompt_length", defaults.max_prompt_length
            )
    return defaults.max_length, defaults.max_prompt_length


def reward_model_scorer(path: str | Path, *, batch_size: int = 16, device=None) -> Callable[[list[str]], list[float]]:
    """A scorer for ``prefopt eval --scorer``: ``scorer(texts) -> rewards``, one float per text.

    Each text is scored as one whole sequence (prompt and response together, as the model saw them
    in training): BOS when the tokenizer adds one, EOS appended, cut to the ``max_length`` the model
    was trained with."""
    from prefopt.data.responses import ResponseItem, tokenize_responses
    from prefopt.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(path))
    model = load_reward_model(str(path), pad_token_id=tokenizer.pad_token_id)
    device = device or device_for_inference()
    model.to(device)
    max_length, max_prompt_length = _saved_lengths(path)

    def scorer(texts: list[str]) -> list[float]:
        encoded, _ = tokenize_responses([ResponseItem("", t) for t in texts], tokenizer,
                                        max_length=max_length, max_prompt_length=max_prompt_length)
        return score_sequences(model, [p + r for p, r in encoded], pad_token_id=tokenizer.pad_token_id,
                               batch_size=batch_size, device=device)

    return scorer
