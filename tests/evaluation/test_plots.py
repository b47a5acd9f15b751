"""Plots a person can read, checked from saved results (no training): labels that do not overlap,
small multiples for many runs, every marker in a legend, the reward axis named after the scorer."""

from __future__ import annotations

import itertools
import json

from prefopt.evaluation.plots import (
    _text_box,
    place_labels,
    plot_frontier,
    plot_training_curves,
    pyplot,
    reward_axis_label,
    run_groups,
    scorer_label,
)


def test_labels_in_a_dense_cluster_do_not_overlap_each_other_or_the_markers():
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    # Twelve points within 0.1 nats and 0.02 reward of each other, like the demo's low-KL cluster.
    points = [(0.5 + 0.01 * (i % 4), 0.70 + 0.005 * (i // 4)) for i in range(12)]
    ax.plot(*zip(*points), "o")
    ax.set_xlim(0, 3)
    ax.set_ylim(0.5, 0.9)
    texts = place_labels(ax, points, [f"β={b}" for b in range(12)], ["black"] * 12)
    renderer = fig.canvas.get_renderer()
    boxes = [_text_box(t, renderer) for t in texts]  # the text itself, not its leader line
    assert len(boxes) == 12
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)
    for (x, y), box in itertools.product(points, boxes):
        px, py = ax.transData.transform((x, y))
        assert not box.contains(px, py)
    plt.close(fig)


def test_axis_names_come_from_the_scorer(tmp_path):
    assert scorer_label("prefopt.demo.world:sentiment_score") == "sentiment_score"
    rm = tmp_path / "my_rm"
    rm.mkdir()
    assert scorer_label(str(rm)) == "reward (RM my_rm)"
    assert reward_axis_label([{"scorer": "m:f"}, {"scorer": "m:f"}]) == "mean f of samples"
    assert reward_axis_label([{"scorer": "m:f"}, {"scorer": "m:g"}]).endswith("(several scorers!)")
    # Through the eval JSON files `prefopt eval` writes.
    for name, kl, reward in (("a", 0.5, 0.7), ("b", 1.0, 0.8)):
        (tmp_path / f"eval_{name}.json").write_text(json.dumps(
            {"name": name, "method": "dpo", "beta": kl, "reward": reward, "kl": kl, "reward_ref": 0.5,
             "ref": "sft", "scorer": "pkg.mod:helpfulness"}))
    from prefopt.evaluation.plots import frontier_entries

    entries = frontier_entries(sorted(tmp_path.glob("eval_*.json")))
    assert reward_axis_label(entries) == "mean helpfulness of samples"
    path = plot_frontier(entries, tmp_path / "frontier.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_many_runs_become_small_multiples_with_their_own_colours(tmp_path):
    from PIL import Image

    assert run_groups(["dpo_beta0.5", "dpo_beta1.0", "odpo_beta0.5_alpha0.5", "sft"]) == {
        "dpo": ["dpo_beta0.5", "dpo_beta1.0"], "odpo": ["odpo_beta0.5_alpha0.5"], "sft": ["sft"]}
    runs = {}
    for method, betas in (("dpo", (0.25, 0.5, 1.0, 2.0, 4.0)), ("odpo", (0.5, 1.0, 2.0)), ("ipo", (0.1, 0.2))):
        for beta in betas:
            name = f"{method}_beta{beta}"
            path = tmp_path / f"{name}.jsonl"
            rows = [{"step": s, "loss": 0.7 - 0.01 * s * beta, "rewards/chosen": 0.1 * s, "rewards/rejected": -0.1 * s,
                     "rewards/accuracies": 0.5 + 0.04 * s} for s in range(1, 11)]
            rows.append({"step": 10, "eval/loss": 0.6, "eval/rewards/accuracies": 0.8})
            path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
            runs[name] = path
    few = Image.open(plot_training_curves(dict(list(runs.items())[:3]), tmp_path / "few.png"))
    many = Image.open(plot_training_curves(runs, tmp_path / "many.png"))
    # 3 runs: one row of panels; 10 runs in 3 groups: three rows, so about three times as tall.
    assert many.size[0] == few.size[0] and 2.5 < many.size[1] / few.size[1] < 3.5
