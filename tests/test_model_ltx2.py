"""The ltx2 and ltx2_i2v adapters (LTX-2, video with audio) against the stock diffusers pipelines on the tiny builds of
both variants, 2.0 and 2.3 (random weights, no download); the full-size LTX-2 (19B) and LTX-2.3 (22B) on the meta
device; the mp4 audio track."""
import json
import types

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
from tests.test_grpo import fresh_accelerator_state, read_metrics  # noqa: F401 (autouse fixture)

PROMPTS, NEG = ["a red cat on a mat", "a dog barks"], ["blurry", ""]
SIZE, FRAMES = 64, 5


def _image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


# (adapter, variant) of every parity test: both pipelines on the tiny 2.0 and 2.3 builds
CASES = [(LTX2Adapter, "2.0"), (LTX2I2VAdapter, "2.0"), (LTX2Adapter, "2.3"), (LTX2I2VAdapter, "2.3")]
IDS = ["t2v", "i2v", "t2v-2.3", "i2v-2.3"]


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def ltx(request):
    cls, variant = request.param
    return cls.load(tiny=True, variant=variant)


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
    # variants: 2.0 the default; 2.3 the diffusers-format copy diffusers' docs load (Lightricks/LTX-2.3 holds only the
    # original single files)
    for cls in (LTX2Adapter, LTX2I2VAdapter):
        assert cls.variants == {"2.0": "Lightricks/LTX-2", "2.3": "diffusers/LTX-2.3-Diffusers"}
        assert cls.check_variant(None) == "2.0" and cls.hub_id == "Lightricks/LTX-2"
        assert set(cls.full_configs) == set(cls.variants)
    with pytest.raises(ModelError, match="ltx2 has no variant '2.5'; known: 2.0, 2.3"):
        models.adapter_class("ltx2", "2.5")


def test_each_variant_loads_its_hub_id(monkeypatch):
    seen = []

    def from_pretrained(path, **kw):  # stands in for the download: record what the loader asked for
        seen.append(path)
        raise OSError("offline")

    for cls in (LTX2Adapter, LTX2I2VAdapter):
        monkeypatch.setattr(cls.pipeline_cls, "from_pretrained", from_pretrained)
        for variant in (None, "2.0", "2.3"):
            with pytest.raises(ModelError, match="offline"):
                models.load(cls.name, variant=variant)
    assert seen == ["Lightricks/LTX-2", "Lightricks/LTX-2", "diffusers/LTX-2.3-Diffusers"] * 2


def test_tiny_23_has_the_23_switches_and_they_matter():
    """The tiny 2.3 build runs LTX-2.3's paths: gated attention, prompt modulation on `sigma`, no caption projections,
    per-modality connectors, the vocoder with bandwidth extension; the tiny 2.0 build none of them. A wrong `sigma` or
    a flipped use_cross_timestep changes the velocity, so the pipeline parity tests would catch either (the timestep
    rule only matters where the video's timestep is not the audio's: image-to-video's condition frame at 0)."""
    old, new = LTX2Adapter.load(tiny=True), LTX2Adapter.load(tiny=True, variant="2.3")
    assert old.variant == "2.0" and new.variant == "2.3"
    cfg = new.config
    assert cfg.cross_attn_mod and cfg.audio_cross_attn_mod and cfg.gated_attn and cfg.audio_gated_attn
    assert not cfg.use_prompt_embeddings and cfg.perturbed_attn and new.transformer.prompt_modulation
    assert new.use_cross_timestep and not old.use_cross_timestep and not old.transformer.prompt_modulation
    assert new.pipe.connectors.config.per_modality_projections
    assert not old.pipe.connectors.config.per_modality_projections
    assert type(new.pipe.vocoder).__name__ == "LTX2VocoderWithBWE" and type(old.pipe.vocoder).__name__ == "LTX2Vocoder"
    state, cond = _inputs(new)
    z = new.prepare_noise(2, SIZE, SIZE, torch.Generator().manual_seed(2), num_frames=FRAMES)
    f, h, w = state["latent_grid"]
    video, audio = new._unjoin(z, state)
    t = torch.full((2,), 600.0)
    kw = dict(hidden_states=video, audio_hidden_states=audio, encoder_hidden_states=cond["prompt_embeds"],
              audio_encoder_hidden_states=cond["audio_prompt_embeds"], timestep=t, audio_timestep=t,
              encoder_attention_mask=cond["prompt_mask"], audio_encoder_attention_mask=cond["prompt_mask"],
              num_frames=f, height=h, width=w, fps=24.0, audio_num_frames=state["audio_frames"],
              use_cross_timestep=True, return_dict=False)
    with torch.no_grad():
        same, other = new.transformer(**kw, sigma=t), new.transformer(**kw, sigma=t / 2)
        assert (same[0] - other[0]).abs().max() > 1e-3 and (same[1] - other[1]).abs().max() > 1e-3
        # predict passes t = 1000 sigma as `sigma` too, as the pipelines do (sigma=timestep)
        v = new.predict(z, 0.6, cond, state, 1.0)
        assert (v - new._join(same[0].float(), same[1].float())).abs().max() < 1e-5
        i2v = LTX2I2VAdapter.load(tiny=True, variant="2.3")
        state, cond = _inputs(i2v)
        z = i2v.prepare_noise(2, SIZE, SIZE, torch.Generator().manual_seed(2), num_frames=FRAMES)
        v = i2v.predict(z, 0.6, cond, state, 3.0)
        i2v.use_cross_timestep = False
        assert (i2v.predict(z, 0.6, cond, state, 3.0) - v).abs().max() > 1e-3


