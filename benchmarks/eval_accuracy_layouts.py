"""The cost of `prefopt eval --pairs`' accuracy pass per pair: the plain padded collator it used
before against training's `layout: auto` it uses now, on the same pairs, in the same run, and the
largest log-prob difference between the two (they compute the same numbers). Prints a Markdown table.

    PYTHONPATH=src python benchmarks/eval_accuracy_layouts.py MODEL_DIR PAIRS_FILE [N_PAIRS] [BATCH]

e.g. a 4-layer GPT-2-sized model (n_embd 768, 12 heads) with the GPT-2 tokenizer and the TL;DR test
pairs (docs/evaluation.md, "What it costs").
"""

from __future__ import annotations

import sys
import time

import torch

from prefopt.data.collate import PaddedPairCollator
from prefopt.evaluation.policy import load_eval_pairs
from prefopt.modeling.attention import model_collator
from prefopt.modeling.load import load_causal_lm, load_tokenizer
from prefopt.modeling.logprobs import score_pairs


def main(model_dir: str, pairs_file: str, n: int = 32, batch_size: int = 32) -> None:
    tokenizer = load_tokenizer(model_dir)
    pairs, total = load_eval_pairs(pairs_file, tokenizer, max_pairs=n, seed=0)
    model = load_causal_lm(model_dir, disable_dropout_=True)
    results = {}
    for name, collator in (("layout auto (now)", model_collator("auto", pairs, batch_size, model,
                                                                 tokenizer.pad_token_id)),
                           ("plain padded (before)", PaddedPairCollator(tokenizer.pad_token_id))):
        began = time.perf_counter()
        rows = score_pairs(model, pairs, collator, batch_size=batch_size, device=torch.device("cpu"), progress=False)
        results[name] = (time.perf_counter() - began, rows)
    (fast, rows_a), (slow, rows_b) = results.values()
    diff = max(abs(a["chosen_logps"] - b["chosen_logps"]) + abs(a["rejected_logps"] - b["rejected_logps"])
               for a, b in zip(rows_a, rows_b))
    print(f"{len(pairs)} of {total} pairs, batch {batch_size}, one model\n")
    print("| collator | s / pair | whole file, policy + reference [min] | ratio |")
    print("| --- | --- | --- | --- |")
    for name, (seconds, _) in results.items():
        print(f"| {name} | {seconds / len(pairs):.3f} | {2 * total * seconds / len(pairs) / 60:.1f} | "
              f"{seconds / fast:.2f} |")
    print(f"\nlargest |log-prob difference| between the two: {diff:.2e} (float32 sums); "
          f"plain / auto time: {slow / fast:.2f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:5]))
