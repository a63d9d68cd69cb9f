"""Run outputs: metrics.jsonl (one JSON object per epoch), sample grids, tracker images, timings, memory."""
import json
import math
import os
import resource
import time
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image


class Timer:
    """Accumulates wall seconds per phase: `with timer("rollout"): ...`; `timer.pop()` returns and resets."""
    def __init__(self):
        self.seconds = {}

    @contextmanager
    def __call__(self, name):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def pop(self):
        out, self.seconds = {f"time/{k}_s": round(v, 3) for k, v in self.seconds.items()}, {}
        return out


def peak_memory_gb(device) -> dict:
    """Peak accelerator memory since the last call if on GPU, else the process's peak RSS."""
    if torch.device(device).type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return {"memory/peak_gpu_gb": round(peak, 3)}
    return {"memory/peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def append_jsonl(path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def image_grid(images, nrow: int = 8) -> np.ndarray:
    """(B,3,H,W) or (B,F,3,H,W) floats in [0,1], or a list of (3,H,W) of any sizes -> one uint8 HxWx3 grid
    (videos show their first frame; smaller images sit top-left in their cell on white)."""
    if torch.is_tensor(images) and images.dim() == 5:
        images = images[:, 0]
    images = [img.float().cpu() for img in images]
    h, w = max(img.shape[-2] for img in images), max(img.shape[-1] for img in images)
    ncol = min(nrow, len(images))
    rows = (len(images) + ncol - 1) // ncol
    grid = torch.ones(3, rows * h, ncol * w)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        grid[:, r * h:r * h + img.shape[-2], c * w:c * w + img.shape[-1]] = img
    return (grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def with_conditions(images: torch.Tensor, condition_paths: list[list[str]]) -> list[torch.Tensor]:
    """Each output image with its condition images (resized to its height) on its left, for sample grids."""
    from common.data import load_image
    out = []
    for img, paths in zip(images, condition_paths):
        h = img.shape[-2]
        conds = []
        for p in paths:
            c = load_image(p)
            c = c.resize((max(1, round(c.width * h / c.height)), h), Image.BICUBIC)
            conds.append(torch.from_numpy(np.asarray(c)).permute(2, 0, 1).float() / 255)
        out.append(torch.cat([*conds, img.float()], dim=-1) if conds and img.dim() == 3 else img)
    return out


def _as_videos(images):
    """The samples as a list of (F, 3, H, W) tensors if they are videos, else None (images)."""
    if torch.is_tensor(images):
        return list(images) if images.dim() == 5 else None
    images = list(images)
    return images if images and all(torch.is_tensor(v) and v.dim() == 4 for v in images) else None


def save_samples(accelerator, out_dir, tag, images, captions, step, *, fps: float = 16):
    """Write samples/<tag>.png and a captions file; send the grid to the trackers.
    Videos ((B,F,3,H,W) or a list of (F,3,H,W)): <tag>.png is a column of frame strips (one row per sample)
    and <tag>.mp4 plays the grid of all samples' frame t (a shorter sample holds its last frame)."""
    from common.video import frame_strip, write_frames
    os.makedirs(out_dir, exist_ok=True)
    videos = _as_videos(images)
    mp4 = None
    if videos is None:
        grid = image_grid(images)
    else:
        videos = [v.detach().float().cpu() for v in videos]
        grid = image_grid([frame_strip(v) for v in videos], nrow=1)
        nrow = math.ceil(math.sqrt(len(videos)))  # a squarish grid plays in any player
        frames = (image_grid([v[min(t, len(v) - 1)] for v in videos], nrow=nrow)
                  for t in range(max(len(v) for v in videos)))
        mp4 = write_frames(os.path.join(out_dir, f"{tag}.mp4"), frames, fps)
    Image.fromarray(grid).save(os.path.join(out_dir, f"{tag}.png"))
    with open(os.path.join(out_dir, f"{tag}.txt"), "w") as f:
        f.write("\n".join(captions) + "\n")
    key = f"samples/{tag.split('_')[0]}"
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            # videos: the strips only (SummaryWriter.add_video needs moviepy, which we do not install)
            tracker.writer.add_image(key, grid, step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb
            caption = " | ".join(captions[:8])
            if mp4 is None:
                tracker.log({key: wandb.Image(grid, caption=caption)}, step=step)
            else:
                tracker.log({key: wandb.Video(mp4, caption=caption),
                             f"{key}_frames": wandb.Image(grid, caption=caption)}, step=step)


def before_after_table(base: dict, final: dict) -> str:
    """A plain-text table of every eval metric, base model vs trained."""
    rows = [f"{'metric':<40} {'base':>9} {'trained':>9} {'change':>9}"]
    for k in sorted(final):
        if k.startswith("eval/") and k in base:
            rows.append(f"{k[5:]:<40} {base[k]:>9.4f} {final[k]:>9.4f} {final[k] - base[k]:>+9.4f}")
    return "\n".join(rows)