@pytest.mark.parametrize("cls,variant", CASES, ids=IDS)
def test_condition_elements_count_what_encode_prompt_stores(cls, variant):
    """The memory plan's estimate per sample (docs/models.md 2) equals one row of the stored conditioning: 2.0's
    connector streams are both as wide as the caption, 2.3's as wide as each modality's text width."""
    a = cls.load(tiny=True, variant=variant)
    state, cond = _inputs(a)
    per_row = sum(v[0].numel() for v in cond.values())
    got, _ = a.condition_elements(types.SimpleNamespace(max_sequence_length=16), state["latent_grid"])
    assert got == per_row


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


@pytest.mark.parametrize("cls,variant", CASES, ids=IDS)
def test_saved_lora_loads_into_the_stock_pipeline(cls, variant, tmp_path):
    trained = cls.load(tiny=True, variant=variant)
    assert trained.add_lora(4, 8) == 2 * 28  # docs/models.md 4: 28 per block, 2 tiny blocks (2.3's gates not targeted)
    randomize_lora(trained)
    trained.save_lora(str(tmp_path))
    fresh = cls.load(tiny=True, variant=variant)
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


# the 2.3 transformer derived by hand from 2.0's 18,876,174,592 (tests/test_full_size.py), with the switches of the
# conversion script's "2.3" config: per block, a per-head gate (width -> 32 heads, bias) on each of the 3 video-query
# and 3 audio-query attentions, the prompt scale / shift table (2 rows) and 3 more rows of the block's modulation
# table, per modality; 3 more timestep modulation outputs per modality; the prompt_adaln embedders (256 -> d -> d, then
# d -> 2d); less the 2.0 caption projections (3840 -> d -> d per modality)
def _ltx23_transformer_count():
    D, A, heads, L, C = 4096, 2048, 32, 48, 3840

    def lin(i, o):
        return i * o + o
    block = 3 * lin(D, heads) + 3 * lin(A, heads) + (2 + 3) * (D + A)
    top = 3 * (D * D + D) + 3 * (A * A + A)
    top += sum(lin(256, d) + lin(d, d) + lin(d, 2 * d) for d in (D, A))
    caption = lin(C, D) + lin(D, D) + lin(C, A) + lin(A, A)
    return 18_876_174_592 + L * block + top - caption


@pytest.fixture(scope="module")
def full23():
    return plan.full_adapter("ltx2", "2.3")


