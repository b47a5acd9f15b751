"""Layouts that share the prompt and drop padding (MATH.md section 7).

Both collators here follow the batch contract of ``collate.py`` (model inputs plus flat targets), so
``logprobs.response_logps`` scores them unchanged. They differ from the plain layout in the model
inputs:

- ``input_ids [R, L]`` where each pair is one *segment* ``[prompt | chosen | rejected]``;
- ``position_ids [R, L]``: the prompt and chosen tokens count up from 0 and the rejected tokens
  restart right after the prompt, so the rejected branch sees the same positions as in its own row;
- ``attention_mask [R, 1, L, L]`` (bool, True = may attend): causal within a segment, the rejected
  tokens never see the chosen ones, and nothing crosses segments. A padding position attends only
  to itself, so no query row is fully masked (that would give NaN in SDPA and poison the gradients).

``PrefixSharedCollator`` puts one pair per row (padding to the longest pair); ``PackedCollator`` packs
several pairs into each row, first-fit decreasing, so the rows carry (almost) no padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from prefopt.data.collate import PaddedPairCollator, target_batch
from prefopt.data.tokenize import TokenizedPair
from prefopt.errors import ConfigError

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3


def segment_length(pair: TokenizedPair) -> int:
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def shared_prefix_batch(rows: list[list[int]], pairs: list[TokenizedPair], pad_token_id: int) -> dict:
    """Build the batch for ``rows``: each row is a list of indices into ``pairs`` (its segments)."""
    width = max(sum(segment_length(pairs[j]) for j in row) for row in rows)
    n_rows = len(rows)
    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    segment = torch.full((n_rows, width), -1, dtype=torch.long)  # -1: padding
    branch = torch.full((n_rows, width), PAD, dtype=torch.long)
    t_rows, t_pos, t_tok, t_resp = [], [], [], []
    for r, row in enumerate(rows):
        at = 0
        for s, j in enumerate(row):
            p = pairs[j]
            n_p, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
            n = n_p + n_c + n_r
            input_ids[r, at : at + n] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids)
            position_ids[r, at : at + n_p + n_c] = torch.arange(n_p + n_c)
            position_ids[r, at + n_p + n_c : at + n] = torch.arange(n_p, n_p + n_r)
            segment[r, at : at + n] = s
            branch[r, at + n_p : at + n_p + n_c] = CHOSEN
            branch[r, at + n_p + n_c : at + n] = REJECTED
            branch[r, at : at + n_p] = PROMPT
            last_prompt = at + n_p - 1
            # chosen token k sits at at+n_p+k and is predicted from the position before it;
            # the first rejected token is predicted from the last prompt token, not the last chosen one.
            for k, tok in enumerate(p.chosen_ids):
                t_rows.append(r)
                t_pos.append(at + n_p + k - 1)
                t_tok.append(tok)
                t_resp.append(2 * j)
            for k, tok in enumerate(p.rejected_ids):
                t_rows.append(r)
                t_pos.append(last_prompt if k == 0 else at + n_p + n_c + k - 1)
                t_tok.append(tok)
                t_resp.append(2 * j + 1)
            at += n
    attention_mask = segment_attention_mask(segment, branch)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    return target_batch(pairs, inputs, (t_rows, t_pos, t_tok, t_resp), (segment >= 0).sum())


def segment_attention_mask(segment: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``[R, 1, L, L]`` bool mask from per-token segment ids (-1 = padding) and branches.

    Query q may see key k iff both are in the same segment, k <= q, and not (q is rejected and
    k is chosen). Padding sees only itself.
    """
    length = segment.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    crossing = (branch[:, :, None] == REJECTED) & (branch[:, None, :] == CHOSEN)
    mask = same & causal & ~crossing
    mask |= torch.eye(length, dtype=torch.bool)  # padding rows: attend to self only
    return mask[:, None]


class PrefixSharedCollator:
    """One row per pair, ``[prompt | chosen | rejected]``: the prompt is computed once, not twice."""

    layout = "prefix_shared"

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
        return shared_prefix_batch([[j] for j in range(len(pairs))], pairs, self.pad_token_id)


