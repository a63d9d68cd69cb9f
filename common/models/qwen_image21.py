"""Qwen-Image-2.1 adapter (docs/models.md 3.11) over diffusers' QwenImage21Pipeline components: text-to-image and edits
from 0..N ordered condition images per sample, one adapter.

Facts (diffusers 0.42.1): a 7B single-stream, block-causal DiT (`QwenImage21Transformer2DModel`, 32 blocks of
32 heads x 128, SwiGLU x3, one shared modulation for all blocks, no biases) over a Qwen3-VL text encoder (its
last decoder layer before the final norm; the pipeline drops the system-prompt tokens). The VAE
(`AutoencoderKLQwenImage21`) compresses 16x to 64 channels and reads RGBA; the transformer takes the latents
unpatched, so a token is a 16x16 px tile and the noise `(B, 1, 64, H/16, W/16)` is flattened row-major to
`(B, (H/16)(W/16), 64)`; sizes are multiples of 32 (the text stream holds one slot per 2x2 target tokens).
Per-channel latents_mean/std (64 values) are undone in `decode`; the output is RGBA, and `decode` drops the alpha
channel as the project's image loading does (rewards/images.py to_rgb8).

One sequence: the VL encoder's tokens, in which each `<|image_pad|>` slot of a condition image is replaced by
its 2x2 VAE latent tokens, then the target tokens. Attention is causal over the sequence, bidirectional inside
each image block; rope positions are built inside the transformer from `img_shapes` (condition images first, the
target last) and the slot mask `img_mask`. With `causal_condition` (the released config) text and condition
tokens are modulated with t = 0. Time: t/1000 in the latent dtype; no guidance embedding (`guidance_scale` is
ignored); true CFG `neg + s (pos - neg)` (no rescale) when `true_cfg_scale > 1` with a negative prompt, the
negative encoded with the same condition images; the model is meant to run without it (the pipeline's default
`true_cfg_scale` is 1). Schedule: linspace(1, 1/N, N), exponential shift with mu from the target token count
(calculate_shift over the scheduler config), or the checkpoint's own `sample_sigmas` (a Turbo grid; the pipeline
then ignores num_inference_steps) when N equals their count. The pipeline's default is 40 steps at 1024^2.

Condition images: each resized to area `condition_max_pixels` (the pipeline's `output_resolution`^2, 1024^2,
up or down, aspect kept, sides multiples of 32); the same copy feeds the VL encoder (alpha over white) and the VAE
(posterior mode, normalized). The VL processor must keep that size (Qwen3-VL: 32 px per slot): an area outside
its min/max pixels is a ModelError. The output size is the requested one (the pipeline derives it from the last
image's aspect when none is given).

Batches: the transformer takes one layout per call (it reads row 0 of `img_mask` and one `img_shapes`), and a
right-padded prompt shifts the target's rope position by its padding, so a padded batch is not the one-prompt
result (the pipeline's batched call pads). `predict` therefore runs one forward per group of rows with equal
text lengths and condition grids, without padding: each row gets what the pipeline gives it alone.

Prefix KV cache (the pipeline's `use_kv_cache`): the prefix (text + condition tokens) never attends to the
target and is modulated at t = 0, so its keys and values are the same at every step for fixed weights and
conditioning: exact up to float rounding (the cached step attends in another layout). `predict` uses it
without gradients (rollouts, evaluation, reference forwards): it fills the cache at sigma = 1 (a rollout's first
step) and reads it while the conditioning tensors (identity and version), the weights (module identity, every
parameter's version counter, LoRA on/off/merged) and the autocast state are unchanged; anything else runs the
full forward. With gradients it is never used: the trained weights transform the prefix tokens too (one stream),
so a cached prefix would drop the loss's gradient through it, and an optimizer step changes it. `decode` (the
end of a rollout) and any forward with gradients free it; `use_kv_cache = False` turns it off.
"""
import weakref

import torch
from diffusers import (AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline,
                       QwenImage21Transformer2DModel)
from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache
from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_dimensions
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
# must be an attribute of this module: diffusers looks a custom component's loadable base class up by name in the
# component's module when it saves or loads a pipeline holding ImageOnlyQwen3VLProcessor
from transformers import ProcessorMixin  # noqa: F401

