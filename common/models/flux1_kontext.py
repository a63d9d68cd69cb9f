"""FLUX.1-Kontext-dev adapter (docs/models.md 3.2) over diffusers' FluxKontextPipeline components.

Facts: the FLUX.1-dev architecture and scheduler config (flux1.py: packed 2x2 tokens, t/1000, distilled
guidance embedding, optional true CFG with a negative prompt, mu from the target token count only).
One condition image per sample: resized to the PREFERRED_KONTEXT_RESOLUTIONS bucket (~1 MP, multiples of 16)
closest to its aspect, VAE-encoded with the posterior mode (no RNG), normalized like the target, packed, and
appended after the noisy tokens with ids [1, row, col]; the velocity is read from the target tokens only.
Output size: the pipeline rescales height x width to area `max_area` (1024^2 by default); we use the
requested size as is (the pipeline with `max_area=H*W` matches).
Condition area rule: condition_max_pixels >= 1024^2 (the buckets' nominal area, the default) keeps the
pipeline's bucket exactly (a few buckets are up to 1.3% larger); a smaller value keeps the bucket's aspect
at that area, each side rounded down to a multiple of 16 (so the area stays within it).
"""
import math
import os

import torch
from diffusers import FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

from common.errors import ModelError
from common.models.base import ROOT, pad_cat
from common.models.flux1 import Flux1Adapter

BUCKET_AREA = 1024 * 1024  # the nominal area of PREFERRED_KONTEXT_RESOLUTIONS


class Flux1KontextAdapter(Flux1Adapter):
    name = "flux1-kontext"
    pipeline_cls = FluxKontextPipeline
    preset = dict(guidance_scale=2.5, batch_size=1)
    tiny_preset = dict(dataset=os.path.join(ROOT, "datasets", "demo-edit"), condition_max_pixels=64 * 64)
    hub_id = "black-forest-labs/FLUX.1-Kontext-dev"
    condition_images = "one"
    condition_min_side = 16  # each side floored to a multiple of vae_scale_factor * 2
    default_condition_max_pixels = BUCKET_AREA

    @classmethod
    def build_tiny(cls, variant=None):
        # Kontext adds no module to FLUX.1, only the token layout: the same tiny components
        return FluxKontextPipeline(**super().build_tiny().components)

    def condition_elements(self, settings, latent_grid=None):
        text, _ = super().condition_elements(settings)
        area = settings.condition_max_pixels or BUCKET_AREA
        return text + area // 256 * (self.config.in_channels + 3), "1 condition image"  # its packed latents and ids

    def condition_size(self, image):
        """(height, width) the condition image is resized to: the pipeline's bucket, capped (module doc)."""
        f = self.pipe.vae_scale_factor * 2
        h, w = self.pipe.image_processor.get_default_height_width(image)  # floored to multiples of 16
        if not h or not w:
            raise ModelError(f"{self.name}: condition image {image.width}x{image.height} is smaller than {f}x{f}")
        # the pipeline's choice, tie-break included
        _, bw, bh = min((abs(w / h - bw / bh), bw, bh) for bw, bh in PREFERRED_KONTEXT_RESOLUTIONS)
        if self.condition_max_pixels < BUCKET_AREA:
            bw, bh = math.sqrt(self.condition_max_pixels * bw / bh), math.sqrt(self.condition_max_pixels * bh / bw)
        return max(f, int(bh) // f * f), max(f, int(bw) // f * f)

    @torch.no_grad()
    def encode_prompt(self, prompts, negative_prompts=None, max_sequence_length=512, images=None, state=None):
        if images is None or len(images) != len(prompts) or any(len(im) != 1 for im in images):
            raise ModelError(f"{self.name} needs exactly one condition image per prompt")
        cond = super().encode_prompt(prompts, negative_prompts, max_sequence_length)
        # encode each distinct image once (K copies of a sample share it); keyed by content, not identity
        keys = [self.image_key(im[0]) for im in images]
        uniq = list(dict.fromkeys(keys))
        first = [images[keys.index(k)][0] for k in uniq]
        proc = self.pipe.image_processor
        # one image per VAE call, as the pipeline encodes its one image: a row's latents then do not depend on the
        # batch it was encoded in (batched convolutions differ in the last bits), so prompts encoded once are exact.
        # Images of other aspect ratios resize to other buckets: padded rows, one forward per size (predict)
        lats = [self.pipe._encode_vae_image(proc.preprocess(im, *self.condition_size(im)).to(self.device, self.dtype),
                                            generator=None) for im in first]  # posterior mode, normalized
        packed = [self.pipe._pack_latents(lat, *lat.shape) for lat in lats]
        grids = torch.tensor([[[lat.shape[2] // 2, lat.shape[3] // 2]] for lat in lats])
        idx = torch.tensor([uniq.index(k) for k in keys])
        cond["image_latents"] = pad_cat(packed)[idx.to(self.device)]
        cond["image_grids"] = grids[idx]  # (B, 1, 2): the (rows, cols) of each row's packed condition tokens
        return cond

    def predict(self, z, sigma, cond, state, guidance_scale=1.0, true_cfg_scale=1.0):
        # the condition tokens follow the noisy ones (the same for both CFG passes); CFG is per token, so
        # cutting the output back to the target tokens after FLUX.1's predict equals the pipeline's order
        def forward(z, sigma, cond, layout, rows):
            (h, w), n = layout[0], z.shape[1]
            # the pipeline's [0, row, col] ids of the condition grid, row-major, with the first channel 1 (condition
            # tokens, not target ones); made on the device, not copied from the host at every step
            ids = torch.cartesian_prod(*(torch.arange(a, b, device=z.device) for a, b in ((1, 2), (0, h), (0, w))))
            ids = ids.to(self.dtype)
            x = torch.cat([z, cond["image_latents"].to(z.dtype)], dim=1)
            return super(Flux1KontextAdapter, self).predict(x, sigma, cond, {**state, "img_ids": torch.cat(
                [state["img_ids"], ids])}, guidance_scale, true_cfg_scale)[:, :n]
        return self.per_condition_layout(z, sigma, cond, forward)
