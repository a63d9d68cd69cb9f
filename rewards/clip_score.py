"""CLIP score: cosine similarity between the image and prompt embeddings of a CLIP model, in [-1, 1].

ClipScore holds the CLIP loading and embedding code that PickScore (rewards/pickscore.py) reuses.
"""
import os

import torch
import torch.nn.functional as F

from rewards.base import Reward, RewardError, over_frames


def _pooled(out) -> torch.Tensor:
    # transformers v5 returns a model output whose pooler_output is the projected embedding; v4 a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScore(Reward):
    name = "clip"
    processor_id = "openai/clip-vit-large-patch14"
    model_id = "openai/clip-vit-large-patch14"

    def __init__(self, path=None, device="cpu", dtype=torch.float32):
        """path: a local folder holding both processor and model; it overrides the hub ids."""
        from transformers import AutoModel, AutoProcessor

        if path is not None and not os.path.isdir(path):
            raise RewardError(f"reward '{self.name}': path override {path!r} is not a folder")
        self.device, self.dtype = torch.device(device), dtype
        self.processor = self._load(AutoProcessor, path or self.processor_id, path)
        self.model = self._load(AutoModel, path or self.model_id, path, dtype=dtype).to(self.device).eval()
        self.model.requires_grad_(False)

    def _load(self, auto, source, path, **kwargs):
        try:
            return auto.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            hint = ("check that the folder holds a saved processor and model" if path else
                    f"no network or not cached? download it and set the path override for '{self.name}' "
                    "to a local folder holding processor and model")
            raise RewardError(f"reward '{self.name}': cannot load {source!r} ({why}); {hint}") from e

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> the model's pixel values (the processor's resize, crop and normalisation)."""
        pixels = self.processor(images=images.detach().float().cpu(), do_rescale=False, return_tensors="pt")
        return pixels["pixel_values"].to(self.device, self.dtype)

    @torch.no_grad()
    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixel values -> unit-norm float32 image embeddings (N, D)."""
        return F.normalize(_pooled(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> unit-norm float32 text embeddings (N, D), padded and truncated to the tokenizer's length."""
        tokenizer = self.processor.tokenizer
        text = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt",
                         max_length=tokenizer.model_max_length)
        txt = _pooled(self.model.get_text_features(input_ids=text["input_ids"].to(self.device),
                                                   attention_mask=text["attention_mask"].to(self.device)))
        return F.normalize(txt.float(), dim=-1)

    def embed(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) in [0, 1] and N prompts -> unit-norm float32 image and text embeddings, (N, D) each."""
        return self.embed_images(self.pixels(images)), self.embed_texts(prompts)

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img, txt = self.embed(images, prompts)
        return (img * txt).sum(-1)

    @torch.no_grad()
    def __call__(self, images, prompts, metadata):
        return over_frames(self.score_images, images, prompts).float().cpu()
