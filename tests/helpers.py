"""Shared by the tests of the scripts: tiny FLUX.1 arguments and runs for any script, and a run up to its first model
load (every check a run makes before loading)."""
import ast
import glob
import importlib
import json
import os
from unittest import mock

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
