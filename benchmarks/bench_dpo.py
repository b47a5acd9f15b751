"""DPO training speed and memory: prefopt against TRL's DPOTrainer, same model, data and settings.

    python benchmarks/bench_dpo.py            # the full table, written to docs/benchmarks.md
    python benchmarks/bench_dpo.py --quick    # a small smoke run (seconds, not minutes)

One randomly initialised GPT-2-style model per hidden size (GPT-2's vocabulary, 50257) and one
synthetic preference set per shape are written to a temporary directory. Every run trains the same
number of pairs with the same batch size, max length, optimiser (AdamW, lr 1e-6, linear schedule,
clipping 1.0), precision (float32), no dropout, no gradient checkpointing, no checkpoint writing,
and runs in a fresh subprocess so its peak RSS is its own. Runs of the systems alternate, repeats
rotate the order, and the table reports the median of the repeats.

The time of a run is steady-state training time: the optimizer steps after the first
``--warmup_steps`` (2: the first step pays for lazy initialisation such as the optimizer state, the
second for the first touch of the memory that the grown footprint needs, which on a virtual machine
costs a host page fault per page) scaled to all pairs, plus the whole reference precompute pass where a
system has one. Process start, imports, tokenization and model loading are left out for both sides
(they are the same few seconds whatever the data size, and on a tiny benchmark would hide the work).

FLOP accounting (the "FLOP/s share" column): model FLOPs, i.e. the matmul FLOPs of the model's
own products for the tokens that system runs (so TRL's second copy of every prompt counts for TRL):

- ``6·N·T`` for the policy (forward + backward) and ``2·N·T`` for the reference (live or
  precomputed), with ``N = 12·layers·H²`` the non-embedding matmul parameters and ``T`` the tokens
  of the rows without padding;
- attention ``QKᵀ`` and ``AV``: ``4·H`` per (query, key) pair the causal mask allows, per layer,
  x3 with backward. Both systems are credited with the same pairs (prompt and each response
  causally, each response to the whole prompt); the masked pairs SDPA computes over a shared row
  on CPU are not counted;
- the LM head ``2·H·V`` per scored completion token only (x3 with backward); prompt positions need
  no logits and are not counted; prefopt's recomputation of the head's logits in backward is not
  counted either (it is memory-saving overhead, not model work);
- not counted: embeddings, layer norms, activations, softmax, the optimizer.

Divided by the wall time and by the float32 matmul peak this machine reaches in the same session:
the fastest ``torch.mm`` over a 2048 square and the model's own shapes (projections over 768 rows,
one LM-head chunk), measured before every repeat and at the end; the best of those counts, so a
measurement disturbed by other jobs lowers nobody's share.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPT2_TOKENIZER = Path(os.environ.get("PREFOPT_BENCH_TOKENIZER", "/work/shared/data/gpt2-tokenizer"))
VOCAB = 50257
SHAPES = {"tldr": (384, 48), "balanced": (128, 128)}  # prompt, response tokens
SYSTEMS = ("prefopt", "prefopt_precompute", "trl", "trl_precompute")
GPU_SECTION = "## GPU check"  # docs/benchmarks.md from this heading on is kept when the table is rewritten


# ------------------------------------------------------------------------------------------------
# Inputs: a tokenizer, models and preference sets on disk


def build_tokenizer(directory: Path):
    """GPT-2's tokenizer when it is available; else a word-level one with GPT-2's vocabulary size."""
    from transformers import AutoTokenizer

    if (GPT2_TOKENIZER / "vocab.json").is_file():
        tok = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    else:
        sys.path.insert(0, str(ROOT / "src"))
        from prefopt.toy import word_tokenizer

        tok = word_tokenizer([f"w{i}" for i in range(VOCAB - 4)], bos=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.save_pretrained(directory)
    return tok


def single_token_words(tok, n: int = 4000) -> list[str]:
    """Words that are exactly one token with a leading space, so ``k`` words make ``k`` tokens."""
    words = []
    for token in tok.get_vocab():
        text = tok.convert_tokens_to_string([token])
        if text.startswith(" ") and text[1:].isalpha() and len(tok(text)["input_ids"]) == 1:
            words.append(text)
            if len(words) >= n:
                break
    return words


def build_data(path: Path, words: list[str], n_pairs: int, prompt: int, response: int, seed: int) -> Path:
    rng = random.Random(seed)

    def text(k: int) -> str:  # " w1 w2 ...": responses keep the leading space, so prompt + response
        return "".join(rng.choice(words) for _ in range(k))  # tokenizes as the two parts do

    rows = []
    for _ in range(n_pairs):
        jitter = lambda k: max(1, int(k * rng.uniform(0.9, 1.1)))  # noqa: E731
        rows.append({"prompt": text(jitter(prompt)).lstrip(), "chosen": text(jitter(response)),
                     "rejected": text(jitter(response))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build_model(directory: Path, hidden: int, layers: int, tok_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    heads = max(1, hidden // 64)
    config = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=1024,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=50256, eos_token_id=50256)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(directory)
    return directory


def matmul_shapes(hiddens: list[int], tokens: int = 768) -> list[tuple[int, int, int]]:
    """``(m, k, n)`` of the products a training step runs: a 2048 square, and per hidden size the
    attention/MLP projections over ``tokens`` rows and one LM-head chunk at GPT-2's vocabulary."""
    sys.path.insert(0, str(ROOT / "src"))
    from prefopt.modeling.lm_head import head_chunk_size

    shapes = [(2048, 2048, 2048)]
    for h in hiddens:
        shapes += [(tokens, h, 3 * h), (tokens, h, 4 * h), (tokens, 4 * h, h), (head_chunk_size(VOCAB), h, VOCAB)]
    return shapes


