"""Z-Image adapter (docs/models.md 3.4) over diffusers' ZImagePipeline components: Z-Image-Turbo and Z-Image (base).

Facts: 16-channel FLUX VAE latents (B, 16, H/8, W/8), not packed; the single-stream transformer takes lists
of per-sample (16, 1, h, w) latents and of ragged caption embeddings (L_i, D) (Qwen3 hidden_states[-2] of the
chat-templated prompt, padding dropped), and patchifies 2x2 itself, so H and W are multiples of 16. Model time
is 1 - sigma (0 = noise) and the output is -velocity. Schedule: linspace(1, 1/N, N) through the checkpoint's
scheduler (Turbo: static shift 3.0; a mu from the token count is passed and used only with dynamic shifting).
Guidance is true CFG driven by `guidance_scale`, on for any scale > 0: pred = pos + s (pos - neg), one batched
call over captions pos + neg; the pipeline's optional cfg_normalization / cfg_truncation are the adapter
attributes of the same names (defaults off, as in the pipeline). The pipeline's default negative prompt is "";
here CFG needs negative_prompts (pass [""] * B for the pipeline's default). Turbo runs without CFG: 1024^2,
9 steps (9 forwards in diffusers 0.42.1; the card counts 8 NFEs), guidance 0. Base: pipeline defaults 1024^2,
50 steps, guidance 5.0; model card 28-50 steps, guidance 3-5 [recalled].
"""
import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas
from torch.nn.utils.rnn import pad_sequence
from transformers import Qwen3Config, Qwen3Model

from common import host
from common.models import tiny_parts
from common.models.base import RAGGED_TEXT_TOKENS, Adapter
from common.models.flux1 import FLUX_VAE

# Z-Image-Turbo's scheduler_config.json (the tiny base variant reuses it)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)

# ---- full-size architectures (common/plan.py; issue 13) -------------------------------------------------------------
# Qwen3-4B (Qwen/Qwen3-4B config.json [recalled]; also FLUX.2-klein-4B's text encoder): 36 layers x 2560, GQA 32/8 heads
# of 128, tied embeddings
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)
# docs/models.md 3.4: diffusers' ZImageTransformer2DModel defaults are Turbo's; the base model shares the architecture
_Z_IMAGE = {
    "transformer": (ZImageTransformer2DModel, dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
        n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512])),
    "text_encoder": (Qwen3Model, QWEN3_4B),
    "vae": (AutoencoderKL, FLUX_VAE),
}


