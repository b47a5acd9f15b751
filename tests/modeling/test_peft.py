"""LoRA through PEFT (the reference is the base model with the adapter off), saving adapter and
merged model, and the precision / memory-saver keys."""

from __future__ import annotations

import math

import pytest
import torch

from prefopt.config import TrainConfig
from prefopt.data.collate import PaddedPairCollator
from prefopt.data.formats import Columns, load_pairs
from prefopt.data.tokenize import tokenize_pairs
from prefopt.modeling.load import load_causal_lm, load_tokenizer
from prefopt.modeling.logprobs import pair_logps
from prefopt.training.metrics import read_metrics

peft = pytest.importorskip("peft")


def _batch(model_dir, data, n=8):
    tok = load_tokenizer(model_dir)
    pairs, _ = load_pairs(str(data), split="train", fmt="auto", columns=Columns(), tokenizer=tok)
    tokenized, _ = tokenize_pairs(pairs[:n], tok, max_length=64, max_prompt_length=32)
    return PaddedPairCollator(tok.pad_token_id)(tokenized)


def _train(cli, model, data, out, **keys):
    args = {"model_name_or_path": model, "dataset": data, "output_dir": out, "max_steps": 3, "logging_steps": 1,
            "progress_bar": "false", "save_steps": 0, "per_device_train_batch_size": 8}
    args.update(keys)
    return cli("train", *[x for k, v in args.items() for x in (f"--{k}", str(v))])


LORA_KEYS = {"use_peft": "true", "lora_r": 4, "lora_alpha": 8, "lora_target_modules": "q_proj,v_proj,up_proj",
             "learning_rate": 1e-2}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama, easy_data):
    from tests.conftest import run_main

    out = tmp_path_factory.mktemp("lora") / "run"
    res = _train(run_main, tiny_llama, easy_data["train"], out, merge_adapter_on_save="true", **LORA_KEYS)
    assert res.returncode == 0, res.stderr
    return out


@pytest.mark.slow
def test_lora_run_trains_only_the_adapter_and_saves_adapter_and_merged_model(lora_run, tiny_llama, easy_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rows = read_metrics(lora_run / "metrics.jsonl")
    # LoRA's B starts at 0: policy == reference at step 1, so the loss is exactly log 2.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1e-3
    # The adapter, not a full model copy, is the final save; the merged model is beside it.
    assert (lora_run / "adapter_config.json").exists() and (lora_run / "adapter_model.safetensors").exists()
    assert not (lora_run / "model.safetensors").exists()
    assert (lora_run / "merged" / "model.safetensors").exists() and (lora_run / "merged" / "tokenizer.json").exists()
    # The model cards: the adapter's (peft) and the merged model's (transformers), each with its plot.
    from prefopt.evaluation.model_card import read_card_metadata

    adapter_card, merged_card = read_card_metadata(lora_run / "README.md"), read_card_metadata(
        lora_run / "merged" / "README.md")
    assert adapter_card["library_name"] == "peft" and merged_card["library_name"] == "transformers"
    assert "lora" in adapter_card["tags"] and (lora_run / "merged" / "training_curves.png").exists()

    batch = _batch(tiny_llama, easy_data["train"])
    base = load_causal_lm(str(tiny_llama)).eval()
    with torch.no_grad():
        base_logps = pair_logps(base, batch)
    model = PeftModel.from_pretrained(load_causal_lm(str(tiny_llama)), str(lora_run)).eval()
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 2 * 3  # 2 layers x (q_proj, v_proj, up_proj)
    assert all(p.abs().max() > 0 for p in lora_b.values())  # every adapter matrix trained away from 0
    with torch.no_grad():
        adapted = pair_logps(model, batch)
    assert (adapted["chosen_logps"] - base_logps["chosen_logps"]).abs().max() > 1e-3
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "merged").eval()
    with torch.no_grad():
        merged_logps = pair_logps(merged, batch)
    for key in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(merged_logps[key], adapted[key], atol=1e-4, rtol=0)


