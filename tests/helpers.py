"""Shared by the tests of grpo_guard.py, nft.py and awm.py: tiny FLUX.1 arguments and runs for any script."""
import importlib

from common.cli import parse_with_presets
from tests.test_grpo import read_metrics

SCRIPTS = ("grpo_guard", "nft", "awm")
POLICY_EMA = {"grpo_guard": None, "nft": "old_ema", "awm": "anchor_ema"}  # the extra EMA file of a checkpoint


def tiny_args(script, out, *extra):
    mod = importlib.import_module(script)
    argv = ["--model", "flux1", "--tiny", "--output-dir", str(out), "--log-with", "none", *extra]
    return parse_with_presets(mod.Args, mod.PRESETS, mod.TINY_PRESETS, argv)


def tiny_run(script, out, *extra):
    """Train `script` in-process on the tiny FLUX.1 (1 epoch, no evaluation unless `extra` says otherwise)."""
    importlib.import_module(script).main(tiny_args(script, out, "--eval-every", "0", "--num-epochs", "1", *extra))
    return read_metrics(out)
