"""The model card: ``README.md`` next to a trained model (and a merged adapter), with the Hugging
Face metadata the Hub reads from its YAML front matter (``base_model``, ``library_name``, ``tags``,
``datasets``) and what a reader needs to trust or redo the run: the loss and its parameters, the
data, the steps, the final metrics, the command, the training curves."""

from __future__ import annotations

import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from prefopt.io import simulate_full_disk, write_text_atomic

# A Hub repository id: `owner/name` (or a bare canonical name), nothing that looks like a file.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow", ".yaml", ".yml")


def hub_id(name: str | None) -> str | None:
    """``name`` when it looks like a Hub id and is not a local path, else None (the Hub rejects a
    card whose ``base_model``/``datasets`` are not ids)."""
    if not isinstance(name, str) or not name or not _HUB_ID.match(name) or "/" not in name:
        return None
    if name.lower().endswith(_FILE_SUFFIXES) or Path(name).expanduser().exists():
        return None
    return name


def card_metadata(cfg, *, kind: str = "policy", merged: bool = False) -> dict[str, Any]:
    """The YAML front matter. A LoRA run's own directory holds the adapter (``library_name: peft``,
    as the Hub expects for adapters); its ``merged`` copy is a plain transformers model."""
    losses = [s.strip() for s in str(cfg.loss_type).split(",") if s.strip()]
    if kind == "reward model":
        tags = ["prefopt", "reward-model", "bradley-terry"]
    else:
        tags = ["prefopt", "dpo", *[t for t in losses if t != "dpo"]]
        if getattr(cfg, "use_offset", False) and "odpo" not in tags:
            tags.append("odpo")
        if getattr(cfg, "use_peft", False):
            tags.append("lora")
    adapter = getattr(cfg, "use_peft", False) and not merged
    meta: dict[str, Any] = {"library_name": "peft" if adapter else "transformers"}
    base = hub_id(cfg.model_name_or_path)
    if base:
        meta["base_model"] = base
    meta["tags"] = list(dict.fromkeys(tags))
    datasets = [d for d in (hub_id(cfg.dataset), hub_id(cfg.eval_dataset)) if d]
    if datasets:
        meta["datasets"] = list(dict.fromkeys(datasets))
    if kind == "reward model":
        meta["pipeline_tag"] = "text-classification"
    return meta


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else "n/a"
    return str(value)


def reproduce_command(cfg, *, kind: str = "policy") -> str:
    command = "prefopt reward train" if kind == "reward model" else "prefopt train"
    return f"{command} --config config.yaml --output_dir NEW_OUTPUT_DIR"


def launched_command() -> str | None:
    """The command line this process was started with, when it was the ``prefopt`` CLI."""
    if sys.argv and Path(sys.argv[0]).name in ("prefopt", "__main__.py") and len(sys.argv) > 1:
        return " ".join(["prefopt", *sys.argv[1:]])
    return None


