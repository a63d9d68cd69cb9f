"""User errors under `accelerate launch --num_processes 2` (gloo on CPU): the script's `error:` line is printed once,
no process prints a traceback of its own, every process exits (none waits in a collective for a rank that has
stopped) and nothing is written. The launcher itself then reports the failed launch (torch's ChildFailedError, its
own traceback, not the script's: a launched script cannot silence it). The repeated-launch check that every
2-process run ends: bench/launch_exits.py."""
import os
import subprocess
import sys
import time

from tests.test_grpo import ENV, ROOT

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "docs/accelerate/two_cpu_processes.yaml"]
FLAGS = ["--model", "flux1", "--tiny", "--log-with", "none", "--num-epochs", "1", "--eval-every", "0"]


def rank1_raises(images, prompts, metadata):
    """A reward that fails on rank 1 only (rank 0 then waits in a collective for it)."""
    if os.environ.get("RANK") == "1":
        raise RuntimeError("the scorer on rank 1 ran out of memory")
    return images.new_zeros(len(images))


def _launch_both(tmp_path):
    """The two launches at once (each waits on its own processes): {case: (result, seconds)}."""
    cases = {"user error": ["--learning-rate", "-1"], "one rank": ["--reward", "tests.test_launch.rank1_raises"]}
    t0, procs = time.time(), {}
    for i, (name, extra) in enumerate(cases.items()):
        procs[name] = subprocess.Popen([*LAUNCH, "--main_process_port", str(29600 + i), "grpo.py", *FLAGS,
                                        "--output-dir", str(tmp_path / f"out{i}"), *extra], cwd=ROOT, env=ENV,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for name, p in procs.items():
        _, err = p.communicate(timeout=120)
        out[name] = (p.returncode, err, time.time() - t0)
    return out


def _script_lines(stderr):
    """The error lines and traceback frames of the project's files in stderr (the launcher's own report of the
    failed launch runs through site-packages only)."""
    return [line for line in stderr.splitlines() if line.startswith(("error:", "[rank"))
            or f'File "{ROOT}/' in line and "/site-packages/" not in line]


def test_user_errors_print_once_and_every_process_exits(tmp_path):
    runs = _launch_both(tmp_path)
    # an error every rank meets (checked before any model loads): printed once, by local rank 0
    rc, err, seconds = runs["user error"]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc != 0 and errors == ["error: --learning-rate must be > 0, got -1.0"]
    assert _script_lines(err) == errors  # no traceback through the scripts or common/, no [rankN] prefix
    assert not (tmp_path / "out0").exists()
    assert seconds < 60
    # an error of rank 1 alone (its reward raises): printed by rank 1; rank 0, waiting for it, exits quietly
    rc, err, seconds = runs["one rank"]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc != 0 and errors == ["error: reward 'tests.test_launch.rank1_raises' failed: RuntimeError: the scorer "
                                  "on rank 1 ran out of memory"]
    assert _script_lines(err) == errors
    assert not (tmp_path / "out1").exists()
    assert seconds < 90
