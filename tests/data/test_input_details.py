"""Input details: CSV cells stay text outside the columns a format defines as lists; a local-looking
model path that does not exist is named as such."""

from __future__ import annotations

import json
import os

import pytest

from prefopt.data.formats import load_pairs
from prefopt.errors import PrefoptError
from prefopt.modeling.load import load_tokenizer, looks_local


def test_a_csv_response_that_looks_like_a_list_is_text(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('prompt,chosen,rejected\nthe numbers,"[1, 2, 3]",none\n')
    pairs, stats = load_pairs(f)
    assert stats.format == "explicit"
    assert pairs[0].chosen == "[1, 2, 3]" and pairs[0].rejected == "none"


def test_a_csv_is_not_taken_for_conversational_data_by_accident(tmp_path):
    msg = json.dumps([{"role": "assistant", "content": "hi"}])
    f = tmp_path / "d.csv"
    f.write_text('prompt,chosen,rejected\nq,"' + msg.replace('"', '""') + '",no\n')
    pairs, stats = load_pairs(f)
    assert stats.format == "explicit" and pairs[0].chosen == msg


def test_csv_list_columns_of_the_rated_format_are_decoded(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text('prompt,responses,scores\nq,"[""good"", ""[1, 2]""]","[0.9, 0.1]"\n')
    pairs, stats = load_pairs(f)
    assert stats.format == "rated"
    assert (pairs[0].chosen, pairs[0].rejected, pairs[0].score_chosen) == ("good", "[1, 2]", 0.9)


def test_explicitly_conversational_csv_decodes_its_message_columns(tmp_path, tiny_llama):
    tok = load_tokenizer(str(tiny_llama))
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    rows = [[{"role": "user", "content": "q"}], [{"role": "assistant", "content": "good"}],
            [{"role": "assistant", "content": "bad"}]]
    f = tmp_path / "d.csv"
    f.write_text("prompt,chosen,rejected\n" + ",".join('"' + json.dumps(r).replace('"', '""') + '"' for r in rows) + "\n")
    pairs, stats = load_pairs(f, fmt="conversational", tokenizer=tok)
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ("user: q\n", "assistant: good\n",
                                                                     "assistant: bad\n")


def test_a_missing_local_model_path_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert looks_local("runs/sft") and looks_local("./sft") and looks_local(f"{os.sep}x{os.sep}y")
    assert not looks_local("gpt2") and not looks_local("org/model")  # hub ids
    assert looks_local(tmp_path / "runs")  # a Path object, as the Python API may pass
    with pytest.raises(PrefoptError, match="^model path not found: runs/sft$"):
        load_tokenizer("runs/sft")
