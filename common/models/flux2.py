"""FLUX.2-dev and FLUX.2-klein adapters (docs/models.md 3.7, 3.8) over diffusers' Flux2Pipeline / Flux2KleinPipeline.

Facts: the VAE has 32 latent channels, patchified 2x2 to 128 and normalized with its BatchNorm running stats;
noise is drawn directly in that space, (B, 128, H/16, W/16), and flattened row-major to (B, L, 128) tokens.
Position ids have 4 axes (t, row, col, l): target (0, r, c, 0), text (0, 0, 0, l), reference image j
(10(j+1), r, c, 0). The transformer takes t/1000 and uses only ids[0], so a batch shares one id layout.
Reference images (0..n per sample; the pipeline's area cap is 1024^2, floored to multiples of 16, center
crop) are VAE-encoded (mode) and concatenated after the target tokens; the output is sliced back.
Schedule = linspace(1, 1/N, N) exponentially shifted with mu = compute_empirical_mu(L, N) (L = target tokens).
Text: FLUX.2-dev stacks Mistral-3 hidden_states[10, 20, 30], klein Qwen3 hidden_states[9, 18, 27].
Guidance: FLUX.2-dev has a distilled guidance embedding (single pass, no true CFG); klein has none: the
distilled 4B/9B run one pass and ignore guidance_scale, the base models run true CFG
v_neg + s (v_pos - v_neg) when guidance_scale > 1 (the pipeline's rule), batched here into one call. That
pipeline always uses the negative prompt ""; here CFG needs negative embeddings in cond (pass "" to match it).
"""

import numpy as np
import torch
from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline,
                       Flux2Transformer2DModel)
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

from common.errors import ModelError
from common.models import tiny_parts
from common.models.base import Adapter, combine_cfg, pad_cat
from common.models.z_image import QWEN3_4B

# FLUX.2's scheduler_config.json (FLUX.1-dev's values); mu is passed explicitly, so base/max shift are unused
SCHEDULER_CONFIG = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                        max_image_seq_len=4096)
TINY_TEXT_HIDDEN = 16  # the transformer's joint_attention_dim is 3 x this (three stacked hidden states)

# ---- full-size architectures (common/plan.py; issue 13) -------------------------------------------------------------
# docs/models.md 3.7/3.8 (the hub configs): one transformer class; widths and depths per model,
# joint_attention_dim = 3 x the text encoder's hidden size (three stacked hidden states); the VAE =
# AutoencoderKLFlux2's defaults [assumed FLUX.2's]
_FLUX2_TRANSFORMER = dict(patch_size=1, in_channels=128, attention_head_dim=128, timestep_guidance_channels=256,
                          mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000)
_FLUX2_VAE = (AutoencoderKLFlux2, dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=32,
                                       patch_size=(2, 2)))
# Mistral-Small-3.1/3.2-24B, one architecture (transformers' Mistral3Config defaults are exactly this model: 40 x 5120
# text, Pixtral vision)
MISTRAL_SMALL_24B = dict(
    text_config=dict(model_type="mistral", vocab_size=131072, hidden_size=5120, intermediate_size=32768,
                     num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=131072, rms_norm_eps=1e-5, sliding_window=None,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e9}),
    vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, head_dim=64, image_size=1540, patch_size=14),
    image_token_index=10, spatial_merge_size=2, projector_hidden_act="gelu", multimodal_projector_bias=False,
    tie_word_embeddings=False)  # the top-level flag decides the tie in transformers 5 (else lm_head = embeddings)
# Qwen3-8B (Qwen/Qwen3-8B config.json [recalled]): 36 x 4096, GQA 32/8, untied lm_head
QWEN3_8B = dict(QWEN3_4B, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)
# FLUX.2-klein 4B: 5 double + 20 single blocks x 3072 over Qwen3-4B; 9B: 8 + 24 x 4096 over Qwen3-8B; the base
# (undistilled) models share the architecture
_KLEIN_4B = {"transformer": (Flux2Transformer2DModel, dict(_FLUX2_TRANSFORMER, num_layers=5, num_single_layers=20,
                                                           num_attention_heads=24, joint_attention_dim=3 * 2560,
                                                           guidance_embeds=False)),
             "text_encoder": (Qwen3ForCausalLM, QWEN3_4B), "vae": _FLUX2_VAE}
