"""Data preparation at scale: prefopt's tokenized-pair store against TRL's DPOTrainer, same files.

    python benchmarks/bench_data.py                          # 10k and 100k pairs, TRL at both
    python benchmarks/bench_data.py --sizes 10000,100000,1000000 --trl_sizes 10000,100000
    python benchmarks/bench_data.py --quick                  # 2k pairs, seconds; writes nothing

Synthetic explicit pairs (JSONL) are built from the shared TL;DR text (/work/shared/data/odpo):
each prompt is a Reddit post followed by part of another and ``TL;DR:``, the chosen and rejected
responses two different human summaries of it, so pairs are TL;DR-shaped (long prompt, short
responses; ~600 GPT-2 tokens) and no two are the same text. Tokenizer: GPT-2's (/work/shared/data/gpt2-tokenizer);
``max_length`` 1024, ``max_prompt_length`` 512 on both sides, ``dataset_num_proc`` the same on both.

Every measurement runs in a fresh process; its peak RSS is that process's own (``wait4``), and its
CPU seconds those of the process and its worker processes during the timed call:

- prefopt, first preparation: ``prepare_dataset`` into an empty cache directory (read, convert,
  tokenize, write the store), wall time of that call;
- prefopt, cache hit: the same call again in a new process (key, checks, memory-map);
- two processes at once on an empty cache (what the ranks of a 2-process run do): one builds, the
  other waits on the lock and maps the result; peak RSS of each;
- baseline: a process that imports the same modules and loads the tokenizer, and nothing else:
  the RSS every process has anyway (what "adds" is measured against);
- TRL: ``datasets.load_dataset("json", ...)`` of the same file plus ``DPOTrainer``'s
  ``_prepare_dataset`` (timed by wrapping it; a tiny model, so the constructor's other work is
  negligible), with an empty ``HF_DATASETS_CACHE``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PREFOPT_BENCH_DATA", "/work/shared/data"))
TOKENIZER = SHARED / "gpt2-tokenizer"
TLDR = SHARED / "odpo" / "tldr-sft-train-rel.json"
MAX_LENGTH, MAX_PROMPT_LENGTH = 1024, 512
MARK = "<!-- bench_data.py: everything below is written by benchmarks/bench_data.py -->"


# ------------------------------------------------------------------------------------------------
# Data


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    posts = json.loads(TLDR.read_text())
    items = [(post, [r for r in v["responses"] if r.strip()]) for post, v in posts.items()]
    items = [(p, rs) for p, rs in items if len(set(rs)) >= 2]
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            post, responses = items[rng.randrange(len(items))]
            other = items[rng.randrange(len(items))][0]
            chosen, rejected = rng.sample(sorted(set(responses)), 2)
            cut = rng.randrange(len(other) // 2, len(other) + 1)
            prompt = f"POST {i}\n{post}\n\n{other[:cut]}\n\nTL;DR:"
            fh.write(json.dumps({"prompt": prompt, "chosen": " " + chosen.strip(), "rejected": " " + rejected.strip()})
                     + "\n")
    return path


# ------------------------------------------------------------------------------------------------
# Children


def child(spec: dict) -> dict:
    if spec["system"] == "trl":
        return child_trl(spec)
    sys.path.insert(0, str(ROOT / "src"))
    from transformers import AutoTokenizer

    from prefopt.config import TrainConfig
    from prefopt.data.prepare import prepare_dataset

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    if spec["system"] == "baseline":
        return {"seconds": 0.0}
    if spec.get("ready"):  # start together with a partner
        Path(f"{spec['ready']}.{os.getpid()}").touch()
        while len(list(Path(spec["ready"]).parent.glob(Path(spec["ready"]).name + ".*"))) < 2:
            time.sleep(0.005)
    cfg = TrainConfig(dataset=spec["data"], data_cache_dir=spec["cache"], max_length=MAX_LENGTH,
                      max_prompt_length=MAX_PROMPT_LENGTH, dataset_num_proc=spec["num_proc"], progress_bar=False)
    t0, c0 = time.perf_counter(), cpu_now()
    store, summary = prepare_dataset(cfg, spec["data"], "train", tok)
    seconds, cpu = time.perf_counter() - t0, cpu_now() - c0
    p, c, r = store.lengths()
    return {"seconds": seconds, "cpu": cpu, "pairs": len(store), "tokens": int(p.sum() + c.sum() + r.sum()),
            "cache": summary["store"]["cache"], "store_mb": (Path(summary["store"]["path"]) / "pairs.arrow")
            .stat().st_size / 2**20}


def child_trl(spec: dict) -> dict:
    import datasets
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.pad_token = tok.eos_token
    model_dir = Path(spec["out"]) / "model"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=len(tok))).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    timing = {}
    inner = DPOTrainer._prepare_dataset

    def timed(self, *a, **k):
        t = time.perf_counter()
        out = inner(self, *a, **k)
        timing["prepare"] = time.perf_counter() - t
        return out

    DPOTrainer._prepare_dataset = timed
    t0, c0 = time.perf_counter(), cpu_now()
    ds = datasets.load_dataset("json", data_files=spec["data"], split="train")
    load = time.perf_counter() - t0
    args = DPOConfig(output_dir=spec["out"], max_length=MAX_LENGTH, dataset_num_proc=spec["num_proc"],
                     report_to="none", use_cpu=True, save_strategy="no")
    trainer = DPOTrainer(model=str(model_dir), args=args, train_dataset=ds, processing_class=tok)
    return {"seconds": load + timing["prepare"], "load_seconds": load, "pairs": len(trainer.train_dataset),
            "cpu": cpu_now() - c0}


def cpu_now() -> float:
    """CPU seconds of this process and of the worker processes it has reaped so far: the work done,
    whatever else the machine's cores were busy with."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_children(specs: list[dict], env: dict | None = None, timeout: float | None = None) -> list[dict]:
    """Start the children together; each result carries its own peak RSS (MiB) and CPU seconds
    (user + system, its worker processes included: ``wait4`` counts the children it reaped).

    Their output goes to files, not pipes: TRL's progress bars write far more than a pipe holds, and
    a child blocked on a full pipe that nobody reads until it exits never exits (what looked like
    TRL hanging at 10k pairs). A child still running after ``timeout`` seconds is killed and its
    result says how far it got (``done``, from its last progress line) instead of failing the run."""
    procs = []
    for spec in specs:
        log = tempfile.NamedTemporaryFile("w+", prefix="bench-child-", suffix=".log", delete=False)
        procs.append((subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=log,
                                       stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
                                       start_new_session=True), log, time.monotonic()))
    results = []
    for proc, log, started in procs:
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if timeout is not None and time.monotonic() - started > timeout:
                os.killpg(proc.pid, 9)  # the child and its workers
                timed_out = True
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
        log.seek(0)
        out = log.read()
        log.close()
        os.unlink(log.name)
        proc.returncode = os.waitstatus_to_exitcode(status)
        measured = {"rss_mb": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime,
                    "wall_s": time.monotonic() - started}
        if timed_out:
            results.append({"timed_out": True, "done": last_progress(out), **measured})
            continue
        line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"child failed ({proc.returncode}):\n{out[-6000:]}")
        results.append({**json.loads(line[len("RESULT "):]), **measured})
    return results


