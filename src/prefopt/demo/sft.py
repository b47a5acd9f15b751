"""Supervised fine-tuning of the demo's tiny causal LM on review text: a plain next-token loop.

Not preference training (that goes through ``prefopt.pipeline.train``); it only makes the
reference policy the papers start from: a model that writes reviews of every mood.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from prefopt.evaluation.policy import encode_prompts
from prefopt.progress import progress_bar
from prefopt.toy import tiny_llama_config


def train_sft(model, tokenizer, texts: list[str], *, steps: int, batch_size: int, learning_rate: float,
              seed: int, progress: bool = True) -> list[float]:
    """Train ``model`` in place on ``texts`` (each encoded as BOS text EOS) with AdamW and a
    linearly decaying learning rate. Returns the loss of every step."""
    ids = [[*t, tokenizer.eos_token_id] for t in encode_prompts(tokenizer, texts)]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / max(steps, 1))
    model.train()
    losses = []
    order: list[int] = []
    bar = progress_bar(range(steps), desc="sft", unit="step", disable=not progress)
    for _ in bar:
        if len(order) < batch_size:
            fresh = list(range(len(ids)))
            rng.shuffle(fresh)
            order += fresh
        batch, order = [ids[i] for i in order[:batch_size]], order[batch_size:]
        width = max(len(s) for s in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)  # pads predict nothing
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, s in enumerate(batch):
            input_ids[r, : len(s)] = torch.tensor(s)
            labels[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def build_sft_model(directory: str | Path, tokenizer, *, seed: int, hidden_size: int, layers: int):
    """A fresh tiny Llama for the demo's vocabulary (built from a config, nothing downloaded)."""
    config = tiny_llama_config(
        len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)
