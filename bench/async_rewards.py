"""--async-rewards against synchronous scoring, with a reward that takes a fixed time per micro-batch (a stand-in
for a slow reward model or a remote server): one epoch of tiny FLUX.1 (64x64, 4 steps, 8 micro-batches of 2)
each way; prints the per-phase seconds and the wall time of the epoch.

    python bench/async_rewards.py                  # 0.3 s per micro-batch
    python bench/async_rewards.py --seconds 0.1
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def slow_jpeg(images, prompts, metadata):
    """jpeg_compressibility after a fixed delay (BENCH_REWARD_SECONDS, default 0.3 s)."""
    from rewards.jpeg import jpeg_kb
    time.sleep(float(os.environ.get("BENCH_REWARD_SECONDS", "0.3")))
    return -jpeg_kb(images) if images.dim() == 4 else torch.stack([-jpeg_kb(v).mean() for v in images])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=0.3)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results/runs/async"))
    a = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "BENCH_REWARD_SECONDS": str(a.seconds)}
    print("| mode | epoch wall s | rollout s | reward s (sync: scoring; async: waiting) | train s |\n|---|---|---|---|---|")
    for flag in ("", "--async-rewards"):
        out = os.path.join(a.out, flag or "sync")
        cmd = [sys.executable, "grpo.py", "--model", "flux1", "--tiny", "--num-epochs", "2", "--eval-every", "0",
               "--log-with", "none", "--reward", "bench.async_rewards.slow_jpeg", "--output-dir", out, "--overwrite"] + (
            [flag] if flag else [])
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            last = [json.loads(line) for line in f][-1]  # the second epoch: warm
        phases = [last.get(f"time/{p}_s", 0.0) for p in ("rollout", "reward", "train")]
        print(f"| {flag or 'sync'} | {sum(phases):.2f} | {phases[0]:.2f} | {phases[1]:.2f} | {phases[2]:.2f} |")


if __name__ == "__main__":
    main()
