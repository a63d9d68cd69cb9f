"""GRPO for flow-matching image generators (Flow-GRPO / DanceGRPO family).

Rollouts integrate the model's own schedule with a window of stochastic (SDE) steps that carry Gaussian
log-probs; rewards become group-relative advantages; the policy is trained with the PPO-clipped ratio of
the recomputed to the stored log-probs, optionally with a KL penalty to the reference model.
Papers: Flow-GRPO (arXiv 2505.05470), DanceGRPO (arXiv 2505.07818). Math: docs/grpo.md, docs/algorithms.md C.

    python grpo.py                                              # embedded shapes world + model on a CPU
    python grpo.py --model flux1 --tiny                         # tiny random FLUX.1 on a CPU, no downloads
    accelerate launch grpo.py --model flux1 --reward pickscore  # FLUX.1-dev, LoRA, PickScore
    accelerate launch --multi_gpu --num_processes 8 grpo.py --model flux1 --dataset data/my_prompts
"""
import os
from dataclasses import dataclass
from typing import Literal

import torch

from common import checks, plan, sampler
from common.args import RunArgs
from common.cli import parse_with_presets
from common.errors import ConfigError
from common.launch import errors_as_one_line
from common.run import Run
from common.tracking import TrainStats

SCRIPT = os.path.basename(__file__)  # recorded in checkpoints: a resume by another algorithm is refused


@dataclass
class Args(RunArgs):  # the flags every script shares: common/args.py
    exp_name: str = "grpo"
    output_dir: str = "runs/grpo"
    # ALGO LOGIC: GRPO's own flags and defaults
    dynamics: Literal["Flow-SDE", "Dance-SDE", "CPS"] = "Flow-SDE"
    """stochastic step inside the SDE window"""
    sde_window_size: int = 1
    """number of consecutive SDE (trained) steps per rollout"""
    gradient_steps_per_epoch: int = 2
    """G, optimizer steps per inner epoch (2: half on-policy, half off-policy)"""
    clip_range: float = 1e-4
    """PPO clip epsilon on the per-element ratio"""
    kl_type: Literal["x-based", "v-based"] = "x-based"
    """x-based: exact Gaussian transition KL; v-based: mean squared velocity difference"""


# each model's sampling settings are its adapter's `preset` (FLUX.1-dev's: the Args defaults); these add GRPO's
PRESETS = {
    # the embedded default: GRPO on the shapes world with the rule-checked reward, on a CPU (docs/shapes.md); a window
    # of 4 of the first 6 steps (issue 30: chosen on held-out training prompts, bench/shapes_levers.py)
    "shapes": dict(sde_window_size=4, sde_window_range=(0, 6), noise_level=0.8, clip_range=1e-3, num_epochs=200,
                   eval_every=50, save_every=50),
    "flux1-kontext": dict(resolution=384, noise_level=0.9),
    "sd3_5": dict(group_size=24, noise_level=0.8, sde_window_size=2, sde_window_range=(1, 6), ema_decay=0.99),
    **{m: dict(noise_level=1.0) for m in ("qwen-image", "qwen-image-edit-plus", "flux2")},
    "flux2-klein": dict(noise_level=0.5, sde_window_range=(1, 3)),
    # Wan (docs/video.md#recipes: eta 0.9, 10 steps): the window range 1-5 reaches both Wan2.2-A14B experts at shift 3
    # (high-noise steps 0-3, low-noise 4-9), so --train-experts both works; the 2.1 recipe keeps steps 1-3
    **{m: dict(noise_level=0.9, sde_window_range=(1, 6)) for m in ("wan2_t2v", "wan2_i2v")},
}
TINY = dict(sde_window_size=2, sde_window_range=(0, 4), clip_range=1e-3)  # --tiny: a window over all 4 steps


# ALGO LOGIC: the GRPO loss
def ppo_clip_loss(log_prob, old_log_prob, adv, clip_range):
    """PPO-clipped policy loss (docs/algorithms.md C.4); returns (loss, ratio)."""
    ratio = torch.exp(log_prob - old_log_prob)
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return torch.maximum(-adv * ratio, -adv * clipped).mean(), ratio


def kl_penalty(kl_type, v, v_ref, mean, mean_ref, std):
    """x-based: exact per-element KL of the two Gaussian transitions; v-based: mean (v - v_ref)^2."""
    dims = tuple(range(1, v.dim()))
    if kl_type == "v-based":
        return ((v - v_ref) ** 2).mean(dims).mean()
    return ((mean - mean_ref) ** 2 / (2 * std**2)).mean(dims).mean()


