"""The qwen-image-2.1 adapter against the stock QwenImage21Pipeline (tiny random weights, no download): rollouts with
0, 1 and 2 condition images, batches of mixed layouts, the prefix KV cache, LoRA through the pipeline's loader, the
sampling grid, and the full-size architecture on the meta device (parameter count, LoRA targets, --plan)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers.models.transformers import transformer_qwenimage21
from PIL import Image

from common import models, plan, sampler
from common.errors import ModelError
from common.models.qwen_image21 import QwenImage21Adapter
from tests.helpers import randomize_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS, NEG = ["a red cat on a mat", "a dog"], " "  # different lengths: one forward per length
SIZE, AREA = 64, 64 * 64  # AREA: a small stand-in for the pipeline's output_resolution^2 (1024^2)


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def qwen():
    return models.load("qwen-image-2.1", tiny=True, condition_max_pixels=AREA)


@pytest.fixture
def modes(monkeypatch):
    """The kv_cache_mode of every transformer call."""
    seen, forward = [], transformer_qwenimage21.QwenImage21Transformer2DModel.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("kv_cache_mode"))
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(transformer_qwenimage21.QwenImage21Transformer2DModel, "forward", spy)
    return seen


def _rollout(a, prompts, cfg, images=None, steps=2, seed=0):
    state = a.make_state(SIZE, SIZE)
    cond = a.encode_prompt(prompts, [NEG] * len(prompts) if cfg > 1 else None, images=images)
    sig = a.sigmas(steps, state)
    z = a.prepare_noise(len(prompts), SIZE, SIZE, torch.Generator().manual_seed(seed))
    final = sampler.rollout(lambda x, i: a.predict(x, sig[i], cond, state, 1.0, cfg), z, sig).final
    return a.decode(final, state), z, sig, final


def _pipeline(a, prompt, cfg, z, images=None, steps=2, **kw):
    """The stock pipeline for one sample (RGBA out: the adapter drops the alpha channel)."""
    out = a.pipe(prompt=prompt, image=images, negative_prompt=NEG if cfg > 1 else None, true_cfg_scale=cfg,
                 height=SIZE, width=SIZE, num_inference_steps=steps, latents=z, output_type="pt",
                 output_resolution=int(AREA ** 0.5), **kw).images
    assert out.shape[1] == 4
    return out[:, :3]


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_rollout_equals_pipeline(qwen, cfg, modes):
    ours, z, sig, _ = _rollout(qwen, PROMPTS, cfg)
    assert ours.shape == (2, 3, SIZE, SIZE) and 0 <= ours.min() and ours.max() <= 1
    for i, prompt in enumerate(PROMPTS):
        ref = _pipeline(qwen, prompt, cfg, z[i:i + 1])
        diff = (ours[i:i + 1] - ref).abs().max().item()
        print(f"text-to-image, true_cfg {cfg}, prompt {i}: max |adapter - pipeline| = {diff:.1e}")
        assert diff < 1e-5  # measured 5e-7 to 8e-7: the adapter encodes both prompts in one (left-padded) call
    torch.testing.assert_close(sig, qwen.pipe.scheduler.sigmas.float(), rtol=0, atol=1e-7)
    # both sides ran with the prefix KV cache: the adapter filled it at step 0 (once per text length and branch)
    branches = 2 if cfg > 1 else 1
    assert modes[:2 * branches] == ["extract"] * 2 * branches
    assert modes[2 * branches:4 * branches] == ["cached"] * 2 * branches


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_edit_rollout_equals_pipeline(qwen, cfg):
    # two ordered condition images of different aspect (3:2 resizes to 64x64 at AREA, 1:2 to 32x96)
    images = [_image(96, 64, 0), _image(48, 96, 1)]
    ours, z, _, _ = _rollout(qwen, ["make the cat blue"], cfg, images=[images])
    ref = _pipeline(qwen, "make the cat blue", cfg, z, images=images)
    diff = (ours - ref).abs().max().item()
    print(f"2 condition images, true_cfg {cfg}: max |adapter - pipeline| = {diff:.1e}")
    assert diff < 1e-5  # measured 0
    # and the order of the images matters (the transformer reads them as a sequence)
    swapped = _pipeline(qwen, "make the cat blue", cfg, z, images=images[::-1])
    assert (swapped - ref).abs().max() > 1e-3


def test_mixed_batch_equals_per_sample_pipeline(qwen):
    """0, 1 and 2 condition images and two prompt lengths in one batch (one forward per layout): each row is what the
    pipeline gives it alone, and a repeated (prompt, images) row is encoded once."""
    a, b = _image(64, 64, 2), _image(96, 48, 3)
    prompts = ["add a hat", "a dog", "add a hat", "make it blue"]
    images = [[a], [], [a], [a, b]]
    cond = qwen.encode_prompt(prompts, [NEG] * 4, images=images)
    assert torch.equal(cond["prompt_embeds"][0], cond["prompt_embeds"][2])
    assert cond["image_grids"].tolist() == [[[4, 4], [0, 0]], [[0, 0], [0, 0]], [[4, 4], [0, 0]], [[4, 4], [2, 6]]]
    ours, z, _, _ = _rollout(qwen, prompts, 4.0, images=images)
    for i in range(4):
        ref = _pipeline(qwen, prompts[i], 4.0, z[i:i + 1], images=images[i] or None)
        assert (ours[i:i + 1] - ref).abs().max() < 1e-5


def test_a_row_does_not_depend_on_its_batch(qwen):
    """The pipeline's own batched call pads the shorter prompt, which moves the target's rope position: the adapter
    runs each text length unpadded, so a row's velocity is the same alone and in any batch."""
    state = qwen.make_state(SIZE, SIZE)
    z = qwen.prepare_noise(2, SIZE, SIZE, torch.Generator().manual_seed(1))
    with torch.no_grad():
        both = qwen.predict(z, 0.7, qwen.encode_prompt(PROMPTS), state)
        alone = [qwen.predict(z[i:i + 1], 0.7, qwen.encode_prompt([p]), state) for i, p in enumerate(PROMPTS)]
    for i in range(2):
        assert (both[i:i + 1] - alone[i]).abs().max() < 1e-6
    padded = qwen.pipe(prompt=PROMPTS, height=SIZE, width=SIZE, num_inference_steps=2, latents=z,
                       output_type="latent").images
    single = qwen.pipe(prompt=PROMPTS[1], height=SIZE, width=SIZE, num_inference_steps=2, latents=z[1:],
                       output_type="latent").images
    assert (padded[1:] - single).abs().max() > 1e-4  # what the grouping avoids


