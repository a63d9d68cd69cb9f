"""DiffusionNFT: reinforcement on the forward (noising) process of a flow-matching image generator.

Rollouts (any solver, the ODE by default) keep only the final latents x0; rewards become group advantages
and an optimality weight r in [0, 1]. Training re-noises x0 at per-sample timesteps and regresses the implicit
policies v+ = beta v_theta + (1 - beta) v_old (weight r) and v- = (1 + beta) v_old - beta v_theta (weight 1 - r)
towards x0, v_old being an EMA "old" policy; no log-probs, CFG-free training forward.
Paper: DiffusionNFT (arXiv 2509.16117). Math: docs/nft.md, docs/algorithms.md E.

    python nft.py                                              # embedded shapes world + model on a CPU
    python nft.py --model flux1 --tiny                         # tiny random FLUX.1 on a CPU, no downloads
    accelerate launch nft.py --model flux1 --reward pickscore  # FLUX.1-dev, LoRA, PickScore
    accelerate launch --multi_gpu --num_processes 8 nft.py --model flux1 --dataset data/my_prompts
"""
import contextlib
import os
from dataclasses import dataclass
from typing import Literal

import torch

from common import checks, plan, timesteps
from common.args import RunArgs
from common.cli import parse_with_presets
from common.ema import Schedule
from common.errors import ConfigError
from common.launch import errors_as_one_line
from common.run import Run
from common.tracking import TrainStats

SCRIPT = os.path.basename(__file__)  # recorded in checkpoints: a resume by another algorithm is refused


@dataclass
class Args(RunArgs):  # the flags every script shares: common/args.py
    exp_name: str = "nft"
    output_dir: str = "runs/nft"
    # ALGO LOGIC: NFT's own flags and defaults
    adv_clip: float = 5.0
    """advantages are clipped to +-adv_clip, which is also C of the optimality weight r = A/C/2 + 1/2"""
    kl_beta: float = 1e-4
    """weight of the v-space KL mean (v_theta - v_ref)^2 to the reference model (0: off, no reference)"""
    off_policy: bool = True
    """sample rollouts with the old (EMA) policy instead of the current weights"""
    num_train_timesteps: int = 2
    """T, training timesteps per sample (0: max(1, int(num_steps * (hi - lo))))"""
    time_sampler: Literal["uniform", "logit_normal", "discrete", "discrete_with_init", "discrete_wo_init"] = "discrete"
    """how the training timesteps are drawn, per sample (common/timesteps.py)"""
    timestep_range: tuple[float, float] = (0.0, 0.7)
    """(lo, hi) fractions along the denoising axis: training sigmas lie in [1 - hi, 1 - lo]"""
    time_shift: float = 3.0
    """shift applied to sigma by the uniform and logit_normal samplers (> 1 favours noisy timesteps)"""
    old_schedule: Schedule = "piecewise_linear"
    """EMA decay schedule of the old policy, indexed by optimizer step (docs/algorithms.md E.6)"""
    old_decay: float = 0.5
    """the old policy's maximum EMA decay"""
    old_flat_steps: int = 0
    """piecewise_linear: optimizer steps with decay 0 (old policy = current weights)"""
    old_ramp_rate: float = 1e-3
    """piecewise_linear: decay increase per optimizer step"""
    nft_beta: float = 1.0
    """beta: how far the implicit positive/negative policies lie from the old policy"""


