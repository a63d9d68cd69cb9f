"""LTX-2 text-to-video-with-audio (`ltx2`) and image-to-video-with-audio (`ltx2_i2v`) adapters over diffusers'
LTX2Pipeline and LTX2ImageToVideoPipeline components. Variants: `2.0` (LTX-2, 19B, the default) and `2.3` (LTX-2.3,
22B); both run through the same pipeline classes, and everything below holds for both unless stated.

Facts. One transformer denoises two latents jointly, with audio<->video cross-attention in every block:
- Video: a causal video VAE of 128 channels, x32 spatial and x8 temporal, normalised per channel (latents_mean /
  latents_std, scaling_factor); latents (B, 128, 1 + (F-1)//8, H/32, W/32) packed (patch 1) into tokens (B, S_v, 128),
  frames then rows then columns. So H, W are multiples of 32 and F = 8k + 1.
- Audio: a mel-spectrogram VAE (8 channels, x4 in time and in mel bins) and a vocoder to the stereo waveform (24 kHz
  for 2.0, 48 kHz for 2.3); latents (B, 8, L, 64/4) packed into (B, L, 8 x 16 = 128) tokens, normalised per packed
  channel. L, the audio latent frames, follows the video's duration: round(F / frame_rate x sample_rate / hop / 4) =
  round(F / 24 x 25).
- The sampler's state is ONE tensor per sample: the joint latent z = [video tokens flattened, audio tokens flattened],
  (B, S_v C_v + L C_a). Every sampler operation is elementwise, and a log-probability is the mean over all elements,
  so both modalities take the same SDE/ODE steps and share one log-probability per transition (video and audio are
  one action of the policy, as the pipeline steps both on one sigma grid).
- Noise: the pipeline's order on one CPU generator, fp32: the video randn (B, C, f, h, w), then the audio randn
  (B, C_a, L, M); each packed, then concatenated.
- Text: Gemma-3 (12B) hidden states of every layer (49 = 48 + embeddings), left-padded to max_sequence_length, stacked;
  the text connectors (frozen, part of the pipeline) turn them into a video and an audio caption stream with a binary
  mask. Those connector outputs are what `encode_prompt` stores. 2.0: one projection after a per-layer masked norm,
  both streams 3840 wide (the transformer's caption projections map them to 4096 / 2048); 2.3: a per-token RMS norm
  and one projection per modality, the streams already 4096 / 2048 wide (the transformer has no caption projection).
- Schedule: FlowMatchEulerDiscreteScheduler on linspace(1, 1/N, N) with the exponential dynamic shift, mu from the
  VIDEO token count (the scheduler config's base/max image_seq_len and shifts: 1024 -> 0.95, 4096 -> 2.05,
  shift_terminal 0.1, what diffusers' convert_ltx2_to_diffusers.py writes for the non-distilled 2.0 and 2.3
  checkpoints; the hub files themselves are not read here); audio uses the same sigmas.
- Time: the transformer takes t = 1000 sigma as `timestep`, and the same t as `sigma`: the input of LTX-2.3's prompt
  modulation (cross_attn_mod: the text cross-attention's keys / values modulated by the noise level), which the
  pipelines pass as `sigma=timestep` (per sample, also in image-to-video).
- Guidance: CFG v = v_neg + s (v_pos - v_neg) on both modalities when guidance_scale > 1, batched [negative, positive];
  the audio scale is the video scale (the pipeline's audio_guidance_scale defaults to it). The pipeline writes the same
  combination in x0 = z - sigma v (linear, so equal up to rounding); its extra guidance terms (STG, modality
  isolation, rescale) are off here, as in the peers' LTX-2 RL recipes. `use_cross_timestep`: LTX-2.0's legacy False;
  True for a transformer with LTX-2.3's prompt modulation (cross_attn_mod), as the pipeline documents the two (its
  default is True). Read from the loaded transformer's config, so a `--model-path` checkpoint decides, not the name.
- Frame rate: 24 fps (the pipeline's default) for the rope coordinates and the audio length; outputs are written at it.

Image-to-video: the first frame (re-compressed through H.264 at the pipeline's CRF, 33 for Gemma-3 checkpoints, so 2.0
and 2.3 alike, then resized) is VAE-encoded (posterior mode) and normalised; it IS latent frame 0, with timestep 0 on
its tokens (the audio and `sigma` keep t), and the pipeline never updates it. As for Wan2.2-TI2V-5B, our z excludes
those tokens (RL log-probs see only generated frames and the audio): prepare_noise drops them from the pipeline's full
noise, predict prepends the condition and drops it from the output, decode prepends it again (so decode needs `cond`).

Audio out: `decode` returns the video (B, F, 3, H, W) like every video model; `decode_audio` the waveform
(B, channels, samples) at `audio_sample_rate(self)` (the vocoder's output rate).

LTX-2.3 against LTX-2.0 (diffusers' convert_ltx2_to_diffusers.py, versions "2.0" and "2.3", and the diffusers
classes' switches): the same 48 blocks and widths, latents, scheduler, Gemma-3-12B and CRF. The 2.3 transformer adds
per-head gated attention (gated_attn, audio_gated_attn), prompt modulation (cross_attn_mod, audio_cross_attn_mod:
prompt_adaln on `sigma`, a per-block prompt scale / shift table, 9 timestep modulation parameters instead of 6) and the
STG-capable attention processor (perturbed_attn, inert without a perturbation mask), and drops the caption projections
(use_prompt_embeddings False); its connectors have 8 layers and per-modality projections (per_modality_projections);
its video VAE other block widths (x32 / x8 unchanged); its vocoder is LTX2VocoderWithBWE (a 16 kHz vocoder, then a
bandwidth extension to 48 kHz). The adapter has no variant branch: what differs is read from the loaded configs.
"""
import numpy as np
import torch
from diffusers import (AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler,
                       LTX2ImageToVideoPipeline, LTX2Pipeline, LTX2VideoTransformer3DModel)