def test_kv_cache_is_exact_and_never_stale(qwen, modes):
    cond = qwen.encode_prompt(["add a hat"], images=[[_image(64, 64, 4)]])
    state = qwen.make_state(SIZE, SIZE)
    sig = qwen.sigmas(3, state)
    z = qwen.prepare_noise(1, SIZE, SIZE, torch.Generator().manual_seed(2))

    def run(use):
        qwen.use_kv_cache = use
        try:
            return sampler.rollout(lambda x, i: qwen.predict(x, sig[i], cond, state), z, sig).final
        finally:
            qwen.use_kv_cache = True
    cached, modes_cached = run(True), list(modes)
    modes.clear()
    assert modes_cached == ["extract", "cached", "cached"] and run(False).sub(cached).abs().max() < 1e-6
    assert modes == [None, None, None]

    def fresh(sigma):
        qwen.use_kv_cache = False
        try:
            with torch.no_grad():
                return qwen.predict(z, sigma, cond, state)
        finally:
            qwen.use_kv_cache = True
    with torch.no_grad():
        qwen.predict(z, sig[0], cond, state)  # fills the cache
        modes.clear()
        assert (qwen.predict(z, sig[1], cond, state) - fresh(sig[1])).abs().max() < 1e-6
        assert modes[0] == "cached"
        # an optimizer step changes the weights in place: the cache is dropped, not read
        p = qwen.pipe.transformer.transformer_blocks[0].attn.to_k.weight
        saved = p.clone()
        try:
            p.mul_(1.5)
            modes.clear()
            assert (qwen.predict(z, sig[1], cond, state) - fresh(sig[1])).abs().max() < 1e-6
            assert modes[0] is None
        finally:
            p.copy_(saved)
        # the same tensors changed in place (a new conditioning in an old tensor) are not read either
        qwen.predict(z, sig[0], cond, state)
        cond["prompt_embeds"].mul_(1.0)
        modes.clear()
        qwen.predict(z, sig[1], cond, state)
        assert modes[0] is None


