"""Plot a run's training reward (and evaluation points) from metrics.jsonl; with --per-category, a third panel
with each evaluation category's curve (keys `<eval-key without /all>/<category>`, e.g. the shapes world's six).

    python scripts/plot_metrics.py runs/grpo-shapes [more runs...] --out curve.png [--per-category]
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--reward", default="shapes", help="reward name to plot")
    ap.add_argument("--eval-key", default="eval/shapes_strict/all", help="evaluation metric to mark")
    ap.add_argument("--out", default="curve.png")
    ap.add_argument("--per-category", action="store_true", help="add each category's evaluation curve (first run)")
    a = ap.parse_args()
    fig, axes = plt.subplots(1, 3 if a.per_category else 2, figsize=(16.5 if a.per_category else 11, 4))
    ax_ep, ax_t = axes[:2]
    for run in a.runs:
        rows = load(run)
        train = [r for r in rows if f"reward/{a.reward}_mean" in r]
        secs, t = [], 0.0
        for r in rows:  # cumulative wall time over every phase, evaluation included
            t += sum(v for k, v in r.items() if k.startswith("time/"))
            secs.append(t)
        label = os.path.basename(os.path.normpath(run))
        ep = [r["epoch"] for r in train]
        rew = [r[f"reward/{a.reward}_mean"] for r in train]
        smooth = [sum(rew[max(0, i - 9):i + 1]) / len(rew[max(0, i - 9):i + 1]) for i in range(len(rew))]
        ax_ep.plot(ep, rew, alpha=0.3, label=f"{label} train reward")
        ax_ep.plot(ep, smooth, label=f"{label} train reward (mean of 10 epochs)")
        ax_t.plot([s for s, r in zip(secs, rows) if r in train], smooth, label=f"{label} train reward (mean of 10 epochs)")
        evals = [(r["epoch"], s, r[a.eval_key]) for s, r in zip(secs, rows) if a.eval_key in r]
        if evals:
            ax_ep.plot([e for e, _, _ in evals], [v for _, _, v in evals], "o--", label=f"{label} {a.eval_key}")
            ax_t.plot([s for _, s, _ in evals], [v for _, _, v in evals], "o--", label=f"{label} {a.eval_key}")
    if a.per_category:
        rows, prefix = load(a.runs[0]), a.eval_key.rsplit("/", 1)[0] + "/"
        evals = [r for r in rows if a.eval_key in r]
        for key in [k for k in evals[0] if k.startswith(prefix)]:
            axes[2].plot([r["epoch"] for r in evals], [r[key] for r in evals], "o-", ms=3,
                         lw=2.5 if key == a.eval_key else 1, label=key[len(prefix):])
        axes[2].set_xlabel("epoch (-1 = base model)")
        axes[2].set_title(f"{os.path.basename(os.path.normpath(a.runs[0]))}: {prefix}<category>", fontsize=9)
    ax_ep.set_xlabel("epoch (-1 = base model)")
    ax_t.set_xlabel("wall-clock seconds")
    for ax in axes:
        ax.set_ylabel("reward / accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
