"""Remote rewards through the scripts (real `python -m rewards.server` processes on 127.0.0.1): a tiny run against a
served reward logs the local reward's numbers; a wrong token stops the run in one line before any model loads; a
server killed mid-run fails the run within the retry bound with one line, the last checkpoint intact, and the same
command with `--resume-from latest` finishes once the server is back."""
import json
import os
import socket
import subprocess
import sys
import time

import httpx

from tests.test_grpo import ENV, ROOT, read_metrics

FLAGS = [sys.executable, "grpo.py", "--model", "flux1", "--tiny", "--log-with", "none", "--eval-every", "0"]


# jpeg_compressibility after 0.15 s per call (a light module the server imports fast): slow enough that the server
# can be killed inside an epoch
SLOW = "bench.async_rewards.slow_jpeg"
SLOW_ENV = {**ENV, "BENCH_REWARD_SECONDS": "0.15"}


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(reward, port, env=ENV):
    proc = subprocess.Popen([sys.executable, "-m", "rewards.server", "--reward", reward, "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):  # up to 60 s
        try:
            token = env.get("FLOW_RL_REWARD_TOKEN")
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5, headers=headers).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("reward server did not start")


def test_remote_run_equals_local_and_a_bad_token_stops_before_loading(tmp_path):
    port = _port()
    server = _serve("jpeg_compressibility", port, {**ENV, "FLOW_RL_REWARD_TOKEN": "right"})
    try:
        spec = f"remote=http://127.0.0.1:{port}"
        r = subprocess.run([*FLAGS, "--reward", spec, "--output-dir", str(tmp_path / "remote")], cwd=ROOT,
                           env={**ENV, "FLOW_RL_REWARD_TOKEN": "right"}, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        bad = subprocess.run([*FLAGS, "--reward", spec, "--output-dir", str(tmp_path / "bad")], cwd=ROOT,
                             env={**ENV, "FLOW_RL_REWARD_TOKEN": "wrong"}, capture_output=True, text=True, timeout=120)
    finally:
        server.kill()
    local = subprocess.run([*FLAGS, "--reward", "jpeg_compressibility", "--output-dir", str(tmp_path / "local")],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0
    for a, b in zip(read_metrics(tmp_path / "remote"), read_metrics(tmp_path / "local"), strict=True):
        assert a["reward/remote_mean"] == b["reward/jpeg_compressibility_mean"]
        assert a["train/loss"] == b["train/loss"]
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "token" in lines[-1] and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()  # stopped before anything was written or loaded
    assert json.load(open(tmp_path / "remote/config.json"))["reward"] == [spec]  # no secret in the config


def test_killed_server_fails_the_run_then_resume_finishes(tmp_path):
    port, out = _port(), tmp_path / "run"
    spec = f"slow=http://127.0.0.1:{port}?timeout=1&max_wait=3"
    cmd = [*FLAGS, "--reward", spec, "--num-epochs", "3", "--save-every", "1", "--output-dir", str(out)]
    server = _serve(SLOW, port, SLOW_ENV)
    run = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints/checkpoint-2").is_dir() and time.monotonic() < deadline:  # epoch 0 saved
            time.sleep(0.05)
        server.kill()
        server.wait()
        killed_at = time.monotonic()
        _, err = run.communicate(timeout=120)
        waited = time.monotonic() - killed_at
    finally:
        server.kill()
        run.kill()
    assert run.returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: reward 'slow': ") and "attempt" in last, last
    assert waited < 20  # max_wait 3 s per call, plus the epoch in flight
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert ckpts and all(c.startswith("checkpoint-") for c in ckpts)  # complete checkpoints only, no temporary one
    server = _serve(SLOW, port, SLOW_ENV)  # the server is back
    try:
        r = subprocess.run(cmd + ["--resume-from", "latest"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=300)
    finally:
        server.kill()
    assert r.returncode == 0, r.stderr[-2000:]
    assert [m["epoch"] for m in read_metrics(out)] == [0, 1, 2]  # epoch 1 failed before its line; resumed from 0
