"""The embedded shapes world: determinism, held-out split, the checker through the shipped VAE, and the
shipped model loading through the ordinary flux1 adapter."""
import json
import os

import numpy as np
import pytest
import torch

from common import shapes
from rewards.shapes import check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "shapes-flux")


def test_render_deterministic_by_seed():
    meta = shapes.all_prompts()[40]
    a, b = shapes.render(meta, np.random.default_rng(7)), shapes.render(meta, np.random.default_rng(7))
    assert np.array_equal(a, b) and a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, shapes.render(meta, np.random.default_rng(8)))


def test_dataset_deterministic_and_held_out(tmp_path):
    shapes.write_dataset(tmp_path / "a")
    shapes.write_dataset(tmp_path / "b")
    for f in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    # the shipped dataset is exactly what the generator writes
    for f in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / f).read_bytes() == open(os.path.join(ROOT, "datasets/shapes", f), "rb").read()
    rows = {f: [json.loads(line) for line in open(tmp_path / "a" / f)] for f in ("train.jsonl", "test.jsonl")}
    train_prompts = {r["prompt"] for r in rows["train.jsonl"]}
    test_prompts = {r["prompt"] for r in rows["test.jsonl"]}
    assert not train_prompts & test_prompts  # RL never sees a test combination
    assert len(rows["test.jsonl"]) >= 400
    tags = [r["tag"] for r in rows["test.jsonl"]]
    assert {tags.count(t) for t in shapes.CATEGORIES} == {len(tags) // len(shapes.CATEGORIES)}


def test_checker_through_shipped_vae():
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(os.path.join(MODEL, "vae")).eval()
    rng = np.random.default_rng(123)
    metas = shapes.all_prompts()
    for tag in shapes.CATEGORIES:
        pool = [m for m in metas if m["tag"] == tag]
        picks = [pool[i] for i in rng.integers(0, len(pool), 40)]
        x = torch.from_numpy(np.stack([shapes.render(m, rng) for m in picks])).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        strict = np.mean([check(r, m)[0] == check(r, m)[1] for r, m in zip(rec, picks)])
        assert strict >= 0.97, (tag, strict)


def test_shipped_model_size_and_format():
    files = [os.path.join(d, f) for d, _, fs in os.walk(MODEL) for f in fs]
    assert sum(os.path.getsize(f) for f in files) <= 25 * 2**20
    weights = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    assert not weights, weights  # safetensors only


# ---- the shipped model and GRPO on it (numbers: README "The embedded default") ----
BASE_STRICT = 0.085  # README table: base strict accuracy, 480 test prompts, eval seed 10000


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)


def _shapes_args(out, *extra):
    import grpo
    from common.cli import parse_with_presets
    return parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY_PRESETS, ["--output-dir", str(out), *extra])


def _metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_shipped_model_loads_through_flux1_adapter_and_matches_readme(tmp_path):
    import grpo
    from common import models
    from common.models.flux1 import Flux1Adapter
    a = models.load("flux1", path=MODEL)
    assert type(a) is Flux1Adapter and not a.config.guidance_embeds
    grpo.main(_shapes_args(tmp_path / "base", "--num-epochs", "0"))
    base = _metrics(tmp_path / "base")[0]
    assert abs(base["eval/shapes_strict/all"] - BASE_STRICT) <= 0.05, base


def test_short_grpo_run_improves_held_out_reward(tmp_path):
    """60 epochs (~4 CPU minutes) on held-in prompts, evaluated on 120 held-out prompts with fixed seeds.
    Measured on this machine: the base model's held-out dense reward has std 0.009 (strict 0.0075) over
    5 evaluation seeds; 60-epoch runs with training seeds 42, 1, 2 raised dense reward by +0.182, +0.210,
    +0.128 (std 0.042) and strict accuracy by +15.0, +16.7, +11.7 points. The margins asserted, +0.06 dense
    and +5 points strict, are ~7 evaluation-noise standard deviations and below every measured run."""
    import grpo
    out = tmp_path / "learn"
    grpo.main(_shapes_args(out, "--num-epochs", "60", "--eval-every", "60", "--eval-num-prompts", "120",
                           "--save-every", "60"))
    rows = _metrics(out)
    base, final = rows[0], rows[-1]
    assert final["eval/reward_shapes"] - base["eval/reward_shapes"] >= 0.06, (base, final)
    assert final["eval/shapes_strict/all"] - base["eval/shapes_strict/all"] >= 0.05, (base, final)
