"""Pretrain the embedded shapes model: a small FLUX.1-architecture pipeline trained on the shapes world.

Three stages, deterministic by seed (python scripts/pretrain_shapes.py --help; about 55 minutes on 2 cores):
  vae     an AutoencoderKL (x8, 16 latent channels, as FLUX.1's) trained to reconstruct world renders;
          its scaling/shift factors are then set from the latent statistics, as for the real VAE.
  flow    a FluxTransformer2DModel trained by rectified flow on VAE latents of world renders, conditioned
          on frozen random CLIP/T5 text encoders (word-level tokenizers built in code), with 10% condition
          dropout (empty prompt) so that true CFG works; constant learning rate; saves <work>/flow.
  anneal  from the flow stage's EMA weights: a fresh optimizer, new renders (seed + 1) and a learning rate
          that decays to 0. Stopped short of perfect on purpose (docs/shapes.md, issue 3).
The result is saved with FluxPipeline.save_pretrained and loads through the ordinary flux1 adapter:
    python grpo.py --model flux1 --model-path models/shapes-flux
"""
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rewards import shapes_world as shapes  # noqa: E402
from common.models import tiny_parts  # noqa: E402
from common.models.flux1 import SCHEDULER_CONFIG  # noqa: E402


@dataclass
class Args:
    stage: Literal["vae", "flow", "anneal", "all"] = "all"
    """which stage to run (each needs the previous stage's output in <work>)"""
    out: str = "models/shapes-flux"
    """output folder of the diffusers pipeline (written by the anneal stage)"""
    work: str = "models/.shapes-work"
    """scratch folder for the stage outputs"""
    seed: int = 0
    """seed of data and initialisation"""
    threads: int = 2
    """torch CPU threads"""
    vae_steps: int = 1200
    """VAE optimizer steps"""
    vae_batch: int = 32
    """VAE batch size"""
    vae_lr: float = 2e-3
    """VAE peak learning rate (cosine decay)"""
    flow_steps: int = 5000
    """flow-stage optimizer steps (base strict accuracy after the anneal: 18%, deliberately short of perfect)"""
    flow_batch: int = 128
    """transformer batch size (both stages)"""
    flow_lr: float = 5e-4
    """flow-stage learning rate (200 warm-up steps, then constant)"""
    ema_decay: float = 0.999
    """flow-stage EMA of the transformer weights, which is what the stage saves"""
    anneal_steps: int = 1000
    """anneal-stage optimizer steps"""
    anneal_lr: float = 3e-4
    """anneal-stage peak learning rate: 200 warm-up steps, then linear decay to 0 over the last 800"""
    anneal_ema_decay: float = 0.99
    """anneal-stage EMA decay (short: the learning rate already goes to 0)"""
    cond_dropout: float = 0.1
    """fraction of training samples with the empty prompt (enables CFG)"""
    num_latents: int = 60_000
    """world renders encoded once for the flow stage"""
    snapshot_every: int = 0
    """also save the EMA pipeline every this many steps under <work>/flow-<step> (0: off), to pick a
    step count; a run with --flow-steps N reproduces snapshot N (constant learning rate after warm-up)"""


def world_batch(rng, n, metas):
    """n renders of uniformly drawn prompts -> (n,3,64,64) in [-1,1] and their metadata."""
    picks = [metas[i] for i in rng.integers(0, len(metas), n)]
    imgs = np.stack([shapes.render(m, rng) for m in picks])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1, picks


def build_vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32),
                         layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=64,
                         use_quant_conv=False, use_post_quant_conv=False)


def train_vae(args):
    rng, metas = np.random.default_rng(args.seed), shapes.all_prompts()
    vae = build_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(args.vae_steps):
        for g in opt.param_groups:
            g["lr"] = args.vae_lr * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps))
        x, _ = world_batch(rng, args.vae_batch, metas)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = ((rec - x) ** 2).mean() + 0.5 * (rec - x).abs().mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            print(f"vae step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    vae.eval()
    with torch.no_grad():  # normalise latents to zero mean, unit std, as FLUX.1's factors do
        x, _ = world_batch(np.random.default_rng(args.seed + 1), 512, metas)
        z = vae.encode(x).latent_dist.mode()
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1 / z.std().item())
    vae.save_pretrained(os.path.join(args.work, "vae"))
    return vae


