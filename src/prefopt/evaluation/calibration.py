"""Preference accuracy and calibration of ``p = sigmoid(r_w - r_l)`` (pure NumPy, plus one plot).

A reward model claims ``p(y_w > y_l | x) = sigmoid(r_w - r_l)`` (the Bradley–Terry model, docs/reward_models.md). Every label
of a preference set says "the first response wins", so the predictions are judged on both
orderings of each pair: ``(p, label 1)`` and ``(1 - p, label 0)``. The reliability diagram is then
symmetric about (0.5, 0.5) and its ECE equals the classic confidence-vs-accuracy ECE of the
predicted winner, ``max(p, 1 - p)`` against "the predicted winner is the chosen response".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from prefopt.evaluation.plots import pyplot


@dataclass(frozen=True)
class Bin:
    lo: float
    hi: float
    count: int
    mean_prob: float | None  # mean predicted probability in the bin (None when empty)
    frequency: float | None  # share of positive labels in the bin


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def reliability_bins(probs, labels, n_bins: int = 10) -> list[Bin]:
    """Equal-width bins on [0, 1]; bin ``k`` holds ``k/n <= p < (k+1)/n`` (the last one includes 1)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if probs.shape != labels.shape:
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} differ in shape")
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    which = np.minimum((probs * n_bins).astype(np.int64), n_bins - 1)
    bins = []
    for k in range(n_bins):
        sel = which == k
        n = int(sel.sum())
        bins.append(Bin(k / n_bins, (k + 1) / n_bins, n,
                        float(probs[sel].mean()) if n else None, float(labels[sel].mean()) if n else None))
    return bins


def expected_calibration_error(bins: list[Bin]) -> float:
    """``sum_b (n_b / N) * |frequency_b - mean_prob_b|`` over non-empty bins."""
    total = sum(b.count for b in bins)
    if total == 0:
        return float("nan")
    return float(sum(b.count / total * abs(b.frequency - b.mean_prob) for b in bins if b.count))


@dataclass
class PreferenceReport:
    pairs: int
    accuracy: float  # share of pairs with r_w > r_l (ties count as wrong)
    ties: int
    ece: float
    mean_margin: float  # mean of r_w - r_l
    mean_prob: float  # mean of sigmoid(r_w - r_l)
    bins: list[Bin]

    def as_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "bins"}, "bins": [asdict(b) for b in self.bins]}


def preference_report(chosen_rewards, rejected_rewards, n_bins: int = 10) -> PreferenceReport:
    r_w = np.asarray(chosen_rewards, dtype=np.float64)
    r_l = np.asarray(rejected_rewards, dtype=np.float64)
    if r_w.shape != r_l.shape or r_w.ndim != 1 or r_w.size == 0:
        raise ValueError("need two equal-length, non-empty 1-D arrays of rewards")
    margin = r_w - r_l
    p = sigmoid(margin)
    # both orderings of every pair: (p, 1) and (1 - p, 0)
    bins = reliability_bins(np.concatenate([p, 1.0 - p]), np.concatenate([np.ones_like(p), np.zeros_like(p)]), n_bins)
    return PreferenceReport(
        pairs=int(r_w.size), accuracy=float((margin > 0).mean()), ties=int((margin == 0).sum()),
        ece=expected_calibration_error(bins), mean_margin=float(margin.mean()), mean_prob=float(p.mean()),
        bins=bins,
    )


def plot_reliability(report: PreferenceReport, path: str | Path, title: str = "Reward model calibration") -> Path:
    """The reliability diagram (bars: observed frequency per bin, points: mean prediction) and the
    histogram of predictions, written as PNG."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    width = report.bins[0].hi - report.bins[0].lo
    filled = [b for b in report.bins if b.count]
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    ax.bar([b.lo for b in filled], [b.frequency for b in filled], width=width, align="edge",
           edgecolor="black", alpha=0.6, label="observed frequency")
    ax.plot([b.mean_prob for b in filled], [b.frequency for b in filled], "o", color="C3", label="bin mean")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("P(first response is preferred)")
    ax.set_title(f"{title}\naccuracy {report.accuracy:.3f}, ECE {report.ece:.3f}, {report.pairs} pairs")
    ax.legend(loc="upper left", fontsize=8)
    hist.bar([b.lo for b in report.bins], [b.count for b in report.bins], width=width, align="edge",
             edgecolor="black", color="C0")
    hist.set_xlabel("predicted sigmoid(r_a - r_b), both orderings of every pair")
    hist.set_ylabel("count")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
