"""Precomputed reference log-probs: one pass, a disk cache keyed by model and tokenized data, reused
by a second run, invalidated by a change, and equal to the live reference."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from prefopt.config import TrainConfig
from prefopt.data.tokenize import TokenizedPair
from prefopt.errors import PrefoptError
from prefopt.objectives.reference import CachedReference
from prefopt.objectives.reference_cache import (
    ReferenceCache,
    cache_key,
    model_fingerprint,
    pairs_fingerprint,
    precompute,
    table_from_rows,
)
from prefopt.toy import easy_preferences, write_jsonl

THROUGHPUT = {"tokens_per_second", "pairs_per_second", "eval/runtime"}  # wall-clock


def run_train(model, data, cache_dir, out, **overrides):
    from prefopt.recipes import train

    cfg = TrainConfig(
        model_name_or_path=str(model), dataset=str(data["train"]), eval_dataset=str(data["eval"]),
        output_dir=str(out), max_steps=2, logging_steps=1, per_device_train_batch_size=8,
        learning_rate=1e-3, ref_logps_cache_dir=str(cache_dir), progress_bar=False, save_steps=0,
        **overrides,
    )
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in THROUGHPUT} for r in rows]


def _rewards_are_noise(row: dict, accuracy_key: str) -> bool:
    prefix = accuracy_key.removesuffix("accuracies")
    return max(abs(row[prefix + "chosen"]), abs(row[prefix + "rejected"])) < 1e-5


def test_second_run_reuses_cache_and_matches_live_reference(tiny_llama, tmp_path, capsys):
    data = {"train": write_jsonl(tmp_path / "train.jsonl", easy_preferences(24, seed=3)),
            "eval": write_jsonl(tmp_path / "eval.jsonl", easy_preferences(8, seed=4))}
    cache = tmp_path / "cache"
    first = run_train(tiny_llama, data, cache, tmp_path / "a", precompute_ref_log_probs=True, layout="prefix_shared")
    err = capsys.readouterr().err
    assert "reference log-probs computed (0 cached, 2 computed)" in err
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 2  # train and eval
    stamps = [f.stat().st_mtime_ns for f in files]

    second = run_train(tiny_llama, data, cache, tmp_path / "b", precompute_ref_log_probs=True, layout="plain")
    assert "reference log-probs reused (2 cached, 0 computed)" in capsys.readouterr().err
    assert [f.stat().st_mtime_ns for f in sorted(cache.glob("*.pt"))] == stamps  # not rewritten
    live = run_train(tiny_llama, data, cache, tmp_path / "c", precompute_ref_log_probs=False)
    for a, b, c in zip(first, second, live, strict=True):
        assert a.keys() == b.keys() == c.keys()
        for key in a:
            if key.endswith("accuracies") and _rewards_are_noise(c, key):
                continue  # at policy == reference the rewards are float noise (~1e-8): their sign means nothing
            assert a[key] == pytest.approx(c[key], rel=1e-4, abs=1e-5), key
            assert b[key] == pytest.approx(c[key], rel=1e-4, abs=1e-5), key
    assert first[-1]["eval/loss"] != pytest.approx(0.6931, abs=1e-4)  # the policy moved: a real comparison

    # A change of tokenization settings (max_prompt_length cuts prompts) is a miss for train and eval.
    run_train(tiny_llama, data, cache, tmp_path / "d", precompute_ref_log_probs=True, max_prompt_length=3)
    assert "(0 cached, 2 computed)" in capsys.readouterr().err
    # A change of the training data only: eval is still cached.
    data["train"] = write_jsonl(tmp_path / "train2.jsonl", easy_preferences(24, seed=5))
    run_train(tiny_llama, data, cache, tmp_path / "e", precompute_ref_log_probs=True)
    assert "partly reused (1 cached, 1 computed)" in capsys.readouterr().err
    assert len(list(cache.glob("*.pt"))) == 5


@pytest.mark.slow
def test_logps_command_writes_the_cache_train_reads(tiny_gpt2, easy_data, tmp_path, cli_here):
    cache = tmp_path / "cache"
    out = tmp_path / "logps.jsonl"
    r = cli_here("logps", "--model", tiny_gpt2, "--dataset", easy_data["train"], "--output", out,
            "--ref_logps_cache_dir", cache)
    assert r.returncode == 0, r.stderr
    (entry,) = cache.glob("*.pt")
    table = torch.load(entry, weights_only=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert table["index"].tolist() == [row["index"] for row in rows]
    assert table["chosen_logps"].tolist() == pytest.approx([row["chosen_logps"] for row in rows])
    # train with that model as reference finds the entry (the eval set is not cached yet)
    from prefopt.recipes import train

    cfg = TrainConfig(model_name_or_path=str(tiny_gpt2), dataset=str(easy_data["train"]),
                      output_dir=str(tmp_path / "run"), max_steps=1, precompute_ref_log_probs=True,
                      ref_logps_cache_dir=str(cache), progress_bar=False)
    calls = []
    from accelerate import Accelerator

    from prefopt.data.collate import PaddedPairCollator
    from prefopt.data.prepare import prepare_dataset
    from prefopt.modeling.load import load_tokenizer

    pairs, _ = prepare_dataset(cfg, cfg.dataset, "train", load_tokenizer(str(tiny_gpt2)))
    tables, stats = precompute(cfg, [pairs], lambda: calls.append(1), PaddedPairCollator(0),
                               Accelerator(cpu=True), ReferenceCache(cache), str(tiny_gpt2))
    assert stats["hits"] == 1 and not calls  # the reference model is never loaded on a hit
    torch.testing.assert_close(tables[0]["rejected_logps"], table["rejected_logps"])
    train(cfg)


def pair(i, prompt=(5, 6)):
    return TokenizedPair(list(prompt), [7, 8], [9], None, None, i)


def test_cache_key_depends_on_tokens_and_model(tiny_llama, tmp_path):
    pairs = [pair(0), pair(1)]
    assert pairs_fingerprint(pairs) == pairs_fingerprint([pair(0), pair(1)])
    assert pairs_fingerprint(pairs) != pairs_fingerprint([pair(0), pair(1, prompt=(6,))])  # a truncated prompt
    assert pairs_fingerprint(pairs) != pairs_fingerprint([pair(0), pair(2)])  # another pair index
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    before = model_fingerprint(str(model))
    assert before == model_fingerprint(str(model))
    assert cache_key(before, pairs) != cache_key(before, pairs[:1])
    weights = next(model.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched, same content: same key
    assert model_fingerprint(str(model)) == before
    # Changed weights with the same size and modification time (one byte in the middle of the
    # tensors, far from both ends): a different key.
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    assert model_fingerprint(str(model)) != before
    before = model_fingerprint(str(model))
    config = model / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    assert model_fingerprint(str(model)) != before


def test_cached_reference_looks_up_by_pair_index_and_damaged_files_are_misses(tmp_path):
    train = table_from_rows([{"index": i, "chosen_logps": -i - 0.5, "rejected_logps": -2.0 * i} for i in (0, 2, 5)])
    evals = table_from_rows([{"index": 0, "chosen_logps": -9.0, "rejected_logps": -8.0}])
    ref = CachedReference([(train, 0), (evals, 6)])
    out = ref({"pair_index": torch.tensor([5, 6, 0]), "input_ids": torch.zeros(1)})
    assert out["chosen_logps"].tolist() == [-5.5, -9.0, -0.5]
    assert out["rejected_logps"].tolist() == [-10.0, -8.0, 0.0]
    for missing in (1, 7):
        with pytest.raises(PrefoptError, match="no precomputed reference"):
            ref({"pair_index": torch.tensor([missing]), "input_ids": torch.zeros(1)})
    cache = ReferenceCache(tmp_path)
    cache.save("k", train)
    assert cache.load("k")["index"].tolist() == [0, 2, 5]
    cache.path("k").write_bytes(b"not a torch file")
    assert cache.load("k") is None


@pytest.mark.slow
def test_a_tampered_table_is_named_and_recomputed(tiny_llama, tmp_path, capsys):
    data = {"train": write_jsonl(tmp_path / "train.jsonl", easy_preferences(16, seed=3)),
            "eval": write_jsonl(tmp_path / "eval.jsonl", easy_preferences(8, seed=4))}
    cache = tmp_path / "cache"
    first = run_train(tiny_llama, data, cache, tmp_path / "a", precompute_ref_log_probs=True)
    assert first[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    capsys.readouterr()
    (train_entry,) = [p for p in cache.glob("*.pt") if torch.load(p, weights_only=True)["index"].numel() == 16]
    table = torch.load(train_entry, weights_only=True)
    table["chosen_logps"] = table["chosen_logps"] + 5.0  # edited values, the stored checksum kept
    torch.save(table, train_entry)
    second = run_train(tiny_llama, data, cache, tmp_path / "b", precompute_ref_log_probs=True)
    err = capsys.readouterr().err
    assert (f"prefopt: warning: reference log-prob cache entry {train_entry} is damaged (its checksum does not "
            "match its contents); recomputing it") in err
    assert "partly reused (1 cached, 1 computed)" in err
    # Used as found, the edited table gave a step-1 loss of about 5 instead of log 2.
    assert second[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert ReferenceCache(cache).load(train_entry.stem) is not None  # rewritten intact


def test_a_table_under_another_key_or_with_edited_values_is_a_miss(tmp_path, capsys):
    cache = ReferenceCache(tmp_path)
    table = table_from_rows([{"index": i, "chosen_logps": -1.0 - i, "rejected_logps": -2.0} for i in range(3)])
    cache.save("k1", table)
    assert cache.load("k1")["chosen_logps"].tolist() == [-1.0, -2.0, -3.0]
    shutil.copy(cache.path("k1"), cache.path("k2"))  # a valid table, filed under the wrong key
    assert cache.load("k2") is None
    assert "cache entry" in capsys.readouterr().err
    stored = torch.load(cache.path("k1"), weights_only=True)
    stored["rejected_logps"][1] = -2.5
    torch.save(stored, cache.path("k1"))
    assert cache.load("k1", warn=False) is None
    assert capsys.readouterr().err == ""


def test_changed_weights_with_the_same_size_and_mtime_are_a_miss(tiny_llama, tmp_path):
    from accelerate import Accelerator

    from prefopt.data.collate import PaddedPairCollator

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    pairs = [pair(0), pair(1)]
    cache = ReferenceCache(tmp_path / "cache")
    cfg = TrainConfig(per_device_eval_batch_size=2, progress_bar=False)
    fake = table_from_rows([{"index": i, "chosen_logps": -1.0, "rejected_logps": -2.0} for i in (0, 1)])
    cache.save(cache_key(model_fingerprint(str(model)), pairs), fake)
    calls = []
    tables, stats = precompute(cfg, [pairs], lambda: calls.append(1), PaddedPairCollator(0), Accelerator(cpu=True),
                               cache, str(model))
    assert stats["hits"] == 1 and not calls
    weights = model / "model.safetensors"
    st = weights.stat()
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    weights.write_bytes(bytes(raw))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    from transformers import AutoModelForCausalLM

    loaded = []

    def load():
        loaded.append(1)
        return AutoModelForCausalLM.from_pretrained(model)

    tables, stats = precompute(cfg, [pairs], load, PaddedPairCollator(0), Accelerator(cpu=True), cache, str(model))
    assert stats["misses"] == 1 and loaded == [1]
    assert tables[0]["chosen_logps"].tolist() != [-1.0, -1.0]  # computed by the model, not the stale entry
