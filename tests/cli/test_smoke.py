import pytest

from prefopt.training.metrics import read_metrics


@pytest.mark.slow
def test_train_cli_runs_and_writes_outputs(cli, tiny_llama, easy_data, tmp_path):
    out = tmp_path / "run"
    res = cli("train", "--model_name_or_path", tiny_llama, "--dataset", easy_data["train"],
              "--output_dir", out, "--max_steps", "3", "--logging_steps", "1", "--learning_rate", "1e-3",
              "--progress_bar", "false")
    assert res.returncode == 0, res.stderr
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for name in ("config.yaml", "model.safetensors", "tokenizer.json", "data_summary.json"):
        assert (out / name).exists(), name
