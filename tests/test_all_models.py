"""Every image model with every algorithm script, on tiny random-weight builds (no download): the saved LoRA
loads with the model's own diffusers pipeline (`load_lora_weights`) and reproduces its predictions; a one-epoch
subprocess run of each script (`--model NAME --tiny`); condition images shown beside the outputs in the sample
grids; a dataset row with a missing or unreadable condition image stops before any model loads.
Per-model pipeline equivalence, schedules and LoRA target counts: tests/test_model_<name>.py."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from common import models
from common.errors import DataError
from tests.helpers import ALGORITHMS, checks_only, randomize_lora
from tests.test_grpo import ENV, ROOT, fresh_accelerator_state, read_metrics  # noqa: F401 (autouse fixture)

MODEL_NAMES = [m for m in models.MODELS if m != "shapes"]
VARIANTS = [(m, None) for m in MODEL_NAMES] + [("sd3_5", "large"), ("z-image", "base"), ("qwen-image-edit-plus", "2509"),
                                               ("flux2-klein", "base-4b")]


def _inputs(a, n=2):
    images = None
    if a.condition_images in ("one", "many"):
        images = [[Image.new("RGB", (64, 64), (200, 40 * i, 90))] for i in range(n)]
    frames = 5 if a.video else 1
    state = a.make_state(64, 64, frames)
    cond = a.encode_prompt(["a red cube", "a blue ball"][:n], ["", "blurry"][:n], max_sequence_length=32, images=images,
                           state=state)
    return cond, state, a.prepare_noise(n, 64, 64, torch.Generator().manual_seed(3), frames)


@pytest.mark.parametrize("name,variant", VARIANTS)
def test_saved_lora_loads_into_the_stock_pipeline(name, variant, tmp_path):
    trained = models.load(name, tiny=True, variant=variant, condition_max_pixels=64 * 64)
    assert trained.add_lora(4, 8) > 0
    randomize_lora(trained)
    trained.save_lora(str(tmp_path))
    fresh = models.load(name, tiny=True, variant=variant, condition_max_pixels=64 * 64)
    cond, state, z = _inputs(fresh)
    g, cfg = (4.0, 4.0) if name != "z-image" else (4.0, 1.0)
    with torch.no_grad():
        before = fresh.predict(z, 0.6, cond, state, g, cfg)
        fresh.pipe.load_lora_weights(str(tmp_path))  # the pipeline's own loader, diffusers format
        after, want = fresh.predict(z, 0.6, cond, state, g, cfg), trained.predict(z, 0.6, cond, state, g, cfg)
    assert (after - want).abs().max() < 1e-5 and (after - before).abs().max() > 1e-3


# beside grpo.py (SDE steps and their log-probs) and nft.py (the forward process on final latents), the two ways a
# script uses a model: the other scripts, placed so that each meets a video model, a model with condition images and
# at least three models in all (test_every_script_meets_several_models_of_each_kind); video models take two
OTHERS = {"flux1-kontext": ("dgpo",), "sd3_5": ("dppo",), "z-image": ("dpo",), "qwen-image": ("awm",),
          "qwen-image-edit-plus": ("crd",), "qwen-image-2.1": ("grpo_guard",), "flux2": ("crd",),
          "flux2-klein": ("dgpo",), "wan2_t2v": ("dgpo", "crd"), "wan2_i2v": ("grpo_guard", "awm"),
          "ltx2": ("grpo_guard", "awm"), "ltx2_i2v": ("dppo", "dpo")}


def scripts_for(name) -> tuple[str, ...]:
    """Every script on flux1; on every other model grpo.py, nft.py and its OTHERS, within the suite's time budget.
    FLOW_RL_ALL_PAIRS=1: every script on every model (run before a release; all pairs passed when the last script or
    model was added)."""
    if name == "flux1" or os.environ.get("FLOW_RL_ALL_PAIRS"):
        return ALGORITHMS
    return ("grpo", "nft", *OTHERS[name])


def test_every_script_meets_several_models_of_each_kind():
    assert set(OTHERS) == set(MODEL_NAMES) - {"flux1"}  # a new model gets its entry
    for script in ALGORITHMS:
        met = [m for m in MODEL_NAMES if script in scripts_for(m)]
        assert any(models.adapter_class(m).video for m in met), script
        assert any(models.adapter_class(m).condition_images in ("one", "many") for m in met), script
        assert len(met) >= 3, (script, met)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_algorithm_runs_one_epoch(name, tmp_path):
    """The scripts at once (one thread each), `--model NAME --tiny --num-epochs 1`."""
    procs = {s: subprocess.Popen([sys.executable, f"{s}.py", "--model", name, "--tiny", "--num-epochs", "1",
                                  "--log-with", "none", "--output-dir", str(tmp_path / s)],
                                 cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in scripts_for(name)}
    for script, p in procs.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{script} --model {name}: {err[-3000:]}"
        rows = read_metrics(tmp_path / script)
        assert [r["epoch"] for r in rows] == [-1, 0]
        assert all(v == v for r in rows for v in r.values() if isinstance(v, float))  # no NaN
        assert (tmp_path / script / "lora/pytorch_lora_weights.safetensors").is_file()
        width = Image.open(tmp_path / script / "samples/eval_base.png").size[0]
        if models.adapter_class(name).video:  # one row per eval prompt, a strip of its 5 frames; an mp4 of a 2x2 grid
            from common.video import read_video
            assert Image.open(tmp_path / script / "samples/eval_base.png").size == (5 * 64, 4 * 64), script
            frames, _ = read_video(str(tmp_path / script / "samples/eval_base.mp4"))
            assert frames.shape == (5, 3, 2 * 64, 2 * 64)
            continue
        # 4 eval prompts in one row; an edit model's cells hold its condition image and its output side by side
        needs_images = models.adapter_class(name).condition_images in ("one", "many")
        assert width == 4 * 64 * (2 if needs_images else 1), (script, width)


def test_variant_from_the_command_line(tmp_path):
    """FLUX.2-klein base (true CFG) by `--variant`; a variant the model lacks is one line before any loading."""
    cmd = [sys.executable, "grpo.py", "--model", "flux2-klein", "--tiny", "--num-epochs", "1", "--log-with", "none"]
    r = subprocess.run(cmd + ["--variant", "base-4b", "--guidance-scale", "4", "--negative-prompt", "",
                              "--output-dir", str(tmp_path / "base")], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.load(open(tmp_path / "base/config.json"))["variant"] == "base-4b"
    r = subprocess.run(cmd + ["--variant", "12b"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == "error: flux2-klein has no variant '12b'; known: 4b, 9b, base-4b, base-9b"


@pytest.mark.parametrize("problem", ["missing", "unreadable"])
def test_bad_condition_image_stops_before_loading(tmp_path, problem):
    import grpo
    from common.cli import parse_with_presets
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "images/ok.png")
    if problem == "unreadable":
        (tmp_path / "images/bad.png").write_bytes(b"\x89PNG but not really")
    rows = [{"prompt": "make it blue", "image": "ok.png"}, {"prompt": "make it red", "image": "bad.png"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY,
                              ["--model", "flux1-kontext", "--tiny", "--dataset", str(tmp_path)])
    want = "image not found: .*bad.png" if problem == "missing" else "train.jsonl:2: unreadable image .*bad.png"
    with pytest.raises(DataError, match=want):
        checks_only("grpo", args)


SEEN_BY_REWARD = []


def record_condition_paths(images, prompts, metadata):
    """A custom reward (dotted path) that records what edit rewards receive: the condition image paths."""
    SEEN_BY_REWARD.extend(m["images"] for m in metadata)
    return images.mean(dim=(1, 2, 3))


def test_condition_images_reach_the_rewards(tmp_path):
    import grpo
    from common.cli import parse_with_presets
    args = parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY,
                              ["--model", "flux1-kontext", "--tiny", "--num-epochs", "1", "--eval-every", "0",
                               "--reward", "tests.test_all_models.record_condition_paths", "--log-with", "none",
                               "--output-dir", str(tmp_path)])
    grpo.main(args)
    rows = [json.loads(line) for line in open(f"{ROOT}/datasets/demo-edit/train.jsonl")]
    want = {f"{ROOT}/datasets/demo-edit/images/{r['image']}" for r in rows}
    # the reward check before the run (2 gray samples of the first rows), then 4 prompts x 4 images
    assert len(SEEN_BY_REWARD) == 2 + 16 and all(len(p) == 1 for p in SEEN_BY_REWARD)
    assert {p[0] for p in SEEN_BY_REWARD} <= want
