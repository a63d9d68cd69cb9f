"""The ltx2 and ltx2_i2v adapters (LTX-2, video with audio) against the stock diffusers pipelines on the tiny build
(random weights, no download); the full-size LTX-2 (19B) on the meta device; the mp4 audio track."""
import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

import grpo
from common import models, plan, sampler
from common.cli import parse_with_presets
from common.errors import DataError, ModelError
from common.models.ltx2 import LTX2Adapter, LTX2I2VAdapter, audio_sample_rate
from common.video import read_video, write_video
from tests.helpers import checks_only, randomize_lora

PROMPTS, NEG = ["a red cat on a mat", "a dog barks"], ["blurry", ""]
SIZE, FRAMES = 64, 5


def _image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=[LTX2Adapter, LTX2I2VAdapter], ids=["t2v", "i2v"])
def ltx(request):
    return request.param.load(tiny=True)


def _inputs(a, images=None):
    state = a.make_state(SIZE, SIZE, FRAMES)
    if a.condition_images == "one" and images is None:
        images = [[_image(0)]] * 2  # the pipeline takes one first frame for its whole batch
    return state, a.encode_prompt(PROMPTS, NEG, max_sequence_length=16, images=images, state=state)


def _pipe_kwargs(a, guidance, **kw):
    """The stock pipeline with the adapter's guidance only: CFG on both modalities, no STG, modality guidance or
    rescale, and the adapter's cross-timestep rule."""
    extra = {"image": _image(0)} if a.condition_images == "one" else {}
    return dict(prompt=PROMPTS, negative_prompt=NEG, height=SIZE, width=SIZE, num_frames=FRAMES, frame_rate=24.0,
                guidance_scale=guidance, audio_guidance_scale=guidance, stg_scale=0.0, audio_stg_scale=0.0,
                modality_scale=1.0, audio_modality_scale=1.0, guidance_rescale=0.0, audio_guidance_rescale=0.0,
                spatio_temporal_guidance_blocks=None, use_cross_timestep=a.use_cross_timestep, max_sequence_length=16,
                generator=torch.Generator().manual_seed(0), **extra, **kw)


def test_registered_with_the_model_facts():
    assert models.adapter_class("ltx2") is LTX2Adapter and models.adapter_class("ltx2_i2v") is LTX2I2VAdapter
    assert LTX2Adapter.condition_images == "none" and LTX2I2VAdapter.condition_images == "one"
    assert LTX2Adapter.video and LTX2Adapter.size_multiple == 32
    with pytest.raises(ModelError, match="multiples of 32"):
        LTX2Adapter.check_size(48, 64, 9)
    with pytest.raises(ModelError, match="8k\\+1"):
        LTX2Adapter.check_size(64, 64, 4)


