"""ImageReward v1.0 (Xu et al. 2023, THUDM): a BLIP ViT-L/16 image encoder and BLIP's BERT-base text encoder with
cross-attention to the image, fine-tuned on 137k human rankings of text-to-image samples (ImageRewardDB); scores are
normalised so that the training set's mean is 0 and its standard deviation 1.

score = (mlp(h) - 0.16717362830052426) / 1.0333394966054072, where h is the text encoder's last hidden state at the
first token ([CLS]: upstream scores the plain tokenizer output, without BLIP's [ENC] swap) for the prompt (BERT
uncased tokens, padded and truncated to 35) attending to the image embeddings (the ViT's whole last hidden state:
class and patch tokens after its final LayerNorm), and mlp is Linear 768->1024, Dropout, Linear 1024->128, Dropout,
Linear 128->64, Dropout, Linear 64->16, Linear 16->1 with no activation anywhere (upstream's ReLUs are commented out:
the same layout as the LAION aesthetic head), applied in float32 as upstream (`.float()` before the MLP).

Input: shortest side resized to 224 (bicubic), centre crop 224 x 224, OpenAI CLIP mean and std, as upstream's
transform, through the CLIPImageProcessor saved in the folder (ClipScore.pixels). Without torchvision, transformers runs
that processor on PIL: the image becomes 8-bit and PIL resizes it, as upstream's transform does.

Weights: upstream ships ImageReward.pt (hub repo THUDM/ImageReward) only as a pickle. Convert it once into a
transformers BlipForImageTextRetrieval folder (rewards/convert.py maps the keys) and pass it:
    python -m rewards.convert imagereward ImageReward.pt FOLDER --tokenizer bert-base-uncased
    --reward-paths imagereward=FOLDER
FOLDER holds config.json and model.safetensors (vision and text weights), imagereward_mlp.safetensors (the MLP, keys as
upstream's `mlp.` without the prefix), BLIP's tokenizer (bert-base-uncased plus [DEC] and [ENC]) and the image
processor. The retrieval model's itm_head is not part of ImageReward (zeros); it and BLIP's contrastive projections
(vision_proj, text_proj) are never used by the score.
"""
import os

import torch
import torch.nn.functional as F

from rewards.aesthetic import HEAD_LAYERS, check_head
from rewards.base import RewardError
from rewards.clip_score import ClipScore

MLP_FILE = "imagereward_mlp.safetensors"
MAX_LENGTH = 35  # upstream's tokenizer call
# the reward's mean and standard deviation on upstream's training data, subtracted and divided by as upstream
MEAN, STD = 0.16717362830052426, 1.0333394966054072
CONVERT = ("convert ImageReward.pt (hub repo THUDM/ImageReward) once with `python -m rewards.convert imagereward "
           "ImageReward.pt FOLDER --tokenizer bert-base-uncased` and pass --reward-paths imagereward=FOLDER")


def check_mlp(state: dict, where: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The MLP's (weight, bias) pairs in order; RewardError (one line) unless `state` holds exactly its layout (the
    aesthetic head's)."""
    return check_head(state, where, "imagereward", "ImageReward's MLP")


class ImageReward(ClipScore):
    """ClipScore's loading helper, float-tensor preprocessing and frame handling; BLIP's model and score."""

    name = "imagereward"

    def __init__(self, path=None, device="cpu", dtype=torch.float32):
        """path: the folder rewards.convert wrote."""
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, BlipForImageTextRetrieval, CLIPImageProcessor

        if path is None:  # no hub repo holds ImageReward in transformers' layout
            raise RewardError(f"reward 'imagereward': no folder given for its converted weights; {CONVERT}")
        mlp_file = os.path.join(path, MLP_FILE)
        if not os.path.isfile(mlp_file):
            raise RewardError(f"reward 'imagereward': {path!r} has no {MLP_FILE}; {CONVERT}")
        mlp = check_mlp(load_file(mlp_file), mlp_file)
        self.device, self.dtype = torch.device(device), dtype
        self.processor = self._load(CLIPImageProcessor, path, path)
        self.tokenizer = self._load(AutoTokenizer, path, path)
        self.model = self._load(BlipForImageTextRetrieval, path, path, dtype=dtype).to(self.device).eval()
        self.model.requires_grad_(False)
        width = self.model.config.text_config.hidden_size
        if width != HEAD_LAYERS[0][1]:
            raise RewardError(f"reward 'imagereward': the text encoder's width is {width}, the MLP takes "
                              f"{HEAD_LAYERS[0][1]} (BERT-base's)")
        self.mlp = [(w.to(self.device, torch.float32), b.to(self.device, torch.float32)) for w, b in mlp]

    @torch.no_grad()
    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image_embeds = self.model.vision_model(pixel_values=self.pixels(images)).last_hidden_state
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                              return_tensors="pt").to(self.device)
        # every image token is attended to (upstream's all-ones image mask): no encoder mask; is_decoder=False (the
        # default) keeps the prompt's self-attention bidirectional, as upstream's encoder
        h = self.model.text_encoder(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                                    encoder_hidden_states=image_embeds).last_hidden_state[:, 0].float()
        for w, b in self.mlp:  # no activation between the layers, as upstream
            h = F.linear(h, w, b)
        return (h.squeeze(-1) - MEAN) / STD