def test_full_size_23(full23):
    """LTX-2.3 on meta: the transformer of the conversion script's 2.3 config, 18.99B, equals the hand count; with its
    text connectors (8 layers, per-modality projections: 3.17B, stored under the diffusion model's prefix in the
    original checkpoint) it is the "22B" of the checkpoint's name (ltx-2.3-22b-dev); the same latents as 2.0, 48 kHz
    sound, the same 48 x 28 LoRA targets, Gemma-3-12B."""
    pipe = full23.pipe
    n = plan.tensor_count(pipe.transformer, persistent_only=True)
    connectors = plan.tensor_count(pipe.connectors, persistent_only=True)
    print(f"LTX-2.3 transformer {n:,}, connectors {connectors:,}, together {n + connectors:,}")
    assert n == _ltx23_transformer_count() == 18_988_838_144
    assert round((n + connectors) / 1e9) == 22
    assert abs(plan.tensor_count(pipe.text_encoder, persistent_only=True) - 12.2e9) < 0.01 * 12.2e9
    assert full23.use_cross_timestep and pipe.transformer.prompt_modulation
    assert not pipe.transformer.config.use_prompt_embeddings
    assert pipe.vocoder.config.output_sampling_rate == 48000 and audio_sample_rate(full23) == 48000
    assert (pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio) == (32, 8)
    assert len(plan.lora_modules(pipe.transformer, full23.default_target_modules)) == 48 * 28
    state = full23.make_state(512, 768, 25)
    assert state["latent_grid"] == (4, 16, 24) and state["audio_frames"] == 26
    assert tuple(full23.prepare_noise(1, 512, 768, num_frames=25).shape) == (1, 4 * 16 * 24 * 128 + 26 * 128)
    # the stored conditioning: video 4096 + audio 2048 wide streams (2.0: 3840 + 3840) and masks, prompt and negative
    args = parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY, ["--model", "ltx2", "--variant", "2.3"])
    assert full23.condition_elements(args)[0] == 2 * 256 * (4096 + 2048 + 1)


def test_memory_plan_23(full23, monkeypatch, tmp_path):
    """`--plan --variant 2.3`: the full-size LTX-2.3 on meta, its transformer in the plan."""
    monkeypatch.setattr(plan, "ACTIVATIONS_JSON", str(tmp_path / "none.json"))
    args = parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY, ["--model", "ltx2", "--variant", "2.3"])
    rows = {r.name: r for r in plan.memory_plan(args, plan.Algorithm("GRPO", latents_per_sample=2), 1, meta=full23)}
    assert rows["transformer (frozen base)"].params == 18_988_838_144
    text = plan.run_plan(args, plan.Algorithm("GRPO", latents_per_sample=2), num_processes=1)
    assert "ltx2 2.3" in text and "LoRA GRPO on one 80 GB GPU: " in text


def test_grpo_runs_the_tiny_23(tmp_path):
    """`grpo.py --model ltx2 --variant 2.3 --tiny`, one epoch in-process: rollouts, rewards, a LoRA step."""
    args = parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY, [
        "--model", "ltx2", "--variant", "2.3", "--tiny", "--num-epochs", "1", "--prompts-per-epoch", "2",
        "--group-size", "2", "--eval-every", "0", "--log-with", "none", "--output-dir", str(tmp_path / "run")])
    grpo.main(args)
    rows = read_metrics(tmp_path / "run")
    assert rows and all(np.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    assert json.load(open(tmp_path / "run/config.json"))["variant"] == "2.3"


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
    """The tiny 2.0 vocoder at a nominal 16 kHz; the tiny 2.3 one extends it x3 to 48 kHz (its real one 16 -> 48 kHz):
    three times the samples of the same track."""
    old, new = LTX2Adapter.load(tiny=True), LTX2Adapter.load(tiny=True, variant="2.3")
    state, cond = _inputs(old)
    z = old.prepare_noise(2, SIZE, SIZE, torch.Generator().manual_seed(1), num_frames=FRAMES)
    audio, audio23 = old.decode_audio(z, state, cond), new.decode_audio(z, state, cond)
    assert audio_sample_rate(old) == 16000 and audio.shape[:2] == (2, 2) and torch.isfinite(audio).all()
    assert audio_sample_rate(new) == 48000 and audio23.shape == (2, 2, 3 * audio.shape[2])
    assert torch.isfinite(audio23).all() and 0 < audio23.abs().max() < 1  # inside the final clamp
