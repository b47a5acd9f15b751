"""Tiny, fully local models, tokenizers and preference sets.

Used by the tests, the quick start and the demo: everything is built from a config and saved to
disk, so the real ``from_pretrained`` code path runs without a model hub.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")

GOOD_WORDS = ("good", "great", "fine", "lovely", "superb", "nice", "brilliant", "wonderful")
BAD_WORDS = ("bad", "awful", "poor", "dull", "terrible", "boring", "weak", "horrible")
NEUTRAL_WORDS = (
    "the", "a", "movie", "film", "plot", "actor", "scene", "story", "was", "is", "and", "it", "this",
    "very", "quite", "really", "music", "ending", "cast", "director", "script", "of", "with", "but",
)


def word_tokenizer(words, *, bos: bool = True):
    """A word-level fast tokenizer (``tokenizers`` WordLevel, whitespace split) wrapped as a
    ``transformers`` ``PreTrainedTokenizerFast`` with pad/unk/bos/eos tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    if bos:
        core.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=2, eos_token_id=3, pad_token_id=0, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_gpt2_config(vocab_size: int, **overrides):
    from transformers import GPT2Config

    kwargs = dict(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                  bos_token_id=2, eos_token_id=3, pad_token_id=0)
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def build_tiny_model(directory: str | Path, *, arch: str = "llama", seed: int = 0, words=None, **overrides) -> Path:
    """Save a randomly initialised tiny causal LM and its word tokenizer to ``directory``."""
    import torch
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    tokenizer = word_tokenizer(words or toy_vocabulary())
    config_fn = {"llama": tiny_llama_config, "gpt2": tiny_gpt2_config}[arch]
    config = config_fn(len(tokenizer), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def toy_vocabulary() -> list[str]:
    return [*NEUTRAL_WORDS, *GOOD_WORDS, *BAD_WORDS]


def easy_preferences(n: int, *, seed: int = 0, scores: bool = True) -> list[dict]:
    """An easy preference task: the chosen response praises, the rejected one complains.
    Scores (when asked) are the share of positive words, so the chosen score is always higher."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(NEUTRAL_WORDS) for _ in range(rng.randint(3, 8)))
        length = rng.randint(2, 6)
        chosen = " ".join(rng.choice(GOOD_WORDS if rng.random() < 0.8 else NEUTRAL_WORDS) for _ in range(length))
        rejected = " ".join(rng.choice(BAD_WORDS if rng.random() < 0.8 else NEUTRAL_WORDS) for _ in range(length))
        if chosen == rejected:
            rejected = rejected + " bad"
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if scores:
            row["score_chosen"] = round(0.5 + 0.5 * rng.random(), 4)
            row["score_rejected"] = round(0.45 * rng.random(), 4)
        rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def good_word_score(texts: list[str]) -> list[float]:
    """A scorer for tests and examples (``prefopt.toy:good_word_score``): the share of the words
    that are good minus the share that are bad, in [-1, 1]."""
    good, bad = set(GOOD_WORDS), set(BAD_WORDS)
    out = []
    for text in texts:
        words = text.split()
        out.append((sum(w in good for w in words) - sum(w in bad for w in words)) / max(len(words), 1))
    return out