def matmul_peak(shapes, seconds: float = 2.0) -> float:
    """Best float32 matmul rate (FLOP/s) on this machine, all threads, over ``shapes``: each shape
    is timed for ``seconds`` and the fastest single call counts (the least disturbed by other jobs)."""
    import torch

    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        out = torch.mm(a, b)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            best = max(best, 2 * m * k * n / (time.perf_counter() - t0))
    return best


# ------------------------------------------------------------------------------------------------
# One run (in a child process)


class Clock:
    """Timestamps of a run: the end of every optimizer step and the reference precompute pass."""

    def __init__(self):
        self.start = time.perf_counter()
        self.step_ends: list[float] = []
        self.precompute = 0.0

    def timed(self, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.precompute += time.perf_counter() - t0

        return wrapper

    def result(self, warmup_steps: int) -> dict:
        ends = self.step_ends[warmup_steps - 1:]
        return {"total_seconds": time.perf_counter() - self.start, "precompute_seconds": self.precompute,
                "steady_seconds": ends[-1] - ends[0], "steady_steps": len(ends) - 1}


def run_prefopt(spec: dict) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from prefopt import recipes
    from prefopt.config import TrainConfig
    from prefopt.objectives import reference_cache as reference
    from prefopt.training import trainer as train

    clock = Clock()
    train.Trainer.save_final = lambda self: None  # neither side writes the model in the benchmark
    step = train.Trainer.train_step

    def train_step(self):
        out = step(self)
        clock.step_ends.append(time.perf_counter())
        return out

    train.Trainer.train_step = train_step
    reference.precompute = clock.timed(reference.precompute)
    cfg = TrainConfig(
        model_name_or_path=spec["model"], dataset=spec["data"], output_dir=spec["out"],
        max_length=spec["max_length"], max_prompt_length=spec["max_length"] - 1,
        per_device_train_batch_size=spec["batch_size"], per_device_eval_batch_size=spec["batch_size"],
        max_steps=spec["steps"], logging_steps=spec["steps"], save_steps=0, learning_rate=1e-6,
        lr_scheduler_type="linear", max_grad_norm=1.0, progress_bar=False, layout=spec.get("layout", "auto"),
        precompute_ref_log_probs=spec["system"].endswith("precompute"),
        ref_logps_cache_dir=str(Path(spec["out"]) / "cache"),  # fresh: the precompute pass is timed
    )
    cfg.report_to = "none"
    recipes.train(cfg)
    return clock.result(spec.get("warmup_steps", 1))


def run_trl(spec: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    clock = Clock()

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_ends.append(time.perf_counter())

    DPOTrainer._precompute_ref_logps = clock.timed(DPOTrainer._precompute_ref_logps)
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    args = DPOConfig(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"],
        max_length=spec["max_length"], learning_rate=1e-6, lr_scheduler_type="linear", max_grad_norm=1.0,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=spec["steps"], disable_dropout=True,
        precompute_ref_log_probs=spec["system"].endswith("precompute"), dataloader_num_workers=0, seed=42,
    )
    trainer = DPOTrainer(model=spec["model"], args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(spec["model"]), callbacks=[StepClock()])
    trainer.train()
    return clock.result(spec.get("warmup_steps", 1))


def in_child(spec: dict) -> dict:
    """Run ``child(spec)`` in a fresh process and return its result."""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"child process failed: {spec}")
    return json.loads(line[len("RESULT "):])


def setup_inputs(spec: dict) -> dict:
    """The tokenizer, one preference set per shape and one model per hidden size, under ``work``."""
    work = Path(spec["work"])
    tok = build_tokenizer(work / "tokenizer")
    words = single_token_words(tok)
    data = {s: build_data(work / f"{s}.jsonl", words, spec["n_pairs"], *SHAPES[s], seed=1) for s in spec["shapes"]}
    models = {h: build_model(work / f"gpt2-h{h}", h, spec["layers"], work / "tokenizer") for h in spec["hiddens"]}
    return {"data": {s: str(p) for s, p in data.items()}, "models": {h: str(p) for h, p in models.items()},
            "lengths": {s: token_lengths(data[s], work / "tokenizer") for s in spec["shapes"]}}


def child(spec: dict) -> None:
    task = spec.get("task", "train")
    if task == "setup":
        print("RESULT " + json.dumps(setup_inputs(spec)), flush=True)
        return
    if task == "peak":
        print("RESULT " + json.dumps({"peak": matmul_peak(matmul_shapes(spec["hiddens"]))}), flush=True)
        return
    import torch

    torch.manual_seed(0)
    result = (run_trl if spec["system"].startswith("trl") else run_prefopt)(spec)
    # Steady state: the steps after the warm-up ones, plus the reference precompute pass.
    n_pairs = spec["batch_size"] * spec["steps"]
    per_pair = result["steady_seconds"] / (result["steady_steps"] * spec["batch_size"])
    result["seconds"] = n_pairs * per_pair + result["precompute_seconds"]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# FLOPs each system has to do


def token_lengths(data: Path, tok_dir: Path) -> list[tuple[int, int, int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    out = []
    for line in data.read_text().splitlines():
        r = json.loads(line)
        p, c, j = (len(tok(r[k])["input_ids"]) for k in ("prompt", "chosen", "rejected"))
        out.append((p, c + 1, j + 1))  # + EOS
    return out


def causal(n: int) -> int:
    return n * (n + 1) // 2


def run_flops(system: str, lengths, hidden: int, layers: int, n_pairs: int) -> float:
    """Matmul FLOPs of training ``n_pairs`` pairs (see the module docstring)."""
    n_body = 12 * layers * hidden * hidden
    total = 0.0
    for p, c, r in lengths[:n_pairs]:
        if system.startswith("trl"):
            rows = [p + c, p + r]
        else:  # prefix sharing (the layout auto picks for these shapes)
            rows = [p + c + r]
        tokens = sum(rows)
        # Attention: QK^T and AV, 2·2·H FLOPs per (query, key) pair the causal mask allows, x3 with
        # backward. Both systems need the same pairs: prompt and each response causally, and each
        # response to the whole prompt (SDPA on CPU computes the masked pairs of a shared row too;
        # they are not counted, as TRL's repeated prompt is).
        pairs_needed = causal(p + c) + causal(p + r) if system.startswith("trl") else causal(p + c) + causal(r) + r * p
        attn = 3 * 4 * layers * hidden * pairs_needed
        head = 2 * hidden * VOCAB * (c + r)
        total += 6 * n_body * tokens + attn + 3 * head
        total += 2 * n_body * tokens + attn / 3 + head  # reference forward (live or precomputed)
    return total


# ------------------------------------------------------------------------------------------------
# The driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Tiny smoke run: 1 repeat, few pairs, small model.")
    parser.add_argument("--shapes", default="tldr,balanced")
    parser.add_argument("--hidden", default="768,256")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="Optimizer steps per run.")
    parser.add_argument("--warmup_steps", type=int, default=2, help="Steps at the start of a run that are not timed.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--raw", help="Also append every run's result to this JSONL file as it finishes.")
    parser.add_argument("--from_raw", help="Render the report from a --raw file (e.g. of an interrupted run).")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.from_raw:
        report_from_raw(Path(args.from_raw), args)
        return
    if args.quick:
        args.hidden, args.layers, args.steps, args.repeats, args.batch_size = "256", 2, 4, 1, 2
        args.shapes = "balanced"
    if not 1 <= args.warmup_steps < args.steps:
        parser.error("--warmup_steps must be at least 1 and less than --steps")
    shapes = args.shapes.split(",")
    hiddens = [int(h) for h in args.hidden.split(",")]
    systems = args.systems.split(",")
    n_pairs = args.batch_size * args.steps

    # The parent never imports torch: a waiting parent that has imported it (let alone run parallel
    # work) slowed every measured run by 10-20% on 2 cores. Inputs and the matmul peak are made in
    # child processes too.
    work = Path(tempfile.mkdtemp(prefix="prefopt-bench-"))
    made = in_child({"task": "setup", "work": str(work), "shapes": shapes, "hiddens": hiddens,
                     "layers": args.layers, "n_pairs": n_pairs})
    data, lengths = made["data"], made["lengths"]
    models = {int(h): path for h, path in made["models"].items()}

    def measure_peak() -> float:
        return in_child({"task": "peak", "hiddens": hiddens})["peak"]

    peaks = [measure_peak()]  # measured again before every repeat and at the end
    print(f"float32 matmul peak: {peaks[-1] / 1e9:.1f} GFLOP/s", flush=True)
    peak = peaks[0]
    raw = open(args.raw, "a", encoding="utf-8") if args.raw else None  # noqa: SIM115
    if raw:
        raw.write(json.dumps({"peak": peak, "lengths": lengths, "args": vars(args)}) + "\n")
        raw.flush()

    results: dict[tuple, list[dict]] = {}
    for rep in range(args.repeats):
        if rep:
            peaks.append(measure_peak())
            print(f"float32 matmul peak: {peaks[-1] / 1e9:.1f} GFLOP/s", flush=True)
        order = systems[rep % len(systems):] + systems[: rep % len(systems)]
        for shape in shapes:
            p, r = SHAPES[shape]
            max_length = p + r + 64
            for hidden in hiddens:
                for system in order:
                    spec = {"system": system, "model": str(models[hidden]), "data": str(data[shape]),
                            "out": str(work / f"run-{system}-{shape}-{hidden}-{rep}"), "batch_size": args.batch_size,
                            "steps": args.steps, "warmup_steps": args.warmup_steps, "max_length": max_length}
                    res = in_child(spec)
                    results.setdefault((shape, hidden, system), []).append(res)
                    if raw:
                        raw.write(json.dumps({"cell": [shape, hidden, system], **res}) + "\n")
                        raw.flush()
                    print(f"[{rep}] {shape:9s} h{hidden:<4d} {system:19s} {res['seconds']:7.2f} s "
                          f"{res['peak_rss_mb']:7.0f} MB", flush=True)

    peaks.append(measure_peak())
    print(f"float32 matmul peak: {peaks[-1] / 1e9:.1f} GFLOP/s", flush=True)
    if raw:
        raw.write(json.dumps({"peaks": peaks}) + "\n")
    finish(results, args, lengths, max(peaks), peaks)


def report_from_raw(path: Path, args) -> None:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    head = lines[0]
    for k, v in head["args"].items():
        if k not in ("from_raw", "raw", "output"):
            setattr(args, k, v)
    results: dict[tuple, list[dict]] = {}
    peaks = [head["peak"]]
    for r in lines[1:]:
        if "peaks" in r:
            peaks = r["peaks"]
            continue
        results.setdefault(tuple(r.pop("cell")), []).append(r)
    finish(results, args, head["lengths"], max(peaks), peaks)


def finish(results, args, lengths, peak, peaks=()) -> None:
    shapes = [s for s in args.shapes.split(",") if any(k[0] == s for k in results)]
    hiddens = [int(h) for h in args.hidden.split(",") if any(k[1] == int(h) for k in results)]
    systems = args.systems.split(",")
    n_pairs = args.batch_size * args.steps
    rows = []
    for shape in shapes:
        for hidden in hiddens:
            base = {}
            for system in systems:
                runs = results.get((shape, hidden, system))
                if not runs:
                    continue
                seconds = statistics.median(r["seconds"] for r in runs)
                rss = statistics.median(r["peak_rss_mb"] for r in runs)
                tokens = sum(sum(x) for x in lengths[shape][:n_pairs])
                flops = run_flops(system, lengths[shape], hidden, args.layers, n_pairs)
                base[system] = (seconds, rss)
                rows.append({"shape": shape, "hidden": hidden, "system": system, "pairs_per_s": n_pairs / seconds,
                             "tokens_per_s": tokens / seconds, "peak_rss_mb": rss,
                             "flop_share": flops / seconds / peak, "runs": [r["seconds"] for r in runs]})
            for row in rows[-len(base):]:
                if "trl" in base:
                    row["speed_vs_trl"] = base["trl"][0] / base[row["system"]][0]
                    row["rss_vs_trl"] = base[row["system"]][1] / base["trl"][1]
                if "trl_precompute" in base:
                    row["speed_vs_trl_precompute"] = base["trl_precompute"][0] / base[row["system"]][0]
    report = render(rows, args, peak, n_pairs, peaks)
    print(report)
    if not args.quick:
        output = Path(args.output)
        # The GPU check's section (benchmarks/gpu_check.py) and the data-preparation section
        # (benchmarks/bench_data.py) are not this benchmark's: keep them, from the first one on.
        old = output.read_text(encoding="utf-8") if output.exists() else ""
        marks = [old.index(m) for m in (GPU_SECTION, "<!-- bench_data.py:") if m in old]
        kept = old[min(marks):] if marks else ""
        output.write_text(report + ("\n" + kept if kept else ""), encoding="utf-8")
        print(f"wrote {args.output}")


def render(rows, args, peak, n_pairs, peaks=()) -> str:
    import torch
    import transformers
    import trl

    cmd = "python benchmarks/bench_dpo.py " + " ".join(
        f"--{k} {v}" for k, v in (("shapes", args.shapes), ("hidden", args.hidden), ("layers", args.layers),
                                  ("batch_size", args.batch_size), ("steps", args.steps), ("warmup_steps", args.warmup_steps),
                                  ("repeats", args.repeats)))
    lines = [
        "# Benchmark: prefopt vs TRL DPOTrainer",
        "",
        f"Command: `{cmd}` (what `make bench` runs, with its defaults).",
        "",
        f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"TRL {trl.__version__}; float32 matmul peak measured in this run: {peak / 1e9:.1f} GFLOP/s (the best of "
        f"{len(peaks) or 1} measurements before each repeat and at the end: "
        f"{', '.join(f'{x / 1e9:.0f}' for x in peaks)} GFLOP/s; 2048-square, projection and LM-head-chunk shapes).",
        "",
        f"Each cell: {n_pairs} pairs ({args.steps} steps of {args.batch_size}), GPT-2 architecture with "
        f"{args.layers} layers and GPT-2's vocabulary (50257), random weights, float32, AdamW, median of "
        f"{args.repeats} runs each in a fresh process (systems alternate). Time = the optimizer steps after the "
        f"first {args.warmup_steps} "
        "scaled to all pairs, plus the reference precompute pass; setup excluded (see the script's docstring). "
        "tokens/s counts every pair's prompt + chosen + rejected tokens once, whatever the layout.",
        "",
        "| shape | hidden | system | pairs/s | tokens/s | peak RSS MB | FLOP/s share of peak | x TRL | "
        "x TRL precompute | RSS / TRL | runs (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['hidden']} | {r['system']} | {r['pairs_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | {100 * r['flop_share']:.0f}% | {r.get('speed_vs_trl', float('nan')):.2f} | "
            f"{r.get('speed_vs_trl_precompute', float('nan')):.2f} | {r.get('rss_vs_trl', float('nan')):.2f} | "
            f"{', '.join(f'{s:.1f}' for s in r['runs'])} |"
        )
    lines += ["", "## Targets (ratios in the same run)", ""] + target_lines(rows) + ["", NOTES]
    return "\n".join(lines) + "\n"


NOTES = """## Conditions and caveats

- The machine is a virtual machine on a shared host: the same run varies by up to ~10% from one
  repeat to the next (compare the per-run times in the last column); ratios come from runs that
  alternate between systems, so both sides saw the same conditions on average. The benchmark's
  parent process never imports torch (a parent that had slowed every measured run by 10-20%), and
  the first `--warmup_steps` steps of each run are not timed (see the script's docstring).
- TRL runs with `gradient_checkpointing=False` and `bf16=False` (its defaults are True) so both sides
  do the same float32 work on CPU; `save_strategy="no"`, `report_to="none"`, and its default
  optimizer (`adamw_torch_fused` with torch >= 2.8). prefopt uses the same fused AdamW kernel.
- TRL 1.16 already applies its LM head only at completion positions (its fused, tiled head), so the
  difference measured here is mostly prefix sharing (the prompt runs once, not twice) and padding.
- A single epoch pays for the reference forward pass once, precomputed or not; the precompute wins
  in time only when the cache is reused (more epochs, several runs), and always in memory.
- GPU numbers (bfloat16, a ~0.5B model, the 40% MFU target) are not recorded: no GPU machine was
  lent to this task (the device tool's `status` reports none can be started).
"""


def target_lines(rows) -> list[str]:
    cell = {(r["shape"], r["hidden"], r["system"]): r for r in rows}
    out = []

    def check(label, value, goal, higher=True):
        if value is None:
            return
        ok = value >= goal if higher else value <= goal
        out.append(f"- {label}: {value:.2f} (target {'>=' if higher else '<='} {goal}) "
                   f"{'met' if ok else 'NOT met'}")

    for hidden in sorted({r["hidden"] for r in rows}):
        def get(shape, system, key, hidden=hidden):
            return cell.get((shape, hidden, system), {}).get(key)

        check(f"h{hidden} TL;DR pairs/s, prefopt / TRL defaults", get("tldr", "prefopt", "speed_vs_trl"), 2.0)
        check(f"h{hidden} balanced pairs/s, prefopt / TRL defaults", get("balanced", "prefopt", "speed_vs_trl"), 1.3)
        check(f"h{hidden} TL;DR pairs/s, prefopt precompute / TRL precompute",
              get("tldr", "prefopt_precompute", "speed_vs_trl_precompute"), 1.5)
        for shape in ("tldr", "balanced"):
            check(f"h{hidden} {shape} peak RSS, prefopt / TRL defaults", get(shape, "prefopt", "rss_vs_trl"), 0.6,
                  higher=False)
            check(f"h{hidden} {shape} peak RSS, prefopt precompute / TRL defaults",
                  get(shape, "prefopt_precompute", "rss_vs_trl"), 0.6, higher=False)
    for r in rows:
        if r["hidden"] == 768 and r["system"].startswith("prefopt"):
            check(f"h768 {r['shape']} {r['system']} share of matmul peak", r["flop_share"], 0.5)
    return out


if __name__ == "__main__":
    main()
