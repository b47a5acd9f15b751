"""Every input format gives the expected records; bad rows name file, row and field."""

import json

import pytest

from prefopt.data.formats import load_pairs, shared_prompt_length
from prefopt.data.records import PreferencePair
from prefopt.data.tokenize import tokenize_pairs
from prefopt.errors import DataError, PrefoptError
from prefopt.toy import word_tokenizer, write_jsonl

ROWS = [
    {"prompt": "the movie was", "chosen": "good", "rejected": "bad", "score_chosen": 0.9, "score_rejected": 0.2},
    {"prompt": "the plot", "chosen": "was great", "rejected": "was dull", "score_chosen": 0.7, "score_rejected": 0.6},
]


def triples(pairs):
    return [(p.prompt, p.chosen, p.rejected, p.score_chosen, p.score_rejected) for p in pairs]


EXPECTED = [("the movie was", "good", "bad", 0.9, 0.2), ("the plot", "was great", "was dull", 0.7, 0.6)]


def test_explicit_jsonl(tmp_path):
    pairs, stats = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    assert triples(pairs) == EXPECTED
    assert stats.format == "explicit" and stats.rows_read == 2 and stats.pairs == 2
    assert pairs[1].row == 2 and pairs[1].row_label == "line"


def test_every_source_gives_the_same_records(tmp_path):
    import datasets
    import pandas as pd

    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame(ROWS).to_csv(tmp_path / "d.csv", index=False)
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "saved_dict"))
    for name in ("d.json", "d.parquet", "d.csv", "saved", "saved_dict"):
        pairs, _ = load_pairs(str(tmp_path / name))
        assert triples(pairs) == EXPECTED, name


@pytest.mark.parametrize(
    "chosen,rejected,prompt",
    [
        ("\n\nHuman: is it good?\n\nAssistant: yes it is", "\n\nHuman: is it good?\n\nAssistant: yes, no",
         "\n\nHuman: is it good?\n\nAssistant:"),
        ("The movie was great fun", "The movie was grim", "The movie was"),
        ("The movie was good", "The movie was bad", "The movie was"),
        ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: sure thing", "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: no",
         "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"),
    ],
)
def test_implicit_prompt_is_cut_at_turn_marker_or_word_boundary(chosen, rejected, prompt, tmp_path):
    pairs, stats = load_pairs(str(write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}])))
    assert stats.format == "implicit"
    p = pairs[0]
    assert p.prompt == prompt
    assert p.prompt + p.chosen == chosen and p.prompt + p.rejected == rejected
    assert shared_prompt_length(chosen, rejected) == len(prompt)


def test_rated_format_expands_to_every_pair_with_different_scores(tmp_path):
    rows = [{"prompt": "p", "responses": ["a", "b", "c", "d"], "scores": [3, 1, 3, 2]}]
    pairs, stats = load_pairs(str(write_jsonl(tmp_path / "r.jsonl", rows)))
    # (a,b) a; (a,c) tie; (a,d) a; (b,c) c; (b,d) d; (c,d) c
    assert [(p.chosen, p.rejected, p.score_chosen, p.score_rejected) for p in pairs] == [
        ("a", "b", 3, 1), ("a", "d", 3, 2), ("c", "b", 3, 1), ("d", "b", 2, 1), ("c", "d", 3, 2)]
    assert stats.format == "rated" and stats.dropped["tied scores"] == 1


def test_empty_samples_in_rated_data_are_dropped_and_counted(tmp_path):
    rows = [{"prompt": "p", "responses": ["a", "", "c"], "scores": [3, 9, 1]}]
    pairs, stats = load_pairs(str(write_jsonl(tmp_path / "r.jsonl", rows)))
    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "c")]
    assert stats.dropped["empty responses"] == 1


def test_tldr_shaped_json_is_read_as_rated(tmp_path):
    (tmp_path / "tldr.json").write_text(json.dumps({
        "post one": {"responses": ["x", "y"], "rewards": [2, 5]},
        "post two": {"responses": ["u", "v", "w"], "rewards": [1, 1, 7]},
    }))
    pairs, stats = load_pairs(str(tmp_path / "tldr.json"))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("post one", "y", "x"), ("post two", "w", "u"), ("post two", "w", "v")]
    assert stats.dropped["tied scores"] == 1