def model_card(cfg, *, final: dict[str, Any], steps: int, summaries: dict[str, Any], kind: str = "policy",
               plot: str | None = "training_curves.png", command: str | None = None, merged: bool = False) -> str:
    """The card's text (front matter + Markdown)."""
    meta = card_metadata(cfg, kind=kind, merged=merged)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", ""]
    base = cfg.model_name_or_path or "a model given as a Python object"
    if kind == "reward model":
        lines += ["# Reward model trained with prefopt", "",
                  f"A Bradley–Terry reward model fine-tuned from `{base}` with prefopt `reward train`. "
                  "Load it with "
                  "`AutoModelForSequenceClassification.from_pretrained`; the score is read at the last real token.", ""]
    else:
        what = ("a LoRA adapter; load it with `peft.PeftModel.from_pretrained(base, this_dir)` (the merged "
                "model is in `merged/`)" if meta["library_name"] == "peft" else
                "load it with `AutoModelForCausalLM.from_pretrained`" + (
                    " (the LoRA adapter merged into its base)" if merged else ""))
        lines += [f"# Policy trained with prefopt ({cfg.loss_type})", "",
                  f"Fine-tuned from `{base}` on preference pairs with prefopt `train`: {what}.", ""]
    lines += ["## Training", "", "| setting | value |", "| --- | --- |"]
    settings: list[tuple[str, Any]] = [("loss_type", cfg.loss_type)]
    if kind != "reward model":
        settings.append(("beta", cfg.beta))
        offset = "odpo" in str(cfg.loss_type) or getattr(cfg, "use_offset", False)
        if offset:
            settings += [("alpha", cfg.alpha), ("offset_scaling", cfg.offset_scaling)]
        settings.append(("reference", cfg.ref_model_name_or_path or ("the base model, adapter off" if cfg.use_peft
                                                                        else "the initial policy")))
    else:
        settings.append(("margin_from_scores", cfg.margin_from_scores))
    settings += [("learning_rate", cfg.learning_rate), ("lr_scheduler_type", cfg.lr_scheduler_type),
                 ("optimizer steps", steps),
                 ("pairs per step", cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps),
                 ("max_length", cfg.max_length), ("seed", cfg.seed)]
    if cfg.use_peft:
        settings += [("LoRA r / alpha", f"{cfg.lora_r} / {cfg.lora_alpha}")]
    lines += [f"| {k} | {v:g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in settings]
    lines += ["", "## Data", ""]
    for role in ("train", "eval"):
        s = summaries.get(role)
        if not isinstance(s, dict):
            continue
        kept = (s.get("tokenization") or {}).get("pairs_kept", s.get("pairs_after_scores"))
        text = f"- {role}: `{s.get('source')}` ({s.get('format')}), {s.get('rows_read')} rows, {kept} pairs used"
        if s.get("evaluated_pairs") is not None:
            text += f"; evaluated on a seeded subset of {s['evaluated_pairs']} (eval_max_pairs)"
        lines.append(text)
    lines += ["", "Full counts (dropped and truncated rows and why) are in `data_summary.json` of the run.", ""]
    lines += ["## Final metrics", "", "| metric | train (last logged window) | eval |", "| --- | --- | --- |"]
    names = sorted({k for k in final if not k.startswith("eval/")} | {k[5:] for k in final if k.startswith("eval/")})
    skip = {"step", "epoch", "learning_rate", "tokens_per_second", "pairs_per_second", "skipped_steps", "runtime",
            "pairs"}
    for name in names:
        if name in skip:
            continue
        train_v, eval_v = final.get(name), final.get(f"eval/{name}")
        lines.append(f"| {name} | {_number(train_v) if train_v is not None else ''} | "
                     f"{_number(eval_v) if eval_v is not None else ''} |")
    lines += ["", "## Reproduce", "", "```bash", reproduce_command(cfg, kind=kind), "```", "",
              "`config.yaml` is the run's resolved configuration (every key, defaults included)."]
    if command:
        lines += ["", "The run was started with:", "", "```bash", command, "```"]
    if plot:
        lines += ["", "## Training curves", "", f"![training curves]({plot})"]
    return "\n".join(lines) + "\n"


def write_model_card(directory: str | Path, cfg, *, final: dict[str, Any], steps: int, summaries: dict[str, Any],
                     kind: str = "policy", metrics_path: str | Path | None = None,
                     copies: list[str | Path] = ()) -> Path:
    """``README.md`` (and ``training_curves.png`` from ``metrics_path``) in ``directory``, and the
    same two files in each of ``copies`` (a merged model's directory)."""
    directory = Path(directory)
    simulate_full_disk("card")
    plot = None
    metrics_path = Path(metrics_path) if metrics_path else directory / "metrics.jsonl"
    if metrics_path.is_file() and metrics_path.stat().st_size:
        from prefopt.evaluation.plots import plot_training_curves

        name = getattr(cfg, "run_name", None) or directory.resolve().name
        plot_training_curves({name: metrics_path}, directory / "training_curves.png")
        plot = "training_curves.png"
    card = dict(final=final, steps=steps, summaries=summaries, kind=kind, plot=plot, command=launched_command())
    path = directory / "README.md"
    write_text_atomic(path, model_card(cfg, **card))
    for other in copies:
        other = Path(other)
        write_text_atomic(other / "README.md", model_card(cfg, merged=True, **card))
        if plot:
            shutil.copyfile(directory / plot, other / plot)
    return path


def read_card_metadata(path: str | Path) -> dict[str, Any]:
    """The front matter of a card (what the Hub reads)."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}
    return yaml.safe_load(text.split("---\n", 2)[1]) or {}