def test_kv_cache_off_with_gradients_and_after_decode(qwen, modes):
    """With gradients the prefix is recomputed (LoRA on the one stream changes it, and the loss reaches it): the
    gradient equals that of the uncached forward."""
    a = models.load("qwen-image-2.1", tiny=True, condition_max_pixels=AREA)
    a.add_lora(4, 8)
    lora = [p for p in a.pipe.transformer.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in lora:
            p.normal_(0, 0.2)
    cond = a.encode_prompt(["add a hat"], images=[[_image(64, 64, 5)]])
    state = a.make_state(SIZE, SIZE)
    z = a.prepare_noise(1, SIZE, SIZE, torch.Generator().manual_seed(3))
    with torch.no_grad():
        a.predict(z, 1.0, cond, state)  # a rollout's first step fills the cache
    assert a._kv["entries"]
    grads = []
    for use in (True, False):
        a.use_kv_cache = use
        a.pipe.transformer.zero_grad()
        a.predict(z, 0.5, cond, state).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in lora]))
        assert a._kv is None  # freed by the forward with gradients
    a.use_kv_cache = True
    assert modes[-2:] == [None, None] and torch.allclose(grads[0], grads[1], rtol=0, atol=1e-7)
    # the prefix gets a gradient too: text and condition tokens pass through the trained layers
    assert grads[0].abs().max() > 0
    with torch.no_grad():
        a.predict(z, 1.0, cond, state)
        a.decode(z, state)  # the end of a rollout frees it
    assert a._kv is None


