"""LAION aesthetic score (C. Schuhmann's "improved aesthetic predictor"; the aesthetic reward of DDPO, Flow-GRPO and
DiffusionNFT): how much people like an image on average, about 1 to 10. The prompt is not used.

score = head(e / |e|), e = CLIPModel.get_image_features of openai/clip-vit-large-patch14 (ViT-L/14, 768-d) at 224 px
through its processor (shortest side to 224, bicubic, centre crop, CLIP mean and std), where head is the released
sac+logos+ava1-l14-linearMSE.pth: nn.Linear 768->1024, Dropout(0.2), Linear 1024->128, Dropout(0.2), Linear 128->64,
Dropout(0.1), Linear 64->16, Linear 16->1, with no activation anywhere (the ReLUs of upstream's MLP are commented out
for this model), so its state dict holds layers.{0,2,4,6,7}.{weight,bias}. At inference the dropouts are identities
and the head is an affine map of the unit embedding, applied here layer by layer in float32.

Weights: upstream ships the head only as a pickle. Convert it once (rewards/convert.py) and pass the folder:
    python -m rewards.convert aesthetic sac+logos+ava1-l14-linearMSE.pth FOLDER [--clip openai/clip-vit-large-patch14]
    --reward-paths aesthetic=FOLDER
FOLDER holds aesthetic_head.safetensors; CLIP loads from FOLDER when it holds a saved CLIP model and processor (what
--clip writes there), else from the hub id openai/clip-vit-large-patch14.
"""
import os

import torch
import torch.nn.functional as F

from rewards.base import RewardError
from rewards.clip_score import ClipScore

HEAD_FILE = "aesthetic_head.safetensors"
# (state-dict prefix, in features, out features) of each nn.Linear of the head, in the order they apply
HEAD_LAYERS = (("layers.0", 768, 1024), ("layers.2", 1024, 128), ("layers.4", 128, 64), ("layers.6", 64, 16),
               ("layers.7", 16, 1))
CONVERT = ("convert upstream's sac+logos+ava1-l14-linearMSE.pth once with `python -m rewards.convert aesthetic "
           "sac+logos+ava1-l14-linearMSE.pth FOLDER` and pass --reward-paths aesthetic=FOLDER")


def check_head(state: dict, where: str, reward: str = "aesthetic", what: str = "the linearMSE aesthetic head"
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The head's (weight, bias) pairs in order; RewardError (one line) unless `state` holds exactly the linearMSE
    layout (other heads, e.g. the reluMSE one with activations, are not this formula). ImageReward's MLP has the same
    layout (`reward`, `what` name it in the errors)."""
    want = {f"{name}.{p}" for name, _, _ in HEAD_LAYERS for p in ("weight", "bias")}
    if set(state) != want:
        extra, missing = sorted(set(state) - want), sorted(want - set(state))
        raise RewardError(f"reward '{reward}': {where} is not {what} (keys missing: "
                          f"{missing[:4]}, unexpected: {extra[:4]}); expected {sorted(want)}")
    layers = []
    for name, n_in, n_out in HEAD_LAYERS:
        w, b = state[f"{name}.weight"], state[f"{name}.bias"]
        if tuple(w.shape) != (n_out, n_in) or tuple(b.shape) != (n_out,):
            raise RewardError(f"reward '{reward}': {where}: {name} has weight {tuple(w.shape)} and bias "
                              f"{tuple(b.shape)}, expected ({n_out}, {n_in}) and ({n_out},)")
        layers.append((w, b))
    return layers


class Aesthetic(ClipScore):
    name = "aesthetic"
    processor_id = "openai/clip-vit-large-patch14"
    model_id = "openai/clip-vit-large-patch14"

    def __init__(self, path=None, device="cpu", dtype=torch.float32):
        """path: a folder holding aesthetic_head.safetensors, and optionally a saved CLIP model and processor."""
        from safetensors.torch import load_file

        head_file = os.path.join(path, HEAD_FILE) if path is not None else None
        if head_file is None or not os.path.isfile(head_file):  # checked before CLIP loads (maybe downloads)
            where = f"{path!r} has no {HEAD_FILE}" if path is not None else "no folder given for its head"
            raise RewardError(f"reward 'aesthetic': {where}; {CONVERT}")
        head = check_head(load_file(head_file), head_file)
        clip_saved = os.path.isfile(os.path.join(path, "config.json"))
        super().__init__(path if clip_saved else None, device, dtype)
        dim = self.model.config.projection_dim
        if dim != HEAD_LAYERS[0][1]:
            raise RewardError(f"reward 'aesthetic': the CLIP model's image embedding has {dim} features, the head "
                              f"takes {HEAD_LAYERS[0][1]} (CLIP ViT-L/14's)")
        # the head is tiny: float32 on the run's device whatever the CLIP dtype
        self.head = [(w.to(self.device, torch.float32), b.to(self.device, torch.float32)) for w, b in head]

    @torch.no_grad()
    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = self.embed_images(self.pixels(images))
        for w, b in self.head:  # no activation between the layers: the released linearMSE model has none
            x = F.linear(x, w, b)
        return x.squeeze(-1)