def pairs_in_stream(path: Path) -> int:
    """Pairs in the complete record batches of a (possibly half-written) Arrow stream."""
    import pyarrow as pa

    n = 0
    with pa.memory_map(str(path), "r") as fh:
        try:
            reader = pa.ipc.open_stream(fh)
            while True:
                n += reader.read_next_batch().num_rows
        except (StopIteration, pa.ArrowInvalid, OSError):
            pass
    return n


def last_progress(log: str) -> tuple[int, int] | None:
    """(examples done, total) of the last progress line of TRL's tokenizing pass, if any."""
    import re

    hits = re.findall(r"Tokenizing[^\r\n|]*\|[^|]*\|\s*(\d+)/(\d+)", log)
    return (int(hits[-1][0]), int(hits[-1][1])) if hits else None


# ------------------------------------------------------------------------------------------------
# Main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--trl_sizes", default="10000,100000")
    ap.add_argument("--two_proc_sizes", default="10000,100000", help="Sizes at which two processes race.")
    ap.add_argument("--num_proc", type=int, default=2, help="dataset_num_proc for both systems.")
    ap.add_argument("--only", choices=("prefopt", "trl"), default=None,
                    help="Measure one side only (two runs side by side; --rows merges their rows by size).")
    ap.add_argument("--prefopt_timeout", type=float, default=None,
                    help="Stop prefopt's first preparation after this many seconds and record how many pairs it "
                    "had written and its peak RSS so far (a partial row; no cache hit is then measured).")
    ap.add_argument("--trl_timeout", type=float, default=None,
                    help="Stop TRL after this many seconds and record how far it got (a partial row).")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--workdir", default=None, help="Where the data and stores go (default: a temporary dir).")
    ap.add_argument("--rows", default=None, help="Render (and write) the table from JSON-lines files of rows "
                    "this script printed (comma-separated; rows of one size are merged), instead of measuring.")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))))
        return
    if args.rows:
        rows, metas = {}, []
        for name in args.rows.split(","):
            for line in Path(name).read_text().splitlines():
                if line.startswith("{"):
                    row = json.loads(line)  # a later print of a size completes an earlier one
                    rows[row["pairs_in"]] = {**rows.get(row["pairs_in"], {}), **row}
                elif line.startswith("META "):
                    metas.append(json.loads(line[len("META "):]))
        meta = {"started": min((m["started"] for m in metas), default="?"),
                "commands": list(dict.fromkeys(m["command"] for m in metas if "command" in m)),
                "load_before": max((m["load_before"] for m in metas), default=(0, 0, 0)),
                "load_after": max((m["load_after"] for m in metas if "load_after" in m), default=os.getloadavg())}
        report = render(sorted(rows.values(), key=lambda r: r["pairs_in"]), args, meta["started"],
                        meta["load_before"], meta["load_after"], meta["commands"])
        write_section(Path(args.output), report)
        print(report)
        return
    sizes = [2000] if args.quick else [int(x) for x in args.sizes.split(",")]
    trl_sizes = set(sizes if args.quick else [int(x) for x in args.trl_sizes.split(",") if x])
    two_proc_sizes = set(sizes if args.quick else [int(x) for x in args.two_proc_sizes.split(",") if x])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    load_before = os.getloadavg()
    command = " ".join(sys.argv[1:])
    print("META " + json.dumps({"started": started, "load_before": load_before, "command": command}), flush=True)
    rows = []
    for n in sizes:
        data = work / f"pairs-{n}.jsonl"
        if not data.exists():
            write_pairs(data, n)
        base = {"data": str(data), "num_proc": args.num_proc}
        row = {"pairs_in": n}
        if args.only != "trl":
            baseline = run_children([{**base, "system": "baseline"}])[0]
            first = run_children([{**base, "system": "prefopt", "cache": str(work / f"cache-{n}")}],
                                 timeout=args.prefopt_timeout)[0]
            if first.get("timed_out"):  # how far the build got: the complete batches of its partial file
                done = sum(pairs_in_stream(f) for f in (work / f"cache-{n}").glob(".tmp-*/pairs.arrow"))
                row.update(first_stopped_s=first["wall_s"], first_done=done, first_rss=first["rss_mb"],
                           baseline_rss=baseline["rss_mb"])
                print(json.dumps(row), flush=True)
                rows.append(row)
                continue
            hit = run_children([{**base, "system": "prefopt", "cache": str(work / f"cache-{n}")}])[0]
            row.update(pairs=first["pairs"], tokens=first["tokens"], store_mb=first["store_mb"],
                       first_s=first["seconds"], first_cpu=first["cpu"], first_rss=first["rss_mb"],
                       hit_s=hit["seconds"], hit_rss=hit["rss_mb"], baseline_rss=baseline["rss_mb"])
            if n in two_proc_sizes:
                pair = run_children([{**base, "system": "prefopt", "cache": str(work / f"cache2-{n}"),
                                      "ready": str(work / f"ready-{n}")} for _ in range(2)])
                row["builder_rss"] = next(r for r in pair if r["cache"] == "built")["rss_mb"]
                row["waiter_rss"] = next(r for r in pair if r["cache"] == "hit")["rss_mb"]
            print(json.dumps(row), flush=True)
        if n in trl_sizes and args.only != "prefopt":
            # Both sides run with the environment they were given (TOKENIZERS_PARALLELISM unset): the
            # fast tokenizer then turns its own threads off in the workers datasets.map forks.
            env = {"HF_DATASETS_CACHE": str(work / f"hf-{n}")}
            trl = run_children([{**base, "system": "trl", "out": str(work / f"trl-{n}")}], env=env,
                               timeout=args.trl_timeout)[0]
            if trl.get("timed_out"):
                row.update(trl_timed_out=trl["wall_s"], trl_done=trl["done"], trl_rss=trl["rss_mb"])
            else:
                row.update(trl_s=trl["seconds"], trl_load_s=trl["load_seconds"], trl_rss=trl["rss_mb"],
                           trl_pairs=trl["pairs"], trl_cpu=trl["cpu"])
            print(json.dumps(row), flush=True)
        rows.append(row)
        print("META " + json.dumps({"started": started, "load_before": load_before, "load_after": os.getloadavg(),
                                    "command": command}), flush=True)
        report = render(rows, args, started, load_before, os.getloadavg())
        if not args.quick and args.only is None:  # after every size: a long run that is stopped keeps its rows
            write_section(Path(args.output), report)
    print(report)
    if not args.quick and args.only is None:
        print(f"wrote {args.output}")


