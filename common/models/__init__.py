"""Model registry: `--model NAME` -> adapter class. Imports are lazy so a bad name fails before torch work."""
import importlib

from common.errors import ModelError
from common.models.base import Adapter

MODELS = {
    "flux1": "common.models.flux1:Flux1Adapter",
    "flux1-kontext": "common.models.flux1_kontext:Flux1KontextAdapter",
    "sd3_5": "common.models.sd3:SD3Adapter",
    "z-image": "common.models.z_image:ZImageAdapter",
    "qwen-image": "common.models.qwen_image:QwenImageAdapter",
    "qwen-image-edit-plus": "common.models.qwen_image:QwenImageEditPlusAdapter",
    "qwen-image-2.1": "common.models.qwen_image21:QwenImage21Adapter",
    "flux2": "common.models.flux2:Flux2Adapter",
    "flux2-klein": "common.models.flux2:Flux2KleinAdapter",
    "wan2_t2v": "common.models.wan:WanT2VAdapter",
    "wan2_i2v": "common.models.wan:WanI2VAdapter",
    "ltx2": "common.models.ltx2:LTX2Adapter",
    "ltx2_i2v": "common.models.ltx2:LTX2I2VAdapter",
    # the embedded shapes model (models/shapes-flux): a FLUX.1-architecture pipeline, the FLUX.1 adapter with its preset
    "shapes": "common.models.flux1:ShapesAdapter",
}


def adapter_class(name: str, variant=None) -> type[Adapter]:
    """The adapter class of `--model name`, after checking the name and `--variant` (one clear line each)."""
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    module, cls = MODELS[name].split(":")
    cls = getattr(importlib.import_module(module), cls)
    cls.check_variant(variant)
    return cls


def load(name: str, path=None, tiny=False, device="cpu", dtype=None, variant=None, condition_max_pixels=None,
         **options) -> Adapter:
    """`options`: model options of the adapter's constructor (Wan2.2-A14B: train_experts, guidance_scale_2)."""
    import torch
    return adapter_class(name).load(path, tiny=tiny, device=device, dtype=dtype or torch.float32, variant=variant,
                                    condition_max_pixels=condition_max_pixels, **options)

