"""``prefopt prepare`` builds the store training opens; ``prefopt cache list|clear`` shows and
empties it; a training run then reuses the store and prints the summary from it."""

import json
from pathlib import Path

import pytest

from prefopt.cli.main import main


@pytest.mark.slow
def test_prepare_then_list_then_train_reuses_then_clear(tiny_llama, easy_data, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["--dataset", str(easy_data["train"]), "--model_name_or_path", str(tiny_llama),
            "--data_cache_dir", str(cache)]
    assert main(["prepare", *args]) == 0
    first = capsys.readouterr().out.strip()
    assert first.startswith(f"train: {easy_data['train']} (explicit): 64 rows -> 64 pairs; tokenized pairs stored in ")
    store = first.rsplit(" ", 1)[1]
    assert main(["prepare", *args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["train"]
    assert summary["store"] == {"cache": "hit", "path": store} and summary["tokenization"]["pairs_kept"] == 64
    # The manifest keeps the key's parts: they hash to the store's name.
    from prefopt.data.store import MANIFEST, store_key

    parts = json.loads((Path(store) / MANIFEST).read_text())["key_parts"]
    assert store_key(parts) == Path(store).name and parts["settings"]["max_length"] is not None

    assert main(["cache", "list", "--data_cache_dir", str(cache)]) == 0
    listing = capsys.readouterr().out
    assert f"{cache}: 1 stores" in listing and f"64 pairs from {easy_data['train']}" in listing

    out = tmp_path / "run"
    assert main(["train", *args, "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "2",
                 "--progress_bar", "false", "--report_to", "none"]) == 0
    err = capsys.readouterr().err
    assert f"tokenized pairs reused from {store}" in err
    saved = json.loads((out / "data_summary.json").read_text())["train"]
    assert saved["store"]["cache"] == "hit" and saved["rows_read"] == 64

    assert main(["cache", "clear", "--data_cache_dir", str(cache)]) == 0
    assert "removed 1 stores" in capsys.readouterr().out
    assert not [p for p in cache.iterdir() if p.is_dir()]


def test_prepare_needs_a_tokenizer_and_bad_keys_are_one_line(easy_data, tmp_path, capsys):
    assert main(["prepare", "--dataset", str(easy_data["train"])]) == 2
    assert "prefopt prepare tokenizes" in capsys.readouterr().err
    assert main(["prepare", "--dataset", str(easy_data["train"]), "--tokenizer_name_or_path", "x",
                 "--dataset_num_proc", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dataset_num_proc must be at least 1" in err[0]
