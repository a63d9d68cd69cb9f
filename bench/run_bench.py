"""The eight algorithms on the embedded shapes world with equal budgets: same base model, prompts, images per
epoch (8 prompts x 8 images, balanced over the categories) and number of epochs; several training seeds each.
Writes a table (markdown and JSON) and a plot of held-out reward and strict accuracy against training
wall-clock seconds and against the number of generated images.

    python bench/run_bench.py                                  # 8 algorithms x seeds 42 1 2, 100 epochs (~3 h, 2 CPU cores)
    python bench/run_bench.py --jobs 2                         # two runs at once, 1 thread each
    python bench/run_bench.py --algorithms grpo nft --seeds 42 --num-epochs 20
    python bench/run_bench.py --summarize-only                 # redo table and plot from finished runs
    python bench/run_bench.py --algorithms dpo --out /tmp/b --merge bench/results/results.json  # add rows to a table

Runs go to <out>/runs/<algorithm>-seed<seed>/ (a finished run is not repeated); seeds run in the outer loop so
that every algorithm sees the same machine conditions. "Training seconds" sum the rollout, reward and
training phases of metrics.jsonl (evaluation excluded); the table gives the median over seeds.
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGORITHMS = ("grpo", "grpo_guard", "nft", "awm", "dppo", "dpo", "dgpo", "crd")
# flags on top of a script's shapes preset: GRPO's row keeps the window of 2 SDE steps it was measured with (as
# GRPO-Guard's and DPPO's presets); `make run`'s preset trains 4 since issue 30 (docs/shapes.md)
FLAGS = {"grpo": ["--sde-window-size", "2"]}


def run_dir(out, algo, seed):
    return os.path.join(out, "runs", f"{algo}-seed{seed}")


def read_metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def finished(path, num_epochs):
    try:
        return any(r["epoch"] == num_epochs - 1 and "eval/reward_shapes" in r for r in read_metrics(path))
    except (OSError, ValueError):
        return False


def run(algo, seed, args):
    path = run_dir(args.out, algo, seed)
    if finished(path, args.num_epochs):
        print(f"{algo} seed {seed}: done already", flush=True)
        return
    cmd = [sys.executable, os.path.join(ROOT, f"{algo}.py"), "--seed", str(seed), "--num-epochs", str(args.num_epochs),
           "--eval-every", str(args.eval_every), "--eval-num-prompts", str(args.eval_num_prompts),
           "--save-every", str(args.num_epochs), "--output-dir", path, "--log-with", "none", *FLAGS.get(algo, [])]
    print(" ".join(cmd[1:]), flush=True)
    os.makedirs(path, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    with open(os.path.join(path, "stdout.log"), "w") as log:
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)


def curves(rows, images_per_epoch):
    """(images, train seconds, dense reward, strict accuracy) at every evaluation, the base model first."""
    out, seconds = [], 0.0
    for r in rows:
        if r["epoch"] >= 0:
            seconds += sum(r.get(f"time/{k}_s", 0.0) for k in ("rollout", "reward", "train"))
        if "eval/reward_shapes" in r:
            out.append(((r["epoch"] + 1) * images_per_epoch, seconds, r["eval/reward_shapes"],
                        r["eval/shapes_strict/all"]))
    return np.array(out)


def row(algo, c, args):
    """The table's row for c = (seeds, evaluations, 4) curves."""
    gain_dense, gain_strict = c[:, -1, 2] - c[:, 0, 2], c[:, -1, 3] - c[:, 0, 3]
    # speed: the first evaluation at which the seed-mean dense gain reaches args.target
    mean_gain = c[:, :, 2].mean(0) - c[:, 0, 2].mean()
    hit = np.flatnonzero(mean_gain >= args.target)
    reach = (f"{c[0, hit[0], 0]:.0f} / {np.median(c[:, hit[0], 1]):.0f}" if len(hit) else "not reached")
    seconds = np.median(c[:, -1, 1])
    return (f"| {algo} | {len(c)} | {c[:, 0, 2].mean():.3f} | {c[:, -1, 2].mean():.3f} "
            f"| {gain_dense.mean():+.3f} ± {gain_dense.std():.3f} | {100 * c[:, 0, 3].mean():.1f} "
            f"| {100 * c[:, -1, 3].mean():.1f} | {100 * gain_strict.mean():+.1f} ± {100 * gain_strict.std():.1f} "
            f"| {reach} | {seconds:.0f} | {seconds / args.num_epochs:.2f} |")


