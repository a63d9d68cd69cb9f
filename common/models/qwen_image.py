"""Qwen-Image (docs/models.md 3.5) and Qwen-Image-Edit-Plus (3.6) adapters over diffusers' QwenImagePipeline and
QwenImageEditPlusPipeline components.

Facts: 16-channel latents of a Wan-style causal VAE (5-D, one frame), per-channel latents_mean/std, packed 2x2
into (B, (H/16)(W/16), 64) tokens; rope positions are built inside the transformer from `img_shapes` (frame,
rows, cols per image) and the text length; the transformer takes t/1000 and no guidance (no released checkpoint
is guidance-distilled, so `guidance_scale` is ignored as in the pipeline). Text: Qwen2.5-VL last hidden state
of a chat template with its system prompt dropped (34 tokens; edit: 64), a padded tensor + mask (the pipeline
passes mask None when all ones). True CFG iff `true_cfg_scale` > 1 with a negative prompt (the card's is " "):
comb = neg + s (pos - neg), rescaled per token to the norm of pos. Schedule = linspace(1, 1/N, N), exponential
shift with mu from the target token count (base/max seq 256/8192, shift 0.5/0.9), stretched so the last
non-zero sigma is 0.02. The pipeline's default size is 1024^2 (the model card suggests 1328^2 and
aspect-specific sizes).

Edit-Plus (2509; 2511 adds `zero_cond_t`: condition tokens are modulated with t = 0, which the transformer
builds itself from `img_shapes`): one or more condition images per prompt. The VL encoder sees them resized
to area `vl_image_pixels` (the pipeline's CONDITION_IMAGE_SIZE, 384^2) inside a "Picture i:" prompt, the
negative prompt included; the VAE sees them resized to area `condition_max_pixels` (the pipeline's
VAE_IMAGE_SIZE, 1024^2, up or down), both multiples of 32 with the aspect kept. Their normalized, packed
latents follow the target tokens on the sequence; the output is sliced back to the target. The edit pipeline
does not truncate its text embeddings, so `max_sequence_length` is unused there.
"""
import os

import torch
from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline,
                       QwenImagePipeline, QwenImageTransformer2DModel)
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor
# must be an attribute of this module: diffusers looks a custom component's loadable base class up by name in the
# component's module when it saves or loads a pipeline holding ImageOnlyQwen2VLProcessor
from transformers import ProcessorMixin  # noqa: F401

from common import host
from common.errors import ModelError
from common.models import tiny_parts
from common.models.base import RAGGED_TEXT_TOKENS, ROOT, Adapter, pad_cat, pad_to

# Qwen-Image's scheduler_config.json (docs/models.md 3.5); real checkpoints bring their own
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                        max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                        time_shift_type="exponential")

# ---- full-size architectures (common/plan.py; issue 13) -------------------------------------------------------------
# Qwen2.5-VL-7B-Instruct (its config.json [recalled]; the count, 8.29B, matches the published one): a 28 x 3584 text
# model (GQA 28/4 heads, untied lm_head) and a 32-block, 1280-wide vision tower merged into 3584
QWEN25_VL_7B = dict(
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                     bos_token_id=151643, eos_token_id=151645),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], in_channels=3),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=False)


def _full_config(zero_cond_t=False):
    # docs/models.md 3.5: the hub config = diffusers' QwenImageTransformer2DModel defaults; the VAE =
    # AutoencoderKLQwenImage's
    # defaults (the Wan-2.1-style VAE used on single frames)
    return {"transformer": (QwenImageTransformer2DModel, dict(
                patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
                zero_cond_t=zero_cond_t)),
            "text_encoder": (Qwen2_5_VLForConditionalGeneration, QWEN25_VL_7B),
            "vae": (AutoencoderKLQwenImage, dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                                 attn_scales=[], temperal_downsample=[False, True, True]))}


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor, for the tiny build: transformers type-checks every
    sub-processor and the video one needs torchvision, which has no CPU wheel here (docs/models.md 3.6).
    The edit pipeline never passes videos. Module level so that from_pretrained can import it by name."""

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


def _tiny_vae():
    torch.manual_seed(0)
    # three temporal-downsample entries make vae_scale_factor 2**3 = 8; latents_mean/std default to the real ones
    return AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                  temperal_downsample=[False, True, True]).eval()


def _tiny_text_encoder(tok, hidden=32):
    torch.manual_seed(0)
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                # mrope_section must sum to head_dim / 2 (pitfall 7)
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                           video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                           vision_end_token_id=ids("<|vision_end|>"))
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def _tiny_transformer(zero_cond_t=False):
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                       guidance_embeds=False, axes_dims_rope=(8, 4, 4), zero_cond_t=zero_cond_t)


def _stack_padded(embs):
    """(1, T_i, D) embeddings -> (U, T, D) zero-padded + (U, T) mask, the layout of the pipeline's encode_prompt."""
    return pad_cat(embs), pad_cat([torch.ones(e.shape[:2], dtype=torch.long, device=e.device) for e in embs])


