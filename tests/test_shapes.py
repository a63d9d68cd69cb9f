"""The embedded shapes world: determinism, held-out split, the checker through the shipped VAE, and the
shipped model loading through the ordinary flux1 adapter."""
import json
import os

import numpy as np
import pytest
import torch

from rewards import shapes_world as shapes
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



def test_tokenizers_hold_world_words(tmp_path):
    """The shipped tokenizers (built by tiny_parts with the world's vocabulary) read each world word as one
    token, keep other text (byte fallback), and survive save/load."""
    from transformers import CLIPTokenizer, T5Tokenizer
    from common.models import tiny_parts
    words = shapes.vocabulary()
    assert len(words) == 22 and "triangles" in words and "left" in words
    built = {"clip": tiny_parts.clip_tokenizer(words=words), "t5": tiny_parts.t5_tokenizer(words=words)}
    shipped = {"clip": CLIPTokenizer.from_pretrained(os.path.join(MODEL, "tokenizer")),
               "t5": T5Tokenizer.from_pretrained(os.path.join(MODEL, "tokenizer_2"))}
    for name, tok in [*built.items(), *shipped.items()]:
        assert all(len(tok.tokenize(w)) == 1 for w in words), name
        assert tok.tokenize("a red circle to the left of a blue square") == built[name].tokenize(
            "a red circle to the left of a blue square")
        assert len(tok.tokenize("a purple hexagon")) > 3  # unknown words spelled out, not dropped
        assert tok("two circles").input_ids == built[name]("two circles").input_ids
    plain = tiny_parts.t5_tokenizer()
    assert len(plain.tokenize("triangle")) == 8  # without words: one token per character

def test_shipped_model_size_and_format():
    files = [os.path.join(d, f) for d, _, fs in os.walk(MODEL) for f in fs]
    assert sum(os.path.getsize(f) for f in files) <= 25 * 2**20
    weights = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    assert not weights, weights  # safetensors only


# ---- the shipped model and GRPO on it (numbers: docs/shapes.md) ----
BASE_STRICT = 0.183  # docs/shapes.md table: base strict accuracy, 480 test prompts, eval seed 10000


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)


def _shapes_args(out, *extra):
    import grpo
    from common.cli import parse_with_presets
    return parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY, ["--output-dir", str(out), *extra])


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


# Each algorithm's learning on the shapes world: its `shapes` preset (8 prompts x 8 images per epoch, held-in
# prompts) for EPOCHS[script] epochs, evaluated on 120 held-out prompts with fixed noise (the same noise before
# and after, so the gain is a paired difference). The benchmark (bench/run_bench.py, docs/bench.md "Comparing the
# algorithms") measured these dense-reward gains after that many epochs with training seeds 42, 1, 2: the
# run-to-run spread is up to 0.08 (GRPO-Guard), and each margin is below every measured run. NFT needs 20 epochs
# (after 10: +0.046 with seed 42); GRPO the most (after 30 epochs seed 1 was at -0.021). One script per way of
# learning (SDE log-probs, the forward process, advantage-weighted matching): GRPO-Guard (GRPO's rollouts with another
# ratio; measured 40-epoch gains 0.160, 0.082, 0.088) and the four that compare samples learn in bench/run_bench.py
# (docs/bench.md), their losses are tested against fp64 formulas, and they are left out here for the suite's time.
EPOCHS = {"grpo": 50, "nft": 20, "awm": 10}
# the gains were measured with GRPO's window of 2 SDE steps (the preset before issue 30 chose 4), which also keeps the
# test at half the training time
EXTRA = {"grpo": ["--sde-window-size", "2"], "nft": [], "awm": []}
GAINS_MEASURED = {"grpo": (0.114, 0.099, 0.100), "nft": (0.140, 0.169, 0.144), "awm": (0.144, 0.115, 0.132)}
MARGIN = {"grpo": 0.05, "nft": 0.06, "awm": 0.05}


def test_every_algorithm_raises_held_out_reward():
    """The three scripts at once as subprocesses, one thread each (~3.5 minutes on 2 cores; one GRPO process
    with two threads beside three others ran 2.5x slower)."""
    import subprocess
    import sys
    import tempfile
    assert all(min(GAINS_MEASURED[s]) > MARGIN[s] for s in MARGIN)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        procs = {s: subprocess.Popen([sys.executable, f"{s}.py", "--num-epochs", str(n), "--eval-every", str(n),
                                      "--eval-num-prompts", "120", "--save-every", str(n), "--log-with", "none",
                                      "--output-dir", os.path.join(tmp, s), *EXTRA[s]], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for s, n in EPOCHS.items()}
        gains = {}
        for script, p in procs.items():
            _, err = p.communicate(timeout=1500)
            assert p.returncode == 0, f"{script}: {err[-2000:]}"
            rows = _metrics(os.path.join(tmp, script))
            assert [rows[0]["epoch"], rows[-1]["epoch"]] == [-1, EPOCHS[script] - 1]
            gains[script] = rows[-1]["eval/reward_shapes"] - rows[0]["eval/reward_shapes"]
    assert all(gains[s] >= MARGIN[s] for s in MARGIN), gains


def test_pretrain_script_bad_stage_order_is_one_line(tmp_path):
    """A stage run alone without the previous stage's output stops with one line, before any work."""
    import subprocess
    import sys
    cases = (["--stage", "anneal"], ["--stage", "flow"], ["--anneal-steps", "100"])
    procs = [subprocess.Popen([sys.executable, "scripts/pretrain_shapes.py", "--work", str(tmp_path / "w"), *extra],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for extra in cases]  # at once: each is only the start-up and its check
    for extra, p in zip(cases, procs):
        _, err = p.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert p.returncode == 1 and len(lines) == 1, (extra, err[-500:])
    assert not (tmp_path / "w").exists()  # nothing written
