"""End-to-end runs on a tiny Llama built from a config and loaded from disk."""

import math

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from prefopt.training.metrics import read_metrics

COMMON = ["--max_steps", "20", "--logging_steps", "1", "--learning_rate", "2e-3", "--beta", "0.5",
          "--per_device_train_batch_size", "8", "--save_steps", "10", "--eval_steps", "10",
          "--progress_bar", "false", "--seed", "3", "--report_to", "none"]


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_llama, easy_data):
    from tests.conftest import run_cli

    out = tmp_path_factory.mktemp("runs") / "dpo"
    config = out.parent / "dpo.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": str(tiny_llama), "dataset": str(easy_data["train"]),
                                      "eval_dataset": str(easy_data["eval"]), "output_dir": str(out),
                                      "loss_type": "dpo"}))
    # Progress on (stderr is a pipe here, as in a log): test_progress_in_a_log reads what it wrote.
    res = run_cli("train", "--config", config, *COMMON, "--progress_bar", "true")
    assert res.returncode == 0, res.stderr
    (out.parent / "dpo.stderr").write_text(res.stderr)
    return out


def test_progress_in_a_log_is_lines_with_the_last_logged_loss(dpo_run):
    err = (dpo_run.parent / "dpo.stderr").read_text()
    assert "\r" not in err  # no bar redraws
    lines = [line for line in err.splitlines() if line.startswith("train: ")]
    last = [r for r in read_metrics(dpo_run / "metrics.jsonl") if "loss" in r][-1]
    # 20 quick steps: no 10 % line (less than LINE_MIN_SECONDS apart), the closing one with the last loss
    assert lines[-1].startswith("train: 20/20 step (100%) [")
    assert lines[-1].endswith(f"loss={last['loss']:.4f}, acc={last['rewards/accuracies']:.2f}")
    assert not any(line.startswith(("eval ", "tokenizing")) for line in err.splitlines())  # quick, transient


def test_first_logged_dpo_loss_is_log2(dpo_run):
    rows = [r for r in read_metrics(dpo_run / "metrics.jsonl") if "loss" in r]
    assert rows[0]["step"] == 1
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_accuracy_rises_on_an_easy_task(dpo_run):
    rows = read_metrics(dpo_run / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert len(train_rows) == 20 and [r["step"] for r in eval_rows] == [10, 20]
    assert train_rows[-1]["rewards/accuracies"] > 0.9
    assert eval_rows[-1]["eval/rewards/accuracies"] > 0.9
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "learning_rate", "tokens_per_second", "grad_norm", "epoch"):
        assert key in train_rows[0], key


def test_saved_model_loads_and_differs_from_initial(dpo_run, tiny_llama):
    trained = AutoModelForCausalLM.from_pretrained(dpo_run)
    initial = AutoModelForCausalLM.from_pretrained(tiny_llama)
    diffs = [(a - b).abs().max().item() for a, b in zip(trained.parameters(), initial.parameters())]
    assert max(diffs) > 1e-3
    assert (dpo_run / "checkpoint-10" / "model.safetensors").exists()
    assert (dpo_run / "checkpoint-10" / "training_state.pt").exists()
    saved = yaml.safe_load((dpo_run / "config.yaml").read_text())
    assert saved["beta"] == 0.5 and saved["max_steps"] == 20


def test_odpo_with_alpha_zero_logs_the_same_losses_as_dpo(cli_here, tiny_llama, easy_data, tmp_path):
    losses = {}
    for loss_type in ("dpo", "odpo"):
        out = tmp_path / loss_type
        res = cli_here("train", "--model_name_or_path", tiny_llama, "--dataset", easy_data["train"], "--output_dir", out,
                  "--loss_type", loss_type, "--alpha", "0", *COMMON[:-6], "--max_steps", "6", "--save_steps", "0",
                  "--progress_bar", "false", "--seed", "3", "--report_to", "none")
        assert res.returncode == 0, res.stderr
        losses[loss_type] = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses["dpo"]) == 6
    assert losses["odpo"] == pytest.approx(losses["dpo"], abs=1e-7)


def test_odpo_offset_changes_training(cli_here, tiny_llama, easy_data, tmp_path):
    out = tmp_path / "odpo"
    res = cli_here("train", "--model_name_or_path", tiny_llama, "--dataset", easy_data["train"], "--output_dir", out,
              "--loss_type", "odpo", "--alpha", "1.0", "--max_steps", "2", "--logging_steps", "1",
              "--progress_bar", "false", "--report_to", "none")
    assert res.returncode == 0, res.stderr
    first = read_metrics(out / "metrics.jsonl")[0]["loss"]
    # at step 1 policy == ref, so each pair's loss is -log sigmoid(-alpha*log(s_w - s_l)) != log 2
    assert abs(first - math.log(2)) > 1e-2


def test_logps_command_matches_training_tokenization(cli_here, tiny_llama, easy_data, tmp_path):
    from prefopt.data.collate import PaddedPairCollator
    from prefopt.data.formats import load_pairs
    from prefopt.data.tokenize import tokenize_pairs
    from prefopt.modeling.load import load_tokenizer
    from prefopt.modeling.logprobs import pair_logps

    out = tmp_path / "logps.jsonl"
    res = cli_here("logps", "--model", tiny_llama, "--dataset", easy_data["eval"], "--output", out, "--batch_size", "5")
    assert res.returncode == 0, res.stderr
    rows = read_metrics(out)
    tok = load_tokenizer(str(tiny_llama))
    pairs, _ = load_pairs(str(easy_data["eval"]))
    tokenized, _ = tokenize_pairs(pairs, tok, max_length=1024, max_prompt_length=512)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        want = pair_logps(model, PaddedPairCollator(tok.pad_token_id)(tokenized[:3]))
    assert [r["index"] for r in rows] == list(range(len(pairs)))
    for i in range(3):
        assert rows[i]["chosen_logps"] == pytest.approx(want["chosen_logps"][i].item(), abs=1e-4)
        assert rows[i]["rejected_logps"] == pytest.approx(want["rejected_logps"][i].item(), abs=1e-4)
        assert rows[i]["chosen_tokens"] == len(tokenized[i].chosen_ids)


def test_bad_input_is_one_line_exit_2(cli_here, tiny_llama, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": 5, "rejected": "b"}\n')
    res = cli_here("train", "--model_name_or_path", tiny_llama, "--dataset", bad, "--output_dir", tmp_path / "o")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == f"prefopt: error: {bad}, line 2, field 'chosen': expected a string, got int"
    assert "Traceback" not in res.stderr
    res = cli_here("train", "--model_name_or_path", tiny_llama, "--dataset", bad, "--betaa", "0.1")
    assert res.returncode == 2 and "did you mean '--beta'" in res.stderr