def as_curves(entry):
    """A results.json entry -> (seeds, evaluations, 4) curves, as curves() stacks them."""
    s = np.array(entry["seconds"])
    images = np.broadcast_to(np.array(entry["images"]), s.shape)
    return np.stack([images, s, np.array(entry["dense"]), np.array(entry["strict"])], axis=-1)


def summarize(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # --merge: algorithms not run here keep the curves an earlier results.json recorded (same budgets and seeds)
    merged = json.load(open(args.merge)) if args.merge else {}
    results, table = {}, []
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for algo in ALGORITHMS:
        runs = [run_dir(args.out, algo, s) for s in args.seeds if finished(run_dir(args.out, algo, s), args.num_epochs)]
        if algo in args.algorithms and runs:
            config = json.load(open(os.path.join(runs[0], "config.json")))
            per_epoch = config["prompts_per_epoch"] * config["group_size"]
            cs = [curves(read_metrics(r), per_epoch) for r in runs]
            n = min(len(c) for c in cs)
            c = np.stack([c[:n] for c in cs])  # (seeds, evals, 4)
            results[algo] = dict(seeds=[int(r.rsplit("seed", 1)[1]) for r in runs], images=c[0, :, 0].tolist(),
                                 seconds=c[:, :, 1].tolist(), dense=c[:, :, 2].tolist(), strict=c[:, :, 3].tolist())
        elif algo in merged:
            results[algo], c = merged[algo], as_curves(merged[algo])
        else:
            continue
        table.append(row(algo, c, args))
        for r, (col, label) in enumerate(((2, "held-out dense reward"), (3, "held-out strict accuracy"))):
            for ax, (x, xlabel) in zip(axes[r], ((c[:, :, 1].mean(0), "training seconds (2 CPU cores)"),
                                                 (c[0, :, 0], "generated images"))):
                mean, std = c[:, :, col].mean(0), c[:, :, col].std(0)
                ax.plot(x, mean, marker="o", ms=3, label=algo)
                ax.fill_between(x, mean - std, mean + std, alpha=0.2)
                ax.set_xlabel(xlabel)
                ax.set_ylabel(label)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"shapes world, {args.num_epochs} epochs x 64 images, mean ± std over seeds {' '.join(map(str, args.seeds))}")
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    fig.savefig(os.path.join(args.out, "curves.png"), dpi=110)
    header = ("| algorithm | seeds | dense base | dense final | dense gain | strict base % | strict final % "
              f"| strict gain (pts) | images / s to dense +{args.target} | training s (median) | s / epoch |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")
    text = header + "\n" + "\n".join(table) + "\n"
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f)
    print(text)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    p.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    p.add_argument("--num-epochs", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-num-prompts", type=int, default=240)
    p.add_argument("--target", type=float, default=0.1, help="dense-reward gain whose first crossing the table reports")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each with --threads torch threads)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run (default: --jobs > 1: 1)")
    p.add_argument("--summarize-only", action="store_true")
    p.add_argument("--merge", default=None, help="an earlier results.json: its algorithms not run now join the table")
    args = p.parse_args()
    args.threads = args.threads or (1 if args.jobs > 1 else None)
    if not args.summarize_only:
        runs = [(algo, seed) for seed in args.seeds for algo in args.algorithms]
        with ThreadPoolExecutor(args.jobs) as pool:  # in order: every algorithm of a seed before the next seed
            for done in [pool.submit(run, algo, seed, args) for algo, seed in runs]:
                done.result()
    summarize(args)


if __name__ == "__main__":
    main()
