"""The levers of the embedded default, each measured on a validation split so that the held-out test set selects
nothing; the test numbers are reported once, by `make run` and two other training seeds (docs/shapes.md).

Two validation splits (`--split`):
- heldout (issue 30, the default): a quarter of each category's training prompts (at least one) is held out, as
  the test set is held out of all prompts; RL trains on the other 48 rows and is validated on 80 rows per category
  of the held-out ones: generalisation to new combinations, what the test set measures. Runs: bench/results/validation.
- seen (issue 22): RL trains on all 65 rows and is validated on those same prompts. Runs: bench/results/levers.
Validation rows use evaluation noise seeds the rollouts never use.

    python bench/shapes_levers.py --variants window2 window4     # two variants at once (1 thread each)
    python bench/shapes_levers.py --variants window4 --seeds 1 2  # more training seeds of one
    python bench/shapes_levers.py --split seen --variants before balanced --jobs 1
    python bench/shapes_levers.py --summarize-only
    python bench/shapes_levers.py --spread runs/a runs/b runs/c   # mean +- std over finished runs (seeds)

Each variant is `python grpo.py` with the shapes preset plus its flags (default: its 200 epochs, validation every
25 on the 480 rows). Runs go to <out>/<variant>/ (<variant>-seed<s> for other seeds; a finished run is not
repeated); the table: validation strict accuracy per category at every evaluation, and the training reward (mean of
the last 10 epochs).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 42  # the scripts' default training seed
CATEGORIES = ("single_object", "colors", "two_object", "counting", "position", "color_attr")
OLD = ["--balance-prompts-by", "", "--lr-schedule", "constant", "--ema-decay", "0.5"]  # the preset before issue 22
SHORT = ["--lr-schedule", "constant", "--num-epochs", "100", "--eval-every", "20", "--eval-num-prompts", "240"]
VARIANTS = {  # name: flags added to `python grpo.py` (the shapes preset's values otherwise)
    "before": OLD,  # prompts uniform over the 65 rows (27 color_attr, 2 two_object), constant lr, evaluation EMA 0.5
    "balanced": OLD[2:],  # prompts balanced over the six categories
    "balanced-lr1e-4-ema0.9": ["--lr-schedule", "constant", "--learning-rate", "1e-4"],
    "balanced-linear-ema0.9": [],  # + the learning rate decaying linearly to 0, a 10-epoch evaluation EMA: the preset
    "lr6e-5": ["--learning-rate", "6e-5"],
    "16-prompts-100-epochs": ["--prompts-per-epoch", "16", "--num-epochs", "100"],  # the same 12,800 images
    "kl1": ["--kl-beta", "1.0"],
    "window0-4": ["--sde-window-range", "0", "4"],  # train only the first 4 steps (the layout's)
    "window0-4-eta1": ["--sde-window-range", "0", "4", "--noise-level", "1.0"],
    "window4-in-0-8": ["--sde-window-size", "4", "--sde-window-range", "0", "8"],
    # issue 30, on held-out training prompts (--split heldout)
    "window2": ["--sde-window-size", "2"],  # the preset of issue 22: 2 trained steps of the first 6 per image
    "window4": ["--sde-window-size", "4"],  # 4 of them: the preset since issue 30
    "window6": ["--sde-window-size", "6"],  # all of the first 6
    # shorter exploratory runs (100 epochs, validation every 20 on 240 rows, constant learning rate)
    "short-lr1.5e-5": SHORT + ["--learning-rate", "1.5e-5"],
    "short-global-std": SHORT + ["--global-std"],
    "short-same-noise-in-group": SHORT + ["--same-noise-in-group"],
}


def write_validation(folder, split="heldout", rows_per_category=80, seed=22):
    """The validation dataset: rows_per_category test rows per category, from evaluation noise seeds the rollouts never
    use. split "heldout": a quarter of each category's training prompts (at least one) is held out, as the test set is
    held out of all prompts, and RL trains on the rest: validation measures generalisation to new combinations.
    split "seen" (issue 22's): RL trains on all 65 rows and validation rows are those same prompts."""
    import numpy as np
    with open(os.path.join(ROOT, "datasets", "shapes", "train.jsonl")) as f:
        lines = f.read().splitlines()
    rows = [json.loads(line) for line in lines]
    rng, train, out = np.random.default_rng(seed), list(lines), []
    for tag in CATEGORIES:
        pool = [line for line, r in zip(lines, rows) if r["tag"] == tag]
        if split == "heldout":
            held = [pool[i] for i in rng.permutation(len(pool))[:max(1, round(len(pool) / 4))]]
            train, pool = [line for line in train if line not in held], held
        out += [pool[i % len(pool)] for i in rng.permutation(rows_per_category)]
    os.makedirs(folder, exist_ok=True)
    for name, text in (("train.jsonl", train), ("test.jsonl", out)):
        with open(os.path.join(folder, name), "w") as f:
            f.write("\n".join(text) + "\n")


def run_path(out, name, seed):
    return os.path.join(out, name if seed == SEED else f"{name}-seed{seed}")


def run(name, seed, args):
    path = run_path(args.out, name, seed)
    if summary(path, finished_only=True):
        return print(f"{name} seed {seed}: done already", flush=True)
    cmd = [sys.executable, os.path.join(ROOT, args.script), "--dataset", os.path.join(args.out, "validation"),
           "--allow-outside-data-paths", "--num-epochs", str(args.num_epochs), "--eval-every", str(args.eval_every),
           "--eval-num-prompts", str(args.eval_num_prompts), "--save-every", str(args.num_epochs),
           "--seed", str(seed), "--output-dir", path, "--overwrite", *VARIANTS[name]]
    print(" ".join(cmd[1:]), flush=True)
    os.makedirs(path, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with open(os.path.join(path + ".log"), "w") as log:
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)


def summary(path, finished_only=False):
    """Markdown rows: validation strict accuracy per category at each evaluation (None: no run, or unfinished
    and finished_only); an unfinished run's last row says where it stopped."""
    try:
        with open(os.path.join(path, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        with open(os.path.join(path, "config.json")) as f:
            last = json.load(f)["num_epochs"] - 1
    except (OSError, ValueError):
        return None
    done = any(r["epoch"] == last and "eval/shapes_strict/all" in r for r in rows)
    if finished_only and not done:
        return None
    out, rewards = [], []
    for r in rows:
        if "reward/shapes_mean" in r:
            rewards.append(r["reward/shapes_mean"])
        if "eval/shapes_strict/all" in r:
            recent = rewards[-10:]
            out.append(f"| {r['epoch'] + 1} | " + " | ".join(
                f"{100 * r[f'eval/shapes_strict/{c}']:.1f}" for c in ("all",) + CATEGORIES)
                + f" | {r['eval/reward_shapes']:.3f} | " + (f"{sum(recent) / len(recent):.3f} |" if recent else "- |"))
    if not done:
        out.append(f"| stopped after epoch {rows[-1]['epoch'] + 1} of {last + 1} |" + " |" * (len(CATEGORIES) + 3))
    return out


def evaluations(path):
    """[(epochs trained, validation strict accuracy %)] of a run's evaluations, the base model first."""
    try:
        with open(os.path.join(path, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    except OSError:
        return []
    return [(r["epoch"] + 1, 100 * r["eval/shapes_strict/all"]) for r in rows if "eval/shapes_strict/all" in r]


def mean_std(x, digits=1):
    return f"{x.mean():.{digits}f} +- {x.std(ddof=1) if len(x) > 1 else 0.0:.{digits}f}"


def spread(paths):
    """Markdown: strict accuracy (%) per category of finished runs with different training seeds: the base, the final
    evaluation, the best evaluation, final - best and final - base, each as mean +- std over the runs (std: n - 1)."""
    import numpy as np
    runs = []
    for path in paths:
        try:
            with open(os.path.join(path, "metrics.jsonl")) as f:
                runs.append([json.loads(line) for line in f if "eval/shapes_strict/all" in line])
        except (OSError, ValueError) as e:
            sys.exit(f"error: --spread {path}: no readable metrics.jsonl ({e.__class__.__name__})")
    if len({len(rows) for rows in runs}) != 1 or len(runs[0]) < 2:
        sys.exit(f"error: --spread: the runs need the same evaluations, at least two each; they have "
                 f"{[len(rows) for rows in runs]}")
    text = ["| strict accuracy (%) | base | final | best | final - best | final - base |", "|---|---|---|---|---|---|"]
    for c in ("all",) + CATEGORIES:
        acc = np.array([[100 * r[f"eval/shapes_strict/{c}"] for r in rows] for rows in runs])  # runs x evaluations
        final, best, base = acc[:, -1], acc[:, 1:].max(1), acc[:, 0]
        text.append(f"| {c} | {base[0]:.1f} | {mean_std(final)} | {mean_std(best)} | {mean_std(final - best)} "
                    f"| {mean_std(final - base)} |")
    dense = np.array([[r["eval/reward_shapes"] for r in rows] for rows in runs])
    final, best, base = dense[:, -1], dense[:, 1:].max(1), dense[:, 0]
    text.append(f"| dense reward | {base[0]:.3f} | {mean_std(final, 3)} | {mean_std(best, 3)} | "
                f"{mean_std(final - best, 3)} | {mean_std(final - base, 3)} |")
    return "\n".join(text)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--script", default="grpo.py")
    p.add_argument("--num-epochs", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-num-prompts", type=int, default=480)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", nargs="+", type=int, default=[SEED], help="training seeds of each variant")
    p.add_argument("--split", choices=("heldout", "seen"), default="heldout",
                   help="heldout: validate on held-out training prompts; seen: on the training prompts (issue 22)")
    p.add_argument("--out", default=None, help="default: bench/results/validation (heldout), .../levers (seen)")
    p.add_argument("--summarize-only", action="store_true")
    p.add_argument("--spread", nargs="+", metavar="RUN", help="only print the seed-spread table of these finished runs")
    args = p.parse_args()
    if args.spread:
        return print(spread(args.spread))
    args.out = args.out or os.path.join(ROOT, "bench", "results", "validation" if args.split == "heldout" else "levers")
    if not args.summarize_only:
        write_validation(os.path.join(args.out, "validation"), args.split)
        with ThreadPoolExecutor(args.jobs) as pool:
            for done in [pool.submit(run, v, s, args) for s in args.seeds for v in args.variants]:
                done.result()
    head = ("| epochs | all | " + " | ".join(CATEGORIES) + " | dense | train reward |\n"
            + "|---" * (len(CATEGORIES) + 4) + "|")
    text = ["| variant | epochs run | base | best (epoch) | last | last - best |\n|---|---|---|---|---|---|"]
    runs = [(v, s, f"{v}" if s == SEED else f"{v} (seed {s})") for v in args.variants for s in args.seeds]
    for v, s, label in runs:
        evals = evaluations(run_path(args.out, v, s))
        if len(evals) > 1:
            best = max(evals[1:], key=lambda e: e[1])
            text.append(f"| {label} | {evals[-1][0]} | {evals[0][1]:.1f} | {best[1]:.1f} ({best[0]}) "
                        f"| {evals[-1][1]:.1f} | {evals[-1][1] - best[1]:+.1f} |")
    text[-1] += "\n"
    for v, s, label in runs:
        rows = summary(run_path(args.out, v, s))
        if rows:
            text.append(f"### {label}: `{shlex.join(VARIANTS[v]) or '(the preset)'}`\n\n{head}\n" + "\n".join(rows)
                        + "\n")
    text = "\n".join(text)
    with open(os.path.join(args.out, "levers.md"), "w") as f:
        split = ("held-out training prompts (RL trains on the other 48 rows)" if args.split == "heldout"
                 else "the training prompts")
        f.write(f"Validation strict accuracy (%) on {split}, 80 rows per category, evaluation seeds the rollouts never "
                f"use, `python bench/shapes_levers.py --split {args.split}`; epoch 0 is the base model; train reward: "
                f"the mean of the last 10 epochs' rollouts\n\n{text}")
    print(text)


if __name__ == "__main__":
    main()
