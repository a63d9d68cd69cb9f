"""Shared by the tests of the scripts: tiny FLUX.1 arguments and runs for any script, and a run up to its first model
load (every check a run makes before loading)."""
import importlib
from unittest import mock

from common import models
from common.cli import parse_with_presets
from tests.test_grpo import read_metrics

SCRIPTS = ("grpo_guard", "nft", "awm")
POLICY_EMA = {"grpo_guard": None, "nft": "old_ema", "awm": "anchor_ema"}  # the extra EMA file of a checkpoint


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
