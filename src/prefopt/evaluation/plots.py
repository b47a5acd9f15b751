"""Plots: training curves from ``metrics.jsonl`` and the reward–KL frontier. Matplotlib with the
Agg backend (files only, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefopt.errors import PrefoptError
from prefopt.io import atomic_path
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


def save_figure(fig, path: Path, dpi: int) -> None:
    """Written beside ``path`` and renamed (a full disk leaves the earlier image whole), then closed."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    finally:
        pyplot().close(fig)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported here: heavy, and the backend must be
    chosen before pyplot is first imported)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scorer_label(scorer: str | None) -> str:
    """A short name for a scorer, short enough for an axis: ``pkg.mod:function`` -> ``function``,
    a reward-model directory -> ``reward (RM NAME)``."""
    if not scorer:
        return "reward"
    scorer = str(scorer)
    if ":" in scorer and not Path(scorer).exists():
        return scorer.rpartition(":")[2]
    return f"reward (RM {Path(scorer).name})"


def reward_axis_label(entries: list[dict[str, Any]]) -> str:
    """The frontier's y-axis: the mean score of samples under the scorer the entries name."""
    scorers = {e.get("scorer") for e in entries if e.get("scorer")}
    if len(scorers) == 1:
        return f"mean {scorer_label(scorers.pop())} of samples"
    return "mean reward of samples" + (" (several scorers!)" if len(scorers) > 1 else "")


def place_labels(ax, points: list[tuple[float, float]], labels: list[str], colors: list[Any], *,
                 fontsize: float = 7, avoid: list[tuple[float, float]] = (),
                 lines: list[list[tuple[float, float]]] = ()) -> list:
    """Annotate ``points`` with ``labels`` so that no label overlaps another, covers a marker or
    crosses a curve (``lines``, polylines in data coordinates): each label tries offsets around
    its point, nearest first, and takes the first free place (a thin leader line joins a label set
    further out to its point). Greedy and deterministic; reusable for any labelled scatter."""
    import numpy as np

    fig = ax.figure
    fig.canvas.draw()  # the transforms and the renderer must reflect the final layout
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    marker_px = [to_px(p) for p in [*points, *avoid]]
    line_px = []  # points every ~3 px along each curve
    for line in lines:
        xy = to_px(np.asarray(line, dtype=float).reshape(-1, 2)) if len(line) else []
        for a, b in zip(xy[:-1], xy[1:]):
            n = max(2, int(np.hypot(*(b - a)) / 3))
            line_px += [a + (b - a) * t for t in np.linspace(0, 1, n)]
    taken = []  # bboxes (display px) of labels placed so far
    texts = []
    directions = [(1, -1), (1, 1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
    # Points in the densest region first, so they get the closest places.
    order = sorted(range(len(points)), key=lambda i: -sum(
        1 for q in marker_px if abs(q[0] - marker_px[i][0]) < 60 and abs(q[1] - marker_px[i][1]) < 30))
    for i in order:
        (x, y), label, color = points[i], labels[i], colors[i]
        if not label:
            continue
        placed = None
        for dist in (6, 12, 20, 30, 42, 56, 72, 90):
            for dx, dy in directions:
                offset = (dx * dist, dy * dist)
                ha = "left" if dx > 0 else "right" if dx < 0 else "center"
                va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
                text = ax.annotate(label, (x, y), textcoords="offset points", xytext=offset, fontsize=fontsize,
                                   color=color, ha=ha, va=va,
                                   arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5, "alpha": 0.6}
                                   if dist > 12 else None)
                box = _text_box(text, renderer).expanded(1.05, 1.15)
                inside = ax.get_window_extent(renderer)
                clash = any(box.overlaps(t) for t in taken) or any(
                    _near_box(box, px, py, 4) for px, py in marker_px) or any(
                    _near_box(box, px, py, 1) for px, py in line_px) or not (
                    inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1)
                if not clash:
                    placed = text
                    taken.append(box)
                    break
                text.remove()
            if placed is not None:
                break
        if placed is None:  # no free place: the nearest one, still readable
            placed = ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, -6), fontsize=fontsize,
                                 color=color, ha="left", va="top")
            taken.append(_text_box(placed, renderer))
        texts.append(placed)
    return texts