def check_args(args):
    """This algorithm's flags, before anything loads (the shared ones: common/checks.py)."""
    checks.check_ranges(args, {"clip_range": (0, False)})  # first: every float flag finite
    if args.noise_level <= 0:
        raise ConfigError("--noise-level must be > 0: GRPO needs stochastic steps")
    lo, hi = args.sde_window_range
    if args.dynamics == "CPS" and hi >= args.num_steps:  # CPS's std sigma_next sin(eta pi / 2) is 0 there
        raise ConfigError(f"--dynamics CPS: the last step (to sigma 0) is deterministic and has no log-prob; end "
                          f"--sde-window-range before it (e.g. --sde-window-range {lo} {args.num_steps - 1})")


def main(args: Args):
    check_args(args)
    lo, hi = args.sde_window_range  # Wan2.2-A14B: the experts of the steps the window may cover must train
    run = Run(args, SCRIPT, trained_steps=range(lo, min(hi, args.num_steps)))
    sigmas, n_train = run.sigmas, args.sde_window_size  # trained steps per sample
    grad_accum = run.n_batches // args.gradient_steps_per_epoch * n_train  # micro-steps per optimizer step
    run.accelerator.print(f"***** GRPO: {args.prompts_per_epoch} prompts x {args.group_size} images per epoch, "
                          f"{run.world} processes x {run.n_batches} batches of {args.batch_size}, {n_train} trained "
                          f"steps each, {args.gradient_steps_per_epoch} optimizer steps per inner epoch *****")
    run.start()  # outputs, prompts encoded once, the base model evaluated

    for epoch in run.epochs():
        # ---- SAMPLING ----
        window = run.sde_window(epoch)
        samples = run.rollout(epoch, window, store=("latents", "log_probs"))

        # ---- ADVANTAGES ----
        raw, advantages = run.advantages(samples, epoch)  # group-relative, over every process's samples

        # ---- TRAINING ----
        stats = TrainStats()
        for inner, b, s in run.train_batches(samples, epoch):
            for j in window:
                with run.accumulate(grad_accum):
                    with run.autocast():
                        z, z_next = s["latents"][j].float(), s["latents"][j + 1].float()
                        v = run.velocity(z, sigmas[j], s["cond"])
                        out = sampler.sde_step(z, v, sigmas[j], sigmas[j + 1], args.noise_level, args.dynamics,
                                               sigmas[1], z_next=z_next)
                    policy_loss, ratio = ppo_clip_loss(out.log_prob, s["log_probs"][j], s["adv"], args.clip_range)
                    loss, kl = policy_loss, torch.zeros(())
                    if args.kl_beta > 0:
                        with torch.no_grad(), run.autocast():
                            v_ref = run.reference_velocity(z, sigmas[j], s["cond"])
                            mean_ref, _ = sampler.step_mean_std(z, v_ref, sigmas[j], sigmas[j + 1], args.noise_level,
                                                                args.dynamics, sigmas[1])
                        kl = kl_penalty(args.kl_type, v, v_ref, out.mean, mean_ref, out.std)
                        loss = loss + args.kl_beta * kl
                    run.backward(loss)
                log_ratio = out.log_prob.detach() - s["log_probs"][j]
                stats.add(loss=loss, policy_loss=policy_loss, kl=kl, ratio=ratio,
                          clipfrac=((ratio.detach() - 1).abs() > args.clip_range).float().mean(),
                          approx_kl=0.5 * (log_ratio**2).mean())

        # ---- LOGGING, EVALUATION, CHECKPOINT ----
        run.end_epoch(epoch, stats, raw, advantages, sde_window=window)
    run.finish()  # the EMA weights exported (lora/ or transformer/), the summary; every process ends


if __name__ == "__main__":
    args = parse_with_presets(Args, PRESETS, TINY)
    algorithm = plan.Algorithm("GRPO", latents_per_sample=args.sde_window_size + 1)  # what its memory plan counts
    with errors_as_one_line():  # a user error: one line (once per machine under accelerate launch), exit code 1
        if args.plan:  # the memory plan, built on the meta device: no weight loads
            print(plan.run_plan(args, algorithm))
        else:  # on a CUDA GPU, unset rollout and evaluation batches become the widest that fit
            main(plan.fit_batches(args, algorithm))