class PackedCollator:
    """Several prefix-shared pairs per row, first-fit decreasing into rows of ``row_tokens`` tokens
    (default: the longest pair of the batch, so a row costs no more attention than prefix sharing
    and short pairs fill the room that would otherwise be padding)."""

    layout = "packed"

    def __init__(self, pad_token_id: int, row_tokens: int = 0):
        self.pad_token_id = pad_token_id
        self.row_tokens = row_tokens

    def __call__(self, pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
        lengths = [segment_length(p) for p in pairs]
        capacity = max(self.row_tokens, max(lengths))
        rows: list[list[int]] = []
        room: list[int] = []
        for j in sorted(range(len(pairs)), key=lambda j: -lengths[j]):
            for r in range(len(rows)):
                if lengths[j] <= room[r]:
                    rows[r].append(j)
                    room[r] -= lengths[j]
                    break
            else:
                rows.append([j])
                room.append(capacity - lengths[j])
        return shared_prefix_batch(rows, pairs, self.pad_token_id)


# ------------------------------------------------------------------------------------------------
# Choosing a layout

LAYOUTS = ("plain", "prefix_shared", "packed")
MASKABLE_ATTENTION = ("sdpa", "eager", "flex_attention")


@dataclass(frozen=True)
class LayoutRule:
    """How ``layout: auto`` costs a batch for one (device, attention implementation).

    ``attention``: ``"dense"`` when the kernel computes every (query, key) pair of a row whatever
    the mask says (so a shared row pays for its masked quarter and its padding), ``"allowed"`` when
    it skips fully masked blocks (FlexAttention's block mask), so a row costs about the pairs its
    mask allows. ``min_saving``: how much cheaper than a simpler layout a layout must be estimated
    to be chosen. ``why``: the evidence, shown in docs/performance.md."""

    attention: str
    min_saving: float
    why: str


# The policy of ``layout: auto``, one row per (device type, attention implementation); anything
# not listed gets DEFAULT_RULE. The CPU rows are measured (docs/benchmarks.md); the CUDA rows are
# reasoned, not yet measured: benchmarks/gpu_check.py measures every layout x backend on a GPU, and
# these rows are to be set from its table (docs/performance.md, "layout: auto on a GPU").
LAYOUT_RULES: dict[tuple[str, str], LayoutRule] = {
    ("cpu", "sdpa"): LayoutRule("dense", 0.05, "measured on CPU: SDPA's CPU kernel takes the bool mask at full "
                                "speed and computes every pair, masked or not"),
    ("cpu", "eager"): LayoutRule("dense", 0.05, "eager attention computes every pair"),
    ("cuda", "flex_attention"): LayoutRule("allowed", 0.05, "FlexAttention's block mask skips fully masked "
                                           "blocks: a shared or packed row costs the pairs it needs"),
    ("cuda", "sdpa"): LayoutRule("dense", 0.15, "a 4D mask keeps SDPA off its flash kernel (the memory-efficient "
                                 "kernel computes every pair); unmeasured, so a shared layout must save 15%"),
    ("cuda", "eager"): LayoutRule("dense", 0.05, "eager attention computes every pair"),
}
DEFAULT_RULE = LayoutRule("dense", 0.05, "no rule for this device: the CPU cost model")


def layout_rule(device_type: str, attn_impl: str) -> LayoutRule:
    return LAYOUT_RULES.get((device_type, attn_impl), DEFAULT_RULE)


def _causal(n: int) -> int:
    return n * (n + 1) // 2


def _row_cost(length: int, hidden: int, pairs: int | None = None) -> float:
    """FLOPs (up to a constant) of one row of ``length`` tokens: the linear layers grow like
    ``24·H²·L`` and attention like ``4·H`` per computed (query, key) pair: ``L²`` with a dense
    kernel, or ``pairs`` (those the mask allows) with a block-sparse one."""
    computed = length * length if pairs is None else pairs
    return 24.0 * hidden * hidden * length + 4.0 * hidden * computed


def _segment_pairs(pair: TokenizedPair) -> int:
    """(query, key) pairs a prefix-shared segment's mask allows: prompt and chosen causally, the
    rejected branch causally and to the whole prompt."""
    return _allowed(len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids))


