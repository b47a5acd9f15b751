"""GPU check: the fast paths proved correct and measured against TRL, in one process tree.

    python benchmarks/gpu_check.py --out runs/gpu-check            # on a CUDA machine (about 7 minutes)
    python benchmarks/gpu_check.py --smoke --out runs/gpu-smoke    # anywhere, on CPU, in seconds
    bash benchmarks/gpu_check.sh                                   # the device entry (installs carried wheels)

It prints one table and writes it (``table.md``) and every raw result (``results.json``) to ``--out``.

1. **Correctness** in float32 and bf16 autocast (what ``bf16: true`` trains with), on a Qwen2-shaped
   and a Llama-shaped random model: the per-response log-probs and every parameter gradient of
   ``sum_i w_i * logp_i`` (fixed weights ``w`` from -1 to 1) for the prefix-shared and packed layouts
   (SDPA and FlexAttention) and for the full-logits LM head, each against the plain layout with
   SDPA and the selective head, on the same weights and pairs. Measures: ``logps`` = max |a - b|
   over responses / max |b|; ``grads`` = max over parameters of ||g_a - g_b|| / ||g_b|| (with
   ||g_b|| floored at a thousandth of the whole gradient's norm: see ``compare``).
   Tolerances: float32 1e-5 (log-probs) and 1e-4 (gradients); bf16 ``max(4u, 2e)`` with
   ``u = 2^-8`` bf16's unit roundoff and ``e`` the difference bf16 itself makes (the plain layout in
   bf16 against the plain layout in float32, same measure), i.e. a layout may differ from plain by
   no more than twice what bf16 rounding does to plain. float32 runs without TF32.
2. **Speed and memory**: DPO training steps through ``prefopt.train`` (the real loop, bf16 autocast,
   fused AdamW, no checkpoint writing) of a Qwen2-0.5B-shaped random model (hidden 896, 24 layers,
   14 heads / 2 KV heads, intermediate 4864, vocabulary 151,936, tied embeddings) at 8 pairs per
   step and rows of at most 1024 tokens, on a TL;DR shape (prompt ~830, responses ~105: the CPU
   benchmark's 8:1 ratio at length 1024) and a balanced shape (~470 + ~470), every layout x
   attention backend, with a live and with a precomputed reference. pairs/s and tokens/s (every
   pair's prompt + chosen + rejected once, whatever the layout) over the steps after
   ``--warmup_steps``; peak GPU memory (``torch.cuda.max_memory_allocated``, reset before the model
   is built); MFU = model FLOPs / time / the bf16 matmul peak measured in the same run (an 8192-cube
   ``torch.mm`` loop). Model FLOPs as in ``bench_dpo.py``: ``6·N·T`` for the policy and ``2·N·T``
   for a live reference (``N`` the non-embedding matmul parameters, ``T`` the tokens of the rows
   that layout runs, without padding), attention ``4·H`` per (query, key) pair the layout needs per
   layer (x3 with backward), the LM head ``2·H·V`` per completion token (x3). The precomputed
   reference's scoring pass is timed separately (it runs once per dataset, not per step).
3. **TRL** 1.16's ``DPOTrainer`` on the same model, data, batch, precision and optimizer, in the
   same run: defaults, ``precompute_ref_log_probs``, ``padding_free`` and ``use_liger_kernel``
   (each reported as not available rather than failing the run where it cannot run).

Every section runs in its own child process, every configuration is guarded (a failure is a row,
the rest still runs), and a global budget (``--budget_s``, 420 s) skips what would overrun, with a
note. ``--smoke`` runs the same code on CPU with tiny models and shapes, 2 steps (the test suite
runs it, so the script cannot rot between GPU sessions); FlexAttention's backward does not run on
CPU (torch 2.13), so the smoke mode checks FlexAttention's log-probs only and says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
U_BF16 = 2.0**-8  # bf16's unit roundoff (8 significant bits)
FP32_TOL = {"logps": 1e-5, "grads": 1e-4}
SECTIONS = ("correctness", "speed", "trl")

# Model shapes. "check": real widths and vocabularies with few layers (correctness on GPU);
# "speed": Qwen2-0.5B; "tiny": the CPU smoke mode.
MODELS = {
    ("qwen2", "speed"): dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                             intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    ("qwen2", "check"): dict(hidden_size=896, num_hidden_layers=4, num_attention_heads=14, num_key_value_heads=2,
                             intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    ("llama", "check"): dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                             intermediate_size=2816, vocab_size=32000, tie_word_embeddings=False),
    ("qwen2", "tiny"): dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, vocab_size=512, tie_word_embeddings=True),
    ("llama", "tiny"): dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, vocab_size=512, tie_word_embeddings=False),
}
# (prompt, response) tokens before the jitter (each pair's lengths are drawn in [0.85, 1] of these).
SHAPES = {
    "gpu": {"tldr": (904, 113), "balanced": (511, 511)},
    "smoke": {"tldr": (24, 3), "balanced": (8, 8)},
}
# (layout, attention) configurations of the speed section, simplest first.
SPEED_CONFIGS = [("plain", "sdpa"), ("prefix_shared", "sdpa"), ("packed", "sdpa"),
                 ("plain", "flex_attention"), ("prefix_shared", "flex_attention"), ("packed", "flex_attention")]


def settings(args) -> dict:
    smoke = args.smoke
    return {
        "mode": "smoke" if smoke else "gpu",
        "device": "cpu" if smoke else "cuda",
        "check_size": "tiny" if smoke else "check",
        "speed_size": "tiny" if smoke else "speed",
        "shapes": SHAPES["smoke" if smoke else "gpu"],
        "batch_size": 2 if smoke else args.batch_size,
        "max_length": 64 if smoke else args.max_length,
        "steps": 2 if smoke else args.steps,
        "warmup_steps": 1 if smoke else args.warmup_steps,
        "check_pairs": 3 if smoke else 8,
    }


# ------------------------------------------------------------------------------------------------
# Shared pieces (children)


def model_config(arch: str, size: str):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    return cls(**MODELS[(arch, size)], max_position_embeddings=4096, bos_token_id=2, eos_token_id=3,
               pad_token_id=0, attention_dropout=0.0)


def build_model(arch: str, size: str, attn: str, device: str, seed: int = 0):
    """A random model, float32 weights (bf16 runs autocast over them, as ``bf16: true`` trains)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(arch, size), attn_implementation=attn,
                                                 dtype=torch.float32)
    return model


