"""The tokenized-pair store: the same pairs as tokenizing the whole file in memory, a key that
misses on every change of its parts, one build shared by concurrent processes, damaged or
half-written stores rebuilt, and errors that still name the file, line and field."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import prefopt.data.prepare as prep
import prefopt.data.store as store_mod
from prefopt.config import TrainConfig
from prefopt.data.fingerprint import COLUMNS_PREFIX, columns_fingerprint, data_fingerprint, same_data
from prefopt.data.formats import Columns, load_pairs
from prefopt.data.layouts import choose_layout, estimate_costs
from prefopt.data.prepare import apply_score_policy, prepare_dataset
from prefopt.data.store import LENGTHS_FILE, MANIFEST, PAIRS_FILE, PairStore
from prefopt.data.tokenize import tokenize_pairs
from prefopt.errors import DataError
from prefopt.toy import word_tokenizer, write_jsonl

WORDS = [f"w{i}" for i in range(40)]
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SRC = str(Path(__file__).resolve().parents[2] / "src")


def tokenizer(chat: bool = False, words=WORDS):
    tok = word_tokenizer(words)
    if chat:
        tok.chat_template = CHAT
    return tok


def text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def rows_for(fmt: str, n: int = 23, seed: int = 0) -> list[dict]:
    """Rows of every shape, with long prompts (truncation, drops), shared response prefixes
    (identical after truncation), ties and scores in both orders (the ODPO policy)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt, shared = text(rng, 1, 9), text(rng, 0, 3)
        chosen = f"{shared} {text(rng, 1, 4)}".strip()
        rejected = f"{shared} {text(rng, 1, 4)} w{i % 40}".strip()
        s_w, s_l = rng.choice([(2.0, 1.0), (1.0, 1.0), (0.5, 1.5), (3.0, 0.25)])
        if fmt == "explicit":
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                        "score_chosen": s_w, "score_rejected": s_l})
        elif fmt == "implicit":
            out.append({"chosen": f"{prompt}\n\nAssistant: {chosen}", "rejected": f"{prompt}\n\nAssistant: {rejected}"})
        elif fmt == "conversational":
            out.append({"prompt": [{"role": "user", "content": prompt}],
                        "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}]})
        elif fmt == "rated":
            k = rng.randint(2, 4)
            out.append({"prompt": prompt, "responses": [text(rng, 0, 4) for _ in range(k)],
                        "scores": [float(rng.randint(0, 2)) for _ in range(k)]})
        else:  # scored_responses: several rows per prompt
            p = f"w{i % 5} w{i % 5 + 1}"
            out.append({"prompt": p, "text": text(rng, 1, 4), "reward": float(rng.randint(0, 3))})
    return out


def write_rows(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
        return path
    import pandas as pd

    df = pd.DataFrame(rows)
    df.to_csv(path, index=False) if path.suffix == ".csv" else df.to_parquet(path)
    return path


def old_path(cfg: TrainConfig, path: Path, tok, score_policy: bool = True):
    """What preparation did before the store: the whole file in memory, then tokenized at once."""
    pairs, stats = load_pairs(str(path), fmt=cfg.dataset_format, columns=Columns.from_config(cfg), tokenizer=tok)
    pairs, nonpositive = apply_score_policy(pairs, cfg) if score_policy else (pairs, 0)
    tokenized, tok_stats = tokenize_pairs(pairs, tok, max_length=cfg.max_length,
                                          max_prompt_length=cfg.prompt_limit(),
                                          max_completion_length=cfg.max_completion_length,
                                          truncation_mode=cfg.truncation_mode)
    summary = {**stats.as_dict(), "nonpositive_score_diff": nonpositive,
               "nonpositive_policy": cfg.nonpositive_score_diff if nonpositive else None,
               "tokenization": tok_stats.as_dict()}
    return tokenized, summary


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_ROWS", 4)  # 23 rows: six chunks, the last one short
    monkeypatch.setattr(store_mod, "BATCH_PAIRS", 6)  # record batches of two chunks: several, the last short


def cfg_for(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{"data_cache_dir": str(tmp_path / "cache"), "progress_bar": False, **kw})


CASES = [
    ("explicit", ".jsonl", {}),
    ("explicit", ".csv", {}),
    ("explicit", ".parquet", {}),
    ("explicit", ".json", {}),
    ("explicit", ".jsonl", {"max_length": 7, "max_prompt_length": 3}),  # truncation
    ("explicit", ".jsonl", {"max_length": 5, "max_prompt_length": None}),  # drops: prompt too long, identical
    ("explicit", ".jsonl", {"loss_type": "odpo", "nonpositive_score_diff": "drop"}),
    ("explicit", ".jsonl", {"loss_type": "odpo", "nonpositive_score_diff": "clamp"}),
    ("implicit", ".jsonl", {"max_length": 9, "max_prompt_length": 4}),
    ("conversational", ".jsonl", {"max_length": 12, "max_prompt_length": 6}),
    ("rated", ".jsonl", {"loss_type": "odpo"}),
    ("rated", ".parquet", {"max_length": 6, "max_prompt_length": 3}),
    ("scored_responses", ".jsonl", {}),
]


# Worker processes: one case per format is enough.
CASES += [(fmt, ".jsonl", {"dataset_num_proc": 2}) for fmt in ("explicit", "conversational", "rated", "scored_responses")]


@pytest.mark.parametrize("fmt,suffix,settings", CASES, ids=[f"{f}{s}-{i}" for i, (f, s, _) in enumerate(CASES)])
def test_store_gives_exactly_the_pairs_of_the_in_memory_path(fmt, suffix, settings, tmp_path, small_chunks):
    path = write_rows(tmp_path / f"data{suffix}", rows_for(fmt))
    tok = tokenizer(chat=fmt == "conversational")
    cfg = cfg_for(tmp_path, **settings)
    expected, expected_summary = old_path(cfg, path, tok)
    store, summary = prepare_dataset(cfg, str(path), "train", tok)
    assert isinstance(store, PairStore) and summary["store"]["cache"] == "built"
    assert len(store) == len(expected) > 0
    assert list(store) == expected  # every token id, score, index and row
    assert [store[i] for i in range(len(store))] == expected and store[-1] == expected[-1]
    assert store[2:5] == expected[2:5]
    assert {k: v for k, v in summary.items() if k != "store"} == expected_summary
    lengths = store.lengths()
    assert lengths[0].tolist() == [len(p.prompt_ids) for p in expected]
    assert (lengths[1] + lengths[2]).tolist() == [len(p.chosen_ids) + len(p.rejected_ids) for p in expected]
    # The cache hit gives the same pairs and the same summary.
    again, summary2 = prepare_dataset(cfg, str(path), "train", tok)
    assert summary2["store"] == {**summary["store"], "cache": "hit"}
    assert list(again) == expected and summary2 == {**summary, "store": summary2["store"]}
    # The resume check's fingerprint, computed during the build in chunks, is that of the pairs.
    assert store.content_fingerprint == again.content_fingerprint == columns_fingerprint(expected)


def test_the_data_fingerprint_of_a_store_reads_no_pair(tmp_path, small_chunks, monkeypatch):
    path = write_rows(tmp_path / "d.jsonl", rows_for("explicit"))
    store, _ = prepare_dataset(cfg_for(tmp_path), str(path), "train", tokenizer())
    pairs = list(store)
    expected = COLUMNS_PREFIX + columns_fingerprint(pairs)

    def no_reading(self, i):
        raise AssertionError("the fingerprint of a store must not read its pairs")

    monkeypatch.setattr(PairStore, "_pair", no_reading)
    assert data_fingerprint(store) == expected and same_data(expected, store)
    changed = [pairs[0], *pairs[2:]]
    assert not same_data(data_fingerprint(changed), store)
    monkeypatch.undo()
    # Indices shifted (eval pairs beside training pairs): other data, computed from the pairs.
    shifted = store.with_index_offset(5)
    assert shifted.content_fingerprint is None and data_fingerprint(shifted) != expected
    assert data_fingerprint(shifted) == data_fingerprint(list(shifted))


def test_settings_that_exercise_truncation_and_drops_do(tmp_path, small_chunks):
    """The cases above are only meaningful if they truncate, drop and clamp."""
    tok = tokenizer()
    path = write_rows(tmp_path / "d.jsonl", rows_for("explicit"))
    s = prepare_dataset(cfg_for(tmp_path, max_length=7, max_prompt_length=3), str(path), "train", tok)[1]
    assert s["tokenization"]["prompt_truncated"] > 0 and s["tokenization"]["completion_truncated"] > 0
    s = prepare_dataset(cfg_for(tmp_path, max_length=5, max_prompt_length=None), str(path), "train", tok)[1]
    assert set(s["tokenization"]["dropped"]) == {"prompt longer than max_length", "responses identical after truncation"}
    s = prepare_dataset(cfg_for(tmp_path, loss_type="odpo"), str(path), "train", tok)[1]
    assert s["nonpositive_score_diff"] > 0 and s["tokenization"]["pairs_in"] < s["rows_read"]
    rated = write_rows(tmp_path / "r.jsonl", rows_for("rated"))
    s = prepare_dataset(cfg_for(tmp_path), str(rated), "train", tok)[1]
    assert s["dropped"]["tied scores"] > 0 and s["dropped"]["empty responses"] > 0


def test_hit_after_a_no_op_and_a_miss_after_each_change_of_the_key(tmp_path):
    tok = tokenizer()
    rows = rows_for("explicit")
    path = write_rows(tmp_path / "d.jsonl", rows)
    base = {"max_length": 64}

    def prepare(cfg_kw=None, *, spec=path, tk=tok):
        store, summary = prepare_dataset(cfg_for(tmp_path, **{**base, **(cfg_kw or {})}), str(spec), "train", tk)
        return summary["store"]["cache"], summary["store"]["path"], store, summary

    cache, first, store, _ = prepare()
    assert cache == "built"
    assert prepare()[:2] == ("hit", first)
    # The same bytes under another name: a hit, and the summary names the file of this run.
    copy = tmp_path / "elsewhere" / "copy.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    cache, where, _, summary = prepare(spec=copy)
    assert (cache, where) == ("hit", first) and summary["source"] == str(copy)

    renamed = tmp_path / "renamed.jsonl"
    write_jsonl(renamed, [{"question": r["prompt"], **{k: v for k, v in r.items() if k != "prompt"}} for r in rows])
    changed_file = tmp_path / "changed.jsonl"
    write_jsonl(changed_file, rows[:-1] + [{**rows[-1], "chosen": rows[-1]["chosen"] + " w1"}])
    chat_tok = tokenizer(chat=True)
    other_vocab = tokenizer(words=list(reversed(WORDS)))
    misses = {
        "file content": prepare(spec=changed_file),
        "tokenizer vocabulary": prepare(tk=other_vocab),
        "tokenizer chat template": prepare(tk=chat_tok),
        "dataset_format": prepare({"dataset_format": "explicit"}),
        "a column name": prepare({"prompt_column": "question"}, spec=renamed),
        "max_length": prepare({"max_length": 63}),
        "max_prompt_length": prepare({"max_prompt_length": 7}),
        "max_completion_length": prepare({"max_completion_length": 2}),
        "truncation_mode": prepare({"truncation_mode": "keep_start"}),
        "loss that needs scores": prepare({"loss_type": "odpo"}),
        "nonpositive_score_diff": prepare({"loss_type": "odpo", "nonpositive_score_diff": "clamp"}),
    }
    paths = {first}
    for what, (cache, where, _, _) in misses.items():
        assert cache == "built", what
        assert where not in paths, what
        paths.add(where)
    # ... and each of them is now a hit in turn; settings that change no pair share a store.
    assert prepare({"max_prompt_length": 7})[:2] == ("hit", misses["max_prompt_length"][1])
    assert prepare({"dataset_num_proc": 2, "progress_bar": True, "beta": 0.5})[:2] == ("hit", first)
    # The vocabulary change really changed the ids, so a shared store would have been wrong.
    assert list(misses["tokenizer vocabulary"][2]) != list(store)


def test_no_cache_builds_a_temporary_store_each_time(tmp_path):
    tok = tokenizer()
    path = write_rows(tmp_path / "d.jsonl", rows_for("explicit"))
    cfg = cfg_for(tmp_path, data_cache=False)
    a, s = prepare_dataset(cfg, str(path), "train", tok)
    b, _ = prepare_dataset(cfg, str(path), "train", tok)
    assert s["store"]["cache"] == "off" and list(a) == list(b) == old_path(cfg, path, tok)[0]
    assert not (tmp_path / "cache").exists()
    # Rows in memory are never cached either, and read the same.
    c, s = prepare_dataset(cfg_for(tmp_path), rows_for("explicit"), "train", tok)
    assert s["store"]["cache"] == "off" and list(c) == list(a)


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "no manifest", "garbage manifest",
                                    "truncate lengths", "flip a length", "no lengths"])
def test_a_damaged_store_is_detected_and_rebuilt(damage, tmp_path):
    tok = tokenizer()
    path = write_rows(tmp_path / "d.jsonl", rows_for("explicit"))
    cfg = cfg_for(tmp_path)
    store, summary = prepare_dataset(cfg, str(path), "train", tok)
    expected = list(store)
    del store
    directory = Path(summary["store"]["path"])
    pairs = directory / PAIRS_FILE
    if damage == "truncate":
        os.truncate(pairs, pairs.stat().st_size // 2)
    elif damage == "flip a byte":
        data = bytearray(pairs.read_bytes())
        data[len(data) // 2] ^= 0xFF
        pairs.write_bytes(bytes(data))
    elif damage == "no manifest":
        (directory / MANIFEST).unlink()
    elif damage == "truncate lengths":
        os.truncate(directory / LENGTHS_FILE, 12 * (len(expected) - 1))
    elif damage == "flip a length":
        data = bytearray((directory / LENGTHS_FILE).read_bytes())
        data[4] ^= 0x01
        (directory / LENGTHS_FILE).write_bytes(bytes(data))
    elif damage == "no lengths":
        (directory / LENGTHS_FILE).unlink()
    else:
        (directory / MANIFEST).write_text("{")
    again, summary = prepare_dataset(cfg, str(path), "train", tok)
    assert summary["store"]["cache"] == "built" and list(again) == expected
    assert again.lengths()[1].tolist() == [len(p.chosen_ids) for p in expected]


def _slow_build_script(path: Path, cache: Path, ready: Path | None, delay: float) -> str:
    """A process that prepares ``path`` with a slow build (delay per chunk), optionally waiting
    for a partner first, and prints what it did."""
    return f"""
import json, sys, time
from pathlib import Path
import prefopt.data.prepare as prep
import prefopt.data.store as store_mod
from prefopt.config import TrainConfig
from prefopt.toy import word_tokenizer
calls = []
orig = prep.tokenize_pairs
def slow(*a, **k):
    calls.append(1)
    time.sleep({delay})
    return orig(*a, **k)
prep.tokenize_pairs = slow
prep.CHUNK_ROWS = 4
ready = {str(ready)!r} if {ready is not None} else None
if ready:
    Path(ready + "." + sys.argv[1]).touch()
    while len(list(Path(ready).parent.glob(Path(ready).name + ".*"))) < 2:
        time.sleep(0.01)
tok = word_tokenizer({WORDS!r})
cfg = TrainConfig(data_cache_dir={str(cache)!r}, progress_bar=False)
store, summary = prep.prepare_dataset(cfg, {str(path)!r}, "train", tok)
print(json.dumps({{"cache": summary["store"]["cache"], "path": summary["store"]["path"], "chunks": len(calls),
                   "pairs": [[p.prompt_ids, p.chosen_ids, p.rejected_ids, p.index] for p in store]}}))
"""


def _python(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_processes_racing_share_one_build(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", rows_for("explicit"))
    cache = tmp_path / "cache"
    script = _slow_build_script(path, cache, tmp_path / "ready", delay=0.4)
    procs = [_python(script, str(i)) for i in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.splitlines()[-1]))
    # Both started at once; one built (six chunks), the other waited on the lock and tokenized nothing.
    assert sorted((r["cache"], r["chunks"]) for r in results) == [("built", 6), ("hit", 0)]
    assert results[0]["path"] == results[1]["path"]
    assert results[0]["pairs"] == results[1]["pairs"]
    expected = old_path(TrainConfig(), path, tokenizer())[0]
    assert results[0]["pairs"] == [[p.prompt_ids, p.chosen_ids, p.rejected_ids, p.index] for p in expected]
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 1


def test_a_build_killed_midway_leaves_nothing_that_is_used_and_is_redone(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", rows_for("explicit"))
    cache = tmp_path / "cache"
    proc = _python(_slow_build_script(path, cache, None, delay=1.0), "0")
    deadline = time.time() + 60
    while not list(cache.glob(".tmp-*/" + PAIRS_FILE)) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)  # a chunk or two written
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    leftovers = list(cache.glob(".tmp-*"))
    assert leftovers and not [d for d in cache.iterdir() if d.is_dir() and not d.name.startswith(".tmp-")]
    tok = tokenizer()
    store, summary = prepare_dataset(cfg_for(tmp_path), str(path), "train", tok)
    assert summary["store"]["cache"] == "built"
    assert list(store) == old_path(TrainConfig(), path, tok)[0]
    assert not list(cache.glob(".tmp-*"))  # the killed build's directory is cleaned up


@pytest.mark.parametrize("num_proc", [1, 2])
def test_errors_in_later_chunks_still_name_file_line_and_field(num_proc, tmp_path, small_chunks):
    rows = rows_for("explicit")
    rows[18] = {k: v for k, v in rows[18].items() if k != "rejected"}
    rows[21]["chosen"] = 5
    path = write_rows(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as old:
        load_pairs(str(path))
    with pytest.raises(DataError) as new:
        prepare_dataset(cfg_for(tmp_path, dataset_num_proc=num_proc), str(path), "train", tokenizer())
    assert str(new.value) == str(old.value)
    assert str(new.value).startswith(f"{path}, line 19, field 'rejected': missing")
    assert not list((tmp_path / "cache").glob("*/" + MANIFEST))  # nothing half-built is kept
    # A line deep in the file that is not JSON.
    lines = write_rows(tmp_path / "ok.jsonl", rows_for("explicit")).read_text().splitlines()
    lines[20] = lines[20][:-1]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 21: malformed JSON"):
        prepare_dataset(cfg_for(tmp_path, dataset_num_proc=num_proc), str(path), "train", tokenizer())


def test_odpo_score_errors_name_the_row(tmp_path, small_chunks):
    rows = rows_for("explicit")
    for r in rows:
        r["score_chosen"], r["score_rejected"] = 2.0, 1.0
    rows[13]["score_chosen"] = 0.5
    path = write_rows(tmp_path / "s.jsonl", rows)
    with pytest.raises(DataError, match=r"s\.jsonl, line 14, field 'score_chosen': 0\.5 is not above"):
        prepare_dataset(cfg_for(tmp_path, loss_type="odpo", nonpositive_score_diff="error"), str(path), "train",
                        tokenizer())


def test_layout_choice_reads_length_columns_and_agrees_with_the_pairs(tmp_path):
    rows = rows_for("explicit", n=200)
    path = write_rows(tmp_path / "d.jsonl", rows)
    store, _ = prepare_dataset(cfg_for(tmp_path, max_length=64), str(path), "train", tokenizer())
    pairs = list(store)
    for bs in (1, 4, 16):
        assert estimate_costs(store, bs, 64) == estimate_costs(pairs, bs, 64)
        assert choose_layout("auto", store, bs, hidden_size=64) == choose_layout("auto", pairs, bs, hidden_size=64)

    class NoPairs(PairStore):  # the decision never builds a pair
        def _pair(self, i):
            raise AssertionError("a pair was built")

    blind = NoPairs(store.table, source=store.source, path=store.path)
    assert choose_layout("auto", blind, 4, hidden_size=64) == choose_layout("auto", pairs, 4, hidden_size=64)


def test_store_file_is_arrow_that_datasets_reads(tmp_path):
    import datasets

    path = write_rows(tmp_path / "d.jsonl", rows_for("explicit"))
    store, summary = prepare_dataset(cfg_for(tmp_path), str(path), "train", tokenizer())
    ds = datasets.Dataset.from_file(str(Path(summary["store"]["path"]) / PAIRS_FILE))
    assert ds["prompt_ids"] == [p.prompt_ids for p in store] and ds["row"] == [p.row for p in store]


def test_eval_offset_view_and_indices(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", rows_for("explicit"))
    store, _ = prepare_dataset(cfg_for(tmp_path, max_length=5, max_prompt_length=None), str(path), "train",
                               tokenizer())
    shifted = store.with_index_offset(100)
    assert [p.index for p in shifted] == [p.index + 100 for p in store] == (store.indices() + 100).tolist()
    assert [p.prompt_ids for p in shifted] == [p.prompt_ids for p in store]
    assert store.fingerprint and shifted.fingerprint != store.fingerprint


def test_a_hit_on_large_files_reads_neither_the_data_nor_the_store_again(tmp_path, monkeypatch):
    """Above REMEMBER_BYTES (lowered here) the data file's digest is remembered by path, size,
    mtime and inode and the store's checksum is skipped while its mtime is the recorded one: a hit
    costs no pass over gigabytes. Any write to either is noticed."""

    monkeypatch.setattr(store_mod, "REMEMBER_BYTES", 0)
    hashed = []
    real = store_mod._hash_file
    monkeypatch.setattr(store_mod, "_hash_file", lambda h, path: (hashed.append(Path(path).name), real(h, path)))
    tok = tokenizer()
    rows = rows_for("explicit")
    path = write_rows(tmp_path / "d.jsonl", rows)
    cfg = cfg_for(tmp_path)
    _, summary = prepare_dataset(cfg, str(path), "train", tok)
    assert summary["store"]["cache"] == "built" and "d.jsonl" in hashed
    hashed.clear()
    _, summary = prepare_dataset(cfg, str(path), "train", tok)
    assert summary["store"]["cache"] == "hit" and hashed == [LENGTHS_FILE]  # 12 bytes a pair: always checked
    # The data file is rewritten (another mtime): hashed again, and a miss.
    write_jsonl(path, rows[:-1])
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, summary2 = prepare_dataset(cfg, str(path), "train", tok)
    assert "d.jsonl" in hashed and summary2["store"]["cache"] == "built" and summary2["rows_read"] == 22
    # The store is damaged in place (its mtime changes): the checksum runs and it is rebuilt.
    pairs = Path(summary2["store"]["path"]) / PAIRS_FILE
    data = bytearray(pairs.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pairs.write_bytes(bytes(data))
    os.utime(pairs, ns=(pairs.stat().st_atime_ns, pairs.stat().st_mtime_ns + 10**9))
    hashed.clear()
    store, summary3 = prepare_dataset(cfg, str(path), "train", tok)
    assert summary3["store"]["cache"] == "built" and PAIRS_FILE in hashed
    assert list(store) == old_path(cfg, path, tok)[0]
