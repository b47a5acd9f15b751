"""What verification costs: hashing checkpoint and model files, and fingerprinting tokenized data.

    python benchmarks/checksum_cost.py            # a 124M-parameter GPT-2 (about 500 MB of float32 weights)
    python benchmarks/checksum_cost.py --quick    # a small model, seconds

Prints one table: the time to SHA-256 the model's weight file (``prefopt.digest.file_digest``, what
checkpoint manifests and the reference cache key use), BLAKE2b over the same file for comparison,
the full reference-cache model key (``model_fingerprint``), a plain read of the file, and writing the
model with ``save_pretrained`` (the peer: what every checkpoint pays anyway, before its optimizer
state); and the data fingerprint of 100,000 TL;DR-sized tokenized pairs. Each is the best of ``--repeats`` runs in this process, after
one warm-up read, so the file is in the page cache: the numbers are hashing cost, not disk speed.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import tempfile
import time
from pathlib import Path


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def blake2b_file(path: Path) -> str:
    h = hashlib.blake2b()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel

    from prefopt.data.fingerprint import pairs_fingerprint
    from prefopt.data.tokenize import TokenizedPair
    from prefopt.digest import file_digest
    from prefopt.objectives.reference_cache import model_fingerprint

    layers, hidden = (2, 128) if args.quick else (12, 768)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "gpt2"
        model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=hidden, n_head=max(1, hidden // 64)))
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(model_dir)
        weights = model_dir / "model.safetensors"
        size_mb = weights.stat().st_size / 1e6
        weights.read_bytes()  # warm the page cache
        rows = [
            ("read the file", best(lambda: weights.read_bytes(), args.repeats)),
            ("SHA-256 of the file (file_digest)", best(lambda: file_digest(weights), args.repeats)),
            ("BLAKE2b of the file", best(lambda: blake2b_file(weights), args.repeats)),
            ("reference-cache model key (model_fingerprint)", best(lambda: model_fingerprint(str(model_dir)),
                                                                    args.repeats)),
            ("write with save_pretrained (the peer)", best(lambda: model.save_pretrained(Path(tmp) / "copy"),
                                                           args.repeats)),
        ]
        rng = random.Random(0)
        n_pairs = 2_000 if args.quick else 100_000
        pairs = [TokenizedPair([rng.randrange(50257) for _ in range(rng.randint(100, 500))],
                             [rng.randrange(50257) for _ in range(rng.randint(20, 60))],
                             [rng.randrange(50257) for _ in range(rng.randint(20, 60))], 0.5, 0.1, i)
                 for i in range(n_pairs)]
        tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        fingerprint = best(lambda: pairs_fingerprint(pairs), args.repeats)

    print(f"model: GPT-2, {layers} layers, hidden {hidden}: {params / 1e6:.1f}M parameters, "
          f"model.safetensors {size_mb:.0f} MB")
    print("| what | seconds | MB/s | x writing |")
    print("| --- | ---: | ---: | ---: |")
    peer = rows[-1][1]
    for what, seconds in rows:
        print(f"| {what} | {seconds:.3f} | {size_mb / seconds:.0f} | {seconds / peer:.2f} |")
    print(f"\ndata fingerprint of {n_pairs} tokenized pairs ({tokens / 1e6:.1f}M token ids): {fingerprint:.3f} s")


if __name__ == "__main__":
    main()
