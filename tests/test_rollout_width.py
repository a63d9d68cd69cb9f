"""--rollout-batch-size: rollouts of several training micro-batches in one forward give the same samples as the
micro-batches rolled out alone (each micro-batch keeps its own noise generators), and the same run."""
import subprocess
import sys

import pytest
import torch

from common import models, sampler
from common.cli import parse_with_presets
from common.errors import ConfigError
from tests.helpers import checks_only
from tests.test_grpo import ENV, ROOT, read_metrics


def test_wide_rollout_gives_the_narrow_samples():
    a = models.load("flux1", tiny=True)
    state = a.make_state(64, 64)
    sig = a.sigmas(4, state)
    cond = a.encode_prompt(["a red cube", "a blue ball", "a cat", "a dog"], None, 32)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12)]  # noqa: E731 (two micro-batches of 2)
    noise = lambda: torch.cat([a.prepare_noise(2, 64, 64, g) for g in gens()])  # noqa: E731
    predict = lambda c: lambda z, i: a.predict(z, sig[i], c, state, 3.5, 1.0)  # noqa: E731
    wide = sampler.rollout(predict(cond), noise(), sig, [1, 2], 0.7, "Flow-SDE", generator=gens())
    z = noise()
    for k, g in enumerate(gens()):
        rows = slice(2 * k, 2 * k + 2)
        narrow = sampler.rollout(predict(a.select(cond, rows)), z[rows], sig, [1, 2], 0.7, "Flow-SDE", generator=g)
        part = wide.rows(rows)
        assert (part.final - narrow.final).abs().max() < 1e-6
        for i in narrow.latents:
            assert (part.latents[i] - narrow.latents[i]).abs().max() < 1e-6
        for i in narrow.log_probs:
            assert (part.log_probs[i] - narrow.log_probs[i]).abs().max() < 1e-6


def brightness(images, prompts, metadata):
    """A smooth reward (the mean pixel): rounding-level differences of the samples stay rounding-level in the run.
    The JPEG rewards are step functions of the 8-bit pixels: one flipped pixel changes a score by 1e-4."""
    return images.float().mean(dim=tuple(range(1, images.dim())))


def test_wide_rollout_run_equals_narrow(tmp_path, script="awm"):
    rows = {}
    for width in ("2", "8"):
        out = tmp_path / width
        r = subprocess.run([sys.executable, f"{script}.py", "--model", "flux1", "--tiny", "--log-with", "none",
                            "--reward", "tests.test_rollout_width.brightness", "--batch-size", "2",
                            "--rollout-batch-size", width, "--output-dir", str(out)],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        rows[width] = read_metrics(out)
    # a wider forward sums in another order: samples differ by fp32 rounding (< 1e-7 measured, here and in the run's
    # means); the losses are means of +-O(1) terms that nearly cancel, so the bound is absolute below 1
    for narrow, wide in zip(rows["2"], rows["8"], strict=True):
        for k, v in narrow.items():
            if isinstance(v, float) and not k.startswith(("time/", "memory/")):
                assert abs(wide[k] - v) <= 1e-5 * max(1.0, abs(v)), k


def test_rollout_width_must_be_a_multiple_of_the_batch():
    import grpo
    args = parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY,
                              ["--model", "flux1", "--tiny", "--rollout-batch-size", "3"])
    with pytest.raises(ConfigError, match="--rollout-batch-size 3 must be a multiple of --batch-size 2"):
        checks_only("grpo", args)
