"""The reward contract shared by every reward, and the error type users see."""
import torch


class RewardError(ValueError):
    """A user-facing reward problem (bad spec, missing weights, bad scores). Its message is one line."""


class Reward:
    """A reward model. Pointwise: scores each sample alone.

    __call__(images, prompts, metadata) -> (B,) float32 CPU raw scores, where images is a float tensor
    in [0, 1] of shape (B, 3, H, W), or (B, F, 3, H, W) for videos (score = mean over frames).
    Heavy imports and weight loading belong in __init__; scoring runs under torch.no_grad().
    """

    name: str = "reward"
    groupwise: bool = False  # True when group_transform is not the identity
    thread_safe: bool = False  # True when __call__ may run in several threads at once (else RewardSet serialises)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        raise NotImplementedError

    def group_transform(self, scores: torch.Tensor) -> torch.Tensor:
        """scores: (G, K) raw scores of G groups of K samples, gathered across ranks. Default: identity."""
        return scores


class FunctionReward(Reward):
    """A plain function fn(images, prompts, metadata) -> (B,) scores, as a pointwise Reward."""

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name
        # what a wrapped reward object declares survives the wrapping (RewardSet, rewards.server read them)
        self.batch_size, self.thread_safe = getattr(fn, "batch_size", None), getattr(fn, "thread_safe", False)

    def __call__(self, images, prompts, metadata):
        return self.fn(images, prompts, metadata)


def over_frames(score_images, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Apply score_images((N, 3, H, W), prompts) -> (N,) to images, or to videos as the mean over frames."""
    if images.dim() == 4:
        return score_images(images, prompts)
    if images.dim() != 5:
        raise RewardError(f"expected images (B,3,H,W) or videos (B,F,3,H,W), got shape {tuple(images.shape)}")
    B, F = images.shape[:2]
    scores = score_images(images.flatten(0, 1), [p for p in prompts for _ in range(F)])
    return scores.view(B, F).mean(1)


def strict_metrics(scores, metadata: list[dict], tags) -> dict[str, float]:
    """Evaluation metrics of a reward that scores exactly 1 when a sample meets every requirement (shapes, geneval):
    strict/all and strict/<tag> (the fraction of such samples, over all and per row `tag` among `tags`), dense/all
    (the mean score)."""
    s = torch.as_tensor(scores, dtype=torch.float32).flatten()
    strict = (s == 1).float()
    out = {"strict/all": float(strict.mean()), "dense/all": float(s.mean())}
    row_tags = [m.get("tag") for m in metadata]
    for tag in tags:
        mine = torch.tensor([t == tag for t in row_tags])
        if mine.any():
            out[f"strict/{tag}"] = float(strict[mine].mean())
    return out