from diffusers.pipelines.ltx2 import LTX2TextConnectors
from diffusers.pipelines.ltx2.pipeline_ltx2_image2video import retrieve_latents
from diffusers.pipelines.ltx2.utils import apply_image_conditioning_crf, resolve_default_image_crf
from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder, LTX2VocoderWithBWE
from PIL import Image
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

from common.errors import ModelError
from common.models import tiny_parts
from common.models.base import Adapter, ROOT, combine_cfg

FRAME_RATE = 24.0  # the pipelines' default frame_rate: rope coordinates, audio length, written mp4s

# the exponential dynamic shift between 1024 tokens (0.95) and 4096 (2.05), stretched so the last non-zero sigma is
# 0.1: what diffusers' convert_ltx2_to_diffusers.py writes for a non-distilled checkpoint, 2.0 and 2.3 alike
# (time_shift_type: the class default, "exponential"); the published scheduler_config.json files are not read here
SCHEDULER_CONFIG = dict(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
                        max_image_seq_len=4096, shift_terminal=0.1, time_shift_type="exponential")

# --variant -> hub id. 2.0: Lightricks/LTX-2 holds the diffusers folders beside the original files. 2.3:
# Lightricks/LTX-2.3 holds only the original single-file checkpoints (ltx-2.3-22b-dev.safetensors, ...); the
# diffusers-format copy that diffusers' own LTX-2 pipeline documentation loads is the one named here
VARIANTS = {"2.0": "Lightricks/LTX-2", "2.3": "diffusers/LTX-2.3-Diffusers"}

# ---- full-size architectures (common/plan.py) ------------------------------------------------------------------------
# diffusers' convert_ltx2_to_diffusers.py, get_ltx2_*_config(version). LTX-2.0 (19B): 48 blocks, video 32 heads
# x 128 (4096), audio 32 x 64 (2048), 128 latent channels in both, patch 1, caption width 3840 (Gemma-3-12B), split rope
_TRANSFORMER_20 = dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
                       attention_head_dim=128, cross_attention_dim=4096, audio_in_channels=128, audio_out_channels=128,
                       audio_num_attention_heads=32, audio_attention_head_dim=64, audio_cross_attention_dim=2048,
                       num_layers=48, caption_channels=3840, rope_type="split")
# LTX-2.3 (22B): the same sizes with its switches on: gated attention, prompt modulation, the STG processor, no caption
# projections. 18.99B (2.0: 18.88B); the name's 22B matches it with its text connectors (3.17B), which the original
# checkpoint stores under the diffusion model's prefix (the conversion script reads them from there)
_LTX23_SWITCHES = dict(gated_attn=True, cross_attn_mod=True, audio_gated_attn=True, audio_cross_attn_mod=True,
                       use_prompt_embeddings=False, perturbed_attn=True)
