"""The z-image adapter against the stock diffusers ZImagePipeline (tiny random weights, no download)."""
import pytest
import torch

from common import models, sampler
from common.models.base import ModelError

PROMPTS, NEG = ["a red cat on a mat", "a dog"], ["", "blurry"]
MAX_SEQ = 64


@pytest.fixture(scope="module")
def variants():
    # the tiny turbo and base builds share the architecture; each is run the way its real model is used
    return {v: models.load("z-image", tiny=True, variant=v) for v in ("turbo", "base")}


@pytest.fixture
def zimage(variants):
    return variants["base"]


def _adapter_rollout(a, guidance, negatives, steps, size=64):
    state = a.make_state(size, size)
    cond = a.encode_prompt(PROMPTS, negatives, max_sequence_length=MAX_SEQ)
    sig = a.sigmas(steps, state)
    z = a.prepare_noise(len(PROMPTS), size, size, torch.Generator().manual_seed(0))
    traj = sampler.rollout(lambda x, i: a.predict(x, sig[i], cond, state, guidance), z, sig)
    return a.decode(traj.final, state), sig


# (variant, guidance_scale, adapter negatives, pipeline negative_prompt, cfg_normalization, cfg_truncation, steps)
MODES = {
    "turbo-no-cfg": ("turbo", 0.0, None, None, 0.0, 1.0, 9),
    "base-cfg": ("base", 4.0, NEG, NEG, 0.0, 1.0, 4),
    # the pipeline's default negative "" and both CFG options (4 steps: model times 0, .1, .25, .5)
    "base-cfg-default-neg-norm-trunc": ("base", 4.0, ["", ""], None, 1.0, 0.2, 4),
}


@pytest.mark.parametrize("mode", MODES)
def test_ode_rollout_equals_pipeline(variants, mode, monkeypatch):
    variant, guidance, negatives, pipe_neg, norm, trunc, steps = MODES[mode]
    zimage = variants[variant]
    monkeypatch.setattr(zimage, "cfg_normalization", norm)
    monkeypatch.setattr(zimage, "cfg_truncation", trunc)
    ours, sig = _adapter_rollout(zimage, guidance, negatives, steps)
    ref = zimage.pipe(prompt=list(PROMPTS), negative_prompt=pipe_neg and list(pipe_neg), height=64, width=64,
                      num_inference_steps=steps, guidance_scale=guidance, cfg_normalization=norm,
                      cfg_truncation=trunc, generator=torch.Generator().manual_seed(0), output_type="pt",
                      max_sequence_length=MAX_SEQ).images
    assert ours.shape == (2, 3, 64, 64) and 0 <= ours.min() and ours.max() <= 1
    assert (ours - ref).abs().max() < 1e-5
    # the schedule is the pipeline scheduler's own (decision 1)
    torch.testing.assert_close(sig, zimage.pipe.scheduler.sigmas.float(), rtol=0, atol=1e-7)


def test_cfg_options_per_sample(zimage, monkeypatch):
    state = zimage.make_state(64, 64)
    cond = zimage.encode_prompt(PROMPTS, NEG, max_sequence_length=MAX_SEQ)
    z = zimage.prepare_noise(2, 64, 64, torch.Generator().manual_seed(1))
    plain = zimage.predict(z, torch.tensor([0.5, 0.9]), cond, state, 0.0)
    guided = zimage.predict(z, torch.tensor([0.5, 0.9]), cond, state, 4.0)
    monkeypatch.setattr(zimage, "cfg_truncation", 0.2)  # model time 0.5 is past it, 0.1 is not
    mixed = zimage.predict(z, torch.tensor([0.5, 0.9]), cond, state, 4.0)
    torch.testing.assert_close(mixed[0], plain[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], guided[1], rtol=0, atol=1e-6)
    monkeypatch.setattr(zimage, "cfg_normalization", 0.5)
    clipped = zimage.predict(z, torch.tensor([0.5, 0.9]), cond, state, 4.0)
    torch.testing.assert_close(clipped[0], plain[0], rtol=0, atol=1e-6)  # truncated rows are never rescaled
    torch.testing.assert_close(clipped[1].norm(), 0.5 * plain[1].norm(), rtol=1e-5, atol=0)


def test_cond_is_batch_first_and_prompts_untouched(zimage):
    prompts = ["a dog", "a red cat on a mat", "a dog"]
    cond = zimage.encode_prompt(prompts, ["", "", ""], max_sequence_length=MAX_SEQ)
    assert prompts == ["a dog", "a red cat on a mat", "a dog"]  # the pipeline rewrites its list in place
    assert all(v.shape[0] == 3 for v in cond.values())
    lens = cond["prompt_lens"].tolist()
    assert lens[0] == lens[2] < lens[1] and cond["prompt_embeds"].shape[1] == lens[1]
    state, z = zimage.make_state(64, 64), zimage.prepare_noise(3, 64, 64, torch.Generator().manual_seed(2))
    full = zimage.predict(z, torch.tensor(0.7), cond, state, 4.0)
    part = zimage.predict(z[[0, 2]], torch.tensor(0.7), zimage.select(cond, [0, 2]), state, 4.0)
    torch.testing.assert_close(part, full[[0, 2]], rtol=0, atol=1e-5)  # other batch padding


def test_non_multiple_resolution_is_an_error(zimage):
    with pytest.raises(ValueError, match="multiples of 16"):
        zimage.make_state(72, 64)


def test_lora_targets_checked():
    a = models.load("z-image", tiny=True)
    assert a.add_lora(4, 8) == 28  # 7 per block: 2 main layers + 1 noise refiner + 1 context refiner
    b = models.load("z-image", tiny=True)
    with pytest.raises(ModelError, match="matches no module"):
        b.add_lora(4, 8, ["attention.to_q", "attention.not_a_layer"])