def test_scored_responses_are_grouped_by_prompt(tmp_path):
    rows = [{"prompt": "p1", "text": "a", "reward": 0.5}, {"prompt": "p2", "text": "c", "reward": 1.0},
            {"prompt": "p1", "text": "b", "reward": 1.5}]
    pairs, stats = load_pairs(str(write_jsonl(tmp_path / "imdb.jsonl", rows)))
    assert stats.format == "scored_responses"
    assert [(p.prompt, p.chosen, p.rejected, p.score_chosen, p.score_rejected) for p in pairs] == [
        ("p1", "b", "a", 1.5, 0.5)]


def test_conversational_rendered_with_chat_template(tmp_path):
    tok = word_tokenizer(["hi", "hello", "bye"])
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    rows = [
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "assistant", "content": "bye"}]},
        {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bye"}]},
    ]
    pairs, stats = load_pairs(str(write_jsonl(tmp_path / "chat.jsonl", rows)), tokenizer=tok)
    assert stats.format == "conversational"
    for p in pairs:
        assert p.prompt == "<|user|>hi<|end|><|assistant|>"
        assert (p.chosen, p.rejected) == ("hello<|end|>", "bye<|end|>")
        assert p.templated


def test_custom_column_names(tmp_path):
    from prefopt.data.formats import Columns

    rows = [{"question": "q", "good": "yes", "bad": "no"}]
    pairs, _ = load_pairs(str(write_jsonl(tmp_path / "c.jsonl", rows)),
                          columns=Columns(prompt="question", chosen="good", rejected="bad"))
    assert triples(pairs) == [("q", "yes", "no", None, None)]


BAD = [
    ('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a", "rejected": }\n', "line 2", None, "malformed JSON"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a", "rejectd": "b"}\n', "line 2", "rejected", "missing"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b"}\n\n{"prompt": "p", "chosen": 3, "rejected": "b"}\n', "line 3", "chosen", "expected a string"),
    ('{"prompt": "p", "chosen": "a", "rejected": "  "}\n', "line 1", "rejected", "is empty"),
    ('{"prompt": "", "chosen": "a", "rejected": "b"}\n', "line 1", "prompt", "is empty"),
    ('{"prompt": "p", "chosen": "a", "rejected": "a"}\n', "line 1", "rejected", "identical"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": NaN, "score_rejected": 1}\n', "line 1", "score_chosen", "finite"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": "high", "score_rejected": 1}\n', "line 1", "score_chosen", "expected a number"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 1}\n', "line 1", "score_rejected", "missing"),
    ('{"question": "p", "answer": "a"}\n', "line 1", "chosen", "missing"),
    ('{"prompt": "p", "responses": ["a", "b"], "scores": [1]}\n', "line 1", "scores", "1 scores for 2 responses"),
]


