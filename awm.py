"""AWM, Advantage Weighted Matching: policy gradient with the flow-matching loss as the log-likelihood.

Rollouts (any solver, the ODE by default) keep only the final latents x0; rewards become group advantages.
Training re-noises x0 at per-sample timesteps and uses logp = -w(mean_d (v_theta - u)^2, sigma), u = eps - x0, in
a PPO-clipped ratio against the weights at the start of the epoch, plus a KL to an EMA anchor; CFG-free training.
Paper: Advantage Weighted Matching (arXiv 2509.25050). Math: docs/awm.md, docs/algorithms.md F.

    python awm.py                                              # embedded shapes world + model on a CPU
    python awm.py --model flux1 --tiny                         # tiny random FLUX.1 on a CPU, no downloads
    accelerate launch awm.py --model flux1 --reward pickscore  # FLUX.1-dev, LoRA, PickScore
    accelerate launch --multi_gpu --num_processes 8 awm.py --model flux1 --dataset data/my_prompts
"""
import os
from dataclasses import dataclass
from typing import Literal

import torch

from common import checks, plan, timesteps
from common.args import RunArgs
from common.cli import parse_with_presets
from common.ema import EMA, Schedule
from common.errors import ConfigError
from common.launch import errors_as_one_line
from common.run import Run
from common.tracking import TrainStats

SCRIPT = os.path.basename(__file__)  # recorded in checkpoints: a resume by another algorithm is refused


@dataclass
class Args(RunArgs):  # the flags every script shares: common/args.py
    exp_name: str = "awm"
    output_dir: str = "runs/awm"
    # ALGO LOGIC: AWM's own flags and defaults
    gradient_steps_per_epoch: int = 2
    """G, optimizer steps per inner epoch (the ratio leaves 1 from the 2nd: old policy = start of the epoch)"""
    clip_range: float = 1.0
    """PPO clip epsilon on the per-sample ratio"""
    adv_clip: float = 5.0
    """advantages are clipped to +-adv_clip, then divided by adv_clip (into [-1, 1])"""
    kl_beta: float = 0.0
    """weight of the v-space KL mean (v_theta - v_ref)^2 to the reference model (0: off, no reference)"""
    num_train_timesteps: int = 4
    """T, training timesteps per sample (0: max(1, int(num_steps * (hi - lo))))"""
    time_sampler: Literal["uniform", "logit_normal", "discrete", "discrete_with_init", "discrete_wo_init"] = "discrete"
    """how the training timesteps are drawn, per sample (common/timesteps.py)"""
    timestep_range: tuple[float, float] = (0.0, 0.7)
    """(lo, hi) fractions along the denoising axis: training sigmas lie in [1 - hi, 1 - lo]"""
    time_shift: float = 3.0
    """shift applied to sigma by the uniform and logit_normal samplers (> 1 favours noisy timesteps)"""
    anchor_schedule: Schedule = "linear"
    """EMA decay schedule of the anchor of the EMA-KL, indexed by optimizer step (docs/algorithms.md E.6, F.4)"""
    anchor_decay: float = 0.3
    """the anchor's maximum EMA decay"""
    anchor_warmup_steps: int = 300
    """linear (and power, warmup_cosine): optimizer steps to reach the maximum decay"""
    awm_weighting: Literal["Uniform", "t", "t**2", "huber", "ghuber"] = "ghuber"
    """w(l, sigma) of logp = -w (docs/algorithms.md F.2)"""
    ghuber_power: float = 0.25
    """p of the ghuber weighting"""
    ema_kl_beta: float = 0.1
    """weight of the EMA-KL mean (v_theta - v_ema)^2 to the EMA anchor (0: off)"""


