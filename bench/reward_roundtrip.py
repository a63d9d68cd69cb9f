"""Round-trip overhead of a remote reward: the same reward (jpeg_compressibility, weight-free) scored locally and
through `python -m rewards.server` on 127.0.0.1, on the same random images and videos (random pixels: the largest
PNG bodies, the worst case for the /compute protocol). Also through the reference project's /compute JSON protocol,
served by the small server of tests/test_reward_server.py.

    OMP_NUM_THREADS=1 python bench/reward_roundtrip.py                 # 16 images 256x256, 16 videos x 5 frames
    OMP_NUM_THREADS=1 python bench/reward_roundtrip.py --size 512 --batch 8 --repeats 3

Prints a markdown table: median seconds per call over --repeats (after one warm-up call), the overhead
(remote - local) per image or video, and the request body size.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import httpx  # noqa: E402
import torch  # noqa: E402

from rewards import load_rewards  # noqa: E402
from rewards.remote import compute_payload, encode_score_request  # noqa: E402


def start(cmd):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.Popen([c.replace("PORT", str(port)) for c in cmd], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).is_success:
                return url, proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"server {cmd} did not start")


def median_time(fn, repeats):
    fn()  # warm-up: connections, first-call allocations
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    ours, ours_proc = start([sys.executable, "-m", "rewards.server", "--reward", "jpeg_compressibility",
                             "--port", "PORT"])
    ref, ref_proc = start([sys.executable, "-c", "import sys, tests.test_reward_server as t; "
                           "t.serve_compute(int(sys.argv[1]))", "PORT"])
    try:
        rs = load_rewards(["jpeg_compressibility", f"remote={ours}", f"compute={ref}/compute"])
        torch.manual_seed(0)
        B, S, F = args.batch, args.size, args.frames
        cases = {f"{B} images {S}x{S}": torch.rand(B, 3, S, S),
                 f"{B} videos x {F} frames {S}x{S}": torch.rand(B, F, 3, S, S)}
        rows = []
        for case, x in cases.items():
            prompts, meta = ["a photo"] * B, [{}] * B
            scores = {k: rs.rewards[k](x, prompts, meta) for k in rs.names}
            assert torch.equal(scores["remote"], scores["jpeg_compressibility"]), "remote differs from local"
            assert torch.allclose(scores["compute"], scores["jpeg_compressibility"], rtol=0, atol=1e-5)
            local = median_time(lambda: rs.rewards["jpeg_compressibility"](x, prompts, meta), args.repeats)
            sizes = {"remote": len(encode_score_request(x, prompts, meta)),
                     "compute": len(json.dumps(compute_payload(x, prompts, meta)))}
            for k in ("remote", "compute"):
                t = median_time(lambda: rs.rewards[k](x, prompts, meta), args.repeats)
                rows.append((case, k, local, t, (t - local) / B * 1000, sizes[k] / 1e6))
        print("| case | path | local s | remote s | overhead ms per sample | body MB |\n|---|---|---|---|---|---|")
        for case, k, local, t, per, mb in rows:
            print(f"| {case} | {'ours (safetensors)' if k == 'remote' else '/compute (JSON + base64 PNG)'} "
                  f"| {local:.3f} | {t:.3f} | {per:.1f} | {mb:.1f} |")
    finally:
        for proc in (ours_proc, ref_proc):
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