def _text_box(annotation, renderer):
    """The display box of an annotation's text alone (its leader line left out)."""
    from matplotlib.text import Text

    annotation.update_positions(renderer)
    return Text.get_window_extent(annotation, renderer)


def _near_box(box, px: float, py: float, pad: float) -> bool:
    return box.x0 - pad <= px <= box.x1 + pad and box.y0 - pad <= py <= box.y1 + pad


def legend_outside(ax, **kwargs):
    """The legend to the right of the axes, never over the data."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False, **kwargs)


def plot_frontier(entries: list[dict[str, Any]], path: str | Path, *, title: str = "Reward vs KL",
                  reward_label: str | None = None) -> Path:
    """Reward against KL, one curve per ``method`` (points sorted by KL, labelled with beta and
    alpha), the reference (``method`` ``sft`` or ``ref``, or any entry with KL 0) as a black star;
    the legend outside the axes, labels placed where they overlap nothing, the y-axis named after
    the entries' ``scorer`` (or ``reward_label``)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 5.2))
    refs = [e for e in entries if e.get("method") in ("sft", "ref")]
    by_method: dict[str, list[dict]] = {}
    for e in entries:
        if e not in refs:
            by_method.setdefault(str(e.get("method") or e.get("name") or "model"), []).append(e)
    cmap = plt.get_cmap("tab10")
    points, labels, colors, curves = [], [], [], []
    for i, (method, pts) in enumerate(by_method.items()):
        pts = sorted(pts, key=lambda e: e["kl"])
        color = METHOD_COLORS.get(method, cmap(i % 10))
        # An alpha shared by the whole curve goes in the legend, not on every point.
        alphas = {p.get("alpha") for p in pts}
        shared_alpha = alphas.pop() if len(alphas) == 1 else None
        legend = METHOD_LABELS.get(method, method.upper()) + (
            f" (α={shared_alpha:g})" if shared_alpha is not None else "")
        ax.plot([p["kl"] for p in pts], [p["reward"] for p in pts], METHOD_STYLES.get(method, "o-"),
                color=color, label=legend, markersize=6 if method not in METHOD_STYLES else 7)
        if any("reward_std" in p or "kl_std" in p for p in pts):  # a spread over seeds
            ax.errorbar([p["kl"] for p in pts], [p["reward"] for p in pts],
                        xerr=[p.get("kl_std", 0.0) for p in pts], yerr=[p.get("reward_std", 0.0) for p in pts],
                        fmt="none", ecolor=color, capsize=3)
        curves.append([(p["kl"], p["reward"]) for p in pts])
        for p in pts:
            points.append((p["kl"], p["reward"]))
            labels.append(_point_label(p, with_alpha=shared_alpha is None))
            colors.append(color)
    for r in refs:
        ax.plot([r.get("kl", 0.0)], [r["reward"]], "k*", markersize=13,
                label=f"{str(r.get('name', 'reference')).upper()} (reference, KL 0)")
    ax.margins(x=0.12, y=0.12)  # room for the point labels
    ax.set_xlabel("sequence KL(policy || reference)  [nats]")
    ax.set_ylabel(reward_label or reward_axis_label(entries))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    legend_outside(ax, fontsize=8)
    fig.tight_layout()
    place_labels(ax, points, labels, colors, avoid=[(r.get("kl", 0.0), r["reward"]) for r in refs], lines=curves)
    path = Path(path)
    save_figure(fig, path, dpi=120)
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


def run_groups(names: list[str]) -> dict[str, list[str]]:
    """Runs grouped by what they vary in: the name less its ``_beta...`` part (``odpo_beta0.5_alpha0.5``
    -> ``odpo``); a name without one is its own group."""
    import re

    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(re.sub(r"_beta[0-9.]+.*$", "", name), []).append(name)
    return groups