def test_sigmas_are_the_dynamically_shifted_grid(ltx):
    """linspace(1, 1/N, N), shifted with mu from the video token count, stretched to end at shift_terminal, then 0:
    written out in fp64 from the scheduler config's numbers."""
    cfg = ltx.pipe.scheduler.config
    for size, frames in ((64, 5), (128, 9)):
        state = ltx.make_state(size, size, frames)
        tokens = (1 + (frames - 1) // 4) * (size // 32) ** 2
        assert state["video_tokens"] == tokens
        for n in (3, 10):
            s = np.linspace(1, 1 / n, n)
            m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
            mu = tokens * m + cfg.base_shift - m * cfg.base_image_seq_len
            s = np.exp(mu) / (np.exp(mu) + 1 / s - 1)
            one_minus = 1 - s
            s = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
            np.testing.assert_allclose(ltx.sigmas(n, state).numpy(), np.append(s, 0), rtol=0, atol=1e-6)
    assert (cfg.base_shift, cfg.max_shift, cfg.shift_terminal) == (0.95, 2.05, 0.1)


def test_noise_is_the_pipelines_two_draws_joined(ltx):
    """Video then audio randn on one generator, packed to tokens (frames, rows, columns) and joined; image-to-video
    drops latent frame 0 (the condition)."""
    z = ltx.prepare_noise(2, SIZE, 2 * SIZE, torch.Generator().manual_seed(5), num_frames=9)
    g = torch.Generator().manual_seed(5)
    video = torch.randn((2, 8, 3, 2, 4), generator=g)  # 8 channels, 1 + 8/4 frames, 64/32 x 128/32
    audio = torch.randn((2, 2, round(9 / 24 * 25), 4), generator=g)  # 2 channels, L latent frames, 16/4 mel bins
    tokens = video.permute(0, 2, 3, 4, 1).reshape(2, 3 * 2 * 4, 8)
    if ltx.condition_images == "one":
        tokens = tokens[:, 2 * 4:]
    want = torch.cat([tokens.flatten(1), audio.permute(0, 2, 1, 3).flatten(1)], dim=1)
    assert z.dtype == torch.float32 and torch.equal(z, want)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_rollout_equals_pipeline(ltx, guidance):
    """Our ODE rollout (joint latent, one Euler step per sigma) against the stock pipeline: the video, the waveform,
    and the final latents of both modalities, for the same noise."""
    a, steps = ltx, 3
    state, cond = _inputs(a)
    sig = a.sigmas(steps, state)
    z = a.prepare_noise(2, SIZE, SIZE, torch.Generator().manual_seed(0), num_frames=FRAMES)
    final = sampler.rollout(lambda x, i: a.predict(x, sig[i], cond, state, guidance), z, sig).final
    video, audio = a.decode(final, state, cond), a.decode_audio(final, state, cond)
    ref = a.pipe(**_pipe_kwargs(a, guidance, num_inference_steps=steps, output_type="pt"))
    assert video.shape == (2, FRAMES, 3, SIZE, SIZE) and 0 <= video.min() and video.max() <= 1
    assert audio.shape == ref.audio.shape and audio.shape[:2] == (2, 2)
    assert (video - ref.frames).abs().max() < 1e-5
    assert (audio - ref.audio).abs().max() < 1e-6
    lat = a.pipe(**_pipe_kwargs(a, guidance, num_inference_steps=steps, output_type="latent"))
    # the stock latents (denormalised, unpacked) against ours, unpacked here by hand
    vae, avae = a.pipe.vae, a.pipe.audio_vae
    nv = state["split"][0]
    tokens = final[:, :nv].reshape(2, -1, 8)
    if a.condition_images == "one":
        tokens = torch.cat([cond["first_frame"], tokens], dim=1)
    ours_v = tokens.reshape(2, 2, 2, 2, 8).permute(0, 4, 1, 2, 3) * vae.latents_std.view(1, -1, 1, 1, 1) \
        + vae.latents_mean.view(1, -1, 1, 1, 1)
    ours_a = (final[:, nv:].reshape(2, state["audio_frames"], 8) * avae.latents_std + avae.latents_mean)
    assert (ours_v - lat.frames).abs().max() < 1e-5
    assert (ours_a.reshape(2, -1, 2, 4).permute(0, 2, 1, 3) - lat.audio).abs().max() < 1e-5
    assert (final[:, nv:] - z[:, nv:]).abs().max() > 0.1  # the audio was denoised too


def test_i2v_encodes_each_image_once_and_needs_its_inputs():
    a = LTX2I2VAdapter.load(tiny=True)
    state = a.make_state(SIZE, SIZE, FRAMES)
    cond = a.encode_prompt(["a", "b", "a"], images=[[_image(0)], [_image(1)], [_image(0)]], state=state,
                           max_sequence_length=16)
    assert cond["first_frame"].shape == (3, 4, 8)  # (64/32)^2 tokens of 8 channels
    assert torch.equal(cond["first_frame"][0], cond["first_frame"][2])
    assert not torch.equal(cond["first_frame"][0], cond["first_frame"][1])
    with pytest.raises(ModelError, match="needs `state`"):
        a.encode_prompt(["a"], images=[[_image(0)]])
    with pytest.raises(ModelError, match="exactly one condition image"):
        a.encode_prompt(["a"], state=state)
    with pytest.raises(ModelError, match="need `cond`"):
        a.decode(a.prepare_noise(1, SIZE, SIZE, num_frames=FRAMES), state)


def test_i2v_dataset_is_checked_before_loading(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "a cat meows"}) + "\n")
    args = parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY,
                              ["--model", "ltx2_i2v", "--tiny", "--dataset", str(tmp_path)])
    with pytest.raises(DataError, match="train.jsonl:1: ltx2_i2v needs exactly one condition image"):
        checks_only("grpo", args)
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "a cat meows", "image": "gone.png"}) + "\n")
    with pytest.raises(DataError, match="image not found: .*gone.png"):
        checks_only("grpo", args)


@pytest.mark.parametrize("cls", [LTX2Adapter, LTX2I2VAdapter], ids=["t2v", "i2v"])
def test_saved_lora_loads_into_the_stock_pipeline(cls, tmp_path):
    trained = cls.load(tiny=True)
    assert trained.add_lora(4, 8) == 2 * 28  # docs/models.md 4: 28 per block, 2 tiny blocks
    randomize_lora(trained)
    trained.save_lora(str(tmp_path))
    fresh = cls.load(tiny=True)
    state, cond = _inputs(fresh)
    z = fresh.prepare_noise(2, SIZE, SIZE, torch.Generator().manual_seed(3), num_frames=FRAMES)
    nv = state["split"][0]
    with torch.no_grad():
        before = fresh.predict(z, 0.6, cond, state, 3.0)
        want = trained.predict(z, 0.6, cond, state, 3.0)
        assert (want - before)[:, :nv].abs().max() > 1e-3 and (want - before)[:, nv:].abs().max() > 1e-3
        fresh.pipe.load_lora_weights(str(tmp_path))  # the pipeline's own loader, diffusers format
        assert (fresh.predict(z, 0.6, cond, state, 3.0) - want).abs().max() < 1e-5
        with trained.lora_disabled():
            assert (trained.predict(z, 0.6, cond, state, 3.0) - before).abs().max() < 1e-6


