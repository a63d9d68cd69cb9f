"""The flux2 and flux2-klein adapters against the stock diffusers Flux2Pipeline / Flux2KleinPipeline (tiny random
weights, no download)."""
import numpy as np
import pytest
import torch
from PIL import Image

from common import models, sampler
from common.models.base import ModelError

PROMPTS, NEG = ["a red cat on a mat", "a dog"], ["", "blurry"]
H, W = 64, 96  # not square, so a row/column mix-up shows
# FLUX.2's system message (168 bytes) needs a long text window with the byte-level tiny tokenizer
MAX_SEQ = {"flux2": 256, "flux2-klein": 64}


def _image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


REFS = [_image(88, 72, 0), _image(64, 64, 1)]  # the first is cropped to 80x64


@pytest.fixture(scope="module")
def adapters():
    cache = {}

    def get(name, variant=None):
        if (name, variant) not in cache:
            cache[name, variant] = models.load(name, tiny=True, variant=variant)
        return cache[name, variant]
    return get


def _adapter_rollout(a, guidance, negatives, refs, steps=3):
    state = a.make_state(H, W)
    cond = a.encode_prompt(PROMPTS, negatives, max_sequence_length=MAX_SEQ[a.name],
                           images=[refs] * len(PROMPTS) if refs else None)
    sig = a.sigmas(steps, state)
    z = a.prepare_noise(len(PROMPTS), H, W, torch.Generator().manual_seed(0))
    traj = sampler.rollout(lambda x, i: a.predict(x, sig[i], cond, state, guidance), z, sig)
    return a.decode(traj.final, state), sig


@pytest.mark.parametrize("name,variant,guidance,with_refs", [
    ("flux2", None, 4.0, False),
    ("flux2", None, 4.0, True),
    ("flux2-klein", "4b", 4.0, False),        # distilled: guidance_scale is ignored, one pass
    ("flux2-klein", "4b", 1.0, True),
    ("flux2-klein", "9b", 1.0, False),
    ("flux2-klein", "base-4b", 4.0, False),   # base: true CFG with "" (batched here, two calls in the pipeline)
    ("flux2-klein", "base-4b", 4.0, True),
    ("flux2-klein", "base-4b", 1.0, False),   # base at guidance 1: no CFG
    ("flux2-klein", "base-9b", 4.0, False),
])
def test_ode_rollout_equals_pipeline(adapters, name, variant, guidance, with_refs):
    a, refs = adapters(name, variant), REFS if with_refs else None
    ours, sig = _adapter_rollout(a, guidance, ["", ""], refs)  # the klein pipeline's negative is always ""
    ref = a.pipe(image=refs, prompt=PROMPTS, height=H, width=W, num_inference_steps=3, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(0), output_type="pt",
                 max_sequence_length=MAX_SEQ[name]).images
    assert ours.shape == (2, 3, H, W) and 0 <= ours.min() and ours.max() <= 1
    assert (ours - ref).abs().max() < 1e-5
    # the schedule (empirical mu from the target tokens and the step count) is the pipeline scheduler's own
    torch.testing.assert_close(sig, a.pipe.scheduler.sigmas.float(), rtol=0, atol=1e-7)


def test_negatives_only_where_true_cfg_exists(adapters):
    for name, variant, has_neg in [("flux2", None, False), ("flux2-klein", "4b", False),
                                   ("flux2-klein", "base-4b", True)]:
        cond = adapters(name, variant).encode_prompt(PROMPTS, NEG, max_sequence_length=MAX_SEQ[name])
        assert ("neg_prompt_embeds" in cond) == has_neg
    # klein base without negative embeddings: one unguided pass, whatever guidance_scale says
    a = adapters("flux2-klein", "base-4b")
    cond, state = a.encode_prompt(PROMPTS, max_sequence_length=64), a.make_state(H, W)
    z = a.prepare_noise(2, H, W, torch.Generator().manual_seed(0))
    assert torch.equal(a.predict(z, 0.5, cond, state, 4.0), a.predict(z, 0.5, cond, state, 1.0))


def test_non_multiple_resolution_is_an_error(adapters):
    a = adapters("flux2-klein", "4b")
    with pytest.raises(ValueError, match="multiples of 16"):
        a.make_state(72, 64)
    with pytest.raises(ValueError, match="multiples of 16"):
        a.prepare_noise(1, 64, 40)


def test_lora_targets_checked():
    a = models.load("flux2", tiny=True)
    assert a.add_lora(4, 8) == 14  # 12 in the double block + the single block's to_qkv_mlp_proj and to_out
    wrapped = {n for n, m in a.pipe.transformer.named_modules() if hasattr(m, "lora_A")}
    assert "single_transformer_blocks.0.attn.to_out" in wrapped  # pitfall 10
    b = models.load("flux2-klein", tiny=True)
    with pytest.raises(ModelError, match="matches no module"):
        b.add_lora(4, 8, ["attn.to_q", "attn.not_a_layer"])
    with pytest.raises(ModelError, match="matches no module"):
        b.add_lora(4, 8, r"single_transformer_blocks\.\d+\.attn\.not_a_layer")


def test_condition_images(adapters):
    a = adapters("flux2-klein", "4b")
    cond = a.encode_prompt(PROMPTS, max_sequence_length=64, images=[REFS, REFS])
    # 80x64 -> 5x4 tokens, 64x64 -> 4x4 tokens, the same for both rows
    assert cond["image_latents"].shape == (2, 36, 128) and cond["image_grids"].tolist() == [[[5, 4], [4, 4]]] * 2


def test_condition_max_pixels_caps_the_area():
    a = models.load("flux2-klein", tiny=True, condition_max_pixels=64 * 64)
    cond = a.encode_prompt(["a"], max_sequence_length=64, images=[[_image(96, 128, 2)]])
    # 128x96 -> area 64^2 (73x55) -> multiples of 16: 64x48 = 4x3 tokens
    assert cond["image_latents"].shape == (1, 12, 128)
    assert cond["image_grids"].tolist() == [[[3, 4]]]
    assert models.adapter_class("flux2-klein").default_condition_max_pixels == 1024 * 1024
