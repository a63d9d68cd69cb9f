"""FLUX.1-dev adapter (MODELS.md 3.1) over diffusers' FluxPipeline components.

Facts: 16-channel latents packed 2x2 into (B, (H/16)(W/16), 64) tokens; img_ids [0, row, col] on the
packed grid; the transformer takes t/1000; FLUX.1-dev has a distilled guidance embedding (single pass);
optional true CFG with a negative prompt (`true_cfg_scale` > 1), batched with the positive pass;
schedule = linspace(1, 1/N, N) exponentially shifted with mu from the token count (calculate_shift).
"""
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from common.models import tiny_parts
from common.models.base import Adapter


# FLUX.1-dev's scheduler_config.json: exponential dynamic shift with mu from the token count
SCHEDULER_CONFIG = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                        max_image_seq_len=4096)


class Flux1Adapter(Adapter):
    name = "flux1"
    pipeline_cls = FluxPipeline
    hub_id = "black-forest-labs/FLUX.1-dev"
    default_target_modules = [
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
        "ff_context.net.2"]

    @classmethod
    def build_tiny(cls):
        tok, tok2 = tiny_parts.clip_tokenizer(), tiny_parts.t5_tokenizer()
        te, te2 = tiny_parts.clip_text_encoder(tok, 32), tiny_parts.t5_encoder(tok2, 32)
        torch.manual_seed(0)
        tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
                            vae=tiny_parts.kl_vae_8x(0.3611, 0.1159), text_encoder=te, tokenizer=tok,
                            text_encoder_2=te2, tokenizer_2=tok2, transformer=tr, image_encoder=None,
                            feature_extractor=None)

    @torch.no_grad()
    def encode_prompt(self, prompts, negative_prompts=None, max_sequence_length=512, images=None, state=None):
        def encode(texts):
            return self.per_row(texts, lambda uniq: self.pipe.encode_prompt(
                uniq, device=self.device, max_sequence_length=max_sequence_length)[:2])
        cond = dict(zip(("prompt_embeds", "pooled_embeds"), encode(list(prompts))))
        if negative_prompts is not None:
            cond.update(zip(("neg_prompt_embeds", "neg_pooled_embeds"),
                            encode([n or "" for n in negative_prompts])))
        return cond

    def make_state(self, height, width, num_frames=1):
        h, w = self._latent_hw(height, width)
        ids = self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, self.device, self.dtype)
        return {"height": height, "width": width, "img_ids": ids, "seq_len": (h // 2) * (w // 2)}

    def prepare_noise(self, n, height, width, generator=None, num_frames=1):
        # the same draw as FluxPipeline.prepare_latents: one randn of (B, 16, h, w), then packing
        h, w = self._latent_hw(height, width)
        c = self.config.in_channels // 4
        z = torch.randn((n, c, h, w), generator=generator, device="cpu", dtype=self.dtype).to(self.device)
        return self.pipe._pack_latents(z, n, c, h, w).float()

    def sigmas(self, num_steps, state):
        return self.shifted_sigmas(num_steps, state["seq_len"])

    def predict(self, z, sigma, cond, state, guidance_scale=1.0, true_cfg_scale=1.0):
        n = z.shape[0]
        t = torch.as_tensor(sigma, dtype=torch.float32, device=z.device).expand(n) * 1000
        emb, pooled = cond["prompt_embeds"], cond["pooled_embeds"]
        cfg = true_cfg_scale > 1 and "neg_prompt_embeds" in cond
        x = z.to(self.dtype)
        if cfg:  # one batched forward for [negative, positive]
            x, t = torch.cat([x, x]), torch.cat([t, t])
            emb = torch.cat([cond["neg_prompt_embeds"], emb])
            pooled = torch.cat([cond["neg_pooled_embeds"], pooled])
        guidance = (torch.full((x.shape[0],), float(guidance_scale), device=z.device, dtype=torch.float32)
                    if self.config.guidance_embeds else None)
        txt_ids = torch.zeros(emb.shape[1], 3, device=z.device, dtype=self.dtype)
        v = self.transformer(hidden_states=x, timestep=t.to(self.dtype) / 1000, guidance=guidance,
                             pooled_projections=pooled, encoder_hidden_states=emb, txt_ids=txt_ids,
                             img_ids=state["img_ids"], return_dict=False)[0].float()
        if cfg:
            neg, pos = v.chunk(2)
            v = neg + true_cfg_scale * (pos - neg)
        return v

    @torch.no_grad()
    def decode(self, z, state, cond=None):
        vae = self.pipe.vae
        x = self.pipe._unpack_latents(z.to(self.dtype), state["height"], state["width"], self.pipe.vae_scale_factor)
        x = x / vae.config.scaling_factor + vae.config.shift_factor
        img = vae.decode(x, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(img, output_type="pt").float()
