"""The sd3_5 adapter against the stock diffusers StableDiffusion3Pipeline (tiny random weights, no download)."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from common import models, sampler
from common.models.base import ModelError

PROMPTS, NEG = ["a red cat on a mat", "a dog"], ["", "blurry"]
VARIANTS = ["medium", "large"]


@pytest.fixture(scope="module", params=VARIANTS)
def sd3(request):
    return models.load("sd3_5", tiny=True, variant=request.param)


def _adapter_rollout(a, guidance, neg, steps=4, size=64):
    state = a.make_state(size, size)
    cond = a.encode_prompt(PROMPTS, neg, max_sequence_length=32)
    sig = a.sigmas(steps, state)
    z = a.prepare_noise(len(PROMPTS), size, size, torch.Generator().manual_seed(0))
    traj = sampler.rollout(lambda x, i: a.predict(x, sig[i], cond, state, guidance), z, sig)
    return a.decode(traj.final, state), sig


# (guidance, our negatives, the pipeline's): with CFG and no negative prompt the pipeline encodes "",
# which our presets pass explicitly
@pytest.mark.parametrize("guidance, neg, pipe_neg", [(1.0, None, None), (4.5, NEG, NEG), (4.5, ["", ""], None)])
def test_ode_rollout_equals_pipeline(sd3, guidance, neg, pipe_neg):
    ours, sig = _adapter_rollout(sd3, guidance, neg)
    ref = sd3.pipe(prompt=PROMPTS, negative_prompt=pipe_neg, height=64, width=64, num_inference_steps=4,
                   guidance_scale=guidance, generator=torch.Generator().manual_seed(0), output_type="pt",
                   max_sequence_length=32).images
    assert ours.shape == (2, 3, 64, 64) and 0 <= ours.min() and ours.max() <= 1
    assert (ours - ref).abs().max() < 1e-5
    # the schedule is the pipeline scheduler's own grid, not linspace(1, 1/N, N) (docs/models.md 3.3)
    torch.testing.assert_close(sig, sd3.pipe.scheduler.sigmas.float(), rtol=0, atol=1e-7)
    torch.testing.assert_close(sig, torch.tensor([1.0, 0.8577, 0.6022, 0.0089, 0.0]), rtol=0, atol=1e-4)


def test_guidance_without_negatives_is_one_unguided_pass(sd3):
    state = sd3.make_state(64, 64)
    cond = sd3.encode_prompt(PROMPTS, max_sequence_length=32)
    z = sd3.prepare_noise(2, 64, 64, torch.Generator().manual_seed(1))
    sig = sd3.sigmas(2, state)
    torch.testing.assert_close(sd3.predict(z, sig[0], cond, state, 4.5), sd3.predict(z, sig[0], cond, state, 1.0))


def test_dynamic_shifting_config_follows_the_pipeline(sd3):
    # not the SD3.5 configs, but the pipeline computes mu from the token count when a scheduler asks for it
    stock = sd3.pipe.scheduler
    sd3.pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    try:
        sd3.pipe(prompt=PROMPTS[:1], height=96, width=64, num_inference_steps=3, guidance_scale=1.0,
                 output_type="latent", max_sequence_length=32)
        torch.testing.assert_close(sd3.sigmas(3, sd3.make_state(96, 64)), sd3.pipe.scheduler.sigmas.float(),
                                   rtol=0, atol=1e-7)
    finally:
        sd3.pipe.scheduler = stock


def test_resolution_limits(sd3):
    with pytest.raises(ValueError, match="multiples of 16"):
        sd3.make_state(72, 64)
    with pytest.raises(ValueError, match="at most 512"):  # tiny pos_embed_max_size 32 patches
        sd3.make_state(528, 64)
    with pytest.raises(ModelError, match="at most 512"):
        sd3.encode_prompt(PROMPTS, max_sequence_length=513)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lora_targets_checked(variant):
    a = models.load("sd3_5", tiny=True, variant=variant)
    # 8 in block 0 + 7 in the last block (context_pre_only: no to_add_out); medium's attn2 is not a target
    assert a.add_lora(4, 8) == 15
    b = models.load("sd3_5", tiny=True, variant=variant)
    with pytest.raises(ModelError, match="matches no module"):
        b.add_lora(4, 8, ["attn.to_q", "attn.not_a_layer"])


def test_variants():
    assert models.adapter_class("sd3_5").hub_id == "stabilityai/stable-diffusion-3.5-medium"
    with pytest.raises(ModelError, match="no variant 'turbo'"):
        models.load("sd3_5", tiny=True, variant="turbo")
    medium = models.load("sd3_5", tiny=True)
    assert medium.variant == "medium" and medium.config.dual_attention_layers == (0,)