def test_saved_lora_reproduces_predictions_in_the_pipeline(tmp_path):
    trained = models.load("qwen-image-2.1", tiny=True, condition_max_pixels=AREA)
    assert trained.add_lora(4, 8) == 14  # 7 per block (q, k, v, out, the SwiGLU's 3), 2 blocks
    randomize_lora(trained)
    trained.save_lora(str(tmp_path))
    fresh = models.load("qwen-image-2.1", tiny=True, condition_max_pixels=AREA)
    images = [[_image(64, 64, 6)], []]
    cond = fresh.encode_prompt(PROMPTS, [NEG] * 2, images=images)
    state = fresh.make_state(SIZE, SIZE)
    z = fresh.prepare_noise(2, SIZE, SIZE, torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = fresh.predict(z, 0.6, cond, state, 1.0, 4.0)
        fresh.pipe.load_lora_weights(str(tmp_path))  # the pipeline's own loader, diffusers format
        after, want = fresh.predict(z, 0.6, cond, state, 1.0, 4.0), trained.predict(z, 0.6, cond, state, 1.0, 4.0)
    assert (after - want).abs().max() < 1e-5 and (after - before).abs().max() > 1e-3
    # and the stock pipeline samples with it: the adapter's rollout with the loaded LoRA is the pipeline's
    ours, z, _, _ = _rollout(fresh, PROMPTS[:1], 1.0, images=images[:1])
    assert (ours - _pipeline(fresh, PROMPTS[0], 1.0, z, images=images[0])).abs().max() < 1e-5


def test_denoising_loop_never_waits_for_the_device(monkeypatch):
    """tests/test_host_sync.py's watch on this model (mixed condition layouts, CFG, the KV cache): after the first step
    no line of this repository reads a tensor on the host or builds one from Python data. diffusers' 2.1 transformer
    itself reads its token layout on the host in every forward (rope positions, image blocks, the prefix length)."""
    from tests import test_host_sync as hs
    monkeypatch.setitem(hs.CASES, "qwen-image-2.1", ("qwen-image-2.1", dict(condition_max_pixels=AREA), 1.0, 4.0,
                                                     hs.MIXED, {}))
    watch = hs.Watch()
    with hs.Functions(watch), watch:
        hs.rollout("qwen-image-2.1", "Flow-SDE", watch)
    assert not watch.ours, watch.ours
    assert {k[:2] for k in watch.models} <= {("transformer_qwenimage21.py", "forward"),
                                             ("transformer_qwenimage21.py", "build_token_metadata")}


def test_lora_targets_checked():
    with pytest.raises(ModelError, match="matches no module"):
        models.load("qwen-image-2.1", tiny=True).add_lora(4, 8, ["attn.to_q", "img_mlp.net.2"])


def test_sampling_grid(qwen):
    """linspace(1, 1/N, N) through the exponential shift with mu from the target tokens, in fp64 here; a checkpoint's
    own sample_sigmas (Turbo) when N is their count, as the pipeline uses them."""
    state = qwen.make_state(SIZE, 2 * SIZE)
    cfg = qwen.pipe.scheduler.config
    n, seq = 4, (SIZE // 16) * (2 * SIZE // 16)
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    mu = cfg.base_shift + m * (seq - cfg.base_image_seq_len)
    s = np.linspace(1.0, 1 / n, n)
    s = np.exp(mu) / (np.exp(mu) + (1 / s - 1))
    s = 1 - (1 - s) / ((1 - s[-1]) / (1 - cfg.shift_terminal))  # stretched to end at shift_terminal
    want = torch.tensor(np.append(s, 0.0), dtype=torch.float32)
    torch.testing.assert_close(qwen.sigmas(n, state), want, rtol=0, atol=1e-6)
    turbo = [1.0, 0.9, 0.6, 0.3]
    pipe = QwenImage21Adapter.build_tiny()
    pipe.register_to_config(sample_sigmas=turbo)
    a = QwenImage21Adapter(pipe)
    z = a.prepare_noise(1, SIZE, 2 * SIZE, torch.Generator().manual_seed(0))
    pipe(prompt="a dog", height=SIZE, width=2 * SIZE, latents=z, output_type="latent")  # 4 steps: the grid's
    torch.testing.assert_close(a.sigmas(4, state), pipe.scheduler.sigmas.float(), rtol=0, atol=1e-7)
    torch.testing.assert_close(a.sigmas(3, state), qwen.sigmas(3, state))  # another count: linspace


def test_sizes_and_condition_area_checked(qwen):
    with pytest.raises(ModelError, match="multiples of 32"):
        QwenImage21Adapter.check_size(48, 64, 1)
    capped = QwenImage21Adapter(qwen.pipe, condition_max_pixels=32 * 32)
    cond = capped.encode_prompt(["add a hat"], images=[[_image(64, 64, 0)]])
    assert cond["image_grids"].tolist() == [[[2, 2]]] and cond["image_latents"].shape == (1, 4, 64)
    too_big = QwenImage21Adapter(qwen.pipe, condition_max_pixels=640 * 640)  # above the VL processor's maximum
    with pytest.raises(ModelError, match="outside its pixel range"):
        too_big.encode_prompt(["add a hat"], images=[[_image(64, 64, 0)]])


def test_pipeline_save_load_round_trip(qwen, tmp_path):
    # the torchvision-free tiny processor must be importable by name from model_index.json
    qwen.pipe.save_pretrained(tmp_path)
    pipe = QwenImage21Adapter.pipeline_cls.from_pretrained(tmp_path)
    assert type(pipe.processor).__name__ == "ImageOnlyQwen3VLProcessor"
    assert pipe.transformer.config.causal_condition


# ---- full size, on the meta device ----------------------------------------------------------------------------------
def test_full_size_architecture():
    """The transformer's count from its architecture by hand: 32 blocks of (q, k, v, out: 4 D^2; SwiGLU 3 x 3 D^2;
    q/k norms 2 x 128), the timestep MLP (256 D + D^2), the text projection (RMSNorm D_txt, D_txt D + D^2), the
    latent input (64 D), the shared modulation (4 D^2), the final norm (D^2) and output (64 D); no biases."""
    a = plan.full_adapter("qwen-image-2.1")
    d, blocks = 4096, 32
    want = blocks * (4 * d * d + 9 * d * d + 2 * 128) + 256 * d + d * d + d + d * d + d * d + 64 * d + 4 * d * d \
        + d * d + 64 * d
    assert plan.tensor_count(a.pipe.transformer, persistent_only=True) == want == 7_115_124_736  # "7B"
    assert len(plan.lora_modules(a.pipe.transformer, a.default_target_modules)) == blocks * 7
    # 512 px: 32 x 32 tokens of 64 channels, as the pipeline's prepare_latents builds them
    z, lat = a.prepare_noise(1, 512, 512), a.pipe.prepare_latents(None, 1, 64, 512, 512, torch.float32,
                                                                 torch.device("meta"), None)[0]
    assert z.shape == lat.shape == (1, 1024, 64) and a.make_state(512, 512)["seq_len"] == 1024


def test_plan_from_the_full_size_config(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "grpo.py", "--model", "qwen-image-2.1", "--plan", "--output-dir",
                        str(tmp_path / "x")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LoRA GRPO on one 80 GB GPU: fits" in r.stdout and "LoRA weights (224 modules" in r.stdout
    assert "Qwen3VLForConditionalGeneration" in r.stdout and not (tmp_path / "x").exists()
