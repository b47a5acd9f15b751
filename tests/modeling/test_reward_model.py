"""Bradley–Terry reward models: the loss, the last-token read-out, training, scoring, the implicit
reward of a policy, and calibration (issue 5)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from prefopt.config import TrainConfig
from prefopt.data.collate import RewardPairCollator, pad_sequences
from prefopt.data.formats import load_pairs
from prefopt.data.responses import ResponseItem, tokenize_responses
from prefopt.data.tokenize import tokenize_pairs
from prefopt.evaluation.calibration import expected_calibration_error, preference_report, reliability_bins
from prefopt.evaluation.scorers import reward_model_scorer
from prefopt.losses.bradley_terry import bt_loss
from prefopt.modeling.load import load_tokenizer
from prefopt.modeling.reward_model import last_token_index, load_reward_model, score_sequences
from prefopt.objectives.reward import RewardObjective
from prefopt.recipes import train_reward_model
from prefopt.toy import build_tiny_model, easy_preferences, write_jsonl
from prefopt.training.metrics import read_metrics

# ------------------------------------------------------------------------------------------------
# The loss


def test_bt_loss_matches_hand_derived_values():
    # -log sigmoid(d) = log(1 + exp(-d)):
    #   d = 2 - 1 = 1  -> log(1 + e^-1) = 0.3132617
    #   d = 0 - 0 = 0  -> log 2         = 0.6931472
    #   d = -1 - 1 = -2 -> log(1 + e^2) = 2.1269280
    r_w = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    r_l = torch.tensor([1.0, 0.0, 1.0])
    losses = bt_loss(r_w, r_l)
    assert losses.tolist() == pytest.approx([0.3132617, 0.6931472, 2.1269280], abs=1e-6)
    # with margins m = (0.5, 1, 0): d - m = 0.5, -1, -2
    #   log(1 + e^-0.5) = 0.4740770, log(1 + e^1) = 1.3132617, log(1 + e^2) = 2.1269280
    margin = torch.tensor([0.5, 1.0, 0.0], requires_grad=True)
    with_margin = bt_loss(r_w, r_l, margin)
    assert with_margin.tolist() == pytest.approx([0.4740770, 1.3132617, 2.1269280], abs=1e-6)
    # d/dr_w of -log sigmoid(z) is -(1 - sigmoid(z)) = -sigmoid(-z); the margin is a constant
    with_margin.sum().backward()
    expected = [-1 / (1 + math.exp(z)) for z in (0.5, -1.0, -2.0)]
    assert r_w.grad.tolist() == pytest.approx(expected, abs=1e-6)
    assert margin.grad is None


def test_objective_margin_comes_from_scores():
    cfg = TrainConfig(margin_from_scores=True, margin_scale=2.0)

    def model(input_ids, attention_mask):  # rewards: chosen rows 1, 0; rejected rows 0, 0
        return torch.tensor([1.0, 0.0, 0.0, 0.0])

    batch = {"input_ids": torch.zeros(4, 1), "attention_mask": torch.ones(4, 1), "num_pairs": torch.tensor(2),
             "score_chosen": torch.tensor([0.75, 0.2], dtype=torch.float64),
             "score_rejected": torch.tensor([0.5, 0.4], dtype=torch.float64)}
    losses, metrics = RewardObjective(margin_from_scores=cfg.margin_from_scores, margin_scale=cfg.margin_scale)(model, batch)
    # margins 2 * (0.25) = 0.5 and 2 * max(-0.2, 0) = 0: -log sigmoid(1 - 0.5), -log sigmoid(0)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.5)), math.log(2)], abs=1e-6)
    assert metrics["accuracy"].tolist() == [1.0, 0.0]
    assert metrics["rewards/margins"].tolist() == [1.0, 0.0]


# ------------------------------------------------------------------------------------------------
# The score is read at the last real token, whatever the padding side


def test_last_token_index_by_hand():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 0, 4]
    with pytest.raises(ValueError):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


@pytest.mark.parametrize("arch_fixture", ["tiny_llama", "tiny_gpt2"])
def test_score_does_not_depend_on_padding_side(arch_fixture, request, easy_data):
    path = request.getfixturevalue(arch_fixture)
    tok = load_tokenizer(str(path))
    model = load_reward_model(str(path), pad_token_id=tok.pad_token_id).eval()
    pairs, _ = load_pairs(str(easy_data["eval"]))
    tokenized, _ = tokenize_pairs(pairs[:6], tok, max_length=64, max_prompt_length=32)
    with torch.no_grad():
        right_batch = RewardPairCollator(tok.pad_token_id, "right")(tokenized)
        left_batch = RewardPairCollator(tok.pad_token_id, "left")(tokenized)
        assert not torch.equal(right_batch["input_ids"], left_batch["input_ids"])  # really padded differently
        right = model(right_batch["input_ids"], right_batch["attention_mask"])
        left = model(left_batch["input_ids"], left_batch["attention_mask"])
        seqs = [p.prompt_ids + p.chosen_ids for p in tokenized] + [p.prompt_ids + p.rejected_ids for p in tokenized]
        alone = torch.cat([model(*pad_sequences([s], tok.pad_token_id)) for s in seqs])
        # the head on the hidden state of the last *column* (a pad for most right-padded rows) differs
        hidden = model.hf.base_model(input_ids=right_batch["input_ids"],
                                     attention_mask=right_batch["attention_mask"]).last_hidden_state
        last_column = model.hf.score(hidden[:, -1]).squeeze(-1)
    assert torch.allclose(right, alone, atol=1e-5)
    assert torch.allclose(left, alone, atol=1e-5)
    padded = right_batch["attention_mask"][:, -1] == 0
    assert padded.any()
    assert not torch.allclose(last_column[padded], alone[padded], atol=1e-3)


def test_response_tokenization_matches_training(tiny_llama, easy_data):
    tok = load_tokenizer(str(tiny_llama))
    pairs, _ = load_pairs(str(easy_data["train"]))
    pairs = pairs[:10]
    tokenized, _ = tokenize_pairs(pairs, tok, max_length=12, max_prompt_length=6)  # cuts prompts and responses
    items = [ResponseItem(p.prompt, text) for p in pairs for text in (p.chosen, p.rejected)]
    encoded, stats = tokenize_responses(items, tok, max_length=12, max_prompt_length=6)
    assert stats.prompt_truncated > 0 and stats.response_truncated > 0
    by_index = {t.index: t for t in tokenized}
    for i in range(len(pairs)):
        if i in by_index:
            t = by_index[i]
            assert encoded[2 * i] == (t.prompt_ids, t.chosen_ids)
            assert encoded[2 * i + 1] == (t.prompt_ids, t.rejected_ids)


# ------------------------------------------------------------------------------------------------
# Calibration


def test_reliability_and_ece_by_hand():
    probs = [0.05, 0.15, 0.35, 0.45, 0.85, 0.95]
    labels = [0, 1, 0, 1, 1, 1]
    bins = reliability_bins(probs, labels, n_bins=2)
    # bin [0, 0.5): mean prob 0.25, frequency 0.5; bin [0.5, 1]: mean prob 0.9, frequency 1
    assert [b.count for b in bins] == [4, 2]
    assert bins[0].mean_prob == pytest.approx(0.25) and bins[0].frequency == pytest.approx(0.5)
    assert bins[1].mean_prob == pytest.approx(0.9) and bins[1].frequency == pytest.approx(1.0)
    # ECE = 4/6 * |0.5 - 0.25| + 2/6 * |1 - 0.9| = 1/6 + 1/30 = 0.2
    assert expected_calibration_error(bins) == pytest.approx(0.2)
    # a pair report: margins 2, 0, -1 -> accuracy 1/3 (the tie counts as wrong)
    report = preference_report([2.0, 0.0, 0.0], [0.0, 0.0, 1.0], n_bins=10)
    assert report.accuracy == pytest.approx(1 / 3) and report.ties == 1
    p = 1 / (1 + np.exp(-np.array([2.0, 0.0, -1.0])))
    both = np.concatenate([p, 1 - p])
    lab = np.concatenate([np.ones(3), np.zeros(3)])
    explicit = 0.0
    for k in range(10):  # an explicit loop over the bins
        sel = (np.minimum((both * 10).astype(int), 9)) == k
        if sel.any():
            explicit += sel.sum() / 6 * abs(lab[sel].mean() - both[sel].mean())
    assert report.ece == pytest.approx(explicit)


# ------------------------------------------------------------------------------------------------
# Training on an easy task, then scoring and evaluating with the trained model


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, tiny_llama):
    d = tmp_path_factory.mktemp("rm")
    train = write_jsonl(d / "train.jsonl", easy_preferences(96, seed=10))
    held_out = write_jsonl(d / "held_out.jsonl", easy_preferences(48, seed=11, scores=False))
    cfg = TrainConfig(
        model_name_or_path=str(tiny_llama), dataset=str(train), eval_dataset=str(held_out),
        output_dir=str(d / "rm"), max_steps=24, learning_rate=3e-3, lr_scheduler_type="constant",
        per_device_train_batch_size=16, logging_steps=8, save_steps=12, progress_bar=False, report_to="none",
        max_length=32, max_prompt_length=16,
    )
    final = train_reward_model(cfg)
    return {"dir": d / "rm", "final": final, "held_out": held_out, "dir_root": d}


def test_reward_model_learns_the_easy_task(trained_rm):
    out, final = trained_rm["dir"], trained_rm["final"]
    assert final["eval/accuracy"] > 0.9  # held-out pairs, never trained on
    rows = read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [8, 16, 24]
    for r in train_rows:
        assert {"accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(r)
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-6)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] < math.log(2) + 0.1
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert len(eval_rows) == 1 and eval_rows[0]["eval/accuracy"] == final["eval/accuracy"]
    assert (out / "checkpoint-12" / "training_state.pt").exists()
    assert (out / "config.yaml").exists() and (out / "data_summary.json").exists()


def test_saved_reward_model_loads_with_transformers(trained_rm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(trained_rm["dir"])
    hf = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert hf.config.num_labels == 1
    texts = ["the movie was wonderful lovely <eos>", "the film is awful boring <eos>", "it was good <eos>"]
    enc = tok(texts, return_tensors="pt", padding=True)  # right padding, pad != eos in the toy tokenizer
    with torch.no_grad():
        hf_scores = hf(**enc).logits.squeeze(-1)
    ours = reward_model_scorer(path)(["the movie was wonderful lovely", "the film is awful boring", "it was good"])
    assert hf_scores.tolist() == pytest.approx(ours, abs=1e-4)
    assert ours[0] > ours[1]


@pytest.mark.slow
def test_reward_score_feeds_odpo_training(trained_rm, cli_here, tiny_llama):
    d = trained_rm["dir_root"]
    scored = d / "scored.jsonl"
    res = cli_here("reward", "score", "--model", trained_rm["dir"], "--dataset", trained_rm["held_out"],
              "--output", scored, "--max_length", "32", "--max_prompt_length", "16", "--batch_size", "5")
    assert res.returncode == 0, res.stderr
    assert "score:" in res.stderr  # the progress bar
    original = [json.loads(line) for line in trained_rm["held_out"].read_text().splitlines()]
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    assert len(rows) == len(original)
    for before, after in zip(original, rows):  # input order, input fields unchanged
        assert {k: after[k] for k in before} == before
        assert set(after) == set(before) | {"score_chosen", "score_rejected"}
    # the same numbers as scoring every sequence alone
    tok = load_tokenizer(str(trained_rm["dir"]))
    model = load_reward_model(str(trained_rm["dir"]), pad_token_id=tok.pad_token_id)
    items = [ResponseItem(r["prompt"], r[k]) for r in original[:4] for k in ("chosen", "rejected")]
    enc, _ = tokenize_responses(items, tok, max_length=32, max_prompt_length=16)
    alone = [score_sequences(model, [p + r], pad_token_id=tok.pad_token_id)[0] for p, r in enc]
    got = [r[k] for r in rows[:4] for k in ("score_chosen", "score_rejected")]
    assert got == pytest.approx(alone, abs=1e-5)
    assert sum(r["score_chosen"] > r["score_rejected"] for r in rows) > 0.9 * len(rows)

    res = cli_here("train", "--model_name_or_path", tiny_llama, "--dataset", scored, "--loss_type", "odpo",
              "--output_dir", d / "odpo", "--max_steps", "1", "--per_device_train_batch_size", "4",
              "--progress_bar", "false")
    assert res.returncode == 0, res.stderr
    row = read_metrics(d / "odpo" / "metrics.jsonl")[0]
    # At step 1 the policy equals the reference (h = 0), so each pair's loss is
    # -log sigmoid(-alpha * log(s_w - s_l)) = log(1 + (s_w - s_l)) with alpha = 1: the reward model's
    # scores are the offsets. The first batch is the schedule's first 4 kept pairs (drop policy).
    from prefopt.training.data_order import Schedule

    kept = [r for r in rows if r["score_chosen"] > r["score_rejected"]]
    first = Schedule(len(kept), 4, 1, 1, seed=42, shuffle=True).step_micro_batches(0)[0]
    expected = np.mean([math.log1p(kept[i]["score_chosen"] - kept[i]["score_rejected"]) for i in first])
    assert row["loss"] == pytest.approx(expected, abs=1e-4)
    assert expected > math.log(2) + 0.5  # far from plain DPO's log 2


def test_reward_eval_reports_accuracy_and_calibration(trained_rm, tmp_path):
    from prefopt.evaluation.rewarders import ModelRewarder, evaluate_rewarder

    cfg = TrainConfig(dataset=str(trained_rm["held_out"]), max_length=32, max_prompt_length=16, progress_bar=False)
    rewarder = ModelRewarder(str(trained_rm["dir"]), batch_size=8, progress=False)
    result = evaluate_rewarder(cfg, rewarder, output=tmp_path / "eval.json", plot=tmp_path / "rel.png")
    per_pair = [json.loads(line) for line in (tmp_path / "eval.pairs.jsonl").read_text().splitlines()]
    margins = np.array([p["reward_chosen"] - p["reward_rejected"] for p in per_pair])
    assert result["pairs"] == 48
    assert result["accuracy"] == pytest.approx(float((margins > 0).mean()))
    assert result["accuracy"] == pytest.approx(trained_rm["final"]["eval/accuracy"])  # as in training's eval
    assert result["ece"] == pytest.approx(preference_report(margins, np.zeros_like(margins)).ece)
    assert (tmp_path / "rel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "eval.json").read_text())["accuracy"] == result["accuracy"]


def test_rated_rows_get_one_score_per_response(trained_rm, tmp_path):
    from prefopt.evaluation.rewarders import ModelRewarder, score_dataset

    rows = [{"prompt": "the movie was", "responses": ["good great", "bad awful", "nice", "dull", ""], "id": 1},
            {"prompt": "it is", "responses": ["boring", "wonderful superb"], "id": 2}]
    src = write_jsonl(tmp_path / "rated.jsonl", rows)
    cfg = TrainConfig(dataset=str(src), max_length=32, max_prompt_length=16, progress_bar=False)
    rewarder = ModelRewarder(str(trained_rm["dir"]), batch_size=3, progress=False)
    score_dataset(cfg, rewarder, tmp_path / "out.parquet")
    import pyarrow.parquet as pq

    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["id"] for r in out] == [1, 2] and [len(r["scores"]) for r in out] == [5, 2]
    scorer = reward_model_scorer(trained_rm["dir"])
    for r in out:
        expected = scorer([f"{r['prompt']} {resp}".strip() for resp in r["responses"]])  # word tokenizer: same ids
        assert r["scores"] == pytest.approx(expected, abs=1e-5)
    assert out[0]["scores"][0] > out[0]["scores"][1] and out[1]["scores"][1] > out[1]["scores"][0]
    # the output is a valid rated file: its pairs load with the reward model's ordering
    pairs, stats = load_pairs(str(tmp_path / "out.parquet"))
    assert len(pairs) == 6 + 1 and stats.dropped["empty responses"] == 1


# ------------------------------------------------------------------------------------------------
# The implicit reward of a policy


@pytest.mark.slow
def test_implicit_reward_equals_beta_times_logp_difference(cli_here, tiny_llama, easy_data, tmp_path):
    policy = build_tiny_model(tmp_path / "policy", arch="llama", seed=1)  # a different model, same vocab
    data = write_jsonl(tmp_path / "d.jsonl", easy_preferences(12, seed=3, scores=False))
    for name, model in (("pol", policy), ("ref", tiny_llama)):
        res = cli_here("logps", "--model", model, "--dataset", data, "--output", tmp_path / f"{name}.jsonl")
        assert res.returncode == 0, res.stderr
    res = cli_here("reward", "score", "--policy", policy, "--ref", tiny_llama, "--beta", "0.25",
              "--dataset", data, "--output", tmp_path / "implicit.jsonl", "--batch_size", "5")
    assert res.returncode == 0, res.stderr
    pol = [json.loads(x) for x in (tmp_path / "pol.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "ref.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (tmp_path / "implicit.jsonl").read_text().splitlines()]
    assert len(got) == len(pol) == 12
    for g, p, r in zip(got, pol, ref):
        assert g["score_chosen"] == pytest.approx(0.25 * (p["chosen_logps"] - r["chosen_logps"]), abs=1e-5)
        assert g["score_rejected"] == pytest.approx(0.25 * (p["rejected_logps"] - r["rejected_logps"]), abs=1e-5)
        assert g["score_chosen"] != 0.0


def test_reward_cli_errors_are_one_line(capsys, tiny_llama, easy_data, tmp_path):
    from prefopt.cli.main import main

    base = ["--dataset", str(easy_data["eval"])]
    unscored = write_jsonl(tmp_path / "unscored.jsonl", easy_preferences(4, scores=False))
    cases = [
        (["reward", "score", "--policy", "p", "--model", "m", "--output", str(tmp_path / "x.jsonl")], "either --model"),
        (["reward", "score", "--policy", str(tiny_llama), "--output", str(tmp_path / "x.jsonl")], "both --policy and --ref"),
        (["reward", "score", "--model", str(tiny_llama), "--output", str(tmp_path / "x.txt")], "unsupported file type"),
        (["reward", "eval"], "give --model"),
        (["reward", "train", "--model_name_or_path", str(tiny_llama), "--margin_scal", "2"], "did you mean '--margin_scale'"),
        (["reward", "train", "--model_name_or_path", str(tiny_llama), "--margin_from_scores", "true",
          "--dataset", str(unscored)], "margin_from_scores is on but 4 pair(s) have no scores"),
    ]
    for argv, message in cases:
        assert main(argv[:2] + base + argv[2:]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_implicit_format_rows_are_scored_on_their_full_texts(trained_rm, tmp_path):
    from prefopt.evaluation.rewarders import ModelRewarder, score_dataset

    rows = [{"chosen": "the movie was good great", "rejected": "the movie was bad", "note": "x"},
            {"chosen": "it is wonderful", "rejected": "it is dull boring", "note": "y"}]
    src = write_jsonl(tmp_path / "hh.jsonl", rows)
    cfg = TrainConfig(dataset=str(src), max_length=32, max_prompt_length=16, progress_bar=False)
    score_dataset(cfg, ModelRewarder(str(trained_rm["dir"]), batch_size=4, progress=False), tmp_path / "out.json")
    out = json.loads((tmp_path / "out.json").read_text())
    assert [r["note"] for r in out] == ["x", "y"] and out[0]["chosen"] == rows[0]["chosen"]
    scorer = reward_model_scorer(trained_rm["dir"])
    expected = scorer([t for r in rows for t in (r["chosen"], r["rejected"])])
    assert [r[k] for r in out for k in ("score_chosen", "score_rejected")] == pytest.approx(expected, abs=1e-5)


def test_reward_training_resumes_exactly(tiny_gpt2, easy_data, tmp_path):
    # same checkpointing as DPO training: resuming from step 2 reproduces steps 3-4 of a full run
    def cfg(out, **kw):
        return TrainConfig(model_name_or_path=str(tiny_gpt2), dataset=str(easy_data["train"]), output_dir=str(out),
                           max_steps=4, save_steps=2, logging_steps=1, learning_rate=1e-3,
                           per_device_train_batch_size=8, progress_bar=False, report_to="none",
                           log_throughput=False, max_length=32, max_prompt_length=16, **kw)

    train_reward_model(cfg(tmp_path / "full"))
    train_reward_model(cfg(tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2")))
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed == full
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and "score.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reward_model_directory_is_a_scorer_for_eval(trained_rm, tiny_llama):
    from prefopt.errors import PrefoptError
    from prefopt.evaluation.scorers import load_scorer

    texts = ["the movie was wonderful lovely", "the film is awful boring"]
    scorer = load_scorer(str(trained_rm["dir"]))
    assert scorer(texts) == pytest.approx(reward_model_scorer(str(trained_rm["dir"]))(texts), abs=1e-6)
    assert scorer(texts)[0] > scorer(texts)[1]
    with pytest.raises(PrefoptError, match="not a reward model directory"):
        load_scorer(str(tiny_llama))  # a causal LM, not a reward model
