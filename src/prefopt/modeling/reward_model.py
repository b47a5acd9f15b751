"""Bradley–Terry reward models (docs/reward_models.md): a language model with a scalar head.

The model is ``AutoModelForSequenceClassification`` with ``num_labels = 1``, so the saved directory
loads with ``transformers`` alone. Its score for a sequence is the head applied to the hidden state
of the **last real token**, found from the attention mask (never from ``pad_token_id``, which is
often the EOS token that ends every response), with positions counted over real tokens only, so
the score of a text does not depend on the padding side.

Training (``recipes.train_reward_model``) reuses everything of DPO training; only the collator
(``data.collate.RewardPairCollator``) and the objective (``objectives.reward``) are its own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from prefopt.data.collate import pad_sequences
from prefopt.errors import PrefoptError
from prefopt.modeling.load import dropout_free_config, finish_loading, first_line, looks_local
from prefopt.progress import progress_bar

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
                      fused_activations: bool = True, dtype: torch.dtype | None = None,
                      trained_head: bool = False) -> ScalarRewardModel:
    """A causal LM checkpoint (new scalar head, initialised by ``transformers``) or a trained reward
    model, as ``AutoModelForSequenceClassification`` with one output; ``dtype`` as in ``load_causal_lm``.

    ``trained_head=True`` (scoring, evaluation) refuses a checkpoint without saved score-head
    weights: its head would be freshly random and its scores meaningless."""
    if looks_local(name_or_path) and not Path(name_or_path).expanduser().exists():
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
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, config=config, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as e:
        raise PrefoptError(f"cannot load a reward model from {name_or_path!r}: {first_line(e)}") from None
    untrained = [k for k in info.get("missing_keys", ()) if k.split(".")[0] == "score"]
    if trained_head and untrained:
        raise PrefoptError(
            f"{name_or_path} has no trained reward head (no {untrained[0]!r} in its weights): it is a plain "
            "language model; train one with `prefopt reward train`, or score with --policy/--ref"
        )
    return ScalarRewardModel(finish_loading(model, disable_dropout_=disable_dropout_,
                                            fused_activations=fused_activations))


# ----------------------------------------------------------------------------------------------
# Scoring with a reward model


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
    if batch_size < 1:
        raise PrefoptError(f"batch_size must be at least 1, got {batch_size}")
    device = device or device_for_inference()
    model.eval()
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[float] = [0.0] * len(sequences)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    for idx in progress_bar(batches, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
        input_ids, attention_mask = pad_sequences([sequences[i] for i in idx], pad_token_id)
        scores = model(input_ids.to(device), attention_mask.to(device)).tolist()
        for i, s in zip(idx, scores):
            out[i] = s
    return out
