"""Plots: training curves from ``metrics.jsonl`` and the reward–KL frontier. Matplotlib with the
Agg backend (files only, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefopt.errors import PrefoptError
from prefopt.training.metrics import read_metrics

# Fixed colours per method, so a method looks the same on every plot.
METHOD_COLORS = {"dpo": "tab:blue", "odpo": "tab:orange", "cdpo": "tab:green", "ipo": "tab:red",
                 "hinge": "tab:purple"}
# The demo's runs on noisy labels: their own colour, marker and legend text.
METHOD_COLORS.update({"dpo_noisy": "tab:cyan", "dpo_rm_filtered": "tab:olive", "odpo_rm": "tab:brown"})
METHOD_STYLES = {"dpo_noisy": "s--", "dpo_rm_filtered": "^--", "odpo_rm": "D--"}  # dashed: noisy labels
METHOD_LABELS = {"dpo_noisy": "DPO, noisy labels", "dpo_rm_filtered": "DPO, noisy labels the RM agrees with",
                 "odpo_rm": "ODPO, noisy labels + RM offsets"}
# `prefopt online` runs: filled diamonds, mean over seeds with error bars.
METHOD_COLORS.update({"online_dpo": "navy", "online_odpo": "darkred"})
METHOD_STYLES.update({"online_dpo": "D", "online_odpo": "D"})
METHOD_LABELS.update({"online_dpo": "online DPO (mean ± std over seeds)", "online_odpo": "online ODPO (mean ± std over seeds)"})


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported here: heavy, and the backend must be
    chosen before pyplot is first imported)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(entries: list[dict[str, Any]], path: str | Path, *, title: str = "Reward vs KL") -> Path:
    """Reward against KL, one curve per ``method`` (points sorted by KL, labelled with beta and
    alpha), the reference (``method`` ``sft`` or ``ref``, or any entry with KL 0) as a black star."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    refs = [e for e in entries if e.get("method") in ("sft", "ref")]
    by_method: dict[str, list[dict]] = {}
    for e in entries:
        if e not in refs:
            by_method.setdefault(str(e.get("method") or e.get("name") or "model"), []).append(e)
    for i, (method, points) in enumerate(by_method.items()):
        points = sorted(points, key=lambda e: e["kl"])
        color = METHOD_COLORS.get(method)
        # An alpha shared by the whole curve goes in the legend, not on every point.
        alphas = {p.get("alpha") for p in points}
        shared_alpha = alphas.pop() if len(alphas) == 1 else None
        legend = METHOD_LABELS.get(method, method.upper()) + (
            f" (α={shared_alpha:g})" if shared_alpha is not None else "")
        ax.plot([p["kl"] for p in points], [p["reward"] for p in points], METHOD_STYLES.get(method, "o-"),
                color=color, label=legend, markersize=6 if method not in METHOD_STYLES else 8)
        if any("reward_std" in p or "kl_std" in p for p in points):  # a spread over seeds
            ax.errorbar([p["kl"] for p in points], [p["reward"] for p in points],
                        xerr=[p.get("kl_std", 0.0) for p in points], yerr=[p.get("reward_std", 0.0) for p in points],
                        fmt="none", ecolor=color, capsize=3)
        for p in points:
            label = _point_label(p, with_alpha=shared_alpha is None)
            if label:
                # Alternate curves label below / above their points, so two close curves stay legible.
                ax.annotate(label, (p["kl"], p["reward"]), textcoords="offset points",
                            xytext=(4, -12) if i % 2 == 0 else (-6, 7), fontsize=7, color=color or "black")
    for r in refs:
        ax.plot([r.get("kl", 0.0)], [r["reward"]], "k*", markersize=13, label=str(r.get("name", "reference")).upper())
    ax.margins(x=0.15, y=0.1)  # room for the point labels
    ax.set_xlabel("sequence KL(policy || reference)  [nats]")
    ax.set_ylabel("mean ground-truth reward of samples")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _point_label(p: dict[str, Any], *, with_alpha: bool = True) -> str:
    parts = []
    if p.get("beta") is not None:
        parts.append(f"β={p['beta']:g}")
    if with_alpha and p.get("alpha") is not None:
        parts.append(f"α={p['alpha']:g}")
    if not parts and p.get("name"):
        parts.append(str(p["name"]))
    return " ".join(parts)