def _text_inputs(emb, mask, rows):
    """Drop padding columns that no row uses and an all-ones mask: what the pipeline itself passes for these
    rows (a training minibatch may hold only the shorter prompts of the encoded batch). `rows`: the mask's rows as
    Python lists, a shorter one read as zero-padded: decided on the host, the mask is not read at every step."""
    n = max(sum(r) for r in rows)
    return emb[:, :n], (None if all(len(r) >= n and all(r[:n]) for r in rows) else mask[:, :n])


class QwenImageAdapter(Adapter):
    name = "qwen-image"
    pipeline_cls = QwenImagePipeline
    preset = dict(eval_resolution=1024, eval_num_steps=28, true_cfg_scale=4.0, negative_prompt=" ", batch_size=1)
    variants = {"2512": "Qwen/Qwen-Image-2512", "original": "Qwen/Qwen-Image"}
    hub_id = "Qwen/Qwen-Image-2512"
    # docs/models.md 4: the second FFN layer is `net.2` itself (the reference's `net.2.proj` matches nothing)
    default_target_modules = [
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
        "txt_mlp.net.2"]
    full_configs = {"2512": _full_config(), "original": _full_config()}

    @classmethod
    def build_tiny(cls, variant=None):
        # both variants share the architecture: one tiny build
        tok = tiny_parts.qwen2_tokenizer()
        return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=_tiny_vae(),
                                 text_encoder=_tiny_text_encoder(tok), tokenizer=tok, transformer=_tiny_transformer())

    @torch.no_grad()
    def encode_prompt(self, prompts, negative_prompts=None, max_sequence_length=512, images=None, state=None):
        def encode_unique(texts):
            emb, mask = self.pipe.encode_prompt(texts, device=self.device, max_sequence_length=max_sequence_length)
            if mask is None:  # the pipeline drops an all-ones mask; cond keeps a tensor so rows can be selected
                mask = torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)
            return emb, mask

        def encode(texts):
            return self.per_row(texts, encode_unique)
        cond = dict(zip(("prompt_embeds", "prompt_mask"), encode(list(prompts))))
        if negative_prompts is not None:
            # " " is the model card's negative prompt
            cond.update(zip(("neg_prompt_embeds", "neg_prompt_mask"), encode([n or " " for n in negative_prompts])))
        return cond

    def make_state(self, height, width, num_frames=1):
        h, w = self._latent_hw(height, width)
        # img_shape: (frames, rows, cols) of the packed target grid, from which the transformer builds its rope
        return {"height": height, "width": width, "img_shape": (1, h // 2, w // 2), "seq_len": (h // 2) * (w // 2)}

    def prepare_noise(self, n, height, width, generator=None, num_frames=1):
        # the same draw as the pipeline's prepare_latents: one randn of (B, 1, 16, h, w), then packing
        h, w = self._latent_hw(height, width)
        c = self.config.in_channels // 4
        z = torch.randn((n, 1, c, h, w), generator=generator, device="cpu", dtype=self.dtype).to(self.device)
        return self.pipe._pack_latents(z, n, c, h, w).float()

    def sigmas(self, num_steps, state):
        return self.shifted_sigmas(num_steps, state["seq_len"])

    def condition_elements(self, settings, latent_grid=None):
        tokens = min(settings.max_sequence_length, RAGGED_TEXT_TOKENS)
        text = tokens * self.config.joint_attention_dim * (2 if settings.negative_prompt is not None else 1)
        if self.condition_images == "none":
            return text, f"{tokens} tokens"
        area = settings.condition_max_pixels or self.default_condition_max_pixels
        return text + area // 256 * self.config.in_channels, f"{tokens} tokens, 1 condition image"

    def predict(self, z, sigma, cond, state, guidance_scale=1.0, true_cfg_scale=1.0):
        cfg = true_cfg_scale > 1 and "neg_prompt_embeds" in cond
        # the forward's text masks ([negative, positive] with CFG), their rows read on the host once per cond
        # (common/host.py)
        masks = [host.values(cond[k]) for k in (["neg_prompt_mask"] if cfg else []) + ["prompt_mask"]]
        return self.per_condition_layout(z, sigma, cond, lambda z, sigma, cond, layout, rows: self._forward(
            z, sigma, cond, state, layout, cfg, true_cfg_scale, [m[i] for m in masks for i in rows]))

    def _forward(self, z, sigma, cond, state, layout, cfg, true_cfg_scale, text_rows):
        """predict for rows whose condition images share `layout` ((rows, cols) per image; () for none);
        `text_rows`: the rows of the text mask it passes, as Python lists."""
        n, seq = z.shape[:2]
        t = torch.as_tensor(sigma, dtype=torch.float32, device=z.device).expand(n) * 1000
        x = z.to(self.dtype)
        if layout:  # condition tokens follow the target tokens on the sequence
            x = torch.cat([x, cond["image_latents"].to(self.dtype)], dim=1)
        shapes = [state["img_shape"], *[(1, h, w) for h, w in layout]]
        emb, mask = cond["prompt_embeds"], cond["prompt_mask"]
        if cfg:
            # one batched forward for [negative, positive]: both zero-padded to one length and masked, which
            # matches the pipeline's two calls to float rounding (tests/test_model_qwen_image.py)
            neg, neg_mask = cond["neg_prompt_embeds"], cond["neg_prompt_mask"]
            t_len = max(emb.shape[1], neg.shape[1])
            emb = torch.cat([pad_to(neg, t_len), pad_to(emb, t_len)])
            mask = torch.cat([pad_to(neg_mask, t_len), pad_to(mask, t_len)])
            x, t = torch.cat([x, x]), torch.cat([t, t])
        emb, mask = _text_inputs(emb, mask, text_rows)
        # the pipeline casts t to the latent dtype before dividing by 1000
        v = self.transformer(hidden_states=x, timestep=t.to(self.dtype) / 1000, encoder_hidden_states=emb,
                             encoder_hidden_states_mask=mask, img_shapes=[shapes] * x.shape[0],
                             return_dict=False)[0][:, :seq].float()
        if cfg:
            neg, pos = v.chunk(2)
            comb = neg + true_cfg_scale * (pos - neg)
            v = comb * (torch.norm(pos, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        return v

    @torch.no_grad()
    def decode(self, z, state, cond=None):
        vae = self.pipe.vae
        x = self.pipe._unpack_latents(z.to(self.dtype), state["height"], state["width"], self.pipe.vae_scale_factor)
        # the pipeline's own arithmetic: divide by 1/std, then add the mean
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(x.device, x.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(x.device, x.dtype)
        img = vae.decode(x / inv_std + mean, return_dict=False)[0][:, :, 0]
        return self.pipe.image_processor.postprocess(img, output_type="pt").float()


class QwenImageEditPlusAdapter(QwenImageAdapter):
    name = "qwen-image-edit-plus"
    pipeline_cls = QwenImageEditPlusPipeline
    preset = dict(resolution=384, eval_resolution=1024, eval_num_steps=40, true_cfg_scale=4.0, negative_prompt=" ",
                  batch_size=1)
    tiny_preset = dict(dataset=os.path.join(ROOT, "datasets", "demo-edit"), condition_max_pixels=64 * 64)
    variants = {"2511": "Qwen/Qwen-Image-Edit-2511", "2509": "Qwen/Qwen-Image-Edit-2509"}
    hub_id = "Qwen/Qwen-Image-Edit-2511"
    condition_images = "many"
    default_condition_max_pixels = 1024 * 1024  # the pipeline's VAE_IMAGE_SIZE
    condition_max_aspect = 200  # the Qwen2.5-VL processor's aspect limit (its 384^2 copy)
    condition_resized_to_area = True
    vl_image_pixels = 384 * 384  # the pipeline's CONDITION_IMAGE_SIZE: area of the VL encoder's copies
    # 2511 = 2509 + zero_cond_t (docs/models.md 3.6; the hub configs)
    full_configs = {"2511": _full_config(zero_cond_t=True), "2509": _full_config()}

    @classmethod
    def build_tiny(cls, variant=None):
        from transformers import Qwen2VLImageProcessorPil  # the PIL backend: no torchvision
        tok = tiny_parts.qwen2_tokenizer()
        # real Qwen2.5-VL patching (14 px, 2x2 merge: one token per 28x28 px), a small pixel budget
        ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
        processor = ImageOnlyQwen2VLProcessor(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)
        return QwenImageEditPlusPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
                                         vae=_tiny_vae(), text_encoder=_tiny_text_encoder(tok), tokenizer=tok,
                                         processor=processor,
                                         transformer=_tiny_transformer(zero_cond_t=variant != "2509"))

    def _encode_images(self, imgs, sizes):
        """VAE latents of one sample's condition images at `sizes` [(w, h)]: normalized, packed, concatenated."""
        packed = []
        for img, (w, h) in zip(imgs, sizes):
            x = self.pipe.image_processor.preprocess(img, h, w).unsqueeze(2).to(self.device, self.dtype)
            lat = self.pipe._encode_vae_image(x, None)  # posterior mode, normalized: (1, 16, 1, h/8, w/8)
            packed.append(self.pipe._pack_latents(lat, 1, lat.shape[1], lat.shape[3], lat.shape[4]))
        return torch.cat(packed, dim=1)

    @torch.no_grad()
    def encode_prompt(self, prompts, negative_prompts=None, max_sequence_length=512, images=None, state=None):
        if images is None or len(images) != len(prompts) or not all(images):
            raise ModelError(f"{self.name} needs one or more condition images for every prompt")
        # a batch holds K copies of a few samples: encode each distinct (prompt, images) once; the pipeline
        # encodes one sample per call (batch 1), so do we, then pad the samples to one length
        img_keys = [tuple(self.image_key(im) for im in imgs) for imgs in images]
        uniq_imgs = list(dict.fromkeys(img_keys))
        first = {k: images[img_keys.index(k)] for k in uniq_imgs}
        ratios = {k: [im.width / im.height for im in first[k]] for k in uniq_imgs}
        # samples whose images differ in count or aspect ratio: padded rows, one forward per layout (predict)
        vae_sizes = {k: [calculate_dimensions(self.condition_max_pixels, r) for r in ratios[k]] for k in uniq_imgs}
        vl_images = {}
        for k in uniq_imgs:
            sizes = [calculate_dimensions(self.vl_image_pixels, r) for r in ratios[k]]
            vl_images[k] = [self.pipe.image_processor.resize(im, h, w) for im, (w, h) in zip(first[k], sizes)]

        def encode(texts):
            keys = list(zip(texts, img_keys))
            uniq = list(dict.fromkeys(keys))
            embs = [self.pipe.encode_prompt(text, image=vl_images[k], device=self.device)[0] for text, k in uniq]
            emb, mask = _stack_padded(embs)
            idx = torch.tensor([uniq.index(k) for k in keys], device=self.device)
            return emb[idx], mask[idx]
        cond = dict(zip(("prompt_embeds", "prompt_mask"), encode(list(prompts))))
        if negative_prompts is not None:  # encoded with the same images, as in the pipeline
            cond.update(zip(("neg_prompt_embeds", "neg_prompt_mask"), encode([n or " " for n in negative_prompts])))
        idx = torch.tensor([uniq_imgs.index(k) for k in img_keys])
        cond["image_latents"] = pad_cat([self._encode_images(first[k], vae_sizes[k]) for k in uniq_imgs])[
            idx.to(self.device)]
        f = self.pipe.vae_scale_factor * 2  # (rows, cols) of each image's packed tokens; zero rows pad fewer images
        grids = [torch.tensor([[h // f, w // f] for w, h in vae_sizes[k]]).unsqueeze(0) for k in uniq_imgs]
        cond["image_grids"] = pad_cat(grids)[idx]
        return cond