def tokenizer_and_words(n_words: int = 400):
    """A word-level tokenizer in which every word is one token (so the shapes are exact token counts)."""
    sys.path.insert(0, str(ROOT / "src"))
    from prefopt.toy import word_tokenizer

    words = [f"w{i}" for i in range(n_words)]
    return word_tokenizer(words, bos=False), words


def make_rows(shape: tuple[int, int], n_pairs: int, words: list[str], seed: int = 1) -> list[dict]:
    import random

    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(max(1, int(k * rng.uniform(0.85, 1.0)))))

    prompt, response = shape
    return [{"prompt": text(prompt), "chosen": " " + text(response), "rejected": " " + text(response)}
            for _ in range(n_pairs)]


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def short_error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


class Results:
    """The child's side of the protocol: one JSON line per job, appended as it finishes."""

    def __init__(self, path: str):
        self.path = path

    def put(self, job_id: str, **result) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"id": job_id, **result}) + "\n")


# ------------------------------------------------------------------------------------------------
# 1. Correctness


def random_pairs(n: int, vocab: int, seed: int, scale: int):
    """Ragged pairs (different prompt and response lengths, so every layout pads or packs)."""
    import random

    sys.path.insert(0, str(ROOT / "src"))
    from prefopt.data.tokenize import TokenizedPair

    rng = random.Random(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(4, vocab) for _ in range(rng.randint(lo * scale, hi * scale))]

    return [TokenizedPair(ids(2, 16), ids(1, 8), ids(1, 6), None, None, i) for i in range(n)]


def eager_flex_attention() -> None:
    """CPU only: run transformers' FlexAttention path with torch's eager ``flex_attention`` instead of
    the inductor-compiled one. Compiling it for the CPU takes ~15 s per shape on 2 cores, and for a
    block mask read from a dense tensor inductor's C++ code failed to compile here (torch 2.13); the
    eager function computes the same attention, which is what the smoke check compares."""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as hf_flex

    wrapper = hf_flex.WrappedFlexAttention(False)
    wrapper._compiled_flex_attention = flex_attention


def run_variant(model, batch, *, selective: bool, bf16: bool, grads: bool, device: str):
    """Per-response log-probs ``[2B]`` (float64, CPU) and, with ``grads``, every parameter's gradient
    of ``sum_i w_i * logp_i``."""
    import contextlib

    import torch

    from prefopt.modeling.logprobs import sum_per_response, target_token_logps

    model.zero_grad(set_to_none=True)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast, (contextlib.nullcontext() if grads else torch.no_grad()):
        per_token = target_token_logps(model, batch, selective=selective)
        sums, _ = sum_per_response(per_token, batch)
    out = {"logps": sums.detach().double().cpu()}
    if grads:
        w = torch.linspace(-1.0, 1.0, sums.numel(), device=sums.device)
        (sums * w).sum().backward()
        out["grads"] = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
    return out


def tolerances(dtype: str, noise: dict) -> dict[str, float]:
    """float32: fixed (rounding only). bf16: ``max(4u, 2e)``: a layout may differ from the plain layout
    by twice what bf16 does to the plain layout itself (``noise``, bf16 against float32), and never
    needs to be closer than four units of bf16 rounding."""
    if dtype == "fp32":
        return dict(FP32_TOL)
    return {k: max(4 * U_BF16, 2 * noise[k]) for k in ("logps", "grads")}


def compare(a: dict, b: dict) -> dict:
    """``logps``: max |a - b| / max |b| over responses. ``grads``: max over parameters of
    ||g_a - g_b|| / max(||g_b||, 1e-3 ||g_b||_all). The floor matters for parameters whose true
    gradient is zero, such as the key projection's bias (adding a constant to every key of a query
    leaves its softmax unchanged): their gradients are rounding noise, which two kernels need not
    share, so they are measured against a thousandth of the whole gradient instead of themselves."""
    logps = float((a["logps"] - b["logps"]).abs().max() / b["logps"].abs().max().clamp_min(1e-30))
    out = {"logps": logps}
    if "grads" in a and "grads" in b:
        norms = {name: float(g.norm()) for name, g in b["grads"].items()}
        floor = 1e-3 * sum(n * n for n in norms.values()) ** 0.5
        worst, where = 0.0, None
        missing = sorted(set(b["grads"]) ^ set(a["grads"]))
        for name, gb in b["grads"].items():
            ga = a["grads"].get(name)
            if ga is None or max(norms[name], floor) == 0.0:
                continue
            rel = float((ga - gb).norm()) / max(norms[name], floor)
            if rel > worst:
                worst, where = rel, name
        out.update(grads=worst, worst_param=where, params=len(b["grads"]), missing_grads=missing)
    return out