def plot_training_curves(runs: dict[str, str | Path], path: str | Path) -> Path:
    """Three panels from each run's ``metrics.jsonl``: loss, implicit rewards (chosen solid,
    rejected dashed) and reward accuracy; held-out (``eval/``) values as markers."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    for i, (name, metrics_path) in enumerate(runs.items()):
        rows = read_metrics(metrics_path)
        color = cmap(i % cmap.N)
        train = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "eval/loss" in r]
        steps = [r["step"] for r in train]
        _line(axes[0], steps, [r.get("loss") for r in train], color=color, label=name)
        _line(axes[1], steps, [r.get("rewards/chosen") for r in train], color=color, label=f"{name} chosen")
        _line(axes[1], steps, [r.get("rewards/rejected") for r in train], color=color, linestyle="--")
        _line(axes[2], steps, [r.get("rewards/accuracies") for r in train], color=color, label=name)
        if evals:
            es = [r["step"] for r in evals]
            axes[0].plot(es, [r["eval/loss"] for r in evals], "s", color=color)
            axes[2].plot(es, [r.get("eval/rewards/accuracies") for r in evals], "s", color=color)
    for ax, title in zip(axes, ("loss", "implicit reward (chosen —, rejected --)", "reward accuracy")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].set_ylim(0, 1.02)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_online(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """``prefopt online``'s rounds: the mean sample reward (with its standard deviation as a band)
    against the number of rounds trained, and against the KL to the initial policy."""
    plt = pyplot()
    points = [r for r in rows if "samples/reward_mean" in r]
    xs = [r["rounds_trained"] for r in points]
    mean = [r["samples/reward_mean"] for r in points]
    std = [r.get("samples/reward_std", 0.0) for r in points]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(xs, mean, "o-", color="tab:orange")
    axes[0].fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                         color="tab:orange", alpha=0.2)
    axes[0].set_xlabel("rounds trained")
    axes[0].set_ylabel("mean reward of the samples (± std)")
    axes[1].plot([r["samples/kl"] for r in points], mean, "o-", color="tab:orange")
    for r in points:
        axes[1].annotate(str(r["rounds_trained"]), (r["samples/kl"], r["samples/reward_mean"]),
                         textcoords="offset points", xytext=(4, -10), fontsize=7)
    axes[1].set_xlabel("KL to the initial policy")
    axes[1].set_ylabel("mean reward of the samples")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("online rounds: reward against round and against KL")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _line(ax, xs, ys, **kwargs) -> None:
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if pts:
        ax.plot([x for x, _ in pts], [y for _, y in pts], **kwargs)


def frontier_entries(paths: list[Path]) -> list[dict[str, Any]]:
    """Points for the frontier from eval JSON files: ``prefopt eval``'s ``eval_*.json`` (one model
    each, plus its reference) and the demo's ``report.json`` (a list of runs)."""
    entries: list[dict[str, Any]] = []
    refs: dict[tuple, dict] = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise PrefoptError(f"{path}: not a readable JSON file: {e}") from None
        if isinstance(data, dict) and isinstance(data.get("runs"), list):
            entries += [r for r in data["runs"] if "reward" in r and "kl" in r]
        elif isinstance(data, dict) and "reward" in data and "kl" in data:
            entries.append({"name": data.get("name") or Path(path).stem, "method": data.get("method"),
                            "beta": data.get("beta"), "alpha": data.get("alpha"), "reward": data["reward"],
                            "kl": data["kl"]})
            if "reward_ref" in data:
                refs.setdefault((data.get("ref"),), {"name": "ref", "method": "ref", "kl": 0.0,
                                                     "reward": data["reward_ref"]})
    return entries + list(refs.values())


def plot_directory(output_dir: str | Path) -> list[Path]:
    """``prefopt plot DIR``: ``training_curves.png`` from every ``metrics.jsonl`` under DIR,
    ``online.png`` (reward against round and KL) when DIR holds a ``prefopt online`` run, and
    ``frontier.png`` from every eval JSON under DIR. Returns the files written."""
    root = Path(output_dir)
    if not root.is_dir():
        raise PrefoptError(f"not a directory: {output_dir}")
    written = []
    metrics = sorted(root.rglob("metrics.jsonl"))
    if metrics:
        runs = {str(p.parent.relative_to(root)) if p.parent != root else root.name: p for p in metrics}
        written.append(plot_training_curves(runs, root / "training_curves.png"))
        top = root / "metrics.jsonl"
        online_rows = [r for r in read_metrics(top) if "samples/reward_mean" in r] if top.is_file() else []
        if online_rows:  # a `prefopt online` run
            written.append(plot_online(online_rows, root / "online.png"))
    evals = sorted(p for p in root.rglob("*.json") if p.name.startswith("eval_") or p.name == "report.json")
    entries = frontier_entries(evals)
    if entries:
        written.append(plot_frontier(entries, root / "frontier.png"))
    if not written:
        raise PrefoptError(f"{output_dir}: found no metrics.jsonl and no eval_*.json or report.json to plot")
    return written
