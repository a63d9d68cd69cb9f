"""HPSv2.1 (Human Preference Score v2.1, Wu et al. 2023): an open_clip ViT-H/14 CLIP fine-tuned on human preferences
(HPD v2). score = cos(image features, text features), no logit scale: diag(img @ txt.T) of the unit features, as the
hpsv2 package scores; published HPS-v2.1 numbers of text-to-image models lie around 0.2 to 0.35.

Architecture and weights: open_clip's ViT-H-14 (vision 32 layers, width 1280, 16 heads of 80, patch 14, 224 px; text
24 layers, width 1024, 16 heads, 77 tokens; 1024-d features; GELU), the same architecture as the transformers CLIPModel
of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, with HPS_v2.1_compressed.pt of the hub repo xswu/HPSv2 (a pickle: open_clip's
state dict under 'state_dict'). Convert it once into a transformers folder (rewards/convert.py maps the keys) and pass
it:
    python -m rewards.convert hpsv2 HPS_v2.1_compressed.pt FOLDER --processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K
    --reward-paths hpsv2=FOLDER

Input, as HPS's validation transform (open_clip image_transform with resize_longest_max): the longest side brought to
224 (bicubic, on the float tensor; antialiased, the default of current torchvision), the other side to
round(side * 224 / longest), then zero padding (black, before normalisation) centred to 224 x 224, then CLIP mean and
std. A square image is a plain resize to 224 x 224; nothing is cropped. Text: OpenAI CLIP's BPE tokenizer (the laion
processor's), 77 tokens, truncated; the text feature is taken at the end-of-text token (open_clip: the argmax of the
ids, the same position since <|endoftext|> is the vocabulary's last id).
"""
import torch
import torch.nn.functional as F

from rewards.base import RewardError
from rewards.clip_score import ClipScore

CONVERT = ("convert HPS_v2.1_compressed.pt (hub repo xswu/HPSv2) once with `python -m rewards.convert hpsv2 "
           "HPS_v2.1_compressed.pt FOLDER --processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K` and pass "
           "--reward-paths hpsv2=FOLDER")


class HPSv2(ClipScore):
    name = "hpsv2"

    def __init__(self, path=None, device="cpu", dtype=torch.float32):
        """path: the folder rewards.convert wrote (transformers config, safetensors, laion ViT-H-14 processor)."""
        if path is None:  # no hub repo holds HPSv2.1 in transformers' layout
            raise RewardError(f"reward 'hpsv2': no folder given for its converted weights; {CONVERT}")
        super().__init__(path, device, dtype)
        ip = self.processor.image_processor
        self.size = ip.crop_size["height"]
        self.mean = torch.tensor(ip.image_mean, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(ip.image_std, device=self.device).view(3, 1, 1)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, 3, S, S) normalised pixels: longest side resized to S, zero-padded square
        (HPS's input, instead of the processor's crop; the text side is ClipScore's)."""
        x = images.detach().to(self.device, torch.float32)
        h, w = x.shape[-2:]
        S = self.size
        if max(h, w) != S:
            scale = S / max(h, w)
            h, w = round(h * scale), round(w * scale)  # Python's round, as upstream
            x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        # upstream pads only when it resized; a non-square image whose longest side is already S is padded too here,
        # as the model takes S x S only
        top, left = (S - h) // 2, (S - w) // 2
        x = F.pad(x, (left, S - w - left, top, S - h - top), value=0.0)
        return ((x - self.mean) / self.std).to(self.dtype)