def plot_training_curves(runs: dict[str, str | Path], path: str | Path, *, max_runs_per_panel: int = 6) -> Path:
    """Three panels from each run's ``metrics.jsonl``: loss, implicit rewards (chosen solid,
    rejected dashed) and reward accuracy (reward models: accuracy); held-out (``eval/``) values as
    square markers. Up to ``max_runs_per_panel`` runs share one row; more are split into small
    multiples, one row per group of runs (``run_groups``), so every line in a row has a colour of
    its own. Legends sit outside the panels and explain every line style and marker."""
    from matplotlib.lines import Line2D

    plt = pyplot()
    names = list(runs)
    groups = {"": names} if len(names) <= max_runs_per_panel else run_groups(names)
    # A group still too big for distinct colours is cut into rows of max_runs_per_panel.
    rows: list[tuple[str, list[str]]] = []
    for group, members in groups.items():
        for k in range(0, len(members), max_runs_per_panel):
            rows.append((group, members[k : k + max_runs_per_panel]))
    fig, axes = plt.subplots(len(rows), 3, figsize=(15, 3.4 * len(rows) + 0.6), squeeze=False)
    cmap = plt.get_cmap("tab10")
    any_eval = False
    for r, (group, members) in enumerate(rows):
        ax_loss, ax_reward, ax_acc = axes[r]
        for i, name in enumerate(members):
            rows_ = read_metrics(runs[name])
            color = cmap(i % 10)
            train = [m for m in rows_ if "loss" in m]
            evals = [m for m in rows_ if "eval/loss" in m]
            steps = [m["step"] for m in train]
            acc_key = "rewards/accuracies" if any("rewards/accuracies" in m for m in train) else "accuracy"
            short = name[len(group) + 1:] if group and name.startswith(group + "_") else name
            _line(ax_loss, steps, [m.get("loss") for m in train], color=color, label=short or name)
            _line(ax_reward, steps, [m.get("rewards/chosen") for m in train], color=color)
            _line(ax_reward, steps, [m.get("rewards/rejected") for m in train], color=color, linestyle="--")
            _line(ax_acc, steps, [m.get(acc_key) for m in train], color=color)
            if evals:
                any_eval = True
                es = [m["step"] for m in evals]
                _line(ax_loss, es, [m.get("eval/loss") for m in evals], color=color, marker="s", linestyle="none",
                      markeredgecolor="black", markeredgewidth=0.5)
                _line(ax_acc, es, [m.get(f"eval/{acc_key}") for m in evals], color=color, marker="s",
                      linestyle="none", markeredgecolor="black", markeredgewidth=0.5)
        for ax, title in zip(axes[r], ("loss", "rewards (chosen, rejected)", "reward accuracy")):
            ax.set_title(f"{group}: {title}" if group else title, fontsize=10)
            ax.grid(alpha=0.3)
            if r == len(rows) - 1:
                ax.set_xlabel("optimizer step")
        ax_acc.set_ylim(0, 1.02)
        handles, _ = ax_loss.get_legend_handles_labels()
        style = [Line2D([], [], color="gray", label="chosen (solid)"),
                 Line2D([], [], color="gray", linestyle="--", label="rejected (dashed)")]
        if any_eval:
            style.append(Line2D([], [], color="gray", marker="s", linestyle="none", markeredgecolor="black",
                                label="held-out eval (eval/ rows)"))
        legend_outside(ax_acc, handles=handles + style, fontsize=7,
                       title=(f"{group} runs" if group else "runs"), title_fontsize=8)
    fig.tight_layout()
    path = Path(path)
    save_figure(fig, path, dpi=100)
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
    save_figure(fig, path, dpi=110)
    return path


def _line(ax, xs, ys, **kwargs) -> None:
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if len(pts) < 3 and "marker" not in kwargs:  # one or two logged rows: a line alone could be invisible
        kwargs.update(marker="o", markersize=3)
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
            entries += [{"scorer": data.get("scorer"), **r} for r in data["runs"] if "reward" in r and "kl" in r]
        elif isinstance(data, dict) and "reward" in data and "kl" in data:
            entries.append({"name": data.get("name") or Path(path).stem, "method": data.get("method"),
                            "beta": data.get("beta"), "alpha": data.get("alpha"), "reward": data["reward"],
                            "kl": data["kl"], "scorer": data.get("scorer")})
            if "reward_ref" in data:
                refs.setdefault((data.get("ref"),), {"name": "ref", "method": "ref", "kl": 0.0,
                                                     "reward": data["reward_ref"], "scorer": data.get("scorer")})
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