# each model's sampling settings are its adapter's `preset` (FLUX.1-dev's: the Args defaults); these add AWM's
# (FLUX.1-dev LoRA: ODE rollouts, T=4 discrete timesteps in the noisier 70%, ghuber 0.25, EMA-KL 0.1)
PRESETS = {
    # AWM on the shapes world with the rule-checked reward, on a CPU (docs/shapes.md)
    "shapes": dict(num_train_timesteps=4, timestep_range=(0.0, 0.9), num_epochs=30, eval_every=30, save_every=30),
    "flux1-kontext": dict(resolution=384),
    "sd3_5": dict(gradient_steps_per_epoch=1, num_steps=14, guidance_scale=1.0, num_train_timesteps=6,
                  time_sampler="discrete_wo_init", timestep_range=(0.0, 0.9), kl_beta=1e-4, ema_kl_beta=1.0),
    "flux2-klein": dict(time_sampler="discrete_wo_init"),
}
TINY = dict(clip_range=1e-4, anchor_warmup_steps=4)  # --tiny: a clip that acts, an anchor that moves in 2 epochs


# ALGO LOGIC: the AWM loss
def ppo_clip_loss(log_prob, old_log_prob, adv, clip_range):
    """PPO-clipped policy loss (docs/algorithms.md C.4); returns (loss, ratio)."""
    ratio = torch.exp(log_prob - old_log_prob)
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return torch.maximum(-adv * ratio, -adv * clipped).mean(), ratio


def awm_weight(ell, sigma, weighting, power=0.25):
    """w(l, sigma) of docs/algorithms.md F.2 (the "t" of the names is sigma in [0, 1]); increasing in l."""
    if weighting == "huber":
        return sigma * (torch.sqrt(ell + 1e-10) - 1e-5)
    if weighting == "ghuber":  # p = 1: "t"; p = 0.5: 2 x "huber"; small p damps large errors
        return sigma * ((ell + 1e-10) ** power - 1e-10**power) / power
    return {"Uniform": 1.0, "t": sigma, "t**2": sigma**2}[weighting] * ell


def awm_log_prob(v, u, sigma, weighting, power=0.25):
    """logp = -w(l, sigma) with l = mean_d (v - u)^2 in float64 (docs/algorithms.md F.2); (B,) float32."""
    ell = ((v.double() - u.double()) ** 2).flatten(1).mean(1)
    return -awm_weight(ell, sigma.double(), weighting, power).float()


def check_args(args):
    """This algorithm's flags, before anything loads (the shared ones: common/checks.py)."""
    checks.check_ranges(args, {"clip_range": (0, False), "anchor_decay": (0, 1)})  # first: every float flag finite
    timesteps.check_config(args.time_sampler, args.num_train_timesteps, args.timestep_range, args.time_shift)
    if args.ghuber_power <= 0:
        raise ConfigError(f"--ghuber-power must be > 0, got {args.ghuber_power}")


