"""Where reference log-probs come from: precomputed once and cached on disk.

With ``precompute_ref_log_probs: true`` the reference model scores every pair in one no-gradient
pass before training; the results go into a cache file whose name is a hash of

- the reference model's content: its config file and the SHA-256 of every weight file, read in
  full (a re-saved or edited model with the same size and modification time is a different key;
  hashing costs about as much as reading the weights once: 0.5-0.7 s for 500 MB here, see
  ``prefopt.digest``), and
- the tokenized pairs themselves (``data.fingerprint``: every prompt, chosen and rejected token id
  and the pair index), which captures the data file, the format, the tokenizer and the truncation
  settings at once.

Every table carries its own key and a SHA-256 of its tensors. A table that does not match them
(damaged, edited, or copied under another key's name) is named in a warning and recomputed.

A second run with the same model and data reuses the file and never loads the reference model; any
change to the model or the tokenization gives another key (a miss, recomputed). The reference model
is freed before training starts. ``prefopt logps`` writes the same cache entries.

When a loss option weighs the reference's tokens (``ld_alpha``), the table also holds every
pair's per-token log-probs; a table without them is a miss for such a run (recomputed, and the
richer table then serves both kinds of run). ``reference.CachedReference`` looks the values up by
``batch["pair_index"]``, so it plugs into the objective exactly like a live reference.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from prefopt.data.collate import to_device
from prefopt.data.fingerprint import pairs_fingerprint as data_fingerprint
from prefopt.data.tokenize import TokenizedPair
from prefopt.digest import bytes_digest, file_digest
from prefopt.errors import PrefoptError
from prefopt.io import atomic_path
from prefopt.memory import transient_heap
from prefopt.modeling.load import freeze, load_causal_lm
from prefopt.modeling.logprobs import pair_token_logps, score_pairs
from prefopt.objectives.reference import CachedReference
from prefopt.progress import progress_bar

CACHE_VERSION = 2
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def default_cache_dir() -> Path:
    if os.environ.get("PREFOPT_CACHE_DIR"):
        return Path(os.environ["PREFOPT_CACHE_DIR"]) / "ref_logps"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "prefopt" / "ref_logps"


def model_fingerprint(name_or_path: str) -> str:
    """A hash of the model's content: its config and index files and the SHA-256 of every weight
    file. For a hub id that is not a local directory, the id itself (a revision change cannot be
    seen offline)."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        h.update(f"hub:{name_or_path}".encode())
        return h.hexdigest()
    for file in sorted(path.iterdir()):
        if file.name == "config.json" or file.name.endswith(".json") and "index" in file.name:
            h.update(file.name.encode() + file.read_bytes())
        elif file.name.endswith(WEIGHT_SUFFIXES) and file.is_file():
            h.update(f"{file.name}:{file_digest(file)}".encode())
    return h.hexdigest()


def pairs_fingerprint(pairs: list[TokenizedPair]) -> str:
    """A hash of the exact token ids the reference scores (data + tokenizer + truncation); the
    scores are left out, the reference's log-probs do not depend on them. A cached tokenized-pair
    store is named by a key of exactly those inputs, so its key stands for its pairs (no pass over
    a million pairs to hash them)."""
    if getattr(pairs, "fingerprint", None):
        return hashlib.sha256(f"pair-store:{pairs.fingerprint}".encode()).hexdigest()
    return data_fingerprint(pairs, scores=False)


def cache_key(model_id: str, pairs: list[TokenizedPair]) -> str:
    return hashlib.sha256(f"{model_id}:{pairs_fingerprint(pairs)}".encode()).hexdigest()[:32]


class ReferenceCache:
    """A directory of ``<key>.pt`` files, each a table of per-pair reference log-probs."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.pt"

    def load(self, key: str, *, per_token: bool = False, warn: bool = True) -> dict[str, torch.Tensor] | None:
        """The table under ``key``, or ``None`` (absent, an old version, or without the per-token
        values a ``per_token`` run needs). A damaged or altered table is also ``None``, with one
        warning line naming it (``warn``), so it is recomputed and overwritten."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            table = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file: recomputed and overwritten
            return _bad_entry(path, f"unreadable ({type(e).__name__})", warn)
        if not isinstance(table, dict) or table.get("version") != CACHE_VERSION:
            return None
        if table.get("key") != key or table.get("checksum") != table_checksum(table):
            return _bad_entry(path, "its checksum does not match its contents", warn)
        if per_token and "token_logps" not in table:
            return None
        return table

    def save(self, key: str, table: dict[str, torch.Tensor], meta: dict | None = None) -> Path:
        """Atomic: written beside the final name, then renamed."""
        path = self.path(key)
        try:
            with atomic_path(path) as tmp:
                torch.save({**table, "version": CACHE_VERSION, "key": key, "checksum": table_checksum(table),
                            "meta": json.dumps(meta or {})}, tmp)
        except OSError as e:
            raise PrefoptError(f"cannot write the reference log-prob cache {path}: {e}") from None
        return path


