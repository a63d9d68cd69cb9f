"""The levers of the embedded default (issue 22), each measured on a validation split of the *training* prompts, so
that the held-out test set selects nothing: the validation rows are the 65 training prompts, 80 rows per category,
sampled from evaluation noise seeds the rollouts never use. The test numbers are reported once, by `make run`.

    python bench/shapes_levers.py                                # every variant below, two at a time (1 thread each)
    python bench/shapes_levers.py --variants before balanced --jobs 1
    python bench/shapes_levers.py --summarize-only

Each variant is `python grpo.py` with the shapes preset plus its flags (default: its 200 epochs, validation every
25 on the 480 rows). Runs go to <out>/<variant>/ (a finished run is not repeated); the table: validation strict accuracy
per category at every evaluation, and the training reward (mean of the last 10 epochs).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    # shorter exploratory runs (100 epochs, validation every 20 on 240 rows, constant learning rate)
    "short-lr1.5e-5": SHORT + ["--learning-rate", "1.5e-5"],
    "short-global-std": SHORT + ["--global-std"],
    "short-same-noise-in-group": SHORT + ["--same-noise-in-group"],
}


def write_validation(folder, rows_per_category=80, seed=22):
    """train.jsonl as shipped; test.jsonl: rows_per_category rows of each category's training prompts."""
    import numpy as np
    with open(os.path.join(ROOT, "datasets", "shapes", "train.jsonl")) as f:
        lines = f.read().splitlines()
    rows = [json.loads(line) for line in lines]
    rng, out = np.random.default_rng(seed), []
    for tag in CATEGORIES:
        pool = [line for line, r in zip(lines, rows) if r["tag"] == tag]
        out += [pool[i % len(pool)] for i in rng.permutation(rows_per_category)]
    os.makedirs(folder, exist_ok=True)
    for name, text in (("train.jsonl", lines), ("test.jsonl", out)):
        with open(os.path.join(folder, name), "w") as f:
            f.write("\n".join(text) + "\n")


def run(name, args):
    path = os.path.join(args.out, name)
    if summary(path, finished_only=True):
        return print(f"{name}: done already", flush=True)
    cmd = [sys.executable, os.path.join(ROOT, args.script), "--dataset", os.path.join(args.out, "validation"),
           "--allow-outside-data-paths", "--num-epochs", str(args.num_epochs),  # a variant's own --num-epochs wins "--eval-every", str(args.eval_every),
           "--eval-num-prompts", str(args.eval_num_prompts), "--save-every", str(args.num_epochs),
           "--output-dir", path, "--overwrite", *VARIANTS[name]]
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--script", default="grpo.py")
    p.add_argument("--num-epochs", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-num-prompts", type=int, default=480)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "levers"))
    p.add_argument("--summarize-only", action="store_true")
    args = p.parse_args()
    if not args.summarize_only:
        write_validation(os.path.join(args.out, "validation"))
        with ThreadPoolExecutor(args.jobs) as pool:
            for done in [pool.submit(run, v, args) for v in args.variants]:
                done.result()
    head = ("| epochs | all | " + " | ".join(CATEGORIES) + " | dense | train reward |\n"
            + "|---" * (len(CATEGORIES) + 4) + "|")
    text = ["| variant | epochs run | base | best (epoch) | last | last - best |\n|---|---|---|---|---|---|"]
    for v in args.variants:
        evals = evaluations(os.path.join(args.out, v))
        if len(evals) > 1:
            best = max(evals[1:], key=lambda e: e[1])
            text.append(f"| {v} | {evals[-1][0]} | {evals[0][1]:.1f} | {best[1]:.1f} ({best[0]}) | {evals[-1][1]:.1f} "
                        f"| {evals[-1][1] - best[1]:+.1f} |")
    text[-1] += "\n"
    for v in args.variants:
        rows = summary(os.path.join(args.out, v))
        if rows:
            text.append(f"### {v}: `{shlex.join(VARIANTS[v]) or '(the preset)'}`\n\n{head}\n" + "\n".join(rows) + "\n")
    text = "\n".join(text)
    with open(os.path.join(args.out, "levers.md"), "w") as f:
        f.write("Validation strict accuracy (%) on the training prompts (80 rows per category, evaluation seeds the "
                "rollouts never use), `python bench/shapes_levers.py`; epoch 0 is the base model; train reward: the "
                f"mean of the last 10 epochs' rollouts\n\n{text}")
    print(text)


if __name__ == "__main__":
    main()