class ZImageAdapter(Adapter):
    name = "z-image"
    pipeline_cls = ZImagePipeline
    preset = dict(num_steps=6, eval_num_steps=10, guidance_scale=0.0, batch_size=1)  # Turbo: no CFG
    hub_id = "Tongyi-MAI/Z-Image-Turbo"
    variants = {"turbo": "Tongyi-MAI/Z-Image-Turbo", "base": "Tongyi-MAI/Z-Image"}
    # every block (main layers and both refiners); adaLN_modulation is left out
    default_target_modules = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                              "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    unguided = (0.0, 1.0)  # CFG is on for any guidance_scale > 0
    cfg_normalization = 0.0  # k > 0 clips ||pred|| to k ||pos|| per sample (the pipeline's True is 1.0)
    cfg_truncation = 1.0     # no guidance where 1 - sigma > this; 1.0 never truncates
    full_configs = {"turbo": _Z_IMAGE, "base": _Z_IMAGE}

    @classmethod
    def build_tiny(cls, variant=None):
        # turbo and base share the architecture; they differ in weights and in use (guidance 0 vs CFG)
        tok = tiny_parts.qwen2_tokenizer()
        torch.manual_seed(0)
        te = Qwen3Model(Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                    max_position_embeddings=2048, pad_token_id=tok.pad_token_id)).eval()
        torch.manual_seed(0)
        tr = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
                                      n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
                                      cap_feat_dim=32, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4],
                                      axes_lens=[1024, 512, 512])
        with torch.no_grad():  # the learned pad tokens start as zeros: make the padded positions matter
            tr.x_pad_token.normal_()
            tr.cap_pad_token.normal_()
        return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
                              vae=tiny_parts.kl_vae_8x(0.3611, 0.1159), text_encoder=te, tokenizer=tok, transformer=tr)

    @torch.no_grad()
    def encode_prompt(self, prompts, negative_prompts=None, max_sequence_length=512, images=None, state=None):
        # caption lengths differ per prompt: store zero-padded (B, L_max, D) embeddings plus the lengths
        def encode_unique(texts):
            # the pipeline overwrites its prompt list with the chat-templated strings: give it a copy
            embs, _ = self.pipe.encode_prompt(list(texts), device=self.device, do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length)
            return pad_sequence(embs, batch_first=True), torch.tensor([len(e) for e in embs], device=self.device)

        def encode(texts):
            return self.per_row(texts, encode_unique)
        cond = dict(zip(("prompt_embeds", "prompt_lens"), encode(list(prompts))))
        if negative_prompts is not None:
            cond.update(zip(("neg_prompt_embeds", "neg_prompt_lens"),
                            encode([n or "" for n in negative_prompts])))
        return cond

    def make_state(self, height, width, num_frames=1):
        h, w = self._latent_hw(height, width)
        return {"height": height, "width": width, "seq_len": (h // 2) * (w // 2)}

    def prepare_noise(self, n, height, width, generator=None, num_frames=1):
        # ZImagePipeline.prepare_latents: one float32 randn of (B, 16, h, w), whatever the model dtype
        h, w = self._latent_hw(height, width)
        z = torch.randn((n, self.config.in_channels, h, w), generator=generator, device="cpu", dtype=torch.float32)
        return z.to(self.device)

    def sigmas(self, num_steps, state):
        return self.shifted_sigmas(num_steps, state["seq_len"], get_default_z_image_sigmas(num_steps))

    @staticmethod
    def _captions(emb, lens):
        return [e[:n] for e, n in zip(emb, host.values(lens))]  # the lengths read once per cond (common/host.py)

    @staticmethod
    def _model_time(t):
        """1 - sigma from the float32 timesteps t = 1000 sigma, computed as the pipeline does (a tensor or an array)."""
        return (1000 - t) / 1000

    def condition_elements(self, settings, latent_grid=None):
        tokens = min(settings.max_sequence_length, RAGGED_TEXT_TOKENS)
        negative = settings.negative_prompt is not None
        return tokens * self.config.cap_feat_dim * (2 if negative else 1), f"{tokens} tokens"

    def predict(self, z, sigma, cond, state, guidance_scale=1.0, true_cfg_scale=1.0):
        n = z.shape[0]
        t = self._model_time(torch.as_tensor(sigma, dtype=torch.float32, device=z.device).expand(n) * 1000)
        caps = self._captions(cond["prompt_embeds"], cond["prompt_lens"])
        cfg = guidance_scale > 0 and "neg_prompt_embeds" in cond
        if cfg:  # per-sample scale: sigma may differ per sample; the pipeline compares in float64
            # 0 past the cut-off: a product, as torch.where of two numbers makes two tensors of them at every step
            scale = (~(t.double() > self.cfg_truncation) * float(guidance_scale)).view(-1, 1, 1, 1)
            # all truncated: a positive-only pass, as the pipeline makes; decided on the host, from the schedule's
            # values (common/host.py) with the same float32 arithmetic, so that no step waits for the device
            t_host = self._model_time(np.asarray(host.value(sigma), dtype=np.float32) * 1000)
            cfg = bool((t_host.astype(np.float64) <= self.cfg_truncation).any())
        x = z.to(self.dtype)
        if cfg:  # one batched forward for captions [positive, negative]
            x, t = torch.cat([x, x]), torch.cat([t, t])
            caps = caps + self._captions(cond["neg_prompt_embeds"], cond["neg_prompt_lens"])
        out = self.transformer(list(x.unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]
        out = torch.stack([o.float() for o in out]).squeeze(2)
        if cfg:
            pos, neg = out[:n], out[n:]
            out = pos + scale * (pos - neg)
            if self.cfg_normalization > 0:
                pos_norm = torch.linalg.vector_norm(pos, dim=(1, 2, 3), keepdim=True)
                new_norm = torch.linalg.vector_norm(out, dim=(1, 2, 3), keepdim=True)
                max_norm = pos_norm * float(self.cfg_normalization)
                out = torch.where((new_norm > max_norm) & (scale > 0), out * (max_norm / new_norm), out)
        return -out  # the model predicts data - noise

    @torch.no_grad()
    def decode(self, z, state, cond=None):
        vae = self.pipe.vae
        x = z.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        img = vae.decode(x, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(img, output_type="pt").float()
