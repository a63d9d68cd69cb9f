"""Stable Diffusion 3.5 adapter (docs/models.md 3.3) over diffusers' StableDiffusion3Pipeline components.

Facts: 16-channel latents (B, 16, H/8, W/8), not packed (the transformer patchifies 2x2 itself and crops
a sincos table, so H/16 and W/16 are at most pos_embed_max_size); the transformer takes t = 1000 sigma;
text = [CLIP-L | CLIP-G] penultimate states zero-padded to the T5 width, then the T5 tokens
(max_sequence_length, pipeline default 256, at most 512); pooled = the two CLIP projections; true CFG
only, batched [negative, positive], on when guidance_scale > 1: v = neg + s (pos - neg);
schedule = the scheduler's own grid linspace(1, ~1/1000, N) (no custom sigmas) with static shift 3,
3s / (1 + 2s). Variants: medium has dual-attention (MMDiT-X) blocks, large has none.
CFG needs negative embeddings in `cond`: where the pipeline falls back to the negative prompt "",
our presets pass negative_prompt "" explicitly; without negatives `predict` runs one unguided pass.
"""
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from transformers import CLIPTextModelWithProjection

from common.errors import ModelError
from common.models import tiny_parts
from common.models.base import Adapter, combine_cfg
from common.models.flux1 import CLIP_L, FLUX_VAE, T5_XXL

# ---- full-size architectures (common/plan.py; issue 13) -------------------------------------------------------------
# docs/models.md 3.3 (the hub configs): the MMDiT widths per variant; medium's MMDiT-X dual attention in blocks 0-12
_SD35_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                         joint_attention_dim=4096, pooled_projection_dim=2048, qk_norm="rms_norm")
_SD35_COMMON = {
    "text_encoder": (CLIPTextModelWithProjection, CLIP_L),
    # OpenCLIP ViT-bigG/14's text tower (laion/CLIP-ViT-bigG-14-laion2B-39B-b160k): 32 x 1280, gelu [recalled]
    "text_encoder_2": (CLIPTextModelWithProjection, dict(CLIP_L, hidden_size=1280, intermediate_size=5120,
                                                         projection_dim=1280, num_hidden_layers=32,
                                                         num_attention_heads=20, hidden_act="gelu")),
    "text_encoder_3": T5_XXL,
    "vae": (AutoencoderKL, dict(FLUX_VAE, scaling_factor=1.5305, shift_factor=0.0609)),
}


