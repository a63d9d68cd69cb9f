"""Run outputs: metrics.jsonl (one JSON object per epoch), sample grids, tracker images, timings, memory."""
import json
import math
import os
import resource
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from common.errors import CheckpointError, writing


class Timer:
    """Accumulates wall seconds per phase: `with timer("rollout"): ...`; `timer.pop()` returns and resets. On CUDA a
    phase waits for the GPU at its start and end (once per phase, never inside its loop), so that each phase is
    charged for its own kernels, not for those queued before it."""
    def __init__(self, device="cpu"):
        self.seconds, self.cuda = {}, torch.device(device).type == "cuda"

    @contextmanager
    def __call__(self, name):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
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


def read_jsonl(path) -> list[dict]:
    """The records of a jsonl file the run appends to. A last line cut short (a crash or a full disk during the
    append) is dropped with a warning; a broken line before it is an error naming file:line."""
    with open(path) as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    records = []
    for i, line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            if i != lines[-1][0]:
                raise CheckpointError(f"{path}:{i}: not a JSON record (only a last line can be torn by a crash)")
            print(f"warning: {os.path.basename(path)}: dropped a torn last line ({path}:{i}, {len(line)} bytes)",
                  file=sys.stderr, flush=True)
    return records


def keep_epochs_before(path, epoch: int):
    """On resume: drop the records of epochs >= `epoch` (written after the checkpoint by a run that was then killed)
    and a torn last line, so the resumed run's lines are not duplicated; the file is rewritten atomically."""
    if not os.path.exists(path):
        return
    records = [r for r in read_jsonl(path) if r.get("epoch", -1) < epoch]
    with writing("the metrics", path), atomic_path(path) as tmp, open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


@contextmanager
def atomic_path(path):
    """A temporary path next to `path` (.tmp-<name>) to write to: renamed to `path` when the block ends, removed when
    it fails, so a full disk leaves no truncated file (and an older complete `path` stays)."""
    tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


class TrainStats:
    """An epoch's training statistics: `add(name=tensor, ...)` once per micro-step (detached here); the epoch record
    holds each one's mean over micro-steps and processes. A `ratio` (optional: a loss without one logs none) is kept
    per element for its mean, min and max, and the first one added gives the on-policy deviation max |ratio - 1|
    of the epoch's first micro-step (0 when training starts from the rollout's weights)."""

    def __init__(self):
        self.values, self.ratios, self.onpolicy_dev = {}, [], None

    def add(self, **stats):
        for name, value in stats.items():
            value = value.detach()
            if name == "ratio":
                if self.onpolicy_dev is None:
                    self.onpolicy_dev = (value - 1).abs().max()
                self.ratios.append(value)
            else:
                self.values.setdefault(name, []).append(value)


def epoch_stats(accelerator, raw: dict, adv, stats: TrainStats) -> dict:
    """An epoch's metrics.jsonl keys, reduced over processes: reward means/stds (raw scores, gathered), advantages,
    the mean of every training statistic and, when the loss has a ratio, its mean/min/max and on-policy deviation."""
    device = accelerator.device
    out = {}
    for k, v in raw.items():
        out[f"reward/{k}_mean"], out[f"reward/{k}_std"] = v.mean().item(), v.std(unbiased=False).item()
    out.update({"adv/mean": adv.mean().item(), "adv/std": adv.std(unbiased=False).item(),
                "adv/abs_max": adv.abs().max().item(), "adv/zero_frac": (adv == 0).float().mean().item()})
    for k, v in stats.values.items():
        out[f"train/{k}"] = accelerator.reduce(torch.stack(v).float().mean().to(device), "mean").item()
    if stats.ratios:
        ratios = torch.cat(stats.ratios).float()
        ratio_stats = accelerator.gather(torch.stack([ratios.mean(), ratios.min(), ratios.max()]).to(device))
        ratio_stats = ratio_stats.view(-1, 3)
        out["train/onpolicy_ratio_dev"] = accelerator.reduce(stats.onpolicy_dev.to(device), "max").item()
        out.update({"train/ratio_mean": ratio_stats[:, 0].mean().item(),
                    "train/ratio_min": ratio_stats[:, 1].min().item(),
                    "train/ratio_max": ratio_stats[:, 2].max().item()})
    return out


