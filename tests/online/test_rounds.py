"""`prefopt online` on a tiny model: what a round writes, ODPO's offsets from the scores, the
reference update, and one-line errors for bad settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from prefopt.config import TrainConfig
from prefopt.data.formats import load_pairs
from prefopt.online.pairing import pair_indices
from prefopt.online.rounds import run_online
from prefopt.recipes import train
from prefopt.toy import good_word_score

SCORER = "prefopt.toy:good_word_score"


def _cfg(model, prompts, out, **kw) -> TrainConfig:
    base = dict(model_name_or_path=str(model), prompts=str(prompts), scorer=SCORER, rounds=1, prompts_per_round=8,
                samples_per_prompt=4, max_new_tokens=8, learning_rate=1e-2, per_device_train_batch_size=16,
                num_train_epochs=1, logging_steps=1, save_steps=0, report_to="none", progress_bar=False,
                log_throughput=False, output_dir=str(out), seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_one_odpo_round_writes_samples_scores_pairs_and_uses_the_scores_as_offsets(tiny_llama, easy_data, tmp_path):
    alpha, beta = 0.5, 0.1
    rows = run_online(_cfg(tiny_llama, easy_data["train"], tmp_path / "run", loss_type="odpo", alpha=alpha,
                           beta=beta), progress=False)
    rd = tmp_path / "run" / "rounds" / "1"
    samples = _jsonl(rd / "samples.jsonl")
    assert len(samples) == 8 * 4
    # the scores are the scorer's, on prompt + completion as `prefopt eval` forms them
    texts = [f"{s['prompt']} {s['completion'].strip()}".strip() for s in samples]
    assert [s["score"] for s in samples] == good_word_score(texts)
    # samples.jsonl is a scored_responses file prefopt reads; pairs.jsonl the best-worst pairs of those scores
    _, stats = load_pairs(str(rd / "samples.jsonl"))
    assert stats.format == "scored_responses"
    pairs = _jsonl(rd / "pairs.jsonl")
    expected = []
    for g in range(8):
        group = samples[4 * g : 4 * g + 4]
        for c, r in pair_indices([s["score"] for s in group], "best_worst"):
            expected.append((group[c]["completion"], group[r]["completion"], group[c]["score"], group[r]["score"]))
    assert [(p["chosen"], p["rejected"], p["score_chosen"], p["score_rejected"]) for p in pairs] == expected
    assert 0 < len(pairs) <= 8
    assert all(p["chosen"].strip() and p["rejected"].strip() for p in pairs)  # empty responses are never paired

    # ODPO's first loss (policy == reference, one step over all pairs): mean softplus(alpha*log(s_w - s_l))
    first = next(r for r in rows if r.get("round") == 1 and r.get("round_step") == 1)
    by_hand = sum(math.log1p(math.exp(alpha * math.log(p["score_chosen"] - p["score_rejected"]))) for p in pairs)
    assert first["loss"] == pytest.approx(by_hand / len(pairs), rel=1e-5)
    assert first["rewards/margins"] == 0.0

    # the round's pairs train offline with `prefopt train` as they are
    offline = TrainConfig(model_name_or_path=str(tiny_llama), dataset=str(rd / "pairs.jsonl"), loss_type="odpo",
                          alpha=alpha, beta=beta, learning_rate=1e-2, per_device_train_batch_size=16,
                          num_train_epochs=1, logging_steps=1, save_steps=0, report_to="none", progress_bar=False,
                          log_throughput=False, output_dir=str(tmp_path / "offline"), seed=0)
    online_last = [r for r in rows if r.get("round") == 1 and "loss" in r][-1]
    assert train(offline)["loss"] == online_last["loss"]  # the same loop on the same pairs: the same numbers

    # metrics: a summary row per round and one for the final policy; the final model in output_dir
    summaries = [r for r in rows if "samples/reward_mean" in r]
    assert [r["round"] for r in summaries] == [1, 2] and summaries[0]["samples/kl"] == 0.0
    assert summaries[0]["samples/reward_mean"] == pytest.approx(sum(s["score"] for s in samples) / len(samples))
    assert summaries[1]["samples/kl"] != 0.0
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "online.png").is_file()
    # `prefopt plot` on the run draws the rounds again
    from prefopt.evaluation.plots import plot_directory

    (tmp_path / "run" / "online.png").unlink()
    assert tmp_path / "run" / "online.png" in plot_directory(tmp_path / "run")


@pytest.mark.slow
def test_a_run_stopped_while_scoring_resumes_to_the_uninterrupted_result(tiny_llama, easy_data, tmp_path,
                                                                        monkeypatch):
    import prefopt.toy

    cfg = dict(loss_type="odpo", alpha=0.5, rounds=1)
    run_online(_cfg(tiny_llama, easy_data["train"], tmp_path / "whole", **cfg), progress=False)
    calls = []

    def dies_on_the_second_call(texts):
        calls.append(len(texts))
        if len(calls) == 2:  # the final policy's samples, after round 1 trained
            raise RuntimeError("killed while scoring")
        return good_word_score(texts)

    monkeypatch.setattr(prefopt.toy, "good_word_score", dies_on_the_second_call)
    from prefopt.errors import PrefoptError

    with pytest.raises(PrefoptError, match="killed while scoring"):  # a scorer's failure, named
        run_online(_cfg(tiny_llama, easy_data["train"], tmp_path / "killed", **cfg), progress=False)
    assert (tmp_path / "killed" / "rounds" / "2" / "generations.jsonl").is_file()
    assert not (tmp_path / "killed" / "rounds" / "2" / "samples.jsonl").exists()
    monkeypatch.setattr(prefopt.toy, "good_word_score", good_word_score)
    run_online(_cfg(tiny_llama, easy_data["train"], tmp_path / "killed", resume_from_checkpoint="latest", **cfg),
               progress=False)
    for name in ("metrics.jsonl", "model.safetensors", "rounds/1/pairs.jsonl", "rounds/2/samples.jsonl"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_new_run_into_a_used_output_dir_is_refused(capsys, tiny_llama, easy_data, tmp_path):
    out = tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = _error_line(capsys, ["online", "--model_name_or_path", str(tiny_llama), "--prompts",
                                str(easy_data["train"]), "--scorer", SCORER, "--output_dir", str(out)])
    assert "already holds files" in line and "--resume" in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow
@pytest.mark.parametrize("update", ["fixed", "per_round"])
def test_reference_update_per_round_moves_the_reference_fixed_does_not(update, tiny_llama, easy_data, tmp_path):
    rows = run_online(_cfg(tiny_llama, easy_data["train"], tmp_path / update, rounds=2, reference_update=update,
                           loss_type="dpo", prompts_per_round=6), progress=False)
    starts = {r["round"]: r for r in rows if r.get("round_step") == 1}
    # round 1 always starts with policy == reference: every implicit reward is 0, the loss log 2
    assert starts[1]["rewards/chosen"] == 0.0 and starts[1]["loss"] == pytest.approx(math.log(2))
    if update == "per_round":  # round 2's reference is the policy round 1 ended with
        assert starts[2]["rewards/chosen"] == 0.0 and starts[2]["rewards/rejected"] == 0.0
        assert starts[2]["loss"] == pytest.approx(math.log(2))
    else:  # still the initial policy, which round 1's training moved away from
        assert abs(starts[2]["rewards/chosen"]) > 1e-4 and abs(starts[2]["rewards/rejected"]) > 1e-4


def _error_line(capsys, argv) -> str:
    from prefopt.cli.main import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prefopt: error: ")
    return err[0]


@pytest.mark.parametrize("extra, message", [
    (["--samples_per_prompt", "1"], "samples_per_prompt must be at least 2"),
    (["--reward_model", "rm_dir"], "set exactly one of reward_model"),
    (["--scorer", "none"], "set exactly one of reward_model"),
    (["--top_p", "0"], "top_p must be in (0, 1]"),
    (["--pairing", "random"], "'pairing' must be one of best_worst, all"),
    (["--rounds", "0"], "rounds must be at least 1"),
    (["--prompts", "missing.jsonl"], "missing.jsonl"),
    (["--scorer", "prefopt.toy:no_such_function"], "has no attribute"),
])
def test_bad_settings_are_one_line_errors(extra, message, capsys, tiny_llama, easy_data, tmp_path):
    argv = ["online", "--model_name_or_path", str(tiny_llama), "--prompts", str(easy_data["train"]),
            "--scorer", SCORER, "--output_dir", str(tmp_path / "out"), *extra]
    assert message in _error_line(capsys, argv)
    assert not (tmp_path / "out").exists()  # nothing written for bad input


def test_the_example_config_is_a_valid_online_config():
    from prefopt.config import build_config

    cfg = build_config(TrainConfig, Path(__file__).resolve().parents[2] / "examples" / "online.yaml")
    assert cfg.validate_online().loss_type == "odpo" and cfg.samples_per_prompt == 4


@pytest.mark.slow
def test_a_full_disk_while_starting_over_an_earlier_run_puts_that_run_back(capsys, tiny_llama, easy_data, tmp_path,
                                                                           monkeypatch):
    """--overwrite_output_dir moves the earlier run aside before config.yaml is written; a failure
    there (a full disk) must bring the earlier run back byte for byte, as `prefopt train` does."""
    from tests.tree_snapshot import snapshot

    out = tmp_path / "run"
    run_online(_cfg(tiny_llama, easy_data["train"], out), progress=False)
    before = snapshot(out)
    capsys.readouterr()  # the first run's output
    monkeypatch.setenv("PREFOPT_TEST_ENOSPC", "config")
    from prefopt.cli.main import main

    assert main(["online", "--model_name_or_path", str(tiny_llama), "--prompts", str(easy_data["train"]),
                 "--scorer", SCORER, "--rounds", "1", "--prompts_per_round", "8", "--samples_per_prompt", "4",
                 "--max_new_tokens", "8", "--report_to", "none", "--output_dir", str(out),
                 "--overwrite_output_dir"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("prefopt: error: ")]
    assert len(errors) == 1 and "disk full" in errors[0] and "config.yaml" in errors[0], err
    assert "Traceback" not in err and f"the earlier run in {out} was restored" in err
    assert snapshot(out) == before