def correctness_child(spec: dict, results: Results) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from prefopt.data.collate import PaddedPairCollator, to_device
    from prefopt.data.layouts import PackedCollator, PrefixSharedCollator

    device = spec["device"]
    smoke = spec["mode"] == "smoke"
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here
    torch.backends.cudnn.allow_tf32 = False
    if device == "cpu":
        eager_flex_attention()
    collators = {"plain": PaddedPairCollator(0), "prefix_shared": PrefixSharedCollator(0),
                 "packed": PackedCollator(0, row_tokens=spec.get("pack_row_tokens", 0))}
    for arch in ("qwen2", "llama"):
        if time.time() > spec["deadline"]:
            results.put(f"correctness/{arch}", skipped="time budget spent")
            continue
        try:
            size = spec["check_size"]
            sdpa = build_model(arch, size, "sdpa", device).eval()
            flex = build_model(arch, size, "flex_attention", device).eval()
            flex.load_state_dict(sdpa.state_dict())
            vocab = sdpa.config.vocab_size
            pairs = random_pairs(spec["check_pairs"], min(vocab, 30000), seed=0, scale=1 if smoke else 16)
            batches = {k: to_device(c(pairs), device) for k, c in collators.items()}
        except Exception as e:  # noqa: BLE001 - reported as a row
            results.put(f"correctness/{arch}", error=short_error(e), trace=traceback.format_exc()[-2000:])
            continue
        try:  # the baseline: plain layout, SDPA, selective head, in both precisions
            base = {dtype: run_variant(sdpa, batches["plain"], selective=True, bf16=dtype == "bf16", grads=True,
                                       device=device) for dtype in ("fp32", "bf16")}
        except Exception as e:  # noqa: BLE001 - reported as a row
            results.put(f"correctness/{arch}", error="baseline: " + short_error(e),
                        trace=traceback.format_exc()[-2000:])
            continue
        noise = compare(base["bf16"], base["fp32"])
        results.put(f"correctness/{arch}/bf16-noise", arch=arch, noise=noise)
        variants = [("prefix_shared", "sdpa", True), ("packed", "sdpa", True), ("plain", "sdpa", False),
                    ("plain", "flex_attention", True), ("prefix_shared", "flex_attention", True),
                    ("packed", "flex_attention", True)]
        for dtype in ("fp32", "bf16"):
            tol = tolerances(dtype, noise)
            for layout, attn, selective in variants:
                job = f"correctness/{arch}/{dtype}/{layout}/{attn}/{'selective' if selective else 'full_logits'}"
                row = dict(arch=arch, dtype=dtype, layout=layout, attn=attn,
                           head="selective" if selective else "full logits", tol=tol)
                if time.time() > spec["deadline"]:
                    results.put(job, **row, skipped="time budget spent")
                    continue
                if (layout, attn, device) == ("plain", "flex_attention", "cpu"):
                    results.put(job, **row, skipped="GPU only: transformers compiles its own block mask "
                                "for a padded batch (~15 s per shape on 2 CPU cores)")
                    continue
                # FlexAttention's backward does not run on CPU (torch 2.13): log-probs only there.
                grads = not (attn == "flex_attention" and device == "cpu")
                try:
                    model = flex if attn == "flex_attention" else sdpa
                    got = run_variant(model, batches[layout], selective=selective, bf16=dtype == "bf16",
                                      grads=grads, device=device)
                    diff = compare(got, base[dtype])
                    ok = diff["logps"] <= tol["logps"] and (not grads or (
                        diff["grads"] <= tol["grads"] and not diff["missing_grads"]))
                    note = None if grads else "gradients not checked: FlexAttention has no backward on CPU"
                    results.put(job, **row, diff=diff, status="PASS" if ok else "FAIL", note=note)
                except Exception as e:  # noqa: BLE001 - reported as a row
                    results.put(job, **row, status="ERROR", error=short_error(e),
                                trace=traceback.format_exc()[-2000:])
        del sdpa, flex, base
        if device == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# 2. Speed and memory: prefopt


def matmul_peak(device: str, smoke: bool) -> dict:
    """The best matmul rate of this run: bf16 8192-cube products on CUDA (3 warm-ups, then 10 timed
    with CUDA events, best of 3 such loops); float32 256-cube products on CPU (smoke only)."""
    import torch

    n, dtype, reps = (256, torch.float32, 20) if smoke else (8192, torch.bfloat16, 10)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(3):
        for _ in range(3):
            torch.mm(a, b, out=out)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return {"flops": best, "shape": f"{n}^3 {str(dtype).replace('torch.', '')}"}


def layout_flops(lengths, layout: str, cfg, reference: str) -> float:
    """Model FLOPs of training on pairs of ``lengths`` ``[(prompt, chosen, rejected)]`` (see the docstring)."""
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    n_body = layers * (2 * h * h + 2 * h * kv + 3 * h * cfg.intermediate_size)
    total = 0.0
    for p, c, r in lengths:
        if layout == "plain":  # two rows, the prompt twice
            tokens = 2 * p + c + r
            pairs = causal(p + c) + causal(p + r)
        else:
            tokens = p + c + r
            pairs = causal(p + c) + causal(r) + r * p
        attn = 4 * h * layers * pairs
        head = 2 * h * cfg.vocab_size * (c + r)
        total += 3 * (2 * n_body * tokens + attn + head)
        if reference == "live":
            total += 2 * n_body * tokens + attn + head
    return total