def log_epoch(accelerator, metrics_path, record: dict):
    """Main process: append the record to metrics.jsonl, send its numbers to the trackers, print its headline keys
    above the progress bars."""
    from tqdm.auto import tqdm
    append_jsonl(metrics_path, record)
    accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["epoch"])
    tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                        if k.startswith(("epoch", "reward/", "train/loss", "eval/", "time/"))))
    if record.get("adv/zero_frac") == 1.0:  # e.g. a constant reward: training runs on, learning nothing
        tqdm.write(f"warning: epoch {record['epoch']}: every advantage is 0 (the rewards scored all samples of each "
                   "group alike), so this epoch's update carries no reward signal; check the reward")


def append_jsonl(path, record: dict):
    """Append one line; a write cut short (a full disk) is truncated back, so the file never ends in a torn line."""
    line = memoryview((json.dumps(record) + "\n").encode())
    with writing("the metrics", path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                while line:  # a short write (the disk filled up) is retried, so that the OS's error surfaces
                    line = line[os.write(fd, line):]
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


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


def save_samples(accelerator, out_dir, tag, images, captions, step, *, fps: float = 16, audio=None):
    """Write samples/<tag>.png and a captions file; send the grid to the trackers.
    Videos ((B,F,3,H,W) or a list of (F,3,H,W)): <tag>.png is a column of frame strips (one row per sample)
    and <tag>.mp4 plays the grid of all samples' frame t (a shorter sample holds its last frame). `audio`: for a
    model with sound, (one (C, N) waveform per sample (a (B, C, N) tensor or a list), sample rate); the mp4 carries
    the first sample's track (AAC).
    Each file is written atomically: a full disk is one OutputError naming it, and leaves no truncated file."""
    with writing("the samples", os.path.join(out_dir, tag)):
        _save_samples(accelerator, out_dir, tag, images, captions, step, fps, audio)


def _save_samples(accelerator, out_dir, tag, images, captions, step, fps, audio=None):
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
        mp4 = os.path.join(out_dir, f"{tag}.mp4")
        # a grid shows every sample at once but an mp4 plays one sound: the first sample's (the top-left video;
        # before_after: the base model's first), never a mix, which would blur what any one sample sounds like
        track = None if audio is None or not len(audio[0]) else (audio[0][0], audio[1])
        with writing("the sample video", mp4):
            write_frames(mp4, frames, fps, track)
    png, txt = os.path.join(out_dir, f"{tag}.png"), os.path.join(out_dir, f"{tag}.txt")
    with writing("the samples", png), atomic_path(png) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    with writing("the samples' captions", txt), atomic_path(txt) as tmp, open(tmp, "w") as f:
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


def _summary_order(k):
    # rewards first, then dense scores, then strict accuracy overall, then per category
    name = k[5:]
    return ("reward_" not in name, "dense" not in name, "strict/all" not in name, name)


def run_summary(metrics_path) -> str:
    """The run's result, read back from metrics.jsonl: the trained model's last evaluation against the base model's
    (epoch -1), one row per metric (accuracies in %), and the best evaluation with its epoch. A metric that repeats
    another one's values in every evaluation (the shapes reward is its dense score) is shown once."""
    evals = [r for r in read_jsonl(metrics_path) if any(k.startswith("eval/") for k in r)]
    base = next((r for r in evals if r["epoch"] == -1), None)
    trained = [r for r in evals if r["epoch"] >= 0]
    if base is None or not trained:
        return "no summary: the run has no base-model and trained-model evaluations to compare (--eval-every)"
    final = trained[-1]
    keys = sorted((k for k in final if k.startswith("eval/") and k in base), key=_summary_order)
    keys = [k for i, k in enumerate(keys) if not any(all(r.get(k) == r.get(j) for r in evals) for j in keys[:i])]
    main = next((k for k in keys if k.endswith("strict/all")), keys[0])
    best = max(trained, key=lambda r: r[main])
    pct = {k: "strict" in k for k in keys}

    def cell(k, v):
        return f"{100 * v:.1f}%" if pct[k] else f"{v:.4f}"

    def change(k):
        d = final[k] - base[k]
        return f"{100 * d:+.1f} pts" if pct[k] else f"{d:+.4f}"
    rows = [f"Result: the trained model (EMA weights, epoch {final['epoch']}) against the base model, held-out prompts",
            f"{'metric':<32} {'base':>10} {'trained':>10} {'change':>11} {'best (epoch ' + str(best['epoch']) + ')':>18}"]
    rows += [f"{k[5:]:<32} {cell(k, base[k]):>10} {cell(k, final[k]):>10} {change(k):>11} {cell(k, best[k]):>18}"
             for k in keys]
    return "\n".join(rows)
