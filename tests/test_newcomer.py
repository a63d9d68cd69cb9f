"""The newcomer's path: the README's two commands are the Makefile's, and CI runs the test one; the run ends with a
summary of the trained model against the base whose numbers are the last evaluation in metrics.jsonl; threads."""
import json
import os
import re
import subprocess
import sys

from common import tracking
from tests.test_grpo import ENV, ROOT, read_metrics


def test_the_two_commands_are_the_makefile_and_ci():
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme.split("## The two commands", 1)[1].split("```", 2)[1]
    assert re.search(r"^make run\b", block, re.M) and re.search(r"^make test\b", block, re.M)
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    assert re.search(r"^run: ", makefile, re.M) and re.search(r"^test: ", makefile, re.M)
    assert "grpo.py" in makefile.split("run:", 1)[1].split("\n\n")[0]
    ci = [line for line in open(os.path.join(ROOT, ".ci/run")).read().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "make test"


def test_final_summary_is_the_last_evaluation_against_the_base(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "grpo.py", "--model", "flux1", "--tiny", "--log-with", "none",
                        "--num-epochs", "3", "--output-dir", str(out)], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Result: the trained model"))
    assert lines[start - 1] == f"saved to {out}" and "epoch 2" in lines[start]
    rows = read_metrics(out)
    base, last = rows[0], rows[-1]
    table = {line.split()[0]: line.split() for line in lines[start + 2:]}  # the summary is the run's last lines
    assert set(table) == {"reward_jpeg_compressibility"}
    name, b, t, change, best = table["reward_jpeg_compressibility"]
    assert (float(b), float(t)) == (round(base["eval/reward_jpeg_compressibility"], 4),
                                     round(last["eval/reward_jpeg_compressibility"], 4))
    evals = [m["eval/reward_jpeg_compressibility"] for m in rows if m["epoch"] >= 0]
    assert float(best) == round(max(evals), 4)


def test_summary_orders_metrics_shows_accuracies_in_percent_and_drops_repeats(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"epoch": -1, "eval/reward_shapes": 0.40, "eval/shapes_dense/all": 0.40, "eval/shapes_strict/all": 0.20,
             "eval/shapes_strict/colors": 0.5},
            {"epoch": 4, "eval/reward_shapes": 0.55, "eval/shapes_dense/all": 0.55, "eval/shapes_strict/all": 0.35,
             "eval/shapes_strict/colors": 0.75},
            {"epoch": 9, "eval/reward_shapes": 0.50, "eval/shapes_dense/all": 0.50, "eval/shapes_strict/all": 0.30,
             "eval/shapes_strict/colors": 0.25}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    lines = tracking.run_summary(path).splitlines()
    assert "epoch 9" in lines[0] and "best (epoch 4)" in lines[1]
    assert [line.split()[0] for line in lines[2:]] == ["reward_shapes", "shapes_strict/all", "shapes_strict/colors"]
    assert lines[3].split()[1:] == ["20.0%", "30.0%", "+10.0", "pts", "35.0%"]


def test_cpu_threads_are_the_cores_shared_by_the_machines_processes():
    code = ("import os, torch; from common.launch import set_cpu_threads; set_cpu_threads(2); "
            "print(torch.get_num_threads(), len(os.sched_getaffinity(0)))")
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    threads, cores = map(int, subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                                             text=True, check=True).stdout.split())
    assert threads == max(1, cores // 2)
    pinned = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, check=True).stdout.split()
    assert pinned[0] == "1"  # OMP_NUM_THREADS wins
    chosen = code.replace("set_cpu_threads(2)", "set_cpu_threads(2, 3)")  # --cpu-threads 3
    assert subprocess.run([sys.executable, "-c", chosen], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True).stdout.split()[0] == "3"