# ---- full size (meta device: no weights) -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full():
    return plan.full_adapter("ltx2")


def test_full_size_counts_targets_and_shapes(full):
    # the published "19B" is the audio-video transformer; Gemma-3-12B (12.2B with its vision tower) encodes the text
    assert round(plan.tensor_count(full.pipe.transformer, persistent_only=True) / 1e9) == 19
    assert abs(plan.tensor_count(full.pipe.text_encoder, persistent_only=True) - 12.2e9) < 0.01 * 12.2e9
    blocks = full.pipe.transformer.transformer_blocks
    assert len(blocks) == 48 and len(plan.lora_modules(full.pipe.transformer, full.default_target_modules)) == 48 * 28
    args = parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY, ["--model", "ltx2"])
    h, w, frames = args.resolution[0], args.resolution[-1], args.num_frames
    assert (h, w, frames) == (512, 768, 25)
    state = full.make_state(h, w, frames)
    # x32 spatial, x8 temporal, 128 channels; audio: round(25 / 24 s x 16000 / 160 / 4) = 26 frames of 8 x 16
    assert state["latent_grid"] == (4, 16, 24) and state["audio_frames"] == 26
    assert tuple(full.prepare_noise(1, h, w, num_frames=frames).shape) == (1, 4 * 16 * 24 * 128 + 26 * 128)
    i2v = plan.full_adapter("ltx2_i2v")
    assert tuple(i2v.prepare_noise(1, h, w, num_frames=frames).shape) == (1, 3 * 16 * 24 * 128 + 26 * 128)
    with pytest.raises(ModelError, match="8k\\+1 for this VAE"):
        full.make_state(h, w, 5)


def test_memory_plan(monkeypatch, tmp_path):
    monkeypatch.setattr(plan, "ACTIVATIONS_JSON", str(tmp_path / "none.json"))
    args = parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY, ["--model", "ltx2"])
    rows = {r.name: r for r in plan.memory_plan(args, plan.Algorithm("GRPO", latents_per_sample=2), 1)}
    tr = rows["transformer (frozen base)"]
    assert tr.bytes == 2 * tr.params and round(tr.params / 1e9) == 19
    lat = next(r for r in rows.values() if r.name.startswith("stored latents"))
    assert lat.params == 48 * 16 * 2 * (4 * 16 * 24 * 128 + 26 * 128)
    text = plan.run_plan(args, plan.Algorithm("GRPO", latents_per_sample=2), num_processes=1)
    assert "LoRA GRPO on one 80 GB GPU: " in text and "with FSDP: " in text


# ---- the mp4 audio track ---------------------------------------------------------------------------------------------
def test_mp4_with_the_audio_track_round_trips(tmp_path):
    sr, n = 24000, 12000
    t = torch.arange(n) / sr
    wave = torch.stack([0.5 * torch.sin(2 * np.pi * 440 * t), 0.25 * torch.sin(2 * np.pi * 660 * t)])
    path = write_video(str(tmp_path / "a.mp4"), torch.rand(12, 3, 32, 32), fps=24, audio=(wave, sr))
    frames, fps = read_video(path)
    assert frames.shape == (12, 3, 32, 32) and fps == 24
    with av.open(path) as c:
        stream = c.streams.audio[0]
        assert (stream.rate, stream.channels, stream.codec_context.name) == (sr, 2, "aac")
        got = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)
    # AAC is lossy and delays by its priming samples: each channel keeps its tone (the spectrum's peak) and level
    for ch, (freq, amp) in enumerate(((440, 0.5), (660, 0.25))):
        spectrum = np.abs(np.fft.rfft(got[ch, 2048:2048 + 8192]))
        assert abs(np.argmax(spectrum) * sr / 8192 - freq) <= sr / 8192
        assert abs(np.abs(got[ch, 2048:10000]).max() - amp) < 0.05 * amp
    with pytest.raises(ValueError, match="audio waveform"):
        write_video(str(tmp_path / "b.mp4"), torch.rand(2, 3, 32, 32), audio=(torch.zeros(3, 10), sr))


def test_decoded_audio_rate_and_length():
    a = LTX2Adapter.load(tiny=True)
    state, cond = _inputs(a)
    z = a.prepare_noise(2, SIZE, SIZE, torch.Generator().manual_seed(1), num_frames=FRAMES)
    audio = a.decode_audio(z, state, cond)
    assert audio_sample_rate(a) == 16000 and audio.shape[:2] == (2, 2) and torch.isfinite(audio).all()