_TRANSFORMER_23 = dict(_TRANSFORMER_20, **_LTX23_SWITCHES)
# video VAE, 2.0: the diffusers class's defaults are its blocks (x32 / x8 video VAE with 128 latents; its config
# states the ratios: the class would derive x16 in time from its four scaling blocks)
_VAE_20 = dict(timestep_conditioning=False, decoder_causal=False, spatial_compression_ratio=32,
               temporal_compression_ratio=8)
# 2.3: other block widths and a fourth decoder block, still x32 / x8 with 128 latents (timestep_conditioning is the
# script's --timestep_conditioning flag, off by default)
_VAE_23 = dict(_VAE_20, block_out_channels=(256, 512, 1024, 1024), decoder_block_out_channels=(256, 512, 512, 1024),
               layers_per_block=(4, 6, 4, 2, 2), decoder_layers_per_block=(4, 6, 4, 2, 2),
               decoder_spatio_temporal_scaling=(True,) * 4, decoder_inject_noise=(False,) * 5,
               upsample_type=("spatiotemporal", "spatiotemporal", "temporal", "spatial"),
               upsample_residual=(False,) * 4, upsample_factor=(2, 2, 1, 2), decoder_spatial_padding_mode="zeros")
# text connectors, 2.0: the class defaults (2 layers of 30 x 128 = 3840 per modality, 128 registers, one projection of
# the 49 x 3840 stacked states) with split rope; 2.3: 8 layers of 32 x 128 (video) and 32 x 64 (audio), gated, one
# biased projection per modality to 4096 / 2048
_CONNECTORS_20 = dict(rope_type="split")
_CONNECTORS_23 = dict(rope_type="split", video_connector_num_attention_heads=32, video_connector_attention_head_dim=128,
                      video_connector_num_layers=8, video_gated_attn=True, audio_connector_num_attention_heads=32,
                      audio_connector_attention_head_dim=64, audio_connector_num_layers=8, audio_gated_attn=True,
                      per_modality_projections=True, video_hidden_dim=4096, audio_hidden_dim=2048, proj_bias=True)
# vocoder, 2.0: LTX2Vocoder's defaults (24 kHz); 2.3: LTX2VocoderWithBWE's defaults, which are the script's 2.3 config
# (a 1536-wide snakebeta vocoder at 16 kHz, a 512-wide bandwidth extension to 48 kHz)
# google/gemma-3-12b-it (config.json [recalled]): 48 x 3840 text layers, GQA 16/8 of width 256, a 27-layer SigLIP
# vision tower at 896 px; the pipeline reads every hidden state (49 x 3840). The text encoder of 2.0 and 2.3 (the
# conversion script's default for both: google/gemma-3-12b-it-qat-q4_0-unquantized, the same architecture)
GEMMA3_12B = dict(
    text_config=dict(vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=1024,
                     max_position_embeddings=131072),
    vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=896, patch_size=14),
    mm_tokens_per_image=256)
# the audio VAE is the class's defaults in both (the script: "Same config as LTX-2.0")
FULL = {
    "2.0": {"transformer": (LTX2VideoTransformer3DModel, _TRANSFORMER_20), "vae": (AutoencoderKLLTX2Video, _VAE_20),
            "audio_vae": (AutoencoderKLLTX2Audio, {}), "vocoder": (LTX2Vocoder, {}),
            "connectors": (LTX2TextConnectors, _CONNECTORS_20),
            "text_encoder": (Gemma3ForConditionalGeneration, GEMMA3_12B)},
    "2.3": {"transformer": (LTX2VideoTransformer3DModel, _TRANSFORMER_23), "vae": (AutoencoderKLLTX2Video, _VAE_23),
            "audio_vae": (AutoencoderKLLTX2Audio, {}), "vocoder": (LTX2VocoderWithBWE, {}),
            "connectors": (LTX2TextConnectors, _CONNECTORS_23),
            "text_encoder": (Gemma3ForConditionalGeneration, GEMMA3_12B)},
}

# docs/models.md 4: per block the q, k, v, out of the six attentions (video and audio self-attention, their text
# cross-attentions, audio->video and video->audio) and both feed-forwards: 28 (2.3's per-head gates, to_gate_logits,
# are not targets)
_ATTENTIONS = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
TARGETS = [f"{a}.{p}" for a in _ATTENTIONS for p in ("to_q", "to_k", "to_v", "to_out.0")] + [
    "ff.net.0.proj", "ff.net.2", "audio_ff.net.0.proj", "audio_ff.net.2"]