def causal(n: int) -> int:
    return n * (n + 1) // 2


def speed_child(spec: dict, results: Results) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    import prefopt
    from prefopt.data.layouts import choose_layout
    from prefopt.objectives import reference_cache
    from prefopt.training import trainer as trainer_mod

    device, smoke = spec["device"], spec["mode"] == "smoke"
    try:
        results.put("speed/peak", **matmul_peak(device, smoke))
    except Exception as e:  # noqa: BLE001 - reported; MFU is then left out
        results.put("speed/peak", error=short_error(e))

    clock = {"ends": [], "precompute": 0.0}
    step = trainer_mod.Trainer.train_step

    def train_step(self):
        out = step(self)
        sync(device)
        clock["ends"].append(time.perf_counter())
        return out

    precompute = reference_cache.precompute

    def timed_precompute(*a, **k):
        sync(device)
        t0 = time.perf_counter()
        try:
            return precompute(*a, **k)
        finally:
            sync(device)
            clock["precompute"] += time.perf_counter() - t0

    trainer_mod.Trainer.train_step = train_step
    trainer_mod.Trainer.save_final = lambda self: None  # neither system writes the model here
    reference_cache.precompute = timed_precompute

    tok, words = tokenizer_and_words()
    n_pairs = spec["batch_size"] * spec["steps"]
    model_cfg = model_config("qwen2", spec["speed_size"])
    work = Path(spec["work"])
    for shape in spec["shapes"]:
        pairs = tokenized(make_rows(tuple(spec["shapes"][shape]), n_pairs, words), tok, spec["max_length"])
        for attn in ("sdpa", "flex_attention"):
            choice = {dev: choose_layout("auto", pairs, spec["batch_size"], attn_impl=attn,
                                         hidden_size=model_cfg.hidden_size, device_type=dev)
                      for dev in ("cpu", "cuda")}
            results.put(f"speed/{shape}/auto/{attn}", shape=shape, attn=attn, auto=choice)
    for job in spec["jobs"]:
        shape, layout, attn, reference = job["shape"], job["layout"], job["attn"], job["reference"]
        row = dict(system="prefopt", shape=shape, layout=layout, attn=attn, reference=reference)
        if time.time() > spec["deadline"]:
            results.put(job["id"], **row, skipped="time budget spent")
            continue
        if attn == "flex_attention" and device == "cpu":
            results.put(job["id"], **row, skipped="FlexAttention has no backward on CPU")
            continue
        rows = make_rows(tuple(spec["shapes"][shape]), n_pairs, words)
        lengths = pair_lengths(rows, tok, spec["max_length"])
        clock["ends"], clock["precompute"] = [], 0.0
        model = None
        try:
            leftover = reset_peak_memory(device)
            model = build_model("qwen2", spec["speed_size"], attn, device)
            cfg = prefopt.TrainConfig(
                output_dir=str(work / job["id"].replace("/", "-")), max_length=spec["max_length"],
                max_prompt_length=spec["max_length"] - 1, per_device_train_batch_size=spec["batch_size"],
                per_device_eval_batch_size=spec["batch_size"], max_steps=spec["steps"], logging_steps=spec["steps"],
                save_steps=0, learning_rate=1e-6, lr_scheduler_type="linear", max_grad_norm=1.0,
                progress_bar=False, layout=layout, bf16=True, precompute_ref_log_probs=reference == "precompute",
                ref_logps_cache_dir=str(work / "cache" / job["id"].replace("/", "-")), report_to="none",
                overwrite_output_dir=True,
            )
            t0 = time.perf_counter()
            prefopt.train(cfg, model=model, tokenizer=tok, train_dataset=rows)
            total = time.perf_counter() - t0
            res = timing(clock, spec, lengths, layout, model_cfg, reference)
            res.update(total_seconds=total, precompute_seconds=clock["precompute"] if reference == "precompute" else None)
            if device == "cuda":
                res["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                res["leftover_gb"] = leftover
            results.put(job["id"], **row, **res)
        except Exception as e:  # noqa: BLE001 - reported as a row
            results.put(job["id"], **row, error=short_error(e), trace=traceback.format_exc()[-2000:])
        finally:
            del model
            import gc

            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()


def reset_peak_memory(device: str) -> float | None:
    """Start a configuration's peak-memory count; returns the GB still allocated from earlier ones
    (they count in its peak: the table flags more than 0.1 GB)."""
    if device != "cuda":
        return None
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**30


def tokenized(rows: list[dict], tok, max_length: int):
    """The rows as prefopt tokenizes them for training (EOS appended to each response)."""
    sys.path.insert(0, str(ROOT / "src"))
    from prefopt.data.formats import load_pairs
    from prefopt.data.tokenize import tokenize_pairs

    return tokenize_pairs(load_pairs(rows)[0], tok, max_length=max_length, max_prompt_length=max_length - 1)[0]


def pair_lengths(rows: list[dict], tok, max_length: int) -> list[tuple[int, int, int]]:
    """(prompt, chosen + EOS, rejected + EOS) tokens of every pair."""
    return [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in tokenized(rows, tok, max_length)]


def timing(clock: dict, spec: dict, lengths, layout: str, model_cfg, reference: str) -> dict:
    """pairs/s, tokens/s and model FLOP/s over the steps after the warm-up ones (MFU is this over
    the matmul peak of the run, taken when the table is made: the sections may run in any order)."""
    ends = clock["ends"][spec["warmup_steps"] - 1:]
    if len(ends) < 2:
        raise RuntimeError(f"only {len(clock['ends'])} steps ran; need more than --warmup_steps")
    seconds = ends[-1] - ends[0]
    timed_steps = len(ends) - 1
    pairs = timed_steps * spec["batch_size"]
    # Per-pair averages over the whole data (the steps' batches are a shuffled partition of it).
    tokens_per_pair = sum(sum(x) for x in lengths) / len(lengths)
    flops_per_pair = layout_flops(lengths, "plain" if layout == "plain" else "shared", model_cfg,
                                  reference) / len(lengths)
    return {"pairs_per_s": pairs / seconds, "tokens_per_s": pairs * tokens_per_pair / seconds,
            "step_seconds": seconds / timed_steps, "timed_steps": timed_steps,
            "model_flops_per_s": pairs * flops_per_pair / seconds}


# ------------------------------------------------------------------------------------------------
# 3. TRL's DPOTrainer


def trl_child(spec: dict, results: Results) -> None:
    import copy
    import gc
    import warnings

    device = spec["device"]
    n_pairs = spec["batch_size"] * spec["steps"]
    tok = words = model_cfg = None  # made when a job runs (transformers takes seconds to import)
    clock = {"ends": [], "precompute": 0.0}
    step_clock = None
    for job in spec["jobs"]:
        variant, shape = job["variant"], job["shape"]
        row = dict(system=variant, shape=shape, layout="plain (TRL)", attn="sdpa",
                   reference="precompute" if variant == "trl_precompute" else "live")
        if time.time() > spec["deadline"]:
            results.put(job["id"], **row, skipped="time budget spent")
            continue
        if importlib.util.find_spec("trl") is None:
            results.put(job["id"], **row, skipped="trl not installed (benchmarks/fetch_wheels.sh carries it)")
            continue
        if variant == "trl_liger" and importlib.util.find_spec("liger_kernel") is None:
            results.put(job["id"], **row, skipped="not available: liger-kernel not installed")
            continue
        if variant == "trl_liger" and device == "cpu":
            results.put(job["id"], **row, skipped="not available: Liger's kernels are Triton (GPU only)")
            continue
        model = ref = trainer = None
        try:
            import torch
            from datasets import Dataset
            from transformers import TrainerCallback
            from trl import DPOConfig, DPOTrainer

            if step_clock is None:
                step_clock = trl_clock(DPOTrainer, TrainerCallback, clock, device)
                tok, words = tokenizer_and_words()
                model_cfg = model_config("qwen2", spec["speed_size"])
            clock["ends"], clock["precompute"] = [], 0.0
            rows = make_rows(tuple(spec["shapes"][shape]), n_pairs, words)
            lengths = pair_lengths(rows, tok, spec["max_length"])
            leftover = reset_peak_memory(device)
            model = build_model("qwen2", spec["speed_size"], "sdpa", device)
            precompute = variant == "trl_precompute"
            # A model given as an object has no path TRL could load its reference from: pass a copy.
            ref = None if precompute else copy.deepcopy(model).eval().requires_grad_(False)
            args = DPOConfig(
                output_dir=str(Path(spec["work"]) / job["id"].replace("/", "-")),
                per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"],
                max_length=spec["max_length"], learning_rate=1e-6, lr_scheduler_type="linear", max_grad_norm=1.0,
                gradient_checkpointing=False, bf16=True, use_cpu=device == "cpu", report_to="none",
                save_strategy="no", logging_steps=spec["steps"], disable_dropout=True,
                precompute_ref_log_probs=precompute, dataloader_num_workers=0, seed=42,
                padding_free=variant == "trl_padding_free", use_liger_kernel=variant == "trl_liger",
            )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                                     processing_class=tok, callbacks=[step_clock])
            note = None
            if variant == "trl_padding_free" and not getattr(trainer, "padding_free", True):
                note = "TRL 1.16 warns and falls back to padding (padding_free is disabled since its DPO refactor)"
            trainer.train()
            res = timing(clock, spec, lengths, "plain", model_cfg, "precompute" if precompute else "live")
            res["precompute_seconds"] = clock["precompute"] if precompute else None
            if device == "cuda":
                res["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                res["leftover_gb"] = leftover
            if note is None and caught and variant != "trl":
                msgs = [str(w.message).splitlines()[0][:160] for w in caught if "padding" in str(w.message).lower()]
                note = msgs[0] if msgs else None
            results.put(job["id"], **row, **res, note=note)
        except Exception as e:  # noqa: BLE001 - reported as a row
            results.put(job["id"], **row, error=short_error(e), trace=traceback.format_exc()[-2000:])
        finally:
            del model, ref, trainer
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()


def trl_clock(trainer_cls, callback_cls, clock: dict, device: str):
    """Once per process: time TRL's reference precompute pass into ``clock``, and return a callback
    that stamps the end of every optimizer step (after a device sync)."""
    original = getattr(trainer_cls, "_precompute_ref_logps", None)
    if original is not None:
        def timed(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return original(self, *a, **k)
            finally:
                sync(device)
                clock["precompute"] += time.perf_counter() - t0

        trainer_cls._precompute_ref_logps = timed

    class StepClock(callback_cls):
        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            clock["ends"].append(time.perf_counter())

    return StepClock()


def env_child(spec: dict, results: Results) -> None:
    from importlib import metadata

    info = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    for name in ("torch", "transformers", "accelerate", "datasets", "trl", "liger-kernel", "triton"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = "missing"
    if spec["mode"] == "smoke":
        info["cuda"] = False  # not needed, and importing torch costs seconds on a busy 2-core machine
    else:
        try:
            import torch

            info["cuda"] = torch.cuda.is_available()
            if info["cuda"]:
                info["gpu"] = torch.cuda.get_device_name(0)
                info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        except Exception as e:  # noqa: BLE001 - a broken torch is a finding
            info["cuda"] = False
            info["torch_error"] = short_error(e)
    results.put("env", **info)


def child(spec: dict) -> None:
    results = Results(spec["results"])
    {"env": env_child, "correctness": correctness_child, "speed": speed_child, "trl": trl_child}[spec["task"]](
        spec, results)


# ------------------------------------------------------------------------------------------------
# The parent: sections as children, the budget, the table


def run_child(spec: dict, results_path: Path, hard_deadline: float, log) -> tuple[int | None, str]:
    """Run one child until it ends or the hard deadline passes; returns (exit code or None, stderr tail)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    spec = {**spec, "results": str(results_path)}
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=log, stderr=err,
                                env=env, text=True)
        try:
            code = proc.wait(timeout=max(5.0, hard_deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        err.seek(0)
        tail = err.read()[-3000:]
    if log is not None and tail:
        log.write(tail)
        log.flush()
    return code, tail


def read_results(path: Path) -> dict[str, dict]:
    out = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                out[r["id"]] = r
    return out


def run_section(task: str, spec: dict, jobs: list[dict], results_path: Path, soft_deadline: float,
                hard_deadline: float, log) -> None:
    """Run ``jobs`` in a child; if it dies, record the job it died in and go on with the rest in a
    new one. A section without jobs (env, correctness) that dies gets one row saying so."""
    results = Results(str(results_path))
    remaining = list(jobs)
    while True:
        code, tail = run_child({**spec, "task": task, "jobs": remaining, "deadline": soft_deadline},
                               results_path, hard_deadline, log)
        why = "time budget spent (stopped)" if code is None else f"child process died (exit {code}): " + (
            tail.strip().splitlines() or ["?"])[-1][:300]
        if not jobs:
            if code != 0:
                results.put(f"{task}/failed", error=why)
            return
        done = read_results(results_path)
        remaining = [j for j in remaining if j["id"] not in done]
        if code == 0 or not remaining:
            return
        first, remaining = remaining[0], remaining[1:]
        results.put(first["id"], **{k: v for k, v in first.items() if k != "id"}, error=why)
        if code is None or time.time() > soft_deadline:
            for j in remaining:
                results.put(j["id"], **{k: v for k, v in j.items() if k != "id"}, skipped="time budget spent")
            return
        if not remaining:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="Folder for table.md, results.json and log.txt (required).")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke mode: tiny models and shapes, seconds.")
    parser.add_argument("--budget_s", type=float, default=420.0, help="Global time budget in seconds.")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="Comma-separated: " + ", ".join(SECTIONS))
    parser.add_argument("--batch_size", type=int, default=8, help="Pairs per step (GPU mode).")
    parser.add_argument("--max_length", type=int, default=1024, help="Tokens of prompt + one response (GPU mode).")
    parser.add_argument("--steps", type=int, default=8, help="Optimizer steps per configuration (GPU mode).")
    parser.add_argument("--warmup_steps", type=int, default=3, help="Untimed steps at the start (GPU mode).")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if not args.out:
        parser.error("--out is required")
    start = time.time()
    deadline = start + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if not args.smoke and not 1 <= args.warmup_steps < args.steps:
        parser.error("--warmup_steps must be at least 1 and less than --steps")
    s = settings(args)
    work = Path(tempfile.mkdtemp(prefix="prefopt-gpu-check-"))
    results_path = out / "results.jsonl"
    results_path.unlink(missing_ok=True)
    base = {**s, "work": str(work)}
    with open(out / "log.txt", "w", encoding="utf-8") as log:
        # The parent never imports torch: it holds no CUDA context and survives any child's crash.
        run_section("env", base, [], results_path, deadline, deadline, log)
        env = read_results(results_path).get("env", {})
        if not args.smoke and not env.get("cuda"):
            print("gpu_check: error: no CUDA device here (torch: "
                  f"{env.get('torch', '?')}); run with --smoke for the CPU smoke mode", file=sys.stderr)
            raise SystemExit(2)
        # Correctness first; then TRL's baseline (the targets are ratios to it), prefopt's configurations,
        # and Liger last (its own child: it patches transformers' modules process-wide). Each part gets
        # a share of the time left; the global deadline stops whatever runs past it.
        plan = []
        if "correctness" in sections:
            plan.append(("correctness", "correctness", [], 0.2))
        if "trl" in sections:
            variants = [(v, shape) for v in ("trl", "trl_precompute") for shape in s["shapes"]]
            variants.append(("trl_padding_free", "tldr"))
            if args.smoke:  # each variant once
                variants = [("trl", "tldr"), ("trl_precompute", "balanced"), ("trl_padding_free", "tldr")]
            plan.append(("trl", "trl", [{"id": f"trl/{shape}/{v}", "shape": shape, "variant": v}
                                        for v, shape in variants], 0.3))
        if "speed" in sections:
            configs = [(shape, layout, attn, ref) for ref in ("live", "precompute")
                       for attn in ("sdpa", "flex_attention") for shape in s["shapes"]
                       for layout, a in SPEED_CONFIGS if a == attn]
            if args.smoke:  # every layout, shape and reference kind once, SDPA only (CPU)
                configs = [("tldr", "plain", "sdpa", "live"), ("tldr", "prefix_shared", "sdpa", "precompute"),
                           ("balanced", "packed", "sdpa", "live")]
            plan.append(("speed", "speed", [{"id": f"speed/{shape}/{layout}/{attn}/{ref}", "shape": shape,
                                             "layout": layout, "attn": attn, "reference": ref}
                                            for shape, layout, attn, ref in configs], 0.85))
        if "trl" in sections:
            shapes = ["tldr"] if args.smoke else list(s["shapes"])
            plan.append(("trl_liger", "trl", [{"id": f"trl/{shape}/trl_liger", "shape": shape, "variant": "trl_liger"}
                                              for shape in shapes], 1.0))
        section_seconds = {}
        for name, task, jobs, share in plan:
            began = time.time()
            soft = began + share * max(0.0, deadline - began)
            print(f"gpu_check: {name} (until +{soft - start:.0f} s of {args.budget_s:.0f} s)", flush=True)
            run_section(task, base, jobs, results_path, soft, deadline, log)
            section_seconds[name] = round(time.time() - began, 1)
    results = read_results(results_path)
    elapsed = time.time() - start
    report = render(results, s, args, elapsed, section_seconds)
    (out / "table.md").write_text(report, encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"settings": s, "args": vars(args), "elapsed_s": elapsed,
                                                  "section_seconds": section_seconds, "results": results}, indent=1) + "\n", encoding="utf-8")
    print(report)
    print(f"gpu_check: wrote {out / 'table.md'} and {out / 'results.json'} ({elapsed:.0f} s)")


# ------------------------------------------------------------------------------------------------
# The report


def mfu(r: dict, results: dict[str, dict]) -> float | None:
    peak = results.get("speed/peak", {}).get("flops")
    return r["model_flops_per_s"] / peak if peak and r.get("model_flops_per_s") else None


def fmt(x, spec: str = ".2f", none: str = "-") -> str:
    if x is None:
        return none
    try:
        if x != x:  # NaN
            return none
    except TypeError:
        return str(x)
    return format(x, spec)


def render(results: dict[str, dict], s: dict, args, elapsed: float, section_seconds: dict) -> str:
    env = results.get("env", {})
    peak = results.get("speed/peak", {})
    mode = "CPU smoke mode (tiny models and shapes: numbers show the script works, not how fast anything is)" \
        if s["mode"] == "smoke" else "GPU mode"
    lines = ["# GPU check: prefopt's layouts and attention backends, correctness and speed, against TRL", "",
             f"{mode}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {elapsed:.0f} s of a "
             f"{args.budget_s:.0f} s budget (" + ", ".join(f"{k} {v:.0f} s" for k, v in section_seconds.items())
             + ").", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "id") + ".", ""]
    if peak.get("flops"):
        lines += [f"Matmul peak measured in this run: {peak['flops'] / 1e9:,.0f} GFLOP/s ({peak.get('shape')}).", ""]

    lines += ["## 1. Correctness: every layout against the plain layout (SDPA, selective head)", "",
              "logps: max |a - b| / max |b| over the per-response log-probs; grads: max over parameters of "
              "||g_a - g_b|| / max(||g_b||, 1e-3 ||g_b||_all) for sum_i w_i logp_i. Tolerance: float32 1e-5 / 1e-4; bf16 "
              "max(4u, 2e), u = 2^-8, e = what bf16 does to the plain layout (bf16 vs float32).", "",
              "| model | precision | layout | attention | LM head | logps diff | tol | grads diff | tol | status |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        if not key.startswith("correctness/"):
            continue
        if key.endswith("bf16-noise"):
            continue
        if "dtype" not in r:
            lines.append(f"| {key} | | | | | | | | | {'SKIP: ' + r['skipped'] if 'skipped' in r else 'ERROR: ' + str(r.get('error'))} |")
            continue
        d = r.get("diff", {})
        status = r.get("status") or ("SKIP: " + r["skipped"] if "skipped" in r else "ERROR")
        if r.get("error"):
            status += ": " + r["error"]
        if r.get("note"):
            status += f" ({r['note']})"
        tol = r.get("tol", {})
        lines.append(f"| {r['arch']} | {r['dtype']} | {r['layout']} | {r['attn']} | {r['head']} | "
                     f"{fmt(d.get('logps'), '.1e')} | {fmt(tol.get('logps'), '.0e')} | {fmt(d.get('grads'), '.1e', 'not checked')} | "
                     f"{fmt(tol.get('grads'), '.0e')} | {status} |")
    noise = [(k.split("/")[1], r["noise"]) for k, r in results.items() if k.endswith("bf16-noise")]
    if noise:
        lines += ["", "bf16 against float32, plain layout (the e above): " + "; ".join(
            f"{arch}: logps {n['logps']:.1e}, grads {n.get('grads', float('nan')):.1e}" for arch, n in noise) + "."]

    lines += ["", "## 2-3. Speed and memory: DPO steps, prefopt and TRL", "",
              f"Qwen2-shaped model ({s['speed_size']}: {describe_model(s['speed_size'])}), bf16 autocast, AdamW; "
              f"{s['batch_size']} pairs per step, max_length {s['max_length']}, {s['steps']} steps of which the first "
              f"{s['warmup_steps']} are untimed. Shapes (prompt, response before a 0.85-1 jitter): "
              + ", ".join(f"{k} {v[0]}+{v[1]}" for k, v in s["shapes"].items()) + ".", "",
              "| shape | system | layout | attention | reference | pairs/s | tokens/s | peak GPU GB | MFU | x TRL | "
              "mem / TRL | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    speed = [r for k, r in results.items() if (k.startswith("speed/") or k.startswith("trl/")) and "system" in r]
    order = list(s["shapes"])
    speed.sort(key=lambda r: (order.index(r["shape"]) if r["shape"] in order else 99, r["system"] != "prefopt"))
    trl_base = {(r["shape"]): r for r in speed if r["system"] == "trl" and r.get("pairs_per_s")}
    for r in speed:
        base = trl_base.get(r["shape"])
        x = r["pairs_per_s"] / base["pairs_per_s"] if base and r.get("pairs_per_s") else None
        m = r["peak_mem_gb"] / base["peak_mem_gb"] if base and r.get("peak_mem_gb") and base.get("peak_mem_gb") else None
        note = r.get("note") or ""
        if r.get("skipped"):
            note = "skipped: " + r["skipped"]
        if r.get("error"):
            note = "ERROR: " + r["error"]
        if r.get("precompute_seconds") is not None:
            note = (note + "; " if note else "") + f"precompute pass {r['precompute_seconds']:.2f} s"
        if (r.get("leftover_gb") or 0) > 0.1:
            note = (note + "; " if note else "") + f"{r['leftover_gb']:.1f} GB left allocated by earlier configurations"
        lines.append(f"| {r['shape']} | {r['system']} | {r['layout']} | {r['attn']} | {r['reference']} | "
                     f"{fmt(r.get('pairs_per_s'))} | {fmt(r.get('tokens_per_s'), '.0f')} | {fmt(r.get('peak_mem_gb'))} | "
                     f"{fmt(100 * u if (u := mfu(r, results)) is not None else None, '.1f')}{'%' if u is not None else ''} | "
                     f"{fmt(x)} | {fmt(m)} | {note} |")
    autos = [r for k, r in results.items() if k.startswith("speed/") and "auto" in r]
    if autos:
        lines += ["", "`layout: auto` on these batches (data.layouts.LAYOUT_RULES): " + "; ".join(
            f"{r['shape']} with {r['attn']}: CPU {r['auto']['cpu']}, CUDA {r['auto']['cuda']}" for r in autos) + "."]
    lines += ["", "## Targets", ""] + targets(results, s) + [""]
    problems = [f"- {k}: {r.get('error')}" for k, r in results.items() if r.get("error")]
    if problems:
        lines += ["## Errors", ""] + problems + [""]
    return "\n".join(lines) + "\n"


def describe_model(size: str) -> str:
    m = MODELS[("qwen2", size)]
    return (f"hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, {m['num_attention_heads']}/"
            f"{m['num_key_value_heads']} heads, intermediate {m['intermediate_size']}, vocab {m['vocab_size']}")


def targets(results: dict[str, dict], s: dict) -> list[str]:
    out = []
    checks = [r for k, r in results.items() if k.startswith("correctness/") and "status" in r]
    if checks:
        bad = [r for r in checks if r["status"] != "PASS"]
        out.append(f"- every layout equal within tolerance: {len(checks) - len(bad)}/{len(checks)} PASS "
                   f"({'met' if not bad else 'NOT met'})")
    speed = [r for k, r in results.items() if k.startswith("speed/") and r.get("pairs_per_s")]
    trl = {r["shape"]: r for k, r in results.items() if k.startswith("trl/") and r.get("system") == "trl"
           and r.get("pairs_per_s")}
    for shape, goal in (("tldr", 1.5), ("balanced", 1.0)):
        mine = [r for r in speed if r["shape"] == shape and r["reference"] == "live"]
        if not mine:
            continue
        best = max(mine, key=lambda r: r["pairs_per_s"])
        label = f"{best['layout']}/{best['attn']}"
        if shape in trl:
            ratio = best["pairs_per_s"] / trl[shape]["pairs_per_s"]
            out.append(f"- {shape}: prefopt ({label}) / TRL pairs/s = {ratio:.2f} (target >= {goal}) "
                       f"{'met' if ratio >= goal else 'NOT met'}")
            if best.get("peak_mem_gb") and trl[shape].get("peak_mem_gb"):
                mem = best["peak_mem_gb"] / trl[shape]["peak_mem_gb"]
                out.append(f"- {shape}: prefopt ({label}) / TRL peak memory = {mem:.2f} (target <= 1) "
                           f"{'met' if mem <= 1 else 'NOT met'}")
        else:
            out.append(f"- {shape}: prefopt / TRL pairs/s: no TRL result in this run")
        if s["mode"] == "gpu":
            u = mfu(best, results)
            if u is not None:
                out.append(f"- {shape}: prefopt ({label}) MFU = {100 * u:.0f}% (target >= 40%) "
                           f"{'met' if u >= 0.4 else 'NOT met'}")
    if s["mode"] == "smoke":
        out.append("- (smoke mode: the speed targets are for the GPU run; these ratios are of tiny CPU runs)")
    return out


if __name__ == "__main__":
    main()
