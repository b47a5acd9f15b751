"""benchmarks/gpu_check.py: its measures by hand, and its CPU smoke mode end to end (so the GPU check
cannot rot between the sessions that have a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check  # noqa: E402


def test_compare_measures_by_hand():
    a = {"logps": torch.tensor([-10.0, -5.0], dtype=torch.float64),
         "grads": {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([1.0]), "z": torch.zeros(2),
                   "k_bias": torch.tensor([2e-6])}}
    b = {"logps": torch.tensor([-10.0, -4.0], dtype=torch.float64),
         "grads": {"w": torch.tensor([3.0, 4.5]), "b": torch.tensor([2.0]), "z": torch.zeros(2),
                   "k_bias": torch.tensor([1e-6])}}
    d = gpu_check.compare(a, b)
    assert d["logps"] == pytest.approx(1.0 / 10.0)  # max |a - b| / max |b|
    # w: ||(0, -0.5)|| / ||(3, 4.5)|| = 0.0925; b: 1 / 2 = 0.5 (the worst); z: equal zeros, 0; k_bias: a
    # rounding-noise gradient, 1e-6 against the floor 1e-3 * ||(3, 4.5, 2, 0, 0, 1e-6)|| = 5.77e-3, not against 1e-6
    assert d["grads"] == pytest.approx(0.5) and d["worst_param"] == "b"
    assert d["params"] == 4 and d["missing_grads"] == []
    del b["grads"]["b"]
    a["grads"]["w"] = b["grads"]["w"].clone()
    d = gpu_check.compare(a, b)
    assert d["grads"] == pytest.approx(1e-6 / (1e-3 * (9 + 4.5**2 + 1e-12) ** 0.5), rel=1e-4)
    assert d["worst_param"] == "k_bias" and d["missing_grads"] == ["b"]


def test_tolerances():
    assert gpu_check.tolerances("fp32", {"logps": 1.0, "grads": 1.0}) == {"logps": 1e-5, "grads": 1e-4}
    u = 2.0**-8
    assert gpu_check.tolerances("bf16", {"logps": 0.0, "grads": 0.0}) == {"logps": 4 * u, "grads": 4 * u}
    assert gpu_check.tolerances("bf16", {"logps": 1e-3, "grads": 0.05}) == {"logps": 4 * u, "grads": 0.1}


def test_layout_flops_by_hand():
    cfg = gpu_check.model_config("qwen2", "tiny")  # hidden 64, 2 layers, 4 heads of 16, 2 KV heads, inter 128
    h, kv, layers, inter, vocab = 64, 32, 2, 128, 512
    n_body = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    p, c, r = 5, 2, 3
    head = 2 * h * vocab * (c + r)
    plain_pairs = 7 * 8 // 2 + 8 * 9 // 2  # two causal rows of 7 and 8 tokens
    plain = 3 * (2 * n_body * (2 * p + c + r) + 4 * h * layers * plain_pairs + head)
    assert gpu_check.layout_flops([(p, c, r)], "plain", cfg, "precompute") == plain
    shared_pairs = 7 * 8 // 2 + 3 * 4 // 2 + 3 * 5  # [prompt|chosen] causal, rejected causal and to the prompt
    shared = 3 * (2 * n_body * (p + c + r) + 4 * h * layers * shared_pairs + head)
    live = shared + 2 * n_body * (p + c + r) + 4 * h * layers * shared_pairs + head
    assert gpu_check.layout_flops([(p, c, r)], "shared", cfg, "precompute") == shared
    assert gpu_check.layout_flops([(p, c, r)], "shared", cfg, "live") == live


@pytest.mark.slow
def test_smoke_mode_runs_every_section(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--budget_s", "500"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    table = (out / "table.md").read_text()
    assert table in proc.stdout  # the printed table is the written one
    results = json.loads((out / "results.json").read_text())["results"]
    assert not [k for k, r in results.items() if r.get("error")], table

    # 1. Correctness: every layout and the full-logits head against the plain layout, both models,
    # both precisions, with real numbers under the stated tolerances.
    n_params = {arch: len(list(gpu_check.build_model(arch, "tiny", "sdpa", "cpu").parameters()))
                for arch in ("qwen2", "llama")}
    for arch in ("qwen2", "llama"):
        noise = results[f"correctness/{arch}/bf16-noise"]["noise"]
        assert 0 < noise["logps"] < 0.02 and 0 < noise["grads"] < 0.1  # bf16 really ran (it differs)
        for dtype in ("fp32", "bf16"):
            for layout, attn, head in [("prefix_shared", "sdpa", "selective"), ("packed", "sdpa", "selective"),
                                       ("plain", "sdpa", "full_logits"),
                                       ("prefix_shared", "flex_attention", "selective"),
                                       ("packed", "flex_attention", "selective")]:
                r = results[f"correctness/{arch}/{dtype}/{layout}/{attn}/{head}"]
                assert r["status"] == "PASS", r
                assert r["tol"] == gpu_check.tolerances(dtype, noise)
                assert 0 <= r["diff"]["logps"] <= r["tol"]["logps"]
                if attn == "sdpa":  # gradients of every parameter
                    assert 0 < r["diff"]["grads"] <= r["tol"]["grads"], r
                    assert r["diff"]["params"] == n_params[arch] and r["diff"]["missing_grads"] == []
                else:  # FlexAttention has no backward on CPU: said so, not hidden
                    assert "grads" not in r["diff"] and "no backward on CPU" in r["note"]
            flex_plain = results[f"correctness/{arch}/{dtype}/plain/flex_attention/selective"]
            assert flex_plain["skipped"].startswith("GPU only")
    assert "| qwen2 | bf16 | prefix_shared | sdpa | selective |" in table
    assert "every layout equal within tolerance: 20/20 PASS (met)" in table

    # 2. Speed: each smoke configuration trained its timed step, with FLOPs against the measured peak.
    assert results["speed/peak"]["flops"] > 0
    for job in ("speed/tldr/plain/sdpa/live", "speed/tldr/prefix_shared/sdpa/precompute",
                "speed/balanced/packed/sdpa/live"):
        r = results[job]
        assert r["pairs_per_s"] > 0 and r["tokens_per_s"] > r["pairs_per_s"] and r["model_flops_per_s"] > 0, r
        assert 0 < gpu_check.mfu(r, results) < 1
        assert r["timed_steps"] == 1
    assert results["speed/tldr/prefix_shared/sdpa/precompute"]["precompute_seconds"] > 0
    assert results["speed/tldr/auto/sdpa"]["auto"]["cpu"] == "prefix_shared"  # long prompts: shared

    # 3. TRL: measured where installed, else reported as skipped; Liger is GPU only.
    for job in ("trl/tldr/trl", "trl/balanced/trl_precompute", "trl/tldr/trl_padding_free"):
        r = results[job]
        assert r.get("pairs_per_s", 0) > 0 or r["skipped"].startswith("trl not installed"), r
    if "pairs_per_s" in results["trl/tldr/trl_padding_free"]:
        assert "falls back to padding" in results["trl/tldr/trl_padding_free"]["note"]
    assert "skipped" in results["trl/tldr/trl_liger"]


def test_check_catches_a_wrong_mask():
    """The comparison the GPU check makes fails when a layout is wrong: a prefix-shared batch whose
    rejected branch may see the chosen one (plain causal mask) gives other log-probs and gradients."""
    from prefopt.data.collate import PaddedPairCollator
    from prefopt.data.layouts import PrefixSharedCollator

    model = gpu_check.build_model("llama", "tiny", "sdpa", "cpu").eval()
    pairs = gpu_check.random_pairs(3, 512, seed=0, scale=1)
    base = gpu_check.run_variant(model, PaddedPairCollator(0)(pairs), selective=True, bf16=False, grads=True,
                                 device="cpu")
    shared = PrefixSharedCollator(0)(pairs)
    good = gpu_check.compare(gpu_check.run_variant(model, shared, selective=True, bf16=False, grads=True,
                                                   device="cpu"), base)
    tol = gpu_check.tolerances("fp32", {})
    assert good["logps"] <= tol["logps"] and good["grads"] <= tol["grads"]
    n = shared["input_ids"].shape[1]
    shared["attention_mask"] = torch.ones(n, n, dtype=torch.bool).tril().expand(len(pairs), 1, n, n).clone()
    bad = gpu_check.compare(gpu_check.run_variant(model, shared, selective=True, bf16=False, grads=True,
                                                  device="cpu"), base)
    assert bad["logps"] > 100 * tol["logps"] and bad["grads"] > 100 * tol["grads"]