_KLEIN_9B = {"transformer": (Flux2Transformer2DModel, dict(_FLUX2_TRANSFORMER, num_layers=8, num_single_layers=24,
                                                           num_attention_heads=32, joint_attention_dim=3 * 4096,
                                                           guidance_embeds=False)),
             "text_encoder": (Qwen3ForCausalLM, QWEN3_8B), "vae": _FLUX2_VAE}


def _tiny_vae():
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8,) * 4,
                             layers_per_block=1, latent_channels=32, norm_num_groups=4, sample_size=64,
                             patch_size=(2, 2))
    # non-trivial BatchNorm stats, so the tests exercise the latent normalization
    vae.bn.running_mean.uniform_(-0.5, 0.5)
    vae.bn.running_var.uniform_(0.5, 2.0)
    return vae.eval()


def _tiny_transformer(guidance_embeds):
    torch.manual_seed(0)
    return Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2,
                                   joint_attention_dim=3 * TINY_TEXT_HIDDEN, timestep_guidance_channels=256,
                                   mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), rope_theta=2000,
                                   guidance_embeds=guidance_embeds)


def _ids(t, h, w, length, device):
    """(h * w * length, 4) position ids (t, row, col, l), row-major as the pipelines build them, made on `device`
    (predict makes some at every step: nothing is copied from the host)."""
    ranges = ((t, t + 1), (0, h), (0, w), (0, length))
    return torch.cartesian_prod(*(torch.arange(a, b, device=device) for a, b in ranges))


