"""DDPO's JPEG (in)compressibility: the size of the image encoded as JPEG (quality 95), in kB.

Needs no weights, so it is the reward used by CPU tests.
"""
import io

import numpy as np
import torch
from PIL import Image

from rewards.base import Reward, over_frames


def jpeg_kb(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) floats in [0, 1] -> (N,) JPEG sizes in kB (1 kB = 1000 bytes)."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a), "RGB").save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegCompressibility(Reward):
    """reward = -(JPEG size in kB): smaller files score higher."""

    name = "jpeg_compressibility"
    sign = -1.0

    def __init__(self, path=None, device="cpu", dtype=torch.float32):
        pass  # nothing to load; the arguments exist so that the registry can build every reward alike

    @torch.no_grad()
    def __call__(self, images, prompts, metadata):
        return over_frames(lambda x, _: self.sign * jpeg_kb(x), images, prompts)


class JpegIncompressibility(JpegCompressibility):
    """reward = +(JPEG size in kB): larger files score higher."""

    name = "jpeg_incompressibility"
    sign = 1.0