def test_adapter_off_reference_equals_the_base_model_and_holds_no_copy(lora_run, tiny_llama, easy_data):
    from peft import PeftModel

    from prefopt.objectives.reference import AdapterOffReference

    batch = _batch(tiny_llama, easy_data["train"])
    with torch.no_grad():
        base_logps = pair_logps(load_causal_lm(str(tiny_llama)).eval(), batch)
    policy = PeftModel.from_pretrained(load_causal_lm(str(tiny_llama)), str(lora_run), is_trainable=True)
    policy.train()
    reference = AdapterOffReference(policy)
    ref = reference(batch)
    for key in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(ref[key], base_logps[key], atol=1e-6, rtol=0)
    assert policy.training  # the reference restores train mode
    assert reference.model is policy  # the same weights, not a copy
    with torch.no_grad():  # and the adapter is on again afterwards
        assert (pair_logps(policy, batch)["chosen_logps"] - ref["chosen_logps"]).abs().max() > 1e-3


def test_build_models_with_peft_uses_the_policy_as_reference(tiny_llama, easy_data):
    from prefopt.objectives.reference import AdapterOffReference
    from prefopt.recipes import build_models

    class OneProcess:  # the Accelerator attributes build_models reads, without creating one
        mixed_precision, local_process_index, num_processes = "no", 0, 1
        device = torch.device("cpu")

    cfg = TrainConfig(model_name_or_path=str(tiny_llama), dataset=str(easy_data["train"]), use_peft=True, lora_r=2)
    policy, reference = build_models(cfg, OneProcess())
    assert isinstance(reference, AdapterOffReference) and reference.model is policy
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_run(cli_here, lora_run, tiny_llama, easy_data, tmp_path):
    checkpointed = tmp_path / "gc"
    res = _train(cli_here, tiny_llama, easy_data["train"], checkpointed, gradient_checkpointing="true", **LORA_KEYS)
    assert res.returncode == 0, res.stderr
    a, b = read_metrics(lora_run / "metrics.jsonl"), read_metrics(checkpointed / "metrics.jsonl")
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_bf16_run_is_finite_and_reference_shares_the_precision(cli_here, tiny_llama, easy_data, tmp_path):
    out = tmp_path / "bf16"
    res = _train(cli_here, tiny_llama, easy_data["train"], out, bf16="true", learning_rate=1e-3)
    assert res.returncode == 0, res.stderr
    rows = read_metrics(out / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    # Policy and reference both run under bf16 autocast, so at step 1 they agree exactly; a float32
    # reference against a bf16 policy would put the first loss visibly off log 2.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards/margins"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("keys, message", [
    ({"use_peft": "true", "load_in_4bit": "true"}, "CUDA"),
    ({"fp16": "true"}, "CUDA"),
    ({"use_peft": "true", "lora_target_modules": "no_such_proj"}, "LoRA"),
])
@pytest.mark.slow
def test_unusable_scale_settings_are_one_line_errors(cli_here, tiny_llama, easy_data, tmp_path, keys, message):
    if torch.cuda.is_available() and message == "CUDA":
        pytest.skip("runs on a GPU machine")
    res = _train(cli_here, tiny_llama, easy_data["train"], tmp_path / "x", **keys)
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("prefopt: error:") and message in last and "Traceback" not in res.stderr


@pytest.mark.parametrize("keys, message", [
    ({"bf16": True, "fp16": True}, "exclusive"),
    ({"load_in_4bit": True}, "use_peft"),
    ({"merge_adapter_on_save": True}, "use_peft"),
    ({"use_peft": True, "lora_r": 0}, "lora_r"),
])
def test_inconsistent_scale_keys_fail_validation(keys, message):
    from prefopt.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        TrainConfig(model_name_or_path="m", dataset="d", **keys).validate()


def test_lora_target_modules_parsing():
    from prefopt.modeling.peft import target_modules

    assert target_modules(TrainConfig(lora_target_modules="all-linear")) == "all-linear"
    assert target_modules(TrainConfig(lora_target_modules=" q_proj, v_proj ,")) == ["q_proj", "v_proj"]


@pytest.mark.slow
def test_merge_adapter_command_matches_the_merge_on_save(cli_here, lora_run, tiny_llama, tmp_path):
    from safetensors.torch import load_file

    res = cli_here("merge-adapter", "--base", tiny_llama, "--adapter", lora_run, "--output", tmp_path / "m")
    assert res.returncode == 0, res.stderr
    a, b = load_file(tmp_path / "m" / "model.safetensors"), load_file(lora_run / "merged" / "model.safetensors")
    base = load_file(tiny_llama / "model.safetensors")
    assert a.keys() == b.keys() == base.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    res = cli_here("merge-adapter", "--base", tiny_llama, "--adapter", tmp_path, "--output", tmp_path / "n")
    assert res.returncode == 2 and "adapter_config.json" in res.stderr