def main(args: Args):
    check_args(args)
    lo, hi = args.timestep_range  # Wan2.2-A14B: the experts that the training sigmas reach must train
    run = Run(args, SCRIPT, trained_sigmas=(1 - hi, 1 - lo), time_sampler=args.time_sampler)
    sigmas = run.sigmas
    n_train = timesteps.num_timesteps(args.num_train_timesteps, args.num_steps, args.timestep_range)  # T per sample
    grad_accum = run.n_batches // args.gradient_steps_per_epoch * n_train  # micro-steps per optimizer step
    timesteps.sample_sigmas(args.time_sampler, n_train, 1, sigmas.cpu(), args.timestep_range,
                            args.time_shift)  # a range without schedule steps: one line, before anything is written
    anchor = run.checkpointed_ema("anchor_ema", schedule=args.anchor_schedule, decay=args.anchor_decay,  # the EMA-KL's
                                  warmup_steps=args.anchor_warmup_steps)  # anchor, by optimizer step
    run.accelerator.print(f"***** AWM: {args.prompts_per_epoch} prompts x {args.group_size} images per epoch, "
                          f"{run.world} x {run.n_batches} batches of {args.batch_size}, T={n_train}, "
                          f"G={args.gradient_steps_per_epoch} *****")
    run.start()  # outputs, prompts encoded once, the base model evaluated

    for epoch in run.epochs():
        # ---- SAMPLING ----
        window = run.sde_window(epoch)
        samples = run.rollout(epoch, window, store=("x0",))  # only the final latent x0

        # ---- ADVANTAGES ----
        raw, advantages = run.advantages(samples, epoch)  # group-relative, over every process's samples

        # ---- TRAINING ----
        stats = TrainStats()
        epoch_start, start = run.global_step, EMA(run.params.values())  # theta, never stepped: the ratio's old policy
        for inner, b, s in run.train_batches(samples, epoch):
            x0, adv = s["x0"].float(), s["adv"] / args.adv_clip  # clamp(A, -5, 5) / 5
            gens = [run.generator("train", epoch, inner, g, m) for g, m in zip(s["group"], s["member"])]
            sig, eps = timesteps.sigmas_and_noise(args.time_sampler, n_train, x0.shape[1:], sigmas,  # T per sample,
                                                  args.timestep_range, args.time_shift, gens)  # fresh noise each
            sig, eps = sig.to(run.device), eps.to(run.device)
            z_t = torch.lerp(x0, eps, sig.view(*sig.shape, *[1] * (x0.dim() - 1)))  # (1 - sigma) x0 + sigma eps
            v_old, v_ema = [None] * n_train, [None] * n_train
            with torch.no_grad(), run.autocast():  # swapped weights before the backward; CFG-free
                if run.global_step > epoch_start or (inner == 0 and b == 0):  # else theta is still the snapshot
                    with start.swapped_in():
                        v_old = [run.velocity(z_t[j], sig[j], s["cond"], guided=False) for j in range(n_train)]
                if args.ema_kl_beta > 0:
                    with anchor.swapped_in():
                        v_ema = [run.velocity(z_t[j], sig[j], s["cond"], guided=False) for j in range(n_train)]
            for j in range(n_train):
                with run.accumulate(grad_accum):
                    with run.autocast():
                        v = run.velocity(z_t[j], sig[j], s["cond"], guided=False)
                    u, w = eps[j] - x0, (args.awm_weighting, args.ghuber_power)
                    log_prob = awm_log_prob(v, u, sig[j], *w)
                    old_log_prob = log_prob.detach() if v_old[j] is None else awm_log_prob(v_old[j], u, sig[j], *w)
                    policy_loss, ratio = ppo_clip_loss(log_prob, old_log_prob, adv, args.clip_range)
                    ema_kl = ((v - v_ema[j]) ** 2).mean() if args.ema_kl_beta > 0 else torch.zeros(())
                    loss, kl = policy_loss + args.ema_kl_beta * ema_kl, torch.zeros(())
                    if args.kl_beta > 0:
                        with torch.no_grad(), run.autocast():
                            v_ref = run.reference_velocity(z_t[j], sig[j], s["cond"], guided=False)
                        kl = ((v - v_ref) ** 2).mean()  # v-space: mean_b mean_d
                        loss = loss + args.kl_beta * kl
                    run.backward(loss)
                stats.add(loss=loss, policy_loss=policy_loss, kl=kl, ema_kl=ema_kl, ratio=ratio,
                          clipfrac=((ratio.detach() - 1).abs() > args.clip_range).float().mean(),
                          approx_kl=0.5 * ((log_prob.detach() - old_log_prob) ** 2).mean())
        anchor.step(run.global_step - 1)  # decay indexed by the last optimizer step (docs/algorithms.md F.4)

        # ---- LOGGING, EVALUATION, CHECKPOINT ----
        run.end_epoch(epoch, stats, raw, advantages, sde_window=window)
    run.finish()  # the EMA weights exported (lora/ or transformer/), the summary; every process ends


if __name__ == "__main__":
    args = parse_with_presets(Args, PRESETS, TINY)
    algorithm = plan.Algorithm("AWM", weight_copies=("EMA", "anchor", "epoch start"))  # what its memory plan counts
    with errors_as_one_line():  # a user error: one line (once per machine under accelerate launch), exit code 1
        if args.plan:  # the memory plan, built on the meta device: no weight loads
            print(plan.run_plan(args, algorithm))
        else:  # on a CUDA GPU, unset rollout and evaluation batches become the widest that fit
            main(plan.fit_batches(args, algorithm))