def table_checksum(table: dict) -> str:
    """SHA-256 over a table's tensors (name, dtype, shape and bytes, in name order)."""
    parts = []
    for name in sorted(k for k, v in table.items() if isinstance(v, torch.Tensor)):
        t = table[name].detach().cpu().contiguous()
        parts.append(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        parts.append(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return bytes_digest(parts)


def _bad_entry(path: Path, why: str, warn: bool) -> None:
    if warn:
        print(f"prefopt: warning: reference log-prob cache entry {path} is damaged ({why}); recomputing it",
              file=sys.stderr)
    return None


def table_from_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Rows ``{index, chosen_logps, rejected_logps, chosen_tokens, rejected_tokens}`` -> tensors."""
    return {
        "index": torch.tensor([r["index"] for r in rows], dtype=torch.long),
        "chosen_logps": torch.tensor([r["chosen_logps"] for r in rows], dtype=torch.float64),
        "rejected_logps": torch.tensor([r["rejected_logps"] for r in rows], dtype=torch.float64),
    }


def compute_table(model, pairs: list[TokenizedPair], collator, *, batch_size: int, device,
                  progress: bool = False, per_token: bool = False) -> dict[str, torch.Tensor]:
    """One no-gradient pass of ``model`` over ``pairs``: the cache table (with per-token values
    when ``per_token``)."""
    if not per_token:
        return table_from_rows(score_pairs(model, pairs, collator, batch_size=batch_size, device=device,
                                           progress=progress))
    model.eval()
    sums = {"index": [], "chosen_logps": [], "rejected_logps": [], "chosen_tokens": [], "rejected_tokens": []}
    values: list[torch.Tensor] = []
    with torch.no_grad(), transient_heap():
        for start in progress_bar(range(0, len(pairs), batch_size), desc="ref logps", disable=not progress):
            chunk = pairs[start : start + batch_size]
            out = pair_token_logps(model, to_device(collator(list(chunk)), device))
            # Tokens ordered by (response, rank): chosen then rejected of pair 0, then pair 1, ...
            width = int(out["token_rank"].max()) + 1 if out["token_rank"].numel() else 1
            order = torch.argsort(out["token_response"] * width + out["token_rank"])
            values.append(out["token_logps"][order].double().cpu())
            for key in ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens"):
                sums[key] += out[key].tolist()
            sums["index"] += [p.index for p in chunk]
    per_pair = torch.tensor(sums["chosen_tokens"]) + torch.tensor(sums["rejected_tokens"])
    return {
        "index": torch.tensor(sums["index"], dtype=torch.long),
        "chosen_logps": torch.tensor(sums["chosen_logps"], dtype=torch.float64),
        "rejected_logps": torch.tensor(sums["rejected_logps"], dtype=torch.float64),
        "chosen_tokens": torch.tensor(sums["chosen_tokens"], dtype=torch.long),
        "rejected_tokens": torch.tensor(sums["rejected_tokens"], dtype=torch.long),
        "token_offsets": torch.cat([torch.zeros(1, dtype=torch.long), per_pair.cumsum(0)]),
        "token_logps": torch.cat(values) if values else torch.zeros(0, dtype=torch.float64),
    }


def precompute(cfg, datasets: list[list[TokenizedPair]], load_model, collator, accelerator,
               cache: ReferenceCache | None, model_path: str | None, *, per_token: bool = False
               ) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """The reference table of each dataset, from the cache or computed with ``load_model()`` (called
    at most once, only on a miss; the model is freed before returning). The main process computes
    and writes; the others wait, then read. Without a cache (a model given as a Python object has
    no files to fingerprint) every process computes its tables in memory. Returns the tables and
    ``{"hits": n, "misses": n, "files": [...]}``."""
    kwargs = dict(batch_size=cfg.per_device_eval_batch_size, device=accelerator.device,
                  progress=cfg.progress_bar and accelerator.is_main_process, per_token=per_token)
    if cache is None:
        model = load_model().to(accelerator.device)
        tables = [compute_table(model, pairs, collator, **kwargs) for pairs in datasets]
        del model
        free_memory()
        return tables, {"hits": 0, "misses": len(datasets), "files": ["(in memory)"]}
    model_id = model_fingerprint(model_path)
    keys = [cache_key(model_id, pairs) for pairs in datasets]
    stats = {"hits": 0, "misses": 0, "files": [str(cache.path(k)) for k in keys]}
    tables: list[dict | None] = [cache.load(k, per_token=per_token, warn=accelerator.is_main_process) for k in keys]
    if accelerator.is_main_process and any(t is None for t in tables):
        model = load_model().to(accelerator.device)
        for i, (key, pairs) in enumerate(zip(keys, datasets)):
            if tables[i] is None:
                tables[i] = compute_table(model, pairs, collator, **kwargs)
                cache.save(key, tables[i], {"model": model_path, "pairs": len(pairs), "per_token": per_token})
                stats["misses"] += 1
        del model
        free_memory()
    accelerator.wait_for_everyone()
    for i, key in enumerate(keys):
        if tables[i] is None:
            tables[i] = cache.load(key, per_token=per_token)
            if tables[i] is None:
                raise PrefoptError(f"reference log-prob cache {cache.path(key)} is not readable")
    stats["hits"] = len(keys) - stats["misses"]
    return tables, stats


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cached_reference(cfg, policy, train_pairs: list[TokenizedPair], eval_pairs: list[TokenizedPair] | None,
                     collator, accelerator, *, ref_model=None, per_token: bool = False, use_cache: bool = True
                     ) -> tuple[CachedReference, list[TokenizedPair] | None]:
    """``train``'s precomputed reference: tables for the training (and eval) pairs, from the cache or
    one pass of the reference model, which is freed afterwards. Eval pairs come back re-indexed
    past the training indices, so one lookup by ``pair_index`` serves both. ``ref_model`` is a
    reference given as a Python object; ``per_token`` stores per-token values (``ld_alpha``);
    ``use_cache`` false: computed in memory only (values the model's files do not determine)."""

    def load_model():
        if ref_model is not None:
            return freeze(ref_model)
        if cfg.ref_model_name_or_path:
            return freeze(load_causal_lm(cfg.ref_model_name_or_path, disable_dropout_=cfg.disable_dropout,
                                         fused_activations=cfg.fused_activations, **cfg.attention_kwargs()))
        # The reference is the initial policy, and training has not started: score with the policy
        # itself (eval mode, no gradients) instead of holding a copy.
        return policy

    datasets = [train_pairs] + ([eval_pairs] if eval_pairs else [])
    model_path = None if ref_model is not None else (cfg.ref_model_name_or_path or cfg.model_name_or_path)
    cache = ReferenceCache(cfg.ref_logps_cache_dir) if model_path and use_cache else None
    tables, stats = precompute(cfg, datasets, load_model, collator, accelerator, cache, model_path,
                               per_token=per_token)
    parts = [(tables[0], 0)]
    if eval_pairs:
        if hasattr(train_pairs, "indices"):  # stores: from the index column, the pairs stay on disk
            offset = 1 + int(train_pairs.indices().max())
        else:
            offset = 1 + max(p.index for p in train_pairs)
        if hasattr(eval_pairs, "with_index_offset"):
            eval_pairs = eval_pairs.with_index_offset(offset)
        else:
            eval_pairs = [dataclasses.replace(p, index=p.index + offset) for p in eval_pairs]
        parts.append((tables[1], offset))
    if accelerator.is_main_process:
        how = "reused" if stats["misses"] == 0 else ("computed" if stats["hits"] == 0 else "partly reused")
        print(f"prefopt: reference log-probs {how} ({stats['hits']} cached, {stats['misses']} computed): "
              f"{', '.join(stats['files'])}", file=sys.stderr)
    return CachedReference(parts), eval_pairs


def store_rows(cfg, model_name_or_path: str, pairs: list[TokenizedPair], rows: list[dict]) -> Path:
    """``prefopt logps``: write its results as the cache entry ``train`` would look up for this
    model as the reference on these pairs."""
    key = cache_key(model_fingerprint(model_name_or_path), pairs)
    return ReferenceCache(cfg.ref_logps_cache_dir).save(key, table_from_rows(rows),
                                                        {"model": model_name_or_path, "pairs": len(pairs)})
