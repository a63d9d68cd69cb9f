"""Plot a run's training reward (and evaluation points) from metrics.jsonl.

    python scripts/plot_metrics.py runs/grpo-shapes [more runs...] --out curve.png
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
    a = ap.parse_args()
    fig, (ax_ep, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
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
    ax_ep.set_xlabel("epoch (-1 = base model)")
    ax_t.set_xlabel("wall-clock seconds")
    for ax in (ax_ep, ax_t):
        ax.set_ylabel("reward / accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