@pytest.mark.parametrize("content,row,field,problem", BAD)
def test_bad_rows_name_file_row_and_field(tmp_path, content, row, field, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_pairs(str(path))
    message = str(info.value)
    assert str(path) in message and row in message and problem in message
    if field:
        assert f"field '{field}'" in message


def test_non_utf8_and_empty_and_unsupported(tmp_path):
    bad = tmp_path / "latin.jsonl"
    bad.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl, line 2: not valid UTF-8"):
        load_pairs(str(bad))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_pairs(str(tmp_path / "empty.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(PrefoptError, match="unsupported file type"):
        load_pairs(str(tmp_path / "d.txt"))
    with pytest.raises(PrefoptError, match="dataset not found"):
        load_pairs(str(tmp_path / "missing.jsonl"))


def test_csv_rows_are_numbered_by_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\np,a,b\n"multi\nline",a,b\np,a,\n')
    with pytest.raises(DataError, match=r"d.csv, line 5, field 'rejected': is empty"):
        load_pairs(str(path))


def test_truncation_cuts_prompt_left_completions_right_and_drops_hopeless_pairs():
    tok = word_tokenizer(["a", "b", "c", "d", "e", "x", "y", "z"])
    pairs = [
        PreferencePair("a b c d e", "x y", "z"),  # prompt 1+5 tokens -> cut to last 3 from the left
        PreferencePair("a", "x y z x y z", "y"),  # completion cut from the right
    ]
    out, stats = tokenize_pairs(pairs, tok, max_length=6, max_prompt_length=3)
    ids = tok.convert_tokens_to_ids
    assert out[0].prompt_ids == ids(["c", "d", "e"])
    assert out[0].chosen_ids == ids(["x", "y"]) + [tok.eos_token_id]
    assert out[1].prompt_ids == [tok.bos_token_id, ids("a")]
    assert out[1].chosen_ids == ids(["x", "y", "z", "x"])  # room = 6 - 2 = 4, EOS cut too
    assert stats.prompt_truncated == 1 and stats.completion_truncated == 1
    dropped, stats = tokenize_pairs([PreferencePair("a b c d e", "x", "y")], tok, max_length=4)
    assert dropped == [] and stats.dropped["prompt longer than max_length"] == 1


def test_max_completion_length_and_keep_start_truncation():
    tok = word_tokenizer(["a", "b", "c", "d", "e", "x", "y", "z"])
    ids = tok.convert_tokens_to_ids
    pairs = [PreferencePair("a b c d e", "x y z x", "z")]
    out, stats = tokenize_pairs(pairs, tok, max_length=20, max_prompt_length=3, max_completion_length=2,
                                truncation_mode="keep_start")
    assert out[0].prompt_ids == [tok.bos_token_id] + ids(["a", "b"])  # the start survives, BOS included
    assert out[0].chosen_ids == ids(["x", "y"])  # 4 words + EOS cut to 2, though max_length has room
    assert out[0].rejected_ids == ids(["z"]) + [tok.eos_token_id]
    assert stats.prompt_truncated == 1 and stats.completion_truncated == 1


def test_each_distinct_text_is_tokenized_once_with_the_ids_of_tokenizing_each_alone(monkeypatch):
    import prefopt.data.tokenize as tokenize

    tok = word_tokenizer(["a", "b", "c", "x", "y", "z"])
    pairs = [PreferencePair("a b", "x", "y z"), PreferencePair("a b", "y z", "x"),  # a prompt and responses again
             PreferencePair("c", "a b", "x y"), PreferencePair("a b", "x", "z")]  # a prompt's text as a response
    sent = []
    real = tokenize.encode_texts
    monkeypatch.setattr(tokenize, "encode_texts", lambda t, texts: sent.append(list(texts)) or real(t, texts))
    out, _ = tokenize_pairs(pairs, tok, max_length=64)
    assert sent == [["a b", "c", "x", "y z", "x y", "z"]]  # prompts, then chosen, then rejected texts, once each
    alone = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    for p, t in zip(pairs, out):
        assert t.prompt_ids == [tok.bos_token_id, *alone(p.prompt)]
        assert t.chosen_ids == [*alone(p.chosen), tok.eos_token_id]
        assert t.rejected_ids == [*alone(p.rejected), tok.eos_token_id]
    assert out[0].prompt_ids is not out[1].prompt_ids  # no list shared between pairs
    chosen = [t.chosen_ids for t in out]
    assert len({id(x) for x in chosen}) == len(chosen)


def test_the_direct_rust_path_gives_the_ids_of_the_transformers_call():
    from prefopt.data.tokenize import _backend_encoder, encode_texts

    tok = word_tokenizer(["a", "b", "c"])
    texts = ["a b c", "c a", "", "b <unk> a", "a" * 3]
    assert _backend_encoder(tok) is not None  # the fast path is the one taken
    assert encode_texts(tok, texts) == tok(texts, add_special_tokens=False)["input_ids"]
    tok.backend_tokenizer.enable_truncation(2)  # state the transformers call would switch off: not direct
    assert _backend_encoder(tok) is None
