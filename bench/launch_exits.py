"""Do 2-process runs end? Repeats `accelerate launch` of a tiny 2-process CPU run (gloo) N times, each with a
time limit, and counts the launches whose every process exited (return code 0, within the limit). A launch that
hangs is killed; with --stacks, the Python stacks of its processes are printed first (needs `py-spy` on PATH).

    python bench/launch_exits.py                   # 20 launches of tiny FLUX.1 GRPO, 1 epoch, 2 processes
    python bench/launch_exits.py -n 40 --script nft.py --fsdp
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
          os.path.join(ROOT, "docs/accelerate/two_cpu_processes.yaml")]


def children(pid):
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    except FileNotFoundError:
        return []
    return [int(p) for p in out] + [c for p in out for c in children(int(p))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20, help="launches")
    ap.add_argument("--script", default="grpo.py")
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--limit", type=float, default=120, help="seconds a launch may take before it counts as hung")
    ap.add_argument("--stacks", action="store_true", help="print the hung processes' stacks (py-spy)")
    a = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    flags = ["--model", "flux1", "--tiny", "--num-epochs", "1", "--eval-every", "0", "--log-with", "none"]
    ended, walls = 0, []
    for i in range(a.n):
        out = tempfile.mkdtemp(prefix="launch-exits-")
        t0 = time.time()
        p = subprocess.Popen([*LAUNCH, a.script, *flags, "--output-dir", out] + (["--fsdp"] if a.fsdp else []),
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            log, _ = p.communicate(timeout=a.limit)
            ok = p.returncode == 0
            walls.append(time.time() - t0)
            status = "ok" if ok else f"exit {p.returncode}: {log[-2000:]}"
        except subprocess.TimeoutExpired:
            ok, status = False, f"HUNG after {a.limit:g} s"
            if a.stacks and shutil.which("py-spy"):
                for pid in children(p.pid):
                    print(subprocess.run(["py-spy", "dump", "--native", "--pid", str(pid)], capture_output=True, text=True).stdout)
            for pid in children(p.pid):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            p.kill()
            log, _ = p.communicate()
            status += "\n" + log[-1500:]
        ended += ok
        print(f"launch {i + 1}/{a.n}: {status}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    mean = sum(walls) / max(1, len(walls))
    print(f"{ended}/{a.n} launches ended (mean {mean:.1f} s per finished launch)")
    sys.exit(0 if ended == a.n else 1)


if __name__ == "__main__":
    main()
