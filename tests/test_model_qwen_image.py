"""The qwen-image and qwen-image-edit-plus adapters against the stock diffusers pipelines (tiny random weights,
no download)."""
import numpy as np
import pytest
import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus
from PIL import Image

from common import models, sampler
from common.models.base import ModelError
from common.models.qwen_image import QwenImageEditPlusAdapter

PROMPTS, NEG = ["a red cat on a mat", "a dog"], [" ", "blurry"]  # different lengths: the padded, masked path
EDITS = ["make the cat blue", "add a hat"]
# small stand-ins for the edit pipeline's 1024^2 VAE and 384^2 VL-encoder areas (docs/models.md 3.6)
VAE_AREA, VL_AREA = 64 * 64, 56 * 56


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["2512", "original"])
def qwen(request):
    return models.load("qwen-image", tiny=True, variant=request.param)


@pytest.fixture(scope="module", params=["2511", "2509"])
def edit(request):
    a = models.load("qwen-image-edit-plus", tiny=True, variant=request.param, condition_max_pixels=VAE_AREA)
    a.vl_image_pixels = VL_AREA
    return a


@pytest.fixture
def small_areas(monkeypatch):
    # the pipeline reads its two resize areas from module globals at call time
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", VAE_AREA)
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "CONDITION_IMAGE_SIZE", VL_AREA)


def _adapter_rollout(a, prompts, true_cfg, images=None, steps=2, size=64):
    state = a.make_state(size, size)
    cond = a.encode_prompt(prompts, [" "] * len(prompts) if true_cfg > 1 else None, 256, images=images)
    sig = a.sigmas(steps, state)
    z = a.prepare_noise(len(prompts), size, size, torch.Generator().manual_seed(0))
    traj = sampler.rollout(lambda x, i: a.predict(x, sig[i], cond, state, 1.0, true_cfg), z, sig)
    return a.decode(traj.final, state), sig, z


@pytest.mark.parametrize("true_cfg", [1.0, 4.0])
def test_qwen_image_rollout_equals_pipeline(qwen, true_cfg):
    state = qwen.make_state(64, 64)
    neg = NEG if true_cfg > 1 else None
    cond = qwen.encode_prompt(PROMPTS, neg, max_sequence_length=256)
    sig = qwen.sigmas(2, state)
    z = qwen.prepare_noise(2, 64, 64, torch.Generator().manual_seed(0))
    ours = qwen.decode(sampler.rollout(lambda x, i: qwen.predict(x, sig[i], cond, state, 1.0, true_cfg), z,
                                       sig).final, state)
    ref = qwen.pipe(prompt=PROMPTS, negative_prompt=neg, true_cfg_scale=true_cfg, height=64, width=64,
                    num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt",
                    max_sequence_length=256).images
    assert ours.shape == (2, 3, 64, 64) and 0 <= ours.min() and ours.max() <= 1
    assert (ours - ref).abs().max() < 1e-5  # measured: 0 without CFG, 1.2e-7 with (one batched call)
    torch.testing.assert_close(sig, qwen.pipe.scheduler.sigmas.float(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("true_cfg", [1.0, 4.0])
def test_edit_rollout_equals_pipeline(edit, small_areas, true_cfg):
    # two condition images of different aspect in one sample (square, and 2:1 -> 96x32 for the VAE)
    images = [_image(64, 64, 0), _image(96, 48, 1)]
    ours, sig, _ = _adapter_rollout(edit, EDITS[:1], true_cfg, images=[images])
    ref = edit.pipe(image=images, prompt=EDITS[:1], negative_prompt=[" "] if true_cfg > 1 else None,
                    true_cfg_scale=true_cfg, height=64, width=64, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert ours.shape == (1, 3, 64, 64) and 0 <= ours.min() and ours.max() <= 1
    assert (ours - ref).abs().max() < 1e-5
    torch.testing.assert_close(sig, edit.pipe.scheduler.sigmas.float(), rtol=0, atol=1e-7)


def test_edit_batch_equals_per_sample_pipeline(edit, small_areas):
    # the pipeline takes one sample per call; the adapter batches samples (padded, masked text) and encodes a
    # repeated sample once, recognising its images by content
    imgs = [[_image(64, 64, 0)], [_image(64, 64, 1)], [_image(64, 64, 0)]]
    prompts = [EDITS[0], EDITS[1], EDITS[0]]
    cond = edit.encode_prompt(prompts, [" "] * 3, images=imgs)
    assert torch.equal(cond["prompt_embeds"][0], cond["prompt_embeds"][2])
    assert cond["prompt_mask"].sum(1).tolist()[0] != cond["prompt_mask"].sum(1).tolist()[1]
    ours, _, z = _adapter_rollout(edit, prompts, 4.0, images=imgs)
    for i in range(2):
        ref = edit.pipe(image=imgs[i], prompt=prompts[i], negative_prompt=" ", true_cfg_scale=4.0, height=64,
                        width=64, num_inference_steps=2, latents=z[i:i + 1], output_type="pt").images
        assert (ours[i:i + 1] - ref).abs().max() < 1e-5


def test_non_multiple_resolution_is_an_error(qwen):
    with pytest.raises(ValueError, match="multiples of 16"):
        qwen.make_state(72, 64)


def test_edit_condition_images_checked(edit):
    with pytest.raises(ModelError, match="condition images"):
        edit.encode_prompt(EDITS, images=None)


def test_condition_max_pixels_sets_the_vae_area(edit):
    assert QwenImageEditPlusAdapter.default_condition_max_pixels == 1024 * 1024  # the pipeline's VAE_IMAGE_SIZE
    capped = QwenImageEditPlusAdapter(edit.pipe, condition_max_pixels=32 * 32)
    capped.vl_image_pixels = VL_AREA
    cond = capped.encode_prompt(EDITS[:1], images=[[_image(64, 64, 0)]])
    assert cond["image_grids"].tolist() == [[[2, 2]]] and cond["image_latents"].shape == (1, 4, 64)  # 32x32 px
    assert edit.encode_prompt(EDITS[:1], images=[[_image(64, 64, 0)]])["image_latents"].shape == (1, 16, 64)


@pytest.mark.parametrize("name", ["qwen-image", "qwen-image-edit-plus"])
def test_lora_targets_checked(name):
    assert models.load(name, tiny=True).add_lora(4, 8) == 24  # 12 per block, 2 blocks (docs/models.md section 4)
    with pytest.raises(ModelError, match="matches no module"):
        models.load(name, tiny=True).add_lora(4, 8, ["attn.to_q", "img_mlp.net.2.proj"])


def test_edit_pipeline_save_load_round_trip(edit, tmp_path):
    # the torchvision-free tiny processor must be importable by name from model_index.json
    edit.pipe.save_pretrained(tmp_path)
    pipe = QwenImageEditPlusAdapter.pipeline_cls.from_pretrained(tmp_path)
    assert type(pipe.processor).__name__ == "ImageOnlyQwen2VLProcessor"
    assert pipe.transformer.config.zero_cond_t == (edit.variant == "2511")