def pair_lengths(pairs) -> tuple:
    """Prompt, chosen and rejected token counts of every pair: from a store's offset columns
    (``PairStore.lengths``, no pair is built), else from the pairs."""
    if hasattr(pairs, "lengths"):
        return pairs.lengths()
    return ([len(p.prompt_ids) for p in pairs], [len(p.chosen_ids) for p in pairs],
            [len(p.rejected_ids) for p in pairs])


def _allowed(n_p: int, n_c: int, n_r: int) -> int:
    """``_segment_pairs`` from the three lengths."""
    return _causal(n_p + n_c) + _causal(n_r) + n_r * n_p


def estimate_costs(pairs, batch_size: int, hidden: int, *, samples: int = 64,
                   seed: int = 0, row_tokens: int = 0, attention: str = "dense") -> dict[str, float]:
    """Mean estimated cost of one batch in each layout, over random batches of the data.
    ``attention``: ``"dense"`` or ``"allowed"`` (see ``LayoutRule``). Only the token counts are
    read (``pair_lengths``: a store's length columns), never the pairs."""

    sparse = attention == "allowed"
    prompt, chosen, rejected = pair_lengths(pairs)
    rng = random.Random(seed)
    costs = dict.fromkeys(LAYOUTS, 0.0)
    n = len(prompt)
    for _ in range(samples):
        batch = [(int(prompt[j]), int(chosen[j]), int(rejected[j]))
                 for j in [rng.randrange(n) for _ in range(min(batch_size, n))]]
        plain_rows = [n_p + r for n_p, n_c, n_r in batch for r in (n_c, n_r)]
        plain_width = max(plain_rows)
        costs["plain"] += sum(_row_cost(plain_width, hidden, _causal(r) if sparse else None) for r in plain_rows)
        by_length = sorted(batch, key=sum, reverse=True)
        lengths = [sum(b) for b in by_length]
        costs["prefix_shared"] += sum(_row_cost(lengths[0], hidden, _allowed(*b) if sparse else None)
                                      for b in by_length)
        capacity = max(row_tokens, lengths[0])
        room: list[int] = []
        allowed: list[int] = []
        for b, length in zip(by_length, lengths):
            for r, free in enumerate(room):
                if length <= free:
                    room[r] -= length
                    allowed[r] += _allowed(*b)
                    break
            else:
                room.append(capacity - length)
                allowed.append(_allowed(*b))
        costs["packed"] += sum(_row_cost(capacity, hidden, a if sparse else None) for a in allowed)
    return {k: v / samples for k, v in costs.items()}


def choose_layout(requested: str, pairs, batch_size: int, *, attn_impl: str = "sdpa",
                  hidden_size: int = 1024, row_tokens: int = 0, device_type: str = "cpu") -> str:
    """``requested`` itself, or for ``auto`` the layout with the lowest estimated cost under the
    rule for ``device_type`` and ``attn_impl`` (``LAYOUT_RULES``: how attention is costed, and how
    much a layout must save over a simpler one to be chosen). Models whose attention implementation
    cannot take a custom 4D mask always get ``plain``. ``hidden_size`` is the model's, for the cost
    model (``modeling.attention.model_layout`` reads these from a model)."""
    impl = attn_impl
    if requested != "auto":
        if requested not in LAYOUTS:
            raise ConfigError(f"layout must be auto or one of {', '.join(LAYOUTS)}; got {requested!r}")
        if requested != "plain" and impl not in MASKABLE_ATTENTION:
            raise ConfigError(
                f"layout {requested!r} needs an attention implementation that takes a 4D mask "
                f"({', '.join(MASKABLE_ATTENTION)}); the model uses {impl!r}"
            )
        return requested
    if impl not in MASKABLE_ATTENTION or not pairs:
        return "plain"
    rule = layout_rule(device_type, impl)
    costs = estimate_costs(pairs, batch_size, int(hidden_size), row_tokens=row_tokens, attention=rule.attention)
    best = "plain"
    for layout in LAYOUTS[1:]:
        if costs[layout] < (1.0 - rule.min_saving) * costs[best]:
            best = layout
    return best


def make_collator(layout: str, pad_token_id: int, row_tokens: int = 0):
    if layout == "plain":
        return PaddedPairCollator(pad_token_id)
    if layout == "prefix_shared":
        return PrefixSharedCollator(pad_token_id)
    return PackedCollator(pad_token_id, row_tokens)
