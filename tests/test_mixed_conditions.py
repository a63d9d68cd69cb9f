"""Condition images of mixed aspect ratios (and counts) in one batch, for every model that takes them: each row of a
mixed batch predicts what it predicts alone (a batch of one layout is the path the pipeline parity tests check),
with CFG, through the encode-once cache, and with gradients; whole runs of the scripts at the default batch sizes
on a dataset of mixed aspect ratios (training and evaluation batches)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from common import conditioning, models
from tests.test_grpo import ENV, ROOT, read_metrics


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


WIDE, TALL, SQUARE = _image(128, 64, 0), _image(64, 112, 1), _image(64, 64, 2)  # FLUX.2: sides >= 64
PROMPTS = ["make it blue", "add a hat", "make it blue", "a dog in snow"]
NEGS = ["", "blurry", "", "low quality"]
# (model, options, condition images per row, guidance_scale, true_cfg_scale): rows 0 and 2 repeat one sample
CASES = {
    "flux1-kontext": (dict(condition_max_pixels=64 * 64), [[WIDE], [TALL], [WIDE], [SQUARE]], 2.5, 3.0),
    "qwen-image-edit-plus": (dict(condition_max_pixels=64 * 64),
                             [[WIDE], [TALL, SQUARE], [WIDE], [SQUARE]], 1.0, 4.0),
    "flux2-klein": (dict(condition_max_pixels=64 * 64, variant="base-4b"), [[WIDE], [TALL, SQUARE], [WIDE], []],
                    4.0, 1.0),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    options, images, g, cfg = CASES[request.param]
    a = models.load(request.param, tiny=True, **options)
    if request.param == "qwen-image-edit-plus":
        a.vl_image_pixels = 56 * 56  # a small stand-in for the VL encoder's 384^2 area (tests/test_model_qwen_image)
    return a, images, g, cfg


def _predict(a, cond, z, g, cfg, sigma=0.7):
    state = a.make_state(64, 64)
    return a.predict(z, sigma, cond, state, g, cfg)


def test_mixed_batch_rows_predict_as_alone(case):
    a, images, g, cfg = case
    cond = a.encode_prompt(PROMPTS, NEGS, 64, images)
    assert len({tuple(map(tuple, r)) for r in cond["image_grids"].tolist()}) == 3  # three layouts, one repeated
    z = a.prepare_noise(len(PROMPTS), 64, 64, torch.Generator().manual_seed(0))
    z[2] = z[0]
    mixed = _predict(a, cond, z, g, cfg)
    for i in range(len(PROMPTS)):
        alone = _predict(a, a.encode_prompt(PROMPTS[i:i + 1], NEGS[i:i + 1], 64, images[i:i + 1]), z[i:i + 1], g, cfg)
        assert (mixed[i:i + 1] - alone).abs().max() < 1e-5, i
    assert (mixed[0] - mixed[2]).abs().max() < 1e-5  # the repeated sample, from the same noise
    # per-row sigmas (NFT and AWM train at one sigma per sample) follow their rows
    sig = torch.tensor([0.3, 0.5, 0.7, 0.9])
    mixed = _predict(a, cond, z, g, cfg, sig)
    for i in range(len(PROMPTS)):
        alone = _predict(a, a.select(cond, [i]), z[i:i + 1], g, cfg, sig[i:i + 1])
        assert (mixed[i:i + 1] - alone).abs().max() < 1e-5, i
    # a minibatch of rows of one layout selected from the mixed batch (training's micro-batches)
    picked = a.select(cond, [1])
    assert (_predict(a, picked, z[1:2], g, cfg, sig[1:2]) - mixed[1:2]).abs().max() < 1e-5


def test_mixed_rows_from_the_encode_once_cache(case):
    a, images, g, cfg = case

    class Row:  # the fields the cache reads of a dataset row
        def __init__(self, i):
            self.source, self.i = f"train.jsonl:{i + 1}", i

    rows = [Row(i) for i in range(len(PROMPTS))]
    cache = conditioning.ConditionCache(lambda items, state: a.encode_prompt(
        [PROMPTS[r.i] for r in items], [NEGS[r.i] for r in items], 64, [images[r.i] for r in items]))
    state = a.make_state(64, 64)
    cache.fill(rows, state)  # one row per call, each at its own length
    cached = cache.get(rows, state, "cpu")
    direct = a.encode_prompt(PROMPTS, NEGS, 64, images)
    z = a.prepare_noise(len(PROMPTS), 64, 64, torch.Generator().manual_seed(1))
    assert (_predict(a, cached, z, g, cfg) - _predict(a, direct, z, g, cfg)).abs().max() < 1e-5


def test_mixed_batch_backward_reaches_every_row(case):
    a, images, g, cfg = case
    cond = a.encode_prompt(PROMPTS, NEGS, 64, images)
    z = a.prepare_noise(len(PROMPTS), 64, 64, torch.Generator().manual_seed(2)).requires_grad_(True)
    _predict(a, cond, z, g, cfg).square().sum().backward()
    assert (z.grad.flatten(1).abs().amax(1) > 0).all()


def _mixed_dataset(root):
    """The reference project's edit dataset layout (sharegpt4o_image_mini): train.jsonl and test.jsonl rows
    {"prompt", "image"} naming PNG and JPEG files in images/, of mixed aspect ratios; stand-in images, small."""
    (root / "images").mkdir(parents=True)
    files = [("v2v_3165.png", 96, 48), ("v2v_57915.jpeg", 48, 80), ("v2v_2209.png", 64, 64),
             ("v2v_82037.jpeg", 80, 48), ("v2v_14009.png", 64, 96), ("v2v_72009.jpeg", 96, 64)]
    rows = []
    for i, (name, w, h) in enumerate(files):
        _image(w, h, 10 + i).save(root / "images" / name)
        rows.append({"prompt": f"Transform the scene number {i} into a watercolor.", "image": name})
    for split, part in (("train", rows), ("test", rows[:4])):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return root


def test_scripts_train_and_evaluate_mixed_aspect_ratios(tmp_path):
    """grpo.py on flux1-kontext at the default batch sizes (tiny: 2 per micro-batch, 8 per evaluation forward) and
    nft.py on qwen-image-edit-plus with 2 prompts per micro-batch, at once."""
    data = _mixed_dataset(tmp_path / "data")
    runs = {"grpo.py": ("flux1-kontext", []),
            "nft.py": ("qwen-image-edit-plus", ["--batch-size", "4", "--group-size", "2", "--prompts-per-epoch", "4"])}
    procs = {script: subprocess.Popen([sys.executable, script, "--model", model, "--tiny", "--dataset", str(data),
                                       "--num-epochs", "1", "--log-with", "none", "--output-dir",
                                       str(tmp_path / script), *flags], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
             for script, (model, flags) in runs.items()}
    for script, p in procs.items():
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"{script}: {err[-3000:]}"
        out = tmp_path / script
        metrics = read_metrics(out)
        assert [m["epoch"] for m in metrics] == [-1, 0]  # the base model's evaluation and the epoch's, both batched
        assert all(np.isfinite(m["eval/reward_jpeg_compressibility"]) for m in metrics)
        assert (out / "lora/pytorch_lora_weights.safetensors").exists()
