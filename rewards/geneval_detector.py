"""The default detector and colour classifier of the geneval reward, through transformers (no mmcv / mmdet):

- Mask2Former Swin-S, COCO instance segmentation (hub id facebook/mask2former-swin-small-coco-instance), read with its
  image processor's post_process_instance_segmentation; a box is its mask's extent (x2, y2 one past the last pixel,
  as mmdet derives Mask2Former's boxes); COCO's "mouse", "remote", "keyboard" take GenEval's names.
- CLIP ViT-L/14 (openai/clip-vit-large-patch14) zero-shot over GenEval's 10 colours and its 3 templates, each object
  cropped to its box from the image composited over #999999 grey outside its mask.

GenEval's own detector is the same architecture and size from mmdetection, and its CLIP the same OpenAI weights
through open_clip: numbers from this pair are not GenEval's until compared on real weights.
Weights: the hub ids, or path = a folder with detector/ (Mask2Former model and image processor, save_pretrained) and
clip/ (CLIP model and processor); safetensors weights only.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rewards.base import RewardError
from rewards.clip_score import ClipScore
from rewards.geneval import COLORS, THRESHOLD

GENEVAL_NAMES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}  # COCO -> GenEval
TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
GREY = 153  # #999999, around a mask-composited crop


def load_default(path, device, dtype, detector=True, colours=True):
    """(Mask2FormerDetector, ClipColours) from the hub, or from path/detector and path/clip; None for one not asked
    for (a reward given its own)."""
    wanted = [d for d, want in (("detector", detector), ("clip", colours)) if want]
    if path is not None:
        missing = [d for d in wanted if not os.path.isdir(os.path.join(path, d))]
        if missing:
            raise RewardError(f"reward 'geneval': path override {path!r} must hold detector/ (Mask2Former model and "
                              f"image processor) and clip/ (CLIP model and processor); missing: {', '.join(missing)}")
    sub = (lambda d: os.path.join(path, d)) if path is not None else (lambda d: None)
    try:
        return (Mask2FormerDetector(sub("detector"), device, dtype) if detector else None,
                ClipColours(sub("clip"), device, dtype) if colours else None)
    except RewardError as e:
        if path is not None:
            raise
        raise RewardError(f"{e}, in its detector/ and clip/ subfolders") from e


class Mask2FormerDetector:
    """detect(images) -> per image {class: [(box, score, mask), ...]}: boxes (x1, y1, x2, y2) float64, masks (H, W)
    bool; detections scoring under 0.3 (GenEval's lowest threshold) are left out here already."""

    name = "geneval"
    model_id = "facebook/mask2former-swin-small-coco-instance"

    def __init__(self, path=None, device="cpu", dtype=torch.float32):
        import transformers
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        # the PIL image processor whatever is installed (the torchvision one resizes slightly differently)
        processor_cls = getattr(transformers, "Mask2FormerImageProcessorPil", AutoImageProcessor)
        self.device, self.dtype = torch.device(device), dtype
        load = ClipScore._load  # its one-line error naming the reward, the source and the path override
        self.processor = load(self, processor_cls, path or self.model_id, path)
        self.model = load(self, Mask2FormerForUniversalSegmentation, path or self.model_id, path, dtype=dtype,
                          use_safetensors=True).to(self.device).eval()
        self.model.requires_grad_(False)
        labels = self.model.config.id2label
        self.labels = {int(k): GENEVAL_NAMES.get(v, v) for k, v in labels.items()}
        self.classes = set(self.labels.values())

    @torch.no_grad()
    def detect(self, images: list[np.ndarray]) -> list[dict]:
        if not images:
            return []
        inputs = self.processor(images=list(images), return_tensors="pt")
        out = self.model(pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                         pixel_mask=inputs["pixel_mask"].to(self.device) if "pixel_mask" in inputs else None)
        out.class_queries_logits = out.class_queries_logits.float()
        out.masks_queries_logits = out.masks_queries_logits.float()
        results = self.processor.post_process_instance_segmentation(
            out, threshold=THRESHOLD, target_sizes=[im.shape[:2] for im in images], return_binary_maps=True)
        detections = []
        for res in results:
            found = {}
            masks = res["segmentation"].bool().cpu().numpy() if res["segments_info"] else None
            for seg in res["segments_info"]:
                mask = masks[seg["id"]]
                found.setdefault(self.labels[seg["label_id"]], []).append((box_of(mask), float(seg["score"]), mask))
            detections.append(found)
        return detections


def box_of(mask: np.ndarray) -> np.ndarray:
    """(x1, y1, x2, y2) of a non-empty (H, W) bool mask, x2 and y2 one past its last column and row."""
    xs, ys = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    return np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], np.float64)


def crop(image: np.ndarray, box, mask: np.ndarray | None) -> Image.Image:
    """The object as GenEval's colour classifier sees it: outside its mask #999999 grey, cropped to its box."""
    if mask is not None:
        image = np.where(mask[..., None], image, np.uint8(GREY))
    return Image.fromarray(image).crop(tuple(float(v) for v in box[:4]))


class _Clip(ClipScore):
    name = "geneval"  # loading errors name this reward


class ClipColours:
    """colours(image, class, objects) -> the colour of each object: CLIP zero-shot over GenEval's colours, each one's
    text embedding the normalised mean of its 3 templates' unit embeddings (GenEval's classifier, per class)."""

    def __init__(self, path=None, device="cpu", dtype=torch.float32):
        self.clip = _Clip(path, device, dtype)
        self.classifiers = {}

    @torch.no_grad()
    def classifier(self, cls: str) -> torch.Tensor:
        """(len(COLORS), D) unit text embeddings of the colours of class `cls`."""
        if cls not in self.classifiers:
            emb = self.clip.embed_texts([t.format(c=c, cls=cls) for c in COLORS for t in TEMPLATES])
            emb = emb.view(len(COLORS), len(TEMPLATES), -1).mean(1)
            self.classifiers[cls] = F.normalize(emb, dim=-1)
        return self.classifiers[cls]

    @torch.no_grad()
    def __call__(self, image: np.ndarray, cls: str, objects) -> list[str]:
        if not objects:
            return []
        clip = self.clip
        crops = [crop(image, o.box, o.mask) for o in objects]
        pixels = clip.processor(images=crops, return_tensors="pt")["pixel_values"].to(clip.device, clip.dtype)
        img = clip.embed_images(pixels)
        return [COLORS[i] for i in (img @ self.classifier(cls).T).argmax(1).tolist()]