def render(rows, args, started, load_before, load_after, commands=None) -> str:
    import tokenizers
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    cmd = "`, `".join(f"python benchmarks/bench_data.py {c}" for c in commands) if commands else (
        f"python benchmarks/bench_data.py --sizes {args.sizes} --trl_sizes {args.trl_sizes} "
        f"--two_proc_sizes {args.two_proc_sizes} --num_proc {args.num_proc}")
    lines = [
        MARK,
        "",
        "## Data preparation: the tokenized-pair store vs TRL (`benchmarks/bench_data.py`)",
        "",
        f"Command{'s' if commands and len(commands) > 1 else ''}: `{cmd}`, run {started} UTC. Machine: {platform.machine()}, {os.cpu_count()} CPU cores, shared with "
        f"other jobs (load average {load_before[0]:.1f} before, {load_after[0]:.1f} after); transformers "
        f"{transformers.__version__}, tokenizers {tokenizers.__version__}, TRL {trl_version}. Synthetic TL;DR-shaped "
        f"explicit pairs (JSONL), GPT-2 tokenizer, max_length {MAX_LENGTH}, max_prompt_length {MAX_PROMPT_LENGTH}, "
        f"dataset_num_proc {args.num_proc} on both sides; every number from its own fresh process (see the "
        "script's docstring). RSS in MiB; \"adds\" = peak RSS minus the baseline process (imports + tokenizer).",
        "",
        "| pairs | tokens (M) | store MiB | first prep s | CPU s | pairs/s | pairs/CPU-s | peak RSS | adds | "
        "cache hit s | hit RSS | 2 procs: builder / waiter RSS | waiter adds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "first_stopped_s" in r:
            lines.append(f"| {r['pairs_in']:,} | stopped after {r['first_stopped_s']:.0f} s: {r['first_done']:,} pairs "
                         f"written ({r['first_done'] / r['pairs_in']:.0%}, {r['first_done'] / r['first_stopped_s']:,.0f}"
                         f" pairs/s) | | | | | | {r['first_rss']:.0f} | {r['first_rss'] - r['baseline_rss']:.0f} | - | - "
                         "| - | - |")
        if "first_s" not in r:
            continue
        lines.append(
            f"| {r['pairs_in']:,} | {r['tokens'] / 1e6:.1f} | {r['store_mb']:.0f} | {r['first_s']:.1f} | "
            f"{r['first_cpu']:.1f} | {r['pairs'] / r['first_s']:,.0f} | {r['pairs'] / r['first_cpu']:,.0f} | "
            f"{r['first_rss']:.0f} | {r['first_rss'] - r['baseline_rss']:.0f} | {r['hit_s']:.2f} | {r['hit_rss']:.0f} | "
            + (f"{r['builder_rss']:.0f} / {r['waiter_rss']:.0f} | {r['waiter_rss'] - r['baseline_rss']:.0f} |"
               if "waiter_rss" in r else "- | - |"))
    lines += ["", "TRL's `DPOTrainer` on the same files (load + `_prepare_dataset`), and prefopt's first preparation "
              "against it: throughput per second of wall time and per CPU second (the CPU ratio does not depend "
              "on what else the machine was running).", "",
              "| pairs | TRL s (load + prepare) | CPU s | pairs/s | pairs/CPU-s | peak RSS | prefopt x TRL (wall) | "
              "prefopt x TRL (CPU) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("trl_s"):
            trl, cpu = r["trl_pairs"] / r["trl_s"], r["trl_pairs"] / r["trl_cpu"]
            mine = (f"{r['pairs'] / r['first_s'] / trl:.2f} | {r['pairs'] / r['first_cpu'] / cpu:.2f} |"
                    if "first_s" in r else "- | - |")
            lines.append(f"| {r['pairs_in']:,} | {r['trl_s']:.1f} ({r['trl_load_s']:.1f} + "
                         f"{r['trl_s'] - r['trl_load_s']:.1f}) | {r['trl_cpu']:.1f} | {trl:,.0f} | {cpu:,.0f} | "
                         f"{r['trl_rss']:.0f} | " + mine)
        elif r.get("trl_timed_out"):
            done = r.get("trl_done")
            lines.append(f"| {r['pairs_in']:,} | stopped after {r['trl_timed_out']:.0f} s (--trl_timeout): "
                         + (f"tokenized {done[0]:,} of {done[1]:,} ({done[0] / done[1]:.0%})" if done else
                            "tokenizing had not started") + " | - | - | - | - | - | - |")
    lines += ["", "Targets:", ""]
    by = {r["pairs_in"]: r for r in rows}
    for r in rows:
        if r.get("trl_s") and "first_s" in r:
            ratio = (r["pairs"] / r["first_s"]) / (r["trl_pairs"] / r["trl_s"])
            ratio_cpu = (r["pairs"] / r["first_cpu"]) / (r["trl_pairs"] / r["trl_cpu"])
            lines.append(f"- {r['pairs_in']:,} pairs: first preparation {ratio:.2f}x TRL's throughput in wall time, "
                         f"{ratio_cpu:.2f}x per CPU second (target >= 2): "
                         f"{'met' if min(ratio, ratio_cpu) >= 2 else 'NOT met'}")
        if "waiter_rss" in r:
            adds = r["waiter_rss"] - r["baseline_rss"]
            lines.append(f"- {r['pairs_in']:,} pairs: the second process adds {adds:.0f} MiB "
                         f"(target < 300): {'met' if adds < 300 else 'NOT met'}")
    if "first_s" in by.get(1000000, {}):
        r = by[1000000]
        lines.append(f"- 1M pairs: cache hit {r['hit_s']:.2f} s (target < 5): {'met' if r['hit_s'] < 5 else 'NOT met'}")
        lines.append(f"- 1M pairs: peak RSS {r['first_rss']:.0f} MiB (target < 2048): "
                     f"{'met' if r['first_rss'] < 2048 else 'NOT met'}")
        if "first_rss" in by.get(100000, {}):
            ratio = r["first_rss"] / by[100000]["first_rss"]
            lines.append(f"- peak RSS 1M / 100k: {ratio:.2f} (target <= 1.2): {'met' if ratio <= 1.2 else 'NOT met'}")
    elif "first_stopped_s" in by.get(1000000, {}):
        r = by[1000000]
        lines.append(f"- 1M pairs: the first preparation was stopped after {r['first_stopped_s']:.0f} s with "
                     f"{r['first_done']:,} pairs written, so no cache hit at 1M was measured; peak RSS until then "
                     f"{r['first_rss']:.0f} MiB (target < 2048)"
                     + (f", {r['first_rss'] / by[100000]['first_rss']:.2f}x the whole 100k build's (target <= 1.2)"
                        if "first_rss" in by.get(100000, {}) else ""))
    else:
        lines.append("- 1M pairs: not measured in this run (see the notes)")
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"


NOTES = """Notes:

- Absolute times depend on the machine's load (the load averages above: the machine is shared, and
  a load above 2 means the two cores were oversubscribed). CPU seconds (user + system of the
  process and of the worker processes it reaped) measure the work done whatever else ran, so the
  per-CPU-second ratio to TRL is the one to compare across runs; the wall-time ratio holds for runs
  made under the same load.
- Preparation is bound by the fast tokenizer: the Rust `encode_batch` is ~90% of prefopt's CPU time
  in a profile, at roughly 250-300k GPT-2 tokens per CPU second on this machine's cores for
  TL;DR text. prefopt tokenizes each distinct text of a chunk once, straight through the Rust
  tokenizer; TRL tokenizes every prompt three times (alone and with each response), one example at
  a time through `transformers`.
- Peak RSS is the main process's. With `dataset_num_proc` 2 both systems tokenize in worker
  processes whose memory is not in that figure; prefopt's workers hold one chunk of 1,000 rows each.
  It counts the pages of the mapped store the process touched: since store version 2 (record batches
  of 4,096 pairs, lengths in their own file read with plain reads) a hit touches little of it, so
  peak RSS is nearly flat from 100k to 1M pairs (version 1 mapped ~280 MiB more at 1M: docs/data.md).
- "2 procs": two processes start preparing the same file on an empty cache at the same instant (what
  the ranks of a 2-process run do): one builds, the other waits on the file lock and maps the
  finished store; "waiter adds" is its peak over the baseline process.
- A cache hit above 64 MiB reads neither the data file (its digest is remembered by path, size, mtime
  and inode) nor the store (its checksum is skipped while its mtime is the one recorded at the build);
  below that both are hashed, which is what the 10k hit time includes.
- TRL's children write their output to a file: an earlier version of this script read their stderr
  through a pipe only after they exited, and TRL's progress bars filled the pipe at 10k pairs, so
  the child blocked for good (what was reported as TRL hanging at 10k, with and without workers)."""


def write_section(path: Path, report: str) -> None:
    """Replace this script's section of docs/benchmarks.md (or append it), keeping the rest."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    keep = text.split(MARK)[0].rstrip("\n")
    path.write_text((keep + "\n\n" if keep else "") + report, encoding="utf-8")


if __name__ == "__main__":
    main()
