"""PickScore (Kirstain et al. 2023): a CLIP-H model fine-tuned on human preferences (Pick-a-Pic).

score = logit_scale.exp() * cos(text, image) / 26, which puts typical scores near [0, 1].
PickScoreRank replaces each group's scores by their ranks: a groupwise reward.
"""
import torch

from rewards.clip_score import ClipScore


class PickScore(ClipScore):
    name = "pickscore"
    processor_id = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    model_id = "yuvalkirstain/PickScore_v1"

    def score_images(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img, txt = self.embed(images, prompts)
        return self.model.logit_scale.exp().float() * (img * txt).sum(-1) / 26


class PickScoreRank(PickScore):
    """Raw scores are PickScore's; group_transform turns each group of K into ranks {0, 1/K, ..., (K-1)/K}."""

    name = "pickscore_rank"
    groupwise = True

    def group_transform(self, scores: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(scores, dim=1, stable=True)
        return torch.argsort(order, dim=1, stable=True).float() / scores.shape[1]
