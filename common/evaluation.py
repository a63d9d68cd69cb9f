"""Held-out evaluation, the same in every algorithm script.

ODE sampling of the test prompts with per-prompt fixed noise (seed `eval_seed + row`), so every evaluation
of a run, and every run and process count, sees the same noise for the same prompt; rewards are gathered
over processes; rewards that define `eval_metrics` (the shapes checker: strict accuracy per category) add
theirs; a grid of 16 prompts spread over the split is saved under samples/, with each prompt's mean rewards
(`<tag>_prompts.json`: which prompts a run learns, and which it gives up on).
"""
import json
import os

import torch
from tqdm.auto import tqdm

from common import data, sampler, tracking
from common.args import height_width
from common.errors import writing


@torch.no_grad()
def evaluate(accelerator, adapter, conditioning, reward_set, items, args, epoch):
    """Returns ({"eval/...": value}, the grid's images, the grid's sound: (one (C, N) CPU waveform per grid sample,
    sample rate) for a model with sound (adapter.audio), else None). `conditioning`
    (common.conditioning.Conditioning) encodes the rows and shows them in the grid; args supplies eval_resolution,
    eval_num_frames, eval_num_steps, eval_batch_size, eval_seed, the guidance scales and output_dir. The caller picks
    the weights (EMA) and autocast."""
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    height, width = height_width(args.eval_resolution)
    state = adapter.make_state(height, width, args.eval_num_frames)
    sigmas = adapter.sigmas(args.eval_num_steps, state).to(device)  # on the device once, not a copy per step
    mine = data.rank_rows(len(items), rank, world)
    grid_ids = mine[:: max(1, len(mine) // 16)][:16]
    scores, images, tracks = {k: [] for k in reward_set.names}, [], []
    for start in tqdm(range(0, len(mine), args.eval_batch_size), desc="evaluation" if epoch < 0 else f"epoch {epoch} eval",
                      disable=not accelerator.is_local_main_process, leave=False):
        idx = mine[start:start + args.eval_batch_size]
        batch = [items[i] for i in idx]
        z = torch.cat([adapter.prepare_noise(1, height, width, torch.Generator().manual_seed(args.eval_seed + i),
                                             args.eval_num_frames) for i in idx])
        cond = conditioning.encode(batch, state)
        traj = sampler.rollout(lambda x, i: adapter.predict(x, sigmas[i], cond, state, args.guidance_scale,
                                                            args.true_cfg_scale), z, sigmas)
        imgs = adapter.decode(traj.final, state, cond)
        sound = (adapter.decode_audio(traj.final, state, cond), adapter.audio_sample_rate()) if adapter.audio else None
        for k, v in data.score(reward_set, batch, imgs, sound).items():
            scores[k].append(v)
        images += [img for i, img in zip(idx, conditioning.shown(batch, imgs.cpu())) if i in grid_ids]
        if sound is not None:
            tracks += [w.float().cpu() for i, w in zip(idx, sound[0]) if i in grid_ids]
    out, metadata, per_prompt = {}, [it.metadata for it in items], {}
    for k, v in scores.items():
        all_k = accelerator.gather(torch.cat(v).to(device)).cpu()[: len(items)]
        out[f"eval/reward_{k}"] = all_k.mean().item()
        per_prompt[k] = prompt_means(items, all_k.tolist())
        if hasattr(reward_set.rewards[k], "eval_metrics"):  # e.g. strict accuracy per category
            out.update({f"eval/{k}_{m}": x for m, x in reward_set.rewards[k].eval_metrics(all_k, metadata).items()})
    images, tag = images[:16], f"eval_epoch{epoch:04d}" if epoch >= 0 else "eval_base"
    audio = (tracks[:16], adapter.audio_sample_rate()) if adapter.audio else None
    if accelerator.is_main_process:
        tracking.save_samples(accelerator, os.path.join(args.output_dir, "samples"), tag, images,
                              [items[i].prompt for i in grid_ids], epoch, fps=adapter.frame_rate, audio=audio)
        path = os.path.join(args.output_dir, "samples", f"{tag}_prompts.json")
        with writing("the per-prompt evaluation", path), tracking.atomic_path(path) as tmp, open(tmp, "w") as f:
            json.dump(per_prompt, f, indent=1)
    return out, images, audio


def prompt_means(items, values):
    """{prompt: [mean value over its rows, rows]} in the order prompts first appear."""
    sums = {}
    for it, v in zip(items, values):
        total, n = sums.get(it.prompt, (0.0, 0))
        sums[it.prompt] = (total + v, n + 1)
    return {p: [total / n, n] for p, (total, n) in sums.items()}