class Flux2Adapter(Adapter):
    name = "flux2"
    pipeline_cls = Flux2Pipeline
    preset = dict(num_steps=8, eval_resolution=1024, eval_num_steps=28, guidance_scale=4.0, batch_size=1)
    hub_id = "black-forest-labs/FLUX.2-dev"
    condition_images = "optional"
    default_condition_max_pixels = 1024 * 1024
    condition_min_side, condition_max_aspect = 64, 8  # Flux2ImageProcessor.check_image_input's defaults
    # a regex because the single blocks' attn.to_out is a plain Linear while the double blocks' is a ModuleList:
    # the suffix "attn.to_out" would hit both and PEFT rejects the ModuleList (docs/models.md 4)
    default_target_modules = (
        r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
        r"|ff(_context)?\.(linear_in|linear_out))"
        r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)")
    full_configs = {None: {
        "transformer": (Flux2Transformer2DModel, dict(_FLUX2_TRANSFORMER, num_layers=8, num_single_layers=48,
                                                      num_attention_heads=48, joint_attention_dim=15360,
                                                      guidance_embeds=True)),
        "text_encoder": (Mistral3ForConditionalGeneration, MISTRAL_SMALL_24B),
        "vae": _FLUX2_VAE}}

    @classmethod
    def build_tiny(cls, variant=None):
        tok = tiny_parts.mistral_tokenizer()
        torch.manual_seed(0)
        # 31 text layers: the pipeline reads hidden_states[30] (pitfall 6)
        cfg = Mistral3Config(
            text_config=dict(model_type="mistral", vocab_size=len(tok), hidden_size=TINY_TEXT_HIDDEN,
                             intermediate_size=32, num_hidden_layers=31, num_attention_heads=2, num_key_value_heads=1,
                             head_dim=8, max_position_embeddings=2048, sliding_window=None,
                             pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id),
            vision_config=dict(model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, image_size=32, patch_size=8, head_dim=8),
            image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2)
        te = Mistral3ForConditionalGeneration(cfg).eval()
        return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=_tiny_vae(),
                             text_encoder=te, tokenizer=tok, transformer=_tiny_transformer(guidance_embeds=True))

    @property
    def _true_cfg_model(self):
        """Whether the model is run with true CFG at all (FLUX.2-dev: no, guidance is an embedding)."""
        return False

    @torch.no_grad()
    def encode_prompt(self, prompts, negative_prompts=None, max_sequence_length=512, images=None, state=None):
        def encode(texts):
            return self.per_row(texts, lambda uniq: self.pipe.encode_prompt(
                uniq, device=self.device, max_sequence_length=max_sequence_length)[0])
        cond = {"prompt_embeds": encode(list(prompts))}
        if negative_prompts is not None and self._true_cfg_model:  # FLUX.2-dev and distilled klein never use them
            cond["neg_prompt_embeds"] = encode([n or "" for n in negative_prompts])
        if images is not None:
            if len(images) != len(prompts):
                raise ModelError(f"{self.name}: {len(images)} condition-image lists for {len(prompts)} prompts")
            cond.update(self._encode_images(images))
        return cond

    def _encode_image(self, img):
        """One reference image as the pipeline prepares it, with the area capped at condition_max_pixels:
        normalized patchified latents (1, 128, h/16, w/16)."""
        proc = self.pipe.image_processor
        try:
            proc.check_image_input(img)
        except ValueError as e:
            raise ModelError(f"{self.name}: condition image: {e}") from None
        w, h = img.size
        if w * h > self.condition_max_pixels:
            img = proc._resize_to_target_area(img, self.condition_max_pixels)
            w, h = img.size
        f = self.pipe.vae_scale_factor * 2
        x = proc.preprocess(img, height=h // f * f, width=w // f * f, resize_mode="crop")  # center crop
        return self.pipe._encode_vae_image(x.to(self.device, self.pipe.vae.dtype), generator=None)

    def _encode_images(self, images):
        cache, rows = {}, []
        for imgs in images:
            row = []
            for img in imgs:  # the K copies of a prompt bring the same images: encode each distinct one once
                key = self.image_key(img)
                if key not in cache:
                    cache[key] = self._encode_image(img)
                row.append(cache[key])
            rows.append(row)
        # rows whose references differ in count or size: zero-padded, one forward per layout (predict)
        tokens = [torch.cat([self.pipe._pack_latents(lat) for lat in row], dim=1) if row else
                  torch.zeros(1, 0, self.config.in_channels, device=self.device, dtype=self.pipe.vae.dtype)
                  for row in rows]
        grids = [torch.tensor([[lat.shape[2], lat.shape[3]] for lat in row], dtype=torch.long).view(1, -1, 2)
                 for row in rows]  # (rows, cols) of each reference's tokens
        return {"image_latents": pad_cat(tokens), "image_grids": pad_cat(grids)}

    def _latent_hw(self, height, width):
        h, w = super()._latent_hw(height, width)
        return h // 2, w // 2  # the grid after the VAE's 2x2 patchify (128 channels)

    def make_state(self, height, width, num_frames=1):
        h, w = self._latent_hw(height, width)
        return {"height": height, "width": width, "latent_hw": (h, w), "img_ids": _ids(0, h, w, 1, self.device),
                "seq_len": h * w}

    def prepare_noise(self, n, height, width, generator=None, num_frames=1):
        # the same draw as Flux2Pipeline.prepare_latents: one randn of (B, 128, H/16, W/16), then flattening
        h, w = self._latent_hw(height, width)
        z = torch.randn((n, self.config.in_channels, h, w), generator=generator, device="cpu", dtype=self.dtype)
        return self.pipe._pack_latents(z.to(self.device)).float()

    def sigmas(self, num_steps, state):
        mu = compute_empirical_mu(image_seq_len=state["seq_len"], num_steps=num_steps)
        return self.scheduler_sigmas(num_steps, np.linspace(1.0, 1 / num_steps, num_steps), mu)

    def condition_elements(self, settings, latent_grid=None):
        negative = settings.negative_prompt is not None and self._true_cfg_model  # only klein base runs CFG
        text = settings.max_sequence_length * self.config.joint_attention_dim
        return text * (2 if negative else 1), "no reference images"

    def predict(self, z, sigma, cond, state, guidance_scale=1.0, true_cfg_scale=1.0):
        """true_cfg_scale is unused: neither FLUX.2 pipeline has one (klein base's CFG scale is guidance_scale)."""
        return self.per_condition_layout(z, sigma, cond, lambda z, sigma, cond, layout, rows: self._forward(
            z, sigma, cond, state, layout, guidance_scale))

    def _forward(self, z, sigma, cond, state, layout, guidance_scale):
        """predict for rows whose reference images share `layout` ((rows, cols) per image; () for none)."""
        n, length = z.shape[:2]
        t = torch.as_tensor(sigma, dtype=torch.float32, device=z.device).expand(n) * 1000
        emb, x, img_ids = cond["prompt_embeds"], z.to(self.dtype), state["img_ids"]
        if layout:  # reference tokens after the target tokens, reference j at time offset 10 (j + 1)
            x = torch.cat([x, cond["image_latents"].to(self.dtype)], dim=1)
            img_ids = torch.cat([img_ids, *[_ids(10 * (j + 1), h, w, 1, img_ids.device)
                                            for j, (h, w) in enumerate(layout)]])
        cfg = self._true_cfg_model and guidance_scale > 1 and "neg_prompt_embeds" in cond
        if cfg:  # one batched forward for [negative, positive]
            x, t, emb = torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond["neg_prompt_embeds"], emb])
        guidance = (torch.full((x.shape[0],), float(guidance_scale), device=z.device, dtype=torch.float32)
                    if self.config.guidance_embeds else None)
        txt_ids = _ids(0, 1, 1, emb.shape[1], z.device)
        v = self.transformer(hidden_states=x, timestep=(t / 1000).to(self.dtype), guidance=guidance,
                             encoder_hidden_states=emb, txt_ids=txt_ids, img_ids=img_ids,
                             return_dict=False)[0][:, :length].float()
        if cfg:
            v = combine_cfg(v, guidance_scale)
        return v

    @torch.no_grad()
    def decode(self, z, state, cond=None):
        vae = self.pipe.vae
        h, w = state["latent_hw"]
        x = z.to(self.dtype).reshape(z.shape[0], h, w, -1).permute(0, 3, 1, 2)  # tokens are row-major
        std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps).view(1, -1, 1, 1)
        x = self.pipe._unpatchify_latents(x * std.to(x.dtype) + vae.bn.running_mean.view(1, -1, 1, 1).to(x.dtype))
        img = vae.decode(x, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(img, output_type="pt").float()


class Flux2KleinAdapter(Flux2Adapter):
    name = "flux2-klein"
    pipeline_cls = Flux2KleinPipeline
    # the distilled default (--variant base-4b: --num-steps 8 --eval-num-steps 28 --guidance-scale 4 --negative-prompt "")
    preset = dict(resolution=384, eval_resolution=1024, num_steps=4, eval_num_steps=10, guidance_scale=1.0, batch_size=1)
    variants = {"4b": "black-forest-labs/FLUX.2-klein-4B", "9b": "black-forest-labs/FLUX.2-klein-9B",
                "base-4b": "black-forest-labs/FLUX.2-klein-base-4B",
                "base-9b": "black-forest-labs/FLUX.2-klein-base-9B"}
    hub_id = variants["4b"]
    full_configs = {"4b": _KLEIN_4B, "9b": _KLEIN_9B, "base-4b": _KLEIN_4B, "base-9b": _KLEIN_9B}

    @classmethod
    def build_tiny(cls, variant=None):
        # 4B and 9B differ only in widths/depths, so their tiny builds are the same; base = not step-distilled
        tok = tiny_parts.qwen2_tokenizer()
        torch.manual_seed(0)
        # 28 text layers: the pipeline reads hidden_states[27] (pitfall 6)
        te = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tok), hidden_size=TINY_TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=28,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
            pad_token_id=tok.pad_token_id, tie_word_embeddings=True)).eval()
        return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=_tiny_vae(),
                                  text_encoder=te, tokenizer=tok, transformer=_tiny_transformer(guidance_embeds=False),
                                  is_distilled=not (variant or "4b").startswith("base"))

    @property
    def _true_cfg_model(self):
        # the pipeline's do_classifier_free_guidance: guidance_scale > 1 and not is_distilled
        return not self.pipe.config.is_distilled