class SD3Adapter(Adapter):
    name = "sd3_5"
    pipeline_cls = StableDiffusion3Pipeline
    preset = dict(lora_rank=32, lora_alpha=64, batch_size=8, eval_num_steps=40, guidance_scale=4.5,
                  negative_prompt="", max_sequence_length=256)
    hub_id = "stabilityai/stable-diffusion-3.5-medium"
    variants = {"medium": "stabilityai/stable-diffusion-3.5-medium",
                "large": "stabilityai/stable-diffusion-3.5-large"}
    # joint attention of every block; the FFNs and medium's second attention (attn2) stay frozen
    default_target_modules = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                              "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
    full_configs = {
        "medium": {"transformer": (SD3Transformer2DModel, dict(
            _SD35_TRANSFORMER, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
            pos_embed_max_size=384, dual_attention_layers=tuple(range(13)))), **_SD35_COMMON},
        "large": {"transformer": (SD3Transformer2DModel, dict(
            _SD35_TRANSFORMER, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
            pos_embed_max_size=192, dual_attention_layers=())), **_SD35_COMMON}}

    @classmethod
    def build_tiny(cls, variant="medium"):
        tok, tok2, tok3 = tiny_parts.clip_tokenizer(), tiny_parts.clip_tokenizer(), tiny_parts.t5_tokenizer()
        # two different CLIPs, so a swapped encoder would show; T5 must be as wide as both CLIPs together
        te = tiny_parts.clip_text_encoder(tok, 32, seed=0, cls=CLIPTextModelWithProjection, projection_dim=32)
        te2 = tiny_parts.clip_text_encoder(tok2, 32, seed=1, cls=CLIPTextModelWithProjection, projection_dim=32)
        te3 = tiny_parts.t5_encoder(tok3, 64)
        torch.manual_seed(0)
        tr = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                   caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32,
                                   qk_norm="rms_norm", dual_attention_layers=(0,) if variant == "medium" else ())
        return StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                        vae=tiny_parts.kl_vae_8x(1.5305, 0.0609), text_encoder=te, tokenizer=tok,
                                        text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3)

    @torch.no_grad()
    def encode_prompt(self, prompts, negative_prompts=None, max_sequence_length=256, images=None, state=None):
        if max_sequence_length > 512:  # the pipeline's own limit (check_inputs)
            raise ModelError(f"{self.name}: max_sequence_length is at most 512, got {max_sequence_length}")

        def encode(texts):
            return self.per_row(texts, lambda uniq: self.pipe.encode_prompt(
                uniq, None, None, device=self.device, do_classifier_free_guidance=False,
                max_sequence_length=max_sequence_length)[::2])  # (embeds, pooled)
        cond = dict(zip(("prompt_embeds", "pooled_embeds"), encode(list(prompts))))
        if negative_prompts is not None:
            cond.update(zip(("neg_prompt_embeds", "neg_pooled_embeds"),
                            encode([n or "" for n in negative_prompts])))
        return cond

    def _latent_hw(self, height, width):
        h, w = super()._latent_hw(height, width)  # patch size 2 in every SD3 config
        f, p = self.pipe.vae_scale_factor, self.config.patch_size
        limit = self.config.pos_embed_max_size * f * p  # the transformer crops its position table to the grid
        if height > limit or width > limit:
            raise ValueError(f"{self.name}: height and width must be at most {limit}, got {height}x{width}")
        return h, w

    def make_state(self, height, width, num_frames=1):
        h, w = self._latent_hw(height, width)
        p = self.config.patch_size
        return {"height": height, "width": width, "seq_len": (h // p) * (w // p)}

    def prepare_noise(self, n, height, width, generator=None, num_frames=1):
        # the same draw as StableDiffusion3Pipeline.prepare_latents: one randn of (B, 16, h, w)
        h, w = self._latent_hw(height, width)
        z = torch.randn((n, self.config.in_channels, h, w), generator=generator, device="cpu", dtype=self.dtype)
        return z.to(self.device).float()

    def sigmas(self, num_steps, state):
        cfg, mu = self.pipe.scheduler.config, None
        if cfg.get("use_dynamic_shifting"):  # off in the SD3.5 configs; the pipeline's fallback (max_shift 1.16)
            mu = calculate_shift(state["seq_len"], cfg.get("base_image_seq_len", 256),
                                 cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                 cfg.get("max_shift", 1.16))
        # no custom sigmas: the pipeline leaves the grid to the scheduler, not linspace(1, 1/N, N) (docs/models.md 3.3)
        return self.scheduler_sigmas(num_steps, mu=mu)

    def condition_elements(self, settings, latent_grid=None):
        text = (77 + settings.max_sequence_length) * self.config.joint_attention_dim + self.config.pooled_projection_dim
        return text * (2 if settings.negative_prompt is not None else 1), ""

    def predict(self, z, sigma, cond, state, guidance_scale=1.0, true_cfg_scale=1.0):
        # SD3 has no true_cfg_scale: guidance_scale is its (true) CFG scale
        n = z.shape[0]
        # float32 t = 1000 sigma, exactly the pipeline's scheduler.timesteps entry
        t = torch.as_tensor(sigma, dtype=torch.float32, device=z.device).expand(n) * 1000
        emb, pooled = cond["prompt_embeds"], cond["pooled_embeds"]
        cfg = guidance_scale > 1 and "neg_prompt_embeds" in cond
        x = z.to(self.dtype)
        if cfg:  # one batched forward for [negative, positive], as the pipeline does
            x, t = torch.cat([x, x]), torch.cat([t, t])
            emb = torch.cat([cond["neg_prompt_embeds"], emb])
            pooled = torch.cat([cond["neg_pooled_embeds"], pooled])
        v = self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=emb, pooled_projections=pooled,
                             return_dict=False)[0].float()
        if cfg:
            v = combine_cfg(v, guidance_scale)
        return v

    @torch.no_grad()
    def decode(self, z, state, cond=None):
        vae = self.pipe.vae
        x = z.to(self.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        img = vae.decode(x, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(img, output_type="pt").float()
