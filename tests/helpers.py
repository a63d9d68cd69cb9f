"""Shared by the tests of the scripts: tiny FLUX.1 arguments and runs for any script, and a run up to its first model
load (every check a run makes before loading); a reward server to test a served reward against."""
import ast
import contextlib
import glob
import importlib
import json
import os
import socket
import subprocess
import sys
import time
from unittest import mock

import httpx

from common import models
from common.cli import parse_with_presets
from tests.test_grpo import ROOT, read_metrics


def algorithm_scripts() -> tuple[str, ...]:
    """Every top-level script that defines `Args` and `main`: the algorithms. Tests take them from here, so a script
    added by copying is under the layout, copy and smoke tests the moment it exists."""
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py"))):
        with open(path) as f:
            names = {n.name for n in ast.parse(f.read()).body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
        if {"Args", "main"} <= names:
            found.append(os.path.basename(path)[:-3])
    return tuple(found)


ALGORITHMS = algorithm_scripts()
SCRIPTS = tuple(s for s in ALGORITHMS if s != "grpo")  # grpo.py has tests of its own (tests/test_grpo.py)
POLICY_EMA = {"grpo_guard": None, "nft": "old_ema", "awm": "anchor_ema"}  # the extra EMA file of a checkpoint


def own_state(checkpoint_dir) -> list[str]:
    """The names of a checkpoint's algorithm-specific state files (what its state.json lists beyond the weights,
    optimizer and EMA every run writes), e.g. ["old_ema"] for nft.py."""
    with open(os.path.join(checkpoint_dir, "state.json")) as f:
        files = json.load(f)["files"]
    return [f[:-len(".safetensors")] for f in files
            if f not in ("trainable.safetensors", "optimizer.safetensors", "ema.safetensors")]


def tiny_args(script, out, *extra):
    mod = importlib.import_module(script)
    argv = ["--model", "flux1", "--tiny", "--output-dir", str(out), "--log-with", "none", *extra]
    return parse_with_presets(mod.Args, mod.PRESETS, mod.TINY, argv)


def tiny_run(script, out, *extra):
    """Train `script` in-process on the tiny FLUX.1 (1 epoch, no evaluation unless `extra` says otherwise)."""
    importlib.import_module(script).main(tiny_args(script, out, "--eval-every", "0", "--num-epochs", "1", *extra))
    return read_metrics(out)


class ModelLoadReached(Exception):
    """A run passed every check and reached its first model load."""


def checks_only(script, args):
    """Run `script`'s main(args) up to its first model load, which raises ModelLoadReached instead of loading: every
    check a run makes before loading runs (an error is raised as the script raises it); returns when all pass."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)

    def reached(*a, **k):
        raise ModelLoadReached

    with mock.patch.object(models, "load", reached):
        try:
            importlib.import_module(script).main(args)
        except ModelLoadReached:
            return
    raise AssertionError(f"{script}.main returned without loading a model")


@contextlib.contextmanager
def reward_server(reward, log_path, *flags):
    """`python -m rewards.server --reward REWARD FLAGS` on a free 127.0.0.1 port, one thread, no token; yields its URL
    once /health answers, kills it on exit. A server that exits fails with its log; the wait is long (a loaded
    machine imports slowly) and costs nothing when the server comes up."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("FLOW_RL_REWARD_TOKEN", None), env.pop("FLOW_RL_REWARD_TOKEN_FILE", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rewards.server", "--reward", reward, *flags, "--port",
                                 str(port), "--device", "cpu"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(reward, url, proc, log_path, time.monotonic() + 600)
        yield url
    finally:
        proc.kill()
        proc.wait()


def wait_for_health(name, url, proc, log_path, deadline, headers=None):
    """Until `url`/health answers 2xx; the server's log in the failure when it exits or `deadline` passes."""
    while True:
        assert proc.poll() is None, f"the {name} server exited: {open(log_path).read()}"
        try:
            if httpx.get(url + "/health", timeout=1, headers=headers).is_success:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"the {name} server did not come up: {open(log_path).read()}"
        time.sleep(0.1)


def randomize_lora(adapter):
    """LoRA's B starts at zero: random trainable weights (seed 0), so that the adapter changes the predictions."""
    import torch
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapter.pipe.transformer.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