# each model's sampling settings are its adapter's `preset` (FLUX.1-dev's: the Args defaults); these add NFT's
# (FLUX.1-dev: ODE rollouts sampled with the old policy, T=2 discrete timesteps in the noisier 70%, beta 1)
PRESETS = {
    # NFT on the shapes world with the rule-checked reward, on a CPU (docs/shapes.md)
    "shapes": dict(num_train_timesteps=4, timestep_range=(0.0, 0.9), kl_beta=0.0, num_epochs=30, eval_every=30,
                   save_every=30),
    "flux1-kontext": dict(num_steps=20, eval_num_steps=28, timestep_range=(0.0, 0.9)),
    "sd3_5": dict(learning_rate=1e-4, num_steps=14, guidance_scale=1.0, num_train_timesteps=4,
                  timestep_range=(0.0, 0.5)),
    "z-image": dict(nft_beta=0.1, num_train_timesteps=3, timestep_range=(0.0, 0.99)),
    "qwen-image": dict(num_steps=30, eval_num_steps=40, learning_rate=2e-4, num_train_timesteps=10,
                       timestep_range=(0.0, 0.5)),
    "qwen-image-edit-plus": dict(resolution=512, eval_resolution=512, num_steps=30, true_cfg_scale=1.0,
                                 learning_rate=2e-4, num_train_timesteps=5),
    "flux2": dict(nft_beta=0.1, timestep_range=(0.0, 0.5)),
    "flux2-klein": dict(learning_rate=1e-4, nft_beta=0.1, timestep_range=(0.0, 0.5)),
}
TINY = dict(gradient_steps_per_epoch=2, old_ramp_rate=0.1)  # --tiny: the old policy leaves theta within 2 epochs


# ALGO LOGIC: the NFT loss
def optimality_weight(adv, adv_clip):
    """r = clamp(A_c / C / 2 + 1/2, 0, 1) with A_c = clamp(A, -C, C) (docs/algorithms.md E.2): -C -> 0, 0 -> 1/2,
    C -> 1."""
    return (adv.clamp(-adv_clip, adv_clip) / adv_clip / 2 + 0.5).clamp(0, 1)


def nft_loss(v, v_old, x0, z_t, sigma, r, beta, adv_clip):
    """L_NFT = C mean_b[(r L+ + (1 - r) L-) / beta] (docs/algorithms.md E.3), with the implicit policies
    v+ = beta v + (1 - beta) v_old and v- = (1 + beta) v_old - beta v, and the adaptive x0-space regression
    L = mean_d (x0_hat - x0)^2 / w, x0_hat = z_t - sigma v, w = max(mean_d |x0_hat - x0|, 1e-5) (fp64, detached)."""
    dims = tuple(range(1, x0.dim()))
    sigma = sigma.view(-1, *([1] * len(dims)))

    def regression(v_implicit):
        err = z_t - sigma * v_implicit - x0
        w = err.detach().double().abs().mean(dims).clamp_min(1e-5)
        return (err.double() ** 2).mean(dims) / w

    positive = regression(beta * v + (1 - beta) * v_old)
    negative = regression((1 + beta) * v_old - beta * v)
    return (adv_clip * (r * positive + (1 - r) * negative) / beta).mean().float()


def check_args(args):
    """This algorithm's flags, before anything loads (the shared ones: common/checks.py)."""
    checks.check_ranges(args, {"old_decay": (0, 1)})  # first: every float flag finite
    timesteps.check_config(args.time_sampler, args.num_train_timesteps, args.timestep_range, args.time_shift)
    if args.nft_beta <= 0:
        raise ConfigError(f"--nft-beta must be > 0, got {args.nft_beta}")