from common import host
from common.errors import ModelError
from common.models import tiny_parts
from common.models.base import RAGGED_TEXT_TOKENS, Adapter, pad_cat
from common.models.qwen_image import SCHEDULER_CONFIG

TINY_TEXT_HIDDEN = 32

# ---- full-size architectures (common/plan.py) -----------------------------------------------------------------------
# the transformer: QwenImage21Transformer2DModel's defaults (7B: 32 x 4096, context 4096 = Qwen3-VL-8B's width)
_TRANSFORMER = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=32, attention_head_dim=128,
                    num_attention_heads=32, context_in_dim=4096, mlp_ratio=3, axes_dims_rope=(16, 56, 56),
                    causal_condition=True)
# Qwen3-VL-8B-Instruct (its config.json [recalled]): a 36 x 4096 text model (GQA 32/8 heads of 128, untied lm_head,
# interleaved mrope) and a 27-block, 1152-wide vision tower (16 px patches, 2x2 merge) with deepstack taps
QWEN3_VL_8B = dict(
    text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                     rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                         "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
    vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                       patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                       deepstack_visual_indexes=[8, 16, 24]),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=False)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without its video processor, for the tiny build: the video one needs torchvision, which has
    no CPU wheel here (as ImageOnlyQwen2VLProcessor, docs/models.md 3.6). The pipeline never passes videos."""

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


def _tiny_text_encoder(tok):
    torch.manual_seed(0)
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), hidden_size=TINY_TEXT_HIDDEN, intermediate_size=2 * TINY_TEXT_HIDDEN,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                max_position_embeddings=4096,
                # mrope_section sums to head_dim / 2
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                                 "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TINY_TEXT_HIDDEN,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                        vision_end_token_id=ids("<|vision_end|>"))
    return Qwen3VLForConditionalGeneration(cfg).eval()


def _tiny_vae():
    torch.manual_seed(0)
    # five levels: 16x as the real VAE; 64 channels, RGBA in and out; latents_mean/std default to the real ones
    return AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=8, z_dim=64, dim_mult=[1, 1, 1, 1, 1],
                                    num_res_blocks=1, temperal_downsample=[False, True, True, True]).eval()


def _tiny_transformer():
    torch.manual_seed(0)
    return QwenImage21Transformer2DModel(**dict(_TRANSFORMER, num_layers=2, attention_head_dim=16,
                                                num_attention_heads=2, context_in_dim=TINY_TEXT_HIDDEN,
                                                axes_dims_rope=(8, 4, 4)))


def _layout_groups(mask, neg_mask, grids, device):
    """Rows that share (text length, negative text length, condition grids), in order of first appearance, each as
    (layout, its rows, them as an index on `device`), and the index that puts the groups' rows back in order. Read
    on the host once per cond (common/host.py)."""
    pos = [sum(r) for r in host.values(mask)]
    neg = [sum(r) for r in host.values(neg_mask)] if neg_mask is not None else [None] * len(pos)
    grid = ([tuple((h, w) for h, w in row if h) for row in host.values(grids)] if grids is not None
            else [()] * len(pos))
    layouts = list(zip(pos, neg, grid))
    groups = []
    for layout in dict.fromkeys(layouts):
        rows = [i for i, lay in enumerate(layouts) if lay == layout]
        groups.append((layout, rows, torch.tensor(rows, device=device)))
    return groups, torch.argsort(torch.cat([index for _, _, index in groups]))


def _same(refs, tensors):
    """Whether `tensors` are the objects (and versions) `refs` recorded."""
    return len(refs) == len(tensors) and all(r() is t and v == _version(t) for (r, v), t in zip(refs, tensors))


def _version(t):
    return None if t.is_inference() else t._version  # an inference tensor keeps no version counter


class QwenImage21Adapter(Adapter):
    name = "qwen-image-2.1"
    pipeline_cls = QwenImage21Pipeline
    hub_id = "Qwen/Qwen-Image-2.1"
    # the pipeline's defaults: 40 steps at 1024^2, no CFG (true_cfg_scale 1)
    preset = dict(eval_resolution=1024, eval_num_steps=40, true_cfg_scale=1.0, batch_size=1)
    condition_images = "optional"
    default_condition_max_pixels = 1024 * 1024  # the pipeline's output_resolution^2
    condition_max_aspect = 200  # the Qwen VL processor's aspect limit
    condition_resized_to_area = True
    size_multiple = 32  # x16 VAE, one text slot per 2x2 target tokens (the pipeline floors to 32)
    # per block: q, k, v, out and the SwiGLU's three layers; the shared modulation and the in/out projections stay
    default_target_modules = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.proj",
                              "img_mlp.gate_layer", "img_mlp.out"]
    full_configs = {None: {"transformer": (QwenImage21Transformer2DModel, _TRANSFORMER),
                           "text_encoder": (Qwen3VLForConditionalGeneration, QWEN3_VL_8B),
                           "vae": (AutoencoderKLQwenImage21, {})}}  # the class defaults [assumed the release's]
    use_kv_cache = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._kv = None  # the prefix KV cache: {"token": ..., "entries": {(branch, layout, rows): QwenImage21KVCache}}

    @classmethod
    def build_tiny(cls, variant=None):
        from transformers import Qwen2VLImageProcessorPil  # the PIL backend: no torchvision
        tok = tiny_parts.qwen2_tokenizer()
        # Qwen3-VL patching (16 px, 2x2 merge: one slot per 32x32 px); the pixel range keeps every tiny size as is
        ip = Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=32 * 32 * 256, patch_size=16, merge_size=2,
                                      temporal_patch_size=2)
        processor = ImageOnlyQwen3VLProcessor(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)
        return QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=_tiny_vae(),
                                   text_encoder=_tiny_text_encoder(tok), processor=processor,
                                   transformer=_tiny_transformer())

    # ---- conditioning ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts, negative_prompts=None, max_sequence_length=512, images=None, state=None):
        """`max_sequence_length` is unused: the pipeline does not truncate. Each distinct (prompt, images) is encoded
        once; the prompts sharing one image set in one call, as the pipeline encodes a batch."""
        if images is not None and len(images) != len(prompts):
            raise ModelError(f"{self.name}: {len(images)} condition-image lists for {len(prompts)} prompts")
        img_keys = [tuple(self.image_key(im) for im in imgs) for imgs in images] if images is not None \
            else [()] * len(prompts)
        first = {k: images[img_keys.index(k)] for k in dict.fromkeys(img_keys)} if images is not None else {(): []}
        sizes = {k: [calculate_dimensions(self.condition_max_pixels, im.width / im.height)[:2] for im in imgs]
                 for k, imgs in first.items()}
        # the pipeline's one resize, as RGBA: it feeds the VL encoder (over white) and the VAE (four channels)
        resized = {k: [self.pipe.image_processor.resize(im.convert("RGBA"), width=w, height=h)
                       for im, (w, h) in zip(imgs, sizes[k])] for k, imgs in first.items()}

        def encode(texts):
            keys = list(zip(texts, img_keys))
            uniq = list(dict.fromkeys(keys))
            rows = {}
            for k in dict.fromkeys(k for _, k in uniq):
                group = [t for t, kk in uniq if kk == k]
                emb, mask, slots = self.pipe.encode_prompt(group, image=resized[k] or None, device=self.device)
                self._check_slots(slots, sizes[k])
                if mask is None:  # the pipeline drops an all-ones mask; cond keeps a tensor so rows can be selected
                    mask = torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)
                for i, t in enumerate(group):
                    rows[(t, k)] = (emb[i:i + 1], mask[i:i + 1].long(), slots[i:i + 1].long())
            return tuple(pad_cat([rows[key][j] for key in keys]) for j in range(3))

        cond = dict(zip(("prompt_embeds", "prompt_mask", "prompt_image_mask"), encode(list(prompts))))
        if negative_prompts is not None:  # encoded with the same images, as in the pipeline
            cond.update(zip(("neg_prompt_embeds", "neg_prompt_mask", "neg_prompt_image_mask"),
                            encode([n or " " for n in negative_prompts])))
        if images is not None:
            cond.update(self._encode_images(img_keys, resized, sizes))
        return cond

    def _check_slots(self, slots, sizes):
        """The VL processor must give each condition image one slot per 32x32 px of its VAE copy."""
        want = sum((w // 32) * (h // 32) for w, h in sizes)
        have = int(slots[0].sum()) if len(slots) else 0
        if have != want:
            raise ModelError(f"{self.name}: the VL processor resized the condition images ({have} image slots for "
                             f"{want}); --condition-max-pixels {self.condition_max_pixels} is outside its pixel range")

    def _encode_images(self, img_keys, resized, sizes):
        """Normalized, packed VAE latents of each row's condition images (zero-padded to the batch's longest) and
        their (rows, cols) token grids (zero rows pad samples with fewer images); each distinct image set once."""
        tokens, grids = {}, {}
        for k, imgs in resized.items():
            packed = []
            for im, (w, h) in zip(imgs, sizes[k]):
                x = self.pipe.image_processor.preprocess(im, height=h, width=w).unsqueeze(2)
                lat = self.pipe._encode_vae_image(x.to(self.device, self.dtype), None)  # mode: (1, 64, 1, h, w)
                packed.append(self.pipe._pack_latents(lat, 1, lat.shape[1], lat.shape[3], lat.shape[4]))
            f = self.pipe.vae_scale_factor
            tokens[k] = (torch.cat(packed, dim=1) if packed else
                         torch.zeros(1, 0, self.config.in_channels, device=self.device, dtype=self.dtype))
            grids[k] = torch.tensor([[h // f, w // f] for w, h in sizes[k]], dtype=torch.long).view(1, -1, 2)
        return {"image_latents": pad_cat([tokens[k] for k in img_keys]),
                "image_grids": pad_cat([grids[k] for k in img_keys])}

    def condition_elements(self, settings, latent_grid=None):
        tokens = RAGGED_TEXT_TOKENS  # the prompt's own tokens (no truncation)
        text = tokens * self.config.context_in_dim * (2 if settings.negative_prompt is not None else 1)
        return text, f"{tokens} tokens, no condition images"

    # ---- sampling -------------------------------------------------------------------------------------------------
    def make_state(self, height, width, num_frames=1):
        h, w = self._latent_hw(height, width)  # the VAE's x16 grid (multiples of 32 px)
        return {"height": height, "width": width, "img_shape": (1, h, w), "seq_len": h * w}

    def prepare_noise(self, n, height, width, generator=None, num_frames=1):
        # the same draw as the pipeline's prepare_latents: one randn of (B, 1, 64, h, w), then flattening
        h, w = self._latent_hw(height, width)
        c = self.config.in_channels
        z = torch.randn((n, 1, c, h, w), generator=generator, device="cpu", dtype=self.dtype).to(self.device)
        return self.pipe._pack_latents(z, n, c, h, w).float()

    def sigmas(self, num_steps, state):
        grid = self.pipe.config.get("sample_sigmas")
        return self.shifted_sigmas(num_steps, state["seq_len"], grid if grid and len(grid) == num_steps else None)

    def predict(self, z, sigma, cond, state, guidance_scale=1.0, true_cfg_scale=1.0):
        """guidance_scale is unused (no guidance embedding)."""
        cfg = true_cfg_scale > 1 and "neg_prompt_embeds" in cond
        caching = self.use_kv_cache and self.config.causal_condition and not torch.is_grad_enabled()
        if not caching:
            self._kv = None  # a forward with gradients (training): free the rollout's cache
        groups, order = host.once(cond["prompt_mask"], _layout_groups, cond.get("neg_prompt_mask") if cfg else None,
                                  cond.get("image_grids"), z.device)
        if caching:
            self._cache_for(cond, cfg, sigma)
        if len(groups) == 1:
            layout, rows, _ = groups[0]
            return self._forward(z, sigma, cond, state, layout, tuple(rows), cfg, true_cfg_scale, caching)
        outs = []
        for layout, rows, index in groups:
            s = sigma[index] if torch.is_tensor(sigma) and sigma.dim() and len(sigma) == len(z) else sigma
            sub = self.select(cond, index)
            outs.append(self._forward(z[index], s, sub, state, layout, tuple(rows), cfg, true_cfg_scale, caching))
        return torch.cat(outs)[order]

    def _cache_for(self, cond, cfg, sigma):
        """Keep the cache only while what the prefix depends on is unchanged (the module docstring); at sigma = 1 (a
        rollout's first step) a stale or missing cache is replaced by an empty one that the forwards fill."""
        tensors = [cond[k] for k in sorted(cond) if torch.is_tensor(cond[k])]
        net = self.transformer
        lora = tuple((m.disable_adapters, tuple(m.active_adapters), "forward" in m.__dict__)
                     for m in net.modules() if hasattr(m, "lora_A"))
        kind = self.device.type
        autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        token = (id(net), tuple(_version(p) for p in net.parameters()), lora, autocast, self.dtype, cfg)
        kv = self._kv
        if kv is not None and kv["token"] == token and _same(kv["refs"], tensors):
            return
        first_step = not torch.is_tensor(sigma) or sigma.dim() == 0
        self._kv = None
        if first_step and host.value(sigma) == 1.0:
            self._kv = {"token": token, "refs": [(weakref.ref(t), _version(t)) for t in tensors], "entries": {}}

    def _forward(self, z, sigma, cond, state, layout, rows, cfg, true_cfg_scale, caching):
        """predict for rows that share `layout` (text lengths and condition grids): no padding anywhere."""
        n, seq = z.shape[:2]
        pos_len, neg_len, grids = layout
        t = torch.as_tensor(sigma, dtype=torch.float32, device=z.device).expand(n) * 1000
        timestep = t.to(self.dtype) / 1000  # the pipeline casts t to the latent dtype before dividing
        x = z.to(self.dtype)
        if grids:  # condition tokens come first, the target last
            x = torch.cat([cond["image_latents"][:, :sum(h * w for h, w in grids)].to(self.dtype), x], dim=1)
        shapes = [[*((1, h, w) for h, w in grids), state["img_shape"]]] * n
        v = self._branch("pos", x, timestep, cond["prompt_embeds"][:, :pos_len],
                         cond["prompt_image_mask"][:, :pos_len], shapes, seq, (layout, rows) if caching else None)
        if cfg:
            neg = self._branch("neg", x, timestep, cond["neg_prompt_embeds"][:, :neg_len],
                               cond["neg_prompt_image_mask"][:, :neg_len], shapes, seq,
                               (layout, rows) if caching else None)
            v = neg + true_cfg_scale * (v - neg)
        return v

    def _branch(self, branch, x, timestep, emb, slots, shapes, seq, cache_key):
        # one text slot per 2x2 target tokens follows the prompt (the pipeline's append_target_slots)
        img_mask = torch.cat([slots.bool(), slots.new_ones(slots.shape[0], seq // 4, dtype=torch.bool)], dim=1)
        entries = self._kv["entries"] if cache_key is not None and self._kv is not None else None
        key = (branch, *cache_key) if entries is not None else None
        kv, mode = None, None
        if entries is not None:  # a filled cache is read; else this forward fills one (the pipeline's first step)
            kv, mode = (entries[key], "cached") if key in entries else (QwenImage21KVCache(self.config.num_layers),
                                                                         "extract")
        v = self.transformer(hidden_states=x, encoder_hidden_states=emb.to(self.dtype), timestep=timestep,
                             img_shapes=shapes, img_mask=img_mask, kv_cache=kv, kv_cache_mode=mode,
                             return_dict=False)[0]
        if mode == "extract":
            entries[key] = kv  # only once the forward has filled every layer
        return v[:, -seq:].float()

    @torch.no_grad()
    def decode(self, z, state, cond=None):
        self._kv = None  # the rollout is over
        vae = self.pipe.vae
        x = self.pipe._unpack_latents(z.to(self.dtype), state["height"], state["width"], self.pipe.vae_scale_factor)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(x.device, x.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(x.device, x.dtype)
        img = vae.decode(x * std + mean, return_dict=False)[0][:, :, 0]
        # RGBA: the alpha channel is dropped, as the project reads RGBA images (rewards/images.py to_rgb8)
        return self.pipe.image_processor.postprocess(img, output_type="pt")[:, :3].float()