def build_pipeline(vae):
    """The shipped pipeline: FLUX.1 components at toy size; text encoders frozen at random init."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    # word-level tokenizers over the world's 22 words (other text still tokenizes, byte by byte): prompts are
    # 9 T5 tokens instead of 31 bytes, so a training step takes half as long (0.42 s against 0.84 s)
    tok, tok2 = tiny_parts.clip_tokenizer(words=shapes.vocabulary()), tiny_parts.t5_tokenizer(words=shapes.vocabulary())
    te, te2 = tiny_parts.clip_text_encoder(tok, 32), tiny_parts.t5_encoder(tok2, 64)
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                                pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(8, 12, 12))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae, text_encoder=te,
                        tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2,
                        transformer=tr, image_encoder=None, feature_extractor=None)


MAX_SEQ = 16  # T5 tokens: the longest world prompt is 8 words, 9 tokens with its end token


def train_flow(args, steps, lr, decay_steps, ema_decay, seed, init, out):
    """Rectified flow on fresh world renders (seed) from `init` (a pipeline folder) or random weights; the
    learning rate warms up over 200 steps and decays linearly to 0 over the last `decay_steps`."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    vae = AutoencoderKL.from_pretrained(os.path.join(args.work, "vae")).eval()
    pipe = build_pipeline(vae)
    metas = shapes.all_prompts()
    prompts = [m["prompt"] for m in metas] + [""]
    with torch.no_grad():  # every prompt of the world, and the empty one, encoded once
        emb, pooled, _ = pipe.encode_prompt(prompts, max_sequence_length=MAX_SEQ)
        rng = np.random.default_rng(seed + 2)
        lat, pidx = [], []
        for _ in range(args.num_latents // 500):
            idx = rng.integers(0, len(metas), 500)
            x = torch.from_numpy(np.stack([shapes.render(metas[i], rng) for i in idx])).permute(0, 3, 1, 2)
            z = vae.encode(x.float() / 127.5 - 1).latent_dist.mode()
            z = (z - vae.config.shift_factor) * vae.config.scaling_factor
            lat.append(pipe._pack_latents(z, len(idx), 16, 8, 8))
            pidx.append(torch.from_numpy(idx))
        lat, pidx = torch.cat(lat), torch.cat(pidx)
    print(f"encoded {len(lat)} latents, std {lat.std():.3f}", flush=True)
    if init:
        pipe.transformer.load_state_dict(FluxTransformer2DModel.from_pretrained(os.path.join(init, "transformer")).state_dict())
    tr = pipe.transformer.train()
    ema = [p.detach().clone() for p in tr.parameters()]
    opt = torch.optim.AdamW(tr.parameters(), lr=lr, weight_decay=0.0)
    assert max(len(pipe.tokenizer_2(p).input_ids) for p in prompts) <= MAX_SEQ
    img_ids = pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
    txt_ids = torch.zeros(MAX_SEQ, 3)
    g = torch.Generator().manual_seed(seed + 3)
    t0 = time.time()
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr * min(1.0, (step + 1) / 200, (steps - step) / max(1, decay_steps))
        i = torch.randint(0, len(lat), (args.flow_batch,), generator=g)
        x0, p = lat[i], pidx[i].clone()
        p[torch.rand(len(p), generator=g) < args.cond_dropout] = len(metas)  # empty prompt
        eps = torch.randn(x0.shape, generator=g)
        sigma = torch.sigmoid(torch.randn(len(x0), generator=g))  # logit-normal(0, 1)
        zt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * eps
        v = tr(hidden_states=zt, timestep=sigma, guidance=None, pooled_projections=pooled[p],
               encoder_hidden_states=emb[p], txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        loss = ((v - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for e, q in zip(ema, tr.parameters()):
                e.mul_(d).add_(q.detach(), alpha=1 - d)
        if step % 100 == 0 or step == steps - 1:
            print(f"flow step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        if args.snapshot_every and (step + 1) % args.snapshot_every == 0:
            save_ema(pipe, ema, os.path.join(args.work, f"flow-{step + 1}"))
    save_ema(pipe, ema, out)


def save_ema(pipe, ema, folder):
    """Save the pipeline with the EMA transformer weights, keeping the live weights for training."""
    tr = pipe.transformer
    live = [q.detach().clone() for q in tr.parameters()]
    with torch.no_grad():
        for e, q in zip(ema, tr.parameters()):
            q.copy_(e)
    pipe.save_pretrained(folder, safe_serialization=True)
    with torch.no_grad():
        for v, q in zip(live, tr.parameters()):
            q.copy_(v)
    print(f"saved {folder}", flush=True)


if __name__ == "__main__":
    a = tyro.cli(Args)
    flow_out = os.path.join(a.work, "flow")
    # a stage run alone needs the previous stage's output: say so in one line before any work is done
    needs = {"flow": os.path.join(a.work, "vae"), "anneal": flow_out}.get(a.stage)
    if needs and not os.path.isdir(needs):
        sys.exit(f"error: --stage {a.stage} needs {needs} (run the previous stage first, or --stage all)")
    if min(a.vae_steps, a.flow_steps) < 1 or a.anneal_steps <= 200:
        sys.exit("error: --vae-steps and --flow-steps must be >= 1 and --anneal-steps > 200 (its warm-up)")
    torch.set_num_threads(a.threads)
    os.makedirs(a.work, exist_ok=True)
    if a.stage in ("vae", "all"):
        train_vae(a)
    if a.stage in ("flow", "all"):
        train_flow(a, a.flow_steps, a.flow_lr, 0, a.ema_decay, a.seed, None, flow_out)
    if a.stage in ("anneal", "all"):
        train_flow(a, a.anneal_steps, a.anneal_lr, a.anneal_steps - 200, a.anneal_ema_decay, a.seed + 1, flow_out, a.out)