# ---- the tiny build --------------------------------------------------------------------------------------------------
def _tiny_components(variant=None):
    """Random tiny components of both pipelines: the interface numbers of LTX-2 but the video VAE's time factor
    (x32 spatial, patch-1 tokens, 4 mel latent bins -> audio tokens of 2 x 4 channels); x4 in time instead of x8, so a
    tiny video has 5 frames as every tiny video model's. variant "2.3": the same sizes with LTX-2.3's switches on (the
    transformer's gated attention, prompt modulation, STG processor, no caption projections, split rope; per-modality
    connectors; the vocoder with bandwidth extension), so every 2.3 path of the pipelines runs."""
    v23 = variant == "2.3"
    tok = tiny_parts.mistral_tokenizer()  # a byte-level fast tokenizer: the pipeline only pads, truncates and masks
    torch.manual_seed(0)
    text_encoder = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                         sliding_window=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14), mm_tokens_per_image=4)).eval()
    torch.manual_seed(0)
    # caption width = the Gemma width; 3 = its 2 layers + embeddings. 2.0: connector width 4 x 8 = the caption width;
    # 2.3: the connectors project per modality straight to the transformer's text widths, 2 x 8 = 16 and 2 x 4 = 8
    if v23:
        connectors = LTX2TextConnectors(
            caption_channels=32, text_proj_in_factor=3, video_connector_num_attention_heads=2,
            video_connector_attention_head_dim=8, video_connector_num_layers=1,
            video_connector_num_learnable_registers=4, video_gated_attn=True, audio_connector_num_attention_heads=2,
            audio_connector_attention_head_dim=4, audio_connector_num_layers=1,
            audio_connector_num_learnable_registers=4, audio_gated_attn=True, connector_rope_base_seq_len=32,
            rope_type="split", per_modality_projections=True, video_hidden_dim=16, audio_hidden_dim=8,
            proj_bias=True).eval()
    else:
        connectors = LTX2TextConnectors(
            caption_channels=32, text_proj_in_factor=3, video_connector_num_attention_heads=4,
            video_connector_attention_head_dim=8, video_connector_num_layers=1,
            video_connector_num_learnable_registers=4, audio_connector_num_attention_heads=4,
            audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
            audio_connector_num_learnable_registers=4, connector_rope_base_seq_len=32).eval()
    torch.manual_seed(0)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, caption_channels=32,
        vae_scale_factors=(4, 32, 32), **(dict(_LTX23_SWITCHES, rope_type="split") if v23 else {}))
    torch.manual_seed(0)
    # patch 4, then 3 spatial halvings (x32); 2 of them also halve time (x4); the decoder mirrors it
    vae = AutoencoderKLLTX2Video(
        latent_channels=8, block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        down_block_types=("LTX2VideoDownBlock3D",) * 3, layers_per_block=(1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1), spatio_temporal_scaling=(True, True, True),
        decoder_spatio_temporal_scaling=(True, True, True), decoder_inject_noise=(False,) * 4,
        downsample_type=("spatial", "spatiotemporal", "spatiotemporal"),
        upsample_type=("spatiotemporal", "spatiotemporal", "spatial"), upsample_residual=(False,) * 3,
        upsample_factor=(1, 1, 1), patch_size=4, decoder_causal=False, timestep_conditioning=False,
        spatial_compression_ratio=32, temporal_compression_ratio=4,
        decoder_spatial_padding_mode="zeros" if v23 else "reflect")  # 2.3's decoder pads with zeros
    # random per-channel statistics, so the tests exercise the normalisation
    vae.latents_mean.uniform_(-0.5, 0.5)
    vae.latents_std.uniform_(0.5, 2.0)
    torch.manual_seed(0)
    audio_vae = AutoencoderKLLTX2Audio(base_channels=8, output_channels=2, ch_mult=(1, 2, 4), num_res_blocks=1,
                                       in_channels=2, latent_channels=2, mel_bins=16)  # 2 x 16 / 4 = 8 packed
    audio_vae.latents_mean.uniform_(-0.5, 0.5)
    audio_vae.latents_std.uniform_(0.5, 2.0)
    torch.manual_seed(0)
    vocoder_kw = dict(in_channels=2 * 16, hidden_channels=16, out_channels=2, upsample_kernel_sizes=[4, 4],
                      upsample_factors=[2, 2], resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]])
    if v23:
        # 4 samples per mel frame at a nominal 16 kHz, then the extension: a causal STFT (hop 4, 16 mel bins) and a
        # second vocoder upsampling each STFT frame 12 x, added to the x3 resampled waveform: 48 kHz. The STFT and mel
        # bases are checkpoint buffers (zeros until loaded): random here, so the extension does work; its output layer
        # scaled down so the sum stays inside the final clamp to [-1, 1] (a clamped sample would hide differences)
        vocoder = LTX2VocoderWithBWE(
            **vocoder_kw, bwe_in_channels=2 * 16, bwe_hidden_channels=16, bwe_out_channels=2,
            bwe_upsample_kernel_sizes=[8, 7], bwe_upsample_factors=[4, 3], bwe_resnet_kernel_sizes=[3],
            bwe_resnet_dilations=[[1, 3, 5]], filter_length=16, hop_length=4, window_length=16, num_mel_channels=16,
            input_sampling_rate=16000, output_sampling_rate=48000)
        stft = vocoder.mel_stft
        stft.stft_fn.forward_basis.normal_(0, 0.25)
        stft.mel_basis.uniform_(0, 0.2)
        vocoder.bwe_generator.conv_out.weight.data.mul_(0.1)
    else:
        vocoder = LTX2Vocoder(**vocoder_kw, output_sampling_rate=16000)
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae.eval(),
                audio_vae=audio_vae.eval(), text_encoder=text_encoder, tokenizer=tok, connectors=connectors,
                transformer=transformer, vocoder=vocoder.eval())


