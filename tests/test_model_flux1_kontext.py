"""The flux1-kontext adapter against the stock diffusers FluxKontextPipeline (tiny random weights, no download)."""
import numpy as np
import pytest
import torch
from PIL import Image

from common import models, sampler
from common.models.base import ModelError

# a repeated sample (prompt and image) as in a GRPO batch, and a second one with its own image
PROMPTS, NEG = ["a red cat on a mat", "a dog", "a red cat on a mat"], ["", "blurry", ""]


def _image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


IMG_A, IMG_B = _image(64, 64, 0), _image(64, 64, 1)
IMAGES = [[IMG_A], [IMG_B], [IMG_A]]


@pytest.fixture(scope="module")
def kontext():
    # condition area capped at the output area, as the reference recipes do (keeps the test at 64x64)
    return models.load("flux1-kontext", tiny=True, condition_max_pixels=64 * 64)


@pytest.fixture(scope="module")
def kontext_default():
    return models.load("flux1-kontext", tiny=True)


def _adapter_rollout(a, true_cfg, steps=4, size=64):
    state = a.make_state(size, size)
    cond = a.encode_prompt(PROMPTS, NEG if true_cfg > 1 else None, max_sequence_length=32, images=IMAGES)
    sig = a.sigmas(steps, state)
    z = a.prepare_noise(len(PROMPTS), size, size, torch.Generator().manual_seed(0))
    traj = sampler.rollout(lambda x, i: a.predict(x, sig[i], cond, state, 2.5, true_cfg), z, sig)
    return a.decode(traj.final, state), sig


@pytest.mark.parametrize("true_cfg", [1.0, 4.0])
def test_ode_rollout_equals_pipeline(kontext, true_cfg):
    ours, sig = _adapter_rollout(kontext, true_cfg)
    kw = dict(negative_prompt=NEG, true_cfg_scale=true_cfg) if true_cfg > 1 else {}
    # the images already have the capped size; max_area keeps the requested output size
    ref = kontext.pipe(image=[IMG_A, IMG_B, IMG_A], prompt=PROMPTS, height=64, width=64, num_inference_steps=4,
                       guidance_scale=2.5, generator=torch.Generator().manual_seed(0), output_type="pt",
                       max_sequence_length=32, max_area=64 * 64, _auto_resize=False, **kw).images
    assert ours.shape == (3, 3, 64, 64) and 0 <= ours.min() and ours.max() <= 1
    assert (ours - ref).abs().max() < 1e-5
    # the schedule is the pipeline scheduler's own (mu from the 16 target tokens, not the 32 with the condition)
    torch.testing.assert_close(sig, kontext.pipe.scheduler.sigmas.float(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("w,h", [(96, 64), (40, 130), (1000, 700)])
def test_default_condition_size_is_the_pipeline_bucket(kontext_default, monkeypatch, w, h):
    a = kontext_default
    assert a.condition_max_pixels == 1024 * 1024
    seen = []

    class Stop(Exception):
        pass

    def record(image, generator):  # the image the pipeline hands to the VAE; stop before the 1 MP encode
        seen.append(tuple(image.shape[2:]))
        raise Stop

    monkeypatch.setattr(a.pipe, "_encode_vae_image", record)
    with pytest.raises(Stop):
        a.pipe(image=_image(w, h), prompt="a cat", height=64, width=64, max_area=64 * 64, max_sequence_length=32)
    assert seen == [a.condition_size(_image(w, h))]


def test_condition_layout(kontext):
    cond = kontext.encode_prompt(["a cat"] * 2, max_sequence_length=32, images=[[_image(200, 100)]] * 2)
    # aspect 2.02 bucket 1456x720, capped to 4096 px: 80x32 -> 5x2 packed tokens (2 rows, 5 columns)
    assert cond["image_latents"].shape == (2, 10, 64) and cond["image_grids"].tolist() == [[[2, 5]]] * 2
    assert 2 * 5 * 16 * 16 <= kontext.condition_max_pixels
    picked = kontext.select(cond, [1])
    assert picked["image_latents"].shape == (1, 10, 64) and picked["image_grids"].shape == (1, 1, 2)


def test_condition_images_checked(kontext):
    with pytest.raises(ModelError, match="exactly one condition image"):
        kontext.encode_prompt(["a"], max_sequence_length=32)
    with pytest.raises(ModelError, match="exactly one condition image"):
        kontext.encode_prompt(["a"], max_sequence_length=32, images=[[IMG_A, IMG_B]])


def test_non_multiple_resolution_is_an_error(kontext):
    with pytest.raises(ValueError, match="multiples of 16"):
        kontext.make_state(72, 64)


def test_lora_targets_checked():
    a = models.load("flux1-kontext", tiny=True)
    assert a.add_lora(4, 8) == 15  # 1 double + 1 single block, as flux1 (docs/models.md section 4)
    b = models.load("flux1-kontext", tiny=True)
    with pytest.raises(ModelError, match="matches no module"):
        b.add_lora(4, 8, ["attn.to_q", "attn.not_a_layer"])
