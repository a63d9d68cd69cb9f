"""The levers of the embedded default (issue 22), each measured on a validation split of the *training* prompts, so
that the held-out test set selects nothing: the validation rows are the 65 training prompts, 80 rows per category,
sampled from evaluation noise seeds the rollouts never use. The test numbers are reported once, by `make run`.

    python bench/shapes_levers.py                                # every variant below, two at a time (1 thread each)
    python bench/shapes_levers.py --variants base lr1.5e-5 --jobs 1
    python bench/shapes_levers.py --summarize-only

Each variant is `python grpo.py` with the shapes preset plus its flags (default: 100 epochs, validation every 20
on 240 rows). Runs go to <out>/<variant>/ (a finished run is not repeated); the table: validation strict accuracy
per category at every evaluation, and the training reward (mean of the last 10 epochs).
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORIES = ("single_object", "colors", "two_object", "counting", "position", "color_attr")
UNIFORM = ["--balance-prompts-by", ""]  # the preset before issue 22: prompts drawn uniformly over the 65 rows
VARIANTS = {  # name: flags added to the command (the preset's values otherwise)
    "uniform-lr3e-5": UNIFORM + ["--learning-rate", "3e-5", "--ema-decay", "0.5"],
    "balanced-lr3e-5": ["--learning-rate", "3e-5", "--ema-decay", "0.5"],
    "balanced-lr3e-5-ema0.9": ["--learning-rate", "3e-5", "--ema-decay", "0.9"],
    "balanced-lr1e-4-ema0.9": ["--learning-rate", "1e-4", "--ema-decay", "0.9"],
    "balanced-lr3e-5-ema0.9-global-std": ["--learning-rate", "3e-5", "--ema-decay", "0.9", "--global-std"],
    "balanced-lr1.5e-5-ema0.9": ["--learning-rate", "1.5e-5", "--ema-decay", "0.9"],
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
    if summary(path):
        return print(f"{name}: done already", flush=True)
    cmd = [sys.executable, os.path.join(ROOT, args.script), "--dataset", os.path.join(args.out, "validation"),
           "--allow-outside-data-paths", "--num-epochs", str(args.num_epochs), "--eval-every", str(args.eval_every),
           "--eval-num-prompts", str(args.eval_num_prompts), "--save-every", str(args.num_epochs),
           "--output-dir", path, "--overwrite", *VARIANTS[name]]
    print(" ".join(cmd[1:]), flush=True)
    os.makedirs(path, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with open(os.path.join(path + ".log"), "w") as log:
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)


def summary(path):
    """Markdown rows: validation strict accuracy per category at each evaluation, or None if unfinished."""
    try:
        with open(os.path.join(path, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        with open(os.path.join(path, "config.json")) as f:
            last = json.load(f)["num_epochs"] - 1
    except (OSError, ValueError):
        return None
    if not any(r["epoch"] == last and "eval/shapes_strict/all" in r for r in rows):
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
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--script", default="grpo.py")
    p.add_argument("--num-epochs", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-num-prompts", type=int, default=240)
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
    text = []
    for v in args.variants:
        rows = summary(os.path.join(args.out, v))
        if rows:
            text.append(f"### {v}: `{' '.join(VARIANTS[v])}`\n\n{head}\n" + "\n".join(rows) + "\n")
    text = "\n".join(text)
    with open(os.path.join(args.out, "levers.md"), "w") as f:
        f.write(f"Validation strict accuracy (%) on the training prompts, `python bench/shapes_levers.py`\n\n{text}")
    print(text)


if __name__ == "__main__":
    main()