def audio_sample_rate(adapter) -> int:
    """The waveform's sample rate: the vocoder's output rate (24 kHz for LTX-2.0, 48 kHz for LTX-2.3)."""
    return int(adapter.pipe.vocoder.config.output_sampling_rate)


class LTX2Adapter(Adapter):
    name = "ltx2"
    pipeline_cls = LTX2Pipeline
    variants = VARIANTS  # "2.0" (default), "2.3"
    hub_id = VARIANTS["2.0"]
    default_target_modules = TARGETS
    condition_images = "none"
    video = True
    audio = True
    audio_sample_rate = audio_sample_rate  # the function as a method: adapter.audio_sample_rate() (common/run.py)
    size_multiple = 32  # the VAE's x32 (patch 1 tokens)
    frame_rate = FRAME_RATE
    # the peers' LTX-2 recipes: 512x768, 24 rollout steps, 50 evaluation steps, CFG 4 in evaluation (their rollouts
    # run CFG-free: --guidance-scale 1; one scale serves both here, so the evaluation's); frames 8k+1, short enough
    # for RL (the recipes do not state theirs); Gemma's 1024 tokens capped at 256 (prompts are short, and the padding
    # is stored with every sample). One preset for both variants (LTX-2.3's published settings, CFG 3 on video and 7 on
    # audio with STG and modality guidance, are not what the adapter's one-scale CFG runs; docs/models.md 3.12)
    preset = dict(resolution=(512, 768), eval_resolution=(512, 768), num_frames=25, eval_num_frames=49,
                  num_steps=24, eval_num_steps=50, guidance_scale=4.0, batch_size=1, max_sequence_length=256)
    tiny_preset = dict(num_frames=5, eval_num_frames=5)
    full_configs = FULL
    unguided = (1.0, 1.0)

    def __init__(self, pipe, device="cpu", dtype=torch.float32, variant=None, condition_max_pixels=None, **options):
        super().__init__(pipe, device, dtype, variant=variant, condition_max_pixels=condition_max_pixels, **options)
        cfg = self.config
        if cfg.patch_size != 1 or cfg.patch_size_t != 1:  # every LTX-2 checkpoint; the token packing below assumes it
            raise ModelError(f"{self.name}: transformer patch sizes must be 1, got {cfg.patch_size}/{cfg.patch_size_t}")
        # LTX-2.0's legacy cross-attention modulation; LTX-2.3 (prompt modulation) uses the other modality's sigma
        self.use_cross_timestep = bool(cfg.cross_attn_mod or cfg.audio_cross_attn_mod)

    @classmethod
    def build_tiny(cls, variant=None):
        return cls.pipeline_cls(**_tiny_components(variant))

    @classmethod
    def check_size(cls, height, width, num_frames, variant=None):
        """Before loading: multiples of 32 and F = 4k + 1 (the tiny VAE's rule; LTX-2's x8 VAE needs F = 8k + 1,
        which make_state checks against the loaded VAE)."""
        m = cls.size_multiple
        if height < m or width < m or height % m or width % m:
            raise ModelError(f"{cls.name}: height and width must be positive multiples of {m}, got {height}x{width}")
        if num_frames < 1 or (num_frames - 1) % 4:
            raise ModelError(f"{cls.name}: num_frames must be 8k+1 (1, 9, 17, ...), got {num_frames}")

    def condition_elements(self, settings, latent_grid=None):
        # video and audio connector streams of the prompt and of the negative, and their masks; each stream is as wide
        # as its connector (2.0: 3840 and 3840; 2.3: 4096 and 2048)
        c = self.pipe.connectors.config
        width = (c.video_connector_num_attention_heads * c.video_connector_attention_head_dim
                 + c.audio_connector_num_attention_heads * c.audio_connector_attention_head_dim)
        return 2 * settings.max_sequence_length * (width + 1), ""

    # ---- sizes ----------------------------------------------------------------------------------------------------
    def _latent_grid(self, height, width, num_frames):
        s, t = self.pipe.vae_spatial_compression_ratio, self.pipe.vae_temporal_compression_ratio
        if height % s or width % s or height < s or width < s:
            raise ModelError(f"{self.name}: height and width must be multiples of {s}, got {height}x{width}")
        if num_frames < 1 or (num_frames - 1) % t:
            raise ModelError(f"{self.name}: num_frames must be {t}k+1 for this VAE (x{t} in time), got {num_frames}")
        return 1 + (num_frames - 1) // t, height // s, width // s

    def _audio_frames(self, num_frames):
        """The pipeline's audio latent length for a video of num_frames at the frame rate."""
        p = self.pipe
        per_second = p.audio_sampling_rate / p.audio_hop_length / float(p.audio_vae_temporal_compression_ratio)
        return round(num_frames / self.frame_rate * per_second)

    def make_state(self, height, width, num_frames=1):
        f, h, w = self._latent_grid(height, width, num_frames)
        p, tr = self.pipe, self.pipe.transformer
        audio_frames = self._audio_frames(num_frames)
        mel = p.audio_vae.config.mel_bins // p.audio_vae_mel_compression_ratio
        audio_width = p.audio_vae.config.latent_channels * mel
        video_width = self.config.in_channels
        # rope coordinates of one sample, built once per size (predict expands them to its batch)
        video_coords = tr.rope.prepare_video_coords(1, f, h, w, self.device, fps=self.frame_rate)
        audio_coords = tr.audio_rope.prepare_audio_coords(1, audio_frames, self.device)
        cond_tokens = h * w if self.condition_images == "one" else 0  # i2v: latent frame 0 is the condition
        return {"height": height, "width": width, "num_frames": num_frames, "latent_grid": (f, h, w),
                "tokens_per_frame": h * w, "video_tokens": f * h * w, "video_width": video_width,
                "audio_frames": audio_frames, "audio_mel": mel, "audio_width": audio_width,
                "cond_tokens": cond_tokens, "video_coords": video_coords, "audio_coords": audio_coords,
                "split": ((f * h * w - cond_tokens) * video_width, audio_frames * audio_width)}

    def sigmas(self, num_steps, state):
        return self.shifted_sigmas(num_steps, state["video_tokens"])

    # ---- the joint latent -------------------------------------------------------------------------------------------
    @staticmethod
    def _unjoin(z, state):
        """(video tokens (B, S, C_v) without condition tokens, audio tokens (B, L, C_a M)) of the joint latent."""
        nv, na = state["split"]
        video = z[:, :nv].reshape(len(z), -1, state["video_width"])
        return video, z[:, nv:nv + na].reshape(len(z), state["audio_frames"], state["audio_width"])

    @staticmethod
    def _join(video, audio):
        return torch.cat([video.flatten(1), audio.flatten(1)], dim=1)

    def prepare_noise(self, n, height, width, generator=None, num_frames=1):
        # the pipelines' prepare_latents then prepare_audio_latents: two fp32 draws on the one CPU generator
        f, h, w = self._latent_grid(height, width, num_frames)
        p = self.pipe
        video = torch.randn((n, p.vae.config.latent_channels, f, h, w), generator=generator, dtype=torch.float32)
        mel = p.audio_vae.config.mel_bins // p.audio_vae_mel_compression_ratio
        audio = torch.randn((n, p.audio_vae.config.latent_channels, self._audio_frames(num_frames), mel),
                            generator=generator, dtype=torch.float32)
        video = LTX2Pipeline._pack_latents(video)  # (B, f h w, C): frames, rows, columns
        if self.condition_images == "one":
            video = video[:, h * w:]  # the first latent frame is the condition image, not noise
        return self._join(video, LTX2Pipeline._pack_audio_latents(audio)).to(self.device)

    # ---- text --------------------------------------------------------------------------------------------------------
    def _encode_text(self, prompts, negative_prompts, max_sequence_length):
        pipe = self.pipe

        def encode(uniq):
            emb, mask, _, _ = pipe.encode_prompt(uniq, do_classifier_free_guidance=False,
                                                 max_sequence_length=max_sequence_length, device=self.device)
            video, audio, mask = pipe.connectors(emb, mask, padding_side=pipe.tokenizer.padding_side)
            return video.to(self.dtype), audio.to(self.dtype), mask

        out = {}
        negs = [n or "" for n in negative_prompts] if negative_prompts is not None else [""] * len(prompts)
        # negatives always ("" by default): CFG is decided per forward (guidance_scale > 1), as in the pipeline
        for prefix, texts in (("", list(prompts)), ("neg_", negs)):
            video, audio, mask = self.per_row(texts, encode)
            out.update({f"{prefix}prompt_embeds": video, f"{prefix}audio_prompt_embeds": audio,
                        f"{prefix}prompt_mask": mask})
        return out

    @torch.no_grad()
    def encode_prompt(self, prompts, negative_prompts=None, max_sequence_length=1024, images=None, state=None):
        return self._encode_text(prompts, negative_prompts, max_sequence_length)

    # ---- the velocity ------------------------------------------------------------------------------------------------
    def _video_in(self, video, cond):
        """Video tokens the transformer sees: the condition frame's tokens first (image-to-video)."""
        return video

    def predict(self, z, sigma, cond, state, guidance_scale=1.0, true_cfg_scale=1.0):
        """The joint velocity (B, N) in the eps - x0 convention, CFG on both modalities when guidance_scale > 1.
        true_cfg_scale is unused (LTX-2's one CFG scale is guidance_scale)."""
        n = z.shape[0]
        t = torch.as_tensor(sigma, dtype=torch.float32, device=z.device).expand(n) * 1000
        video, audio = self._unjoin(z, state)
        video = self._video_in(video, cond)
        video, audio = video.to(self.dtype), audio.to(self.dtype)
        keys = ("prompt_embeds", "audio_prompt_embeds", "prompt_mask")
        emb, audio_emb, mask = (cond[k] for k in keys)
        cfg = guidance_scale > 1
        if cfg:  # one batched forward for [negative, positive]
            video, audio, t = torch.cat([video, video]), torch.cat([audio, audio]), torch.cat([t, t])
            emb, audio_emb, mask = (torch.cat([cond["neg_" + k], cond[k]]) for k in keys)
        b = len(t)
        c = state["cond_tokens"]
        # image-to-video: timestep 0 on the condition frame's tokens, t elsewhere; the audio and sigma keep t
        video_t = t if not c else torch.cat([torch.zeros_like(t)[:, None].expand(-1, c),
                                             t[:, None].expand(-1, state["video_tokens"] - c)], dim=1)
        f, h, w = state["latent_grid"]
        v_video, v_audio = self.transformer(
            hidden_states=video, audio_hidden_states=audio, encoder_hidden_states=emb,
            audio_encoder_hidden_states=audio_emb, timestep=video_t, audio_timestep=t, sigma=t,
            encoder_attention_mask=mask, audio_encoder_attention_mask=mask, num_frames=f, height=h, width=w,
            fps=self.frame_rate, audio_num_frames=state["audio_frames"],
            video_coords=state["video_coords"].expand(b, -1, -1, -1),
            audio_coords=state["audio_coords"].expand(b, -1, -1, -1), use_cross_timestep=self.use_cross_timestep,
            return_dict=False)
        v = self._join(v_video[:, c:].float(), v_audio.float())
        if cfg:
            v = combine_cfg(v, guidance_scale)
        return v

    # ---- outputs ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, z, state, cond=None):
        """Videos (B, F, 3, H, W) in [0, 1] (image-to-video: `cond` rows matching z hold the first frame)."""
        video, _ = self._unjoin(z, state)
        video = self._video_in(video, cond)
        f, h, w = state["latent_grid"]
        vae = self.pipe.vae
        x = LTX2Pipeline._unpack_latents(video.float(), f, h, w)
        x = LTX2Pipeline._denormalize_latents(x, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        # a timestep-conditioned decoder gets the pipeline's decode_timestep 0 (its noise then weighs 0)
        timestep = torch.zeros(len(x), device=x.device, dtype=vae.dtype) if vae.config.timestep_conditioning else None
        out = vae.decode(x.to(vae.dtype), timestep, return_dict=False)[0]
        return self.pipe.video_processor.postprocess_video(out, output_type="pt").float()

    @torch.no_grad()
    def decode_audio(self, z, state, cond=None) -> torch.Tensor:
        """Waveforms (B, channels, samples) in the vocoder's range, at audio_sample_rate(self)."""
        _, audio = self._unjoin(z, state)
        p = self.pipe
        x = LTX2Pipeline._denormalize_audio_latents(audio.float(), p.audio_vae.latents_mean, p.audio_vae.latents_std)
        x = LTX2Pipeline._unpack_audio_latents(x, state["audio_frames"], num_mel_bins=state["audio_mel"])
        mel = p.audio_vae.decode(x.to(p.audio_vae.dtype), return_dict=False)[0]
        return p.vocoder(mel).float()


class LTX2I2VAdapter(LTX2Adapter):
    name = "ltx2_i2v"
    pipeline_cls = LTX2ImageToVideoPipeline
    condition_images = "one"
    # as text-to-video, 30 training steps (the peers' image-to-video recipe)
    preset = dict(LTX2Adapter.preset, num_steps=30)
    # --tiny: the demo edit dataset's images as first frames
    tiny_preset = dict(num_frames=5, eval_num_frames=5, dataset=f"{ROOT}/datasets/demo-edit")

    def condition_elements(self, settings, latent_grid=None):
        text, _ = super().condition_elements(settings)
        _, h, w = latent_grid
        return text + h * w * self.config.in_channels, ""  # the first frame's latent tokens

    @torch.no_grad()
    def encode_prompt(self, prompts, negative_prompts=None, max_sequence_length=1024, images=None, state=None):
        if images is None or len(images) != len(prompts) or any(len(im) != 1 for im in images):
            raise ModelError(f"{self.name} needs exactly one condition image (the first frame) per prompt")
        if state is None:
            raise ModelError(f"{self.name}: encode_prompt needs `state` (make_state): the first frame is encoded at "
                             "the video's size")
        cond = self._encode_text(prompts, negative_prompts, max_sequence_length)
        first = {self.image_key(im[0]): im[0] for im in images}
        cond["first_frame"] = self.per_row([self.image_key(im[0]) for im in images],
                                           lambda uniq: torch.cat([self._encode_image(first[k], state) for k in uniq]))
        return cond

    def _encode_image(self, img, state):
        """(1, h w, C) normalised latent tokens of the first frame, as the pipeline builds them (one image a call)."""
        pipe, vae = self.pipe, self.pipe.vae
        crf = resolve_default_image_crf(pipe.text_encoder)
        img = Image.fromarray(apply_image_conditioning_crf(np.array(img.convert("RGB")), crf))
        x = pipe.video_processor.preprocess(img, height=state["height"], width=state["width"])
        x = x.to(self.device, self.dtype)
        lat = retrieve_latents(vae.encode(x.unsqueeze(2).to(vae.dtype)), None, "argmax").to(torch.float32)
        lat = LTX2Pipeline._normalize_latents(lat, vae.latents_mean, vae.latents_std)  # the pipeline: scaling 1 here
        return LTX2Pipeline._pack_latents(lat)

    def _video_in(self, video, cond):
        if cond is None or "first_frame" not in cond:
            raise ModelError(f"{self.name}: predict and decode need `cond` (latent frame 0 is the condition image, not "
                             "part of z)")
        return torch.cat([cond["first_frame"].to(video), video], dim=1)

