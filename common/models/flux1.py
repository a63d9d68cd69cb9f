"""FLUX.1-dev adapter (docs/models.md 3.1) over diffusers' FluxPipeline components.

Facts: 16-channel latents packed 2x2 into (B, (H/16)(W/16), 64) tokens; img_ids [0, row, col] on the
packed grid; the transformer takes t/1000; FLUX.1-dev has a distilled guidance embedding (single pass);
optional true CFG with a negative prompt (`true_cfg_scale` > 1), batched with the positive pass;
schedule = linspace(1, 1/N, N) exponentially shifted with mu from the token count (calculate_shift).
"""
import os

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel

from common.models import tiny_parts
from common.models.base import Adapter, ROOT, combine_cfg


# FLUX.1-dev's scheduler_config.json: exponential dynamic shift with mu from the token count
SCHEDULER_CONFIG = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                        max_image_seq_len=4096)

# ---- full-size architectures (common/plan.py builds them on the meta device; issue 13) ----------------------------
# Each component is (class, kwargs): diffusers classes take the kwargs, transformers classes their config class's.
# Text encoders shared with SD3.5: CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14; the token ids are its
# config's legacy 0/2/1, [recalled]) and T5 v1.1 XXL's encoder (google/t5-v1_1-xxl).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0,
              eos_token_id=2, pad_token_id=1)
T5_XXL = (T5EncoderModel, dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                               relative_attention_num_buckets=32, relative_attention_max_distance=128,
                               feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", layer_norm_epsilon=1e-6,
                               tie_word_embeddings=False))
# the FLUX.1 VAE (also Z-Image's; SD3.5's with its own scaling/shift): 4 levels (x8), 16 channels, no quant convs
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, use_quant_conv=False,
                use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)


class Flux1Adapter(Adapter):
    name = "flux1"
    pipeline_cls = FluxPipeline
    hub_id = "black-forest-labs/FLUX.1-dev"
    default_target_modules = [
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
        "ff_context.net.2"]
    # docs/models.md 3.1 (= diffusers' FluxTransformer2DModel defaults except guidance_embeds)
    full_configs = {None: {
        "transformer": (FluxTransformer2DModel, dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                                     attention_head_dim=128, num_attention_heads=24,
                                                     joint_attention_dim=4096, pooled_projection_dim=768,
                                                     guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
        "text_encoder": (CLIPTextModel, CLIP_L),
        "text_encoder_2": T5_XXL,
        "vae": (AutoencoderKL, FLUX_VAE)}}

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

    def condition_elements(self, settings, latent_grid=None):
        text = settings.max_sequence_length * self.config.joint_attention_dim + self.config.pooled_projection_dim
        return text * (2 if settings.negative_prompt is not None else 1), ""

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
            v = combine_cfg(v, true_cfg_scale)
        return v

    @torch.no_grad()
    def decode(self, z, state, cond=None):
        vae = self.pipe.vae
        x = self.pipe._unpack_latents(z.to(self.dtype), state["height"], state["width"], self.pipe.vae_scale_factor)
        x = x / vae.config.scaling_factor + vae.config.shift_factor
        img = vae.decode(x, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(img, output_type="pt").float()


class ShapesAdapter(Flux1Adapter):
    """The embedded shapes world's model (models/shapes-flux, README): a 2.3M-parameter FLUX.1-architecture
    pipeline trained on the shapes world (rewards/shapes_world.py), run in full on a CPU."""
    name = "shapes"
    hub_id = os.path.join(ROOT, "models", "shapes-flux")
    full_configs = {}  # it is its own full size: no memory plan
    # every algorithm on the shapes world: its 64 px images, 10 steps, true CFG against the empty prompt, the
    # rule-checked reward, full fine-tuning in fp32, evaluation on the 480 held-out rows (a script adds its own);
    # prompts balanced over the six categories (the 65 training rows are 27 color_attr but 2 two_object), the
    # learning rate decaying linearly to 0 and a 10-epoch evaluation EMA (issue 22: bench/shapes_levers.py)
    preset = dict(model_path=hub_id, dataset=os.path.join(ROOT, "datasets", "shapes"), reward=("shapes",),
                  resolution=64, eval_resolution=64, num_steps=10, eval_num_steps=10, guidance_scale=1.0,
                  true_cfg_scale=3.0, negative_prompt="", max_sequence_length=16, group_size=8, prompts_per_epoch=8,
                  balance_prompts_by="tag",
                  batch_size=16, finetune="full", learning_rate=3e-5, lr_schedule="linear", mixed_precision="no",
                  gradient_checkpointing=False, latent_storage_dtype="fp32", eval_num_prompts=480,
                  eval_batch_size=64, ema_decay=0.9, ema_interval=1, log_with="none", output_dir="{output_dir}-shapes")