def main(args: Args):
    check_args(args)
    lo, hi = args.timestep_range  # Wan2.2-A14B: the experts that the training sigmas reach must train
    run = Run(args, SCRIPT, trained_sigmas=(1 - hi, 1 - lo), time_sampler=args.time_sampler)
    sigmas = run.sigmas
    n_train = timesteps.num_timesteps(args.num_train_timesteps, args.num_steps, args.timestep_range)  # T per sample
    grad_accum = run.n_batches // args.gradient_steps_per_epoch * n_train  # micro-steps per optimizer step
    timesteps.sample_sigmas(args.time_sampler, n_train, 1, sigmas.cpu(), args.timestep_range,
                            args.time_shift)  # a range without schedule steps: one line, before anything is written
    old = run.checkpointed_ema("old_ema", schedule=args.old_schedule, decay=args.old_decay,  # the old policy, an EMA
                               flat_steps=args.old_flat_steps, ramp_rate=args.old_ramp_rate)  # by optimizer step
    run.accelerator.print(f"***** NFT: {args.prompts_per_epoch} prompts x {args.group_size} images per epoch, "
                          f"{run.world} x {run.n_batches} batches of {args.batch_size}, T={n_train}, "
                          f"G={args.gradient_steps_per_epoch} *****")
    run.start()  # outputs, prompts encoded once, the base model evaluated

    for epoch in run.epochs():
        # ---- SAMPLING ----
        window = run.sde_window(epoch)
        with old.swapped_in() if args.off_policy else contextlib.nullcontext():  # rollouts by the old policy
            samples = run.rollout(epoch, window, store=("x0",))  # only the final latent x0

        # ---- ADVANTAGES ----
        raw, advantages = run.advantages(samples, epoch)  # group-relative, over every process's samples

        # ---- TRAINING ----
        stats = TrainStats()
        for inner, b, s in run.train_batches(samples, epoch):
            x0, r = s["x0"].float(), optimality_weight(s["adv"], args.adv_clip)
            gens = [run.generator("train", epoch, inner, g, m) for g, m in zip(s["group"], s["member"])]
            sig, eps = timesteps.sigmas_and_noise(args.time_sampler, n_train, x0.shape[1:], sigmas,  # T per sample,
                                                  args.timestep_range, args.time_shift, gens)  # fresh noise each
            sig, eps = sig.to(run.device), eps.to(run.device)
            z_t = torch.lerp(x0, eps, sig.view(*sig.shape, *[1] * (x0.dim() - 1)))  # (1 - sigma) x0 + sigma eps
            with torch.no_grad(), run.autocast(), old.swapped_in():  # CFG-free, as in training
                v_old = [run.velocity(z_t[j], sig[j], s["cond"], guided=False) for j in range(n_train)]
            for j in range(n_train):
                with run.accumulate(grad_accum):
                    with run.autocast():
                        v = run.velocity(z_t[j], sig[j], s["cond"], guided=False)
                    policy_loss = nft_loss(v, v_old[j], x0, z_t[j], sig[j], r, args.nft_beta, args.adv_clip)
                    loss, kl = policy_loss, torch.zeros(())
                    if args.kl_beta > 0:
                        with torch.no_grad(), run.autocast():
                            v_ref = run.reference_velocity(z_t[j], sig[j], s["cond"], guided=False)
                        kl = ((v - v_ref) ** 2).mean()  # v-space: mean_b mean_d
                        loss = loss + args.kl_beta * kl
                    run.backward(loss)
                # diagnostic only: theta vs theta_old under AWM's Uniform log-prob -mean_d (v - u)^2
                log_ratio = ((v_old[j] - eps[j] + x0) ** 2 - (v.detach() - eps[j] + x0) ** 2).flatten(1).mean(1)
                stats.add(loss=loss, policy_loss=policy_loss, kl=kl, ratio=log_ratio.exp())
        old.step(run.global_step - 1)  # theta_old <- d theta_old + (1 - d) theta, d by the last optimizer step

        # ---- LOGGING, EVALUATION, CHECKPOINT ----
        run.end_epoch(epoch, stats, raw, advantages, sde_window=window)
    run.finish()  # the EMA weights exported (lora/ or transformer/), the summary; every process ends


if __name__ == "__main__":
    args = parse_with_presets(Args, PRESETS, TINY)
    algorithm = plan.Algorithm("NFT", weight_copies=("EMA", "old policy"))  # what its memory plan counts
    with errors_as_one_line():  # a user error: one line (once per machine under accelerate launch), exit code 1
        if args.plan:  # the memory plan, built on the meta device: no weight loads
            print(plan.run_plan(args, algorithm))
        else:  # on a CUDA GPU, unset rollout and evaluation batches become the widest that fit
            main(plan.fit_batches(args, algorithm))
