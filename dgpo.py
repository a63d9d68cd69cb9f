"""DGPO, Direct Group Preference Optimization: DPO between the better and the worse half of each group.

Rollouts (the ODE by default) keep only the final latents x0; rewards become group advantages A. Training re-noises
a group's K images with one shared noise at T timesteps shared by every group, takes each image's flow-matching
error e_i = mean_d (u_i - v_theta)^2 (u = eps - x0, CFG-free) and a reference error e_ref_i, and descends
L = mean_i w_g A_c,i e_i with the detached group weight w_g = sigmoid((beta/K) sum_{i in g} A_c,i (e_i - e_ref_i)):
the gradient of the group DPO loss -log sigmoid(-(beta/K) sum A_c (e - e_ref)), divided by beta. A PPO-style mask
stops the images whose error already moved past the clip range against a fast EMA `ema_ref`.
Paper: DGPO (arXiv 2510.08425). Math: docs/dgpo.md.

    python dgpo.py                                              # embedded shapes world + model on a CPU
    python dgpo.py --model flux1 --tiny                         # tiny random FLUX.1 on a CPU, no downloads
    accelerate launch dgpo.py --model flux1 --reward pickscore  # FLUX.1-dev, LoRA, PickScore
    accelerate launch --multi_gpu --num_processes 8 dgpo.py --model flux1 --dataset data/my_prompts
"""
import math
import os
from dataclasses import dataclass
from typing import Literal

import torch

from common import checks, plan, sampler, timesteps
from common.args import RunArgs
from common.cli import parse_with_presets
from common.errors import ConfigError
from common.launch import errors_as_one_line
from common.run import Run
from common.tracking import TrainStats

SCRIPT = os.path.basename(__file__)  # recorded in checkpoints: a resume by another algorithm is refused


@dataclass
class Args(RunArgs):  # the flags every script shares: common/args.py
    exp_name: str = "dgpo"
    output_dir: str = "runs/dgpo"
    # ALGO LOGIC: DGPO's own flags and defaults
    dpo_beta: float = 100.0
    """beta of the group DPO loss: w_g = sigmoid((beta/K) sum_{i in g} A_c,i (e_i - e_ref_i))"""
    kl_beta: float = 0.0
    """weight of the v-space KL mean (v_theta - v_ref)^2 to the frozen reference model (0: off)"""
    num_train_timesteps: int = 4
    """T, training timesteps per inner epoch, shared by every group and process (0: max(1, int(N (hi - lo))))"""
    time_sampler: Literal["uniform", "logit_normal", "discrete", "discrete_with_init", "discrete_wo_init"] = "discrete"
    """how the T training timesteps are drawn, once per inner epoch (common/timesteps.py)"""
    timestep_range: tuple[float, float] = (0.0, 0.6)
    """(lo, hi) fractions along the denoising axis: training sigmas lie in [1 - hi, 1 - lo]"""
    time_shift: float = 3.0
    """shift applied to sigma by the uniform and logit_normal samplers (> 1 favours noisy timesteps)"""
    clip_dsm: bool = True
    """PPO-style mask: no gradient through e_i where A > 0 and rho > 1 + clip, or A <= 0 and rho < 1 - clip, with
    rho = exp(e_old - e) against ema_ref"""
    clip_range: float = 1e-2
    """the mask's clip epsilon"""
    use_ema_ref: bool = False
    """the reference of w_g is ema_ref (a fast EMA of the trained weights) instead of the frozen model"""
    ema_ref_decay: float = 0.3
    """ema_ref's maximum decay; its decay is min(ema_ref_decay, ema_ref_ramp_rate * optimizer step)"""
    ema_ref_ramp_rate: float = 1e-3
    """ema_ref's decay increase per optimizer step (0 at step 0: a copy of the weights)"""


# each model's sampling settings are its adapter's `preset` (FLUX.1-dev's: the Args defaults); these add DGPO's
# (ODE rollouts, T=4 discrete timesteps in the noisier 60%, beta 100, clip 1e-2, one optimizer step per epoch)
PRESETS = {
    # DGPO on the shapes world with the rule-checked reward, on a CPU (README); lr 5e-5 (training reward; docs/dgpo.md);
    # no mask: ema_ref's decay stays <= 0.1 over 100 optimizer steps, rho within 1 +- 1e-4, the mask never fired
    "shapes": dict(learning_rate=5e-5, clip_dsm=False, num_epochs=30, eval_every=30, save_every=30),
    "sd3_5": dict(kl_beta=1e-3),  # the SD3.5 recipes of the authors' code and Flow-Factory's example: KL 1e-3
}
TINY = dict(gradient_steps_per_epoch=2, num_train_timesteps=2)  # --tiny: 2 optimizer steps per epoch, 2 timesteps


# ALGO LOGIC: the DGPO loss
def dsm_error(v, u):
    """e = mean_d (u - v)^2 per sample, in float64: (B,)."""
    return ((v.double() - u.double()) ** 2).flatten(1).mean(1)


def group_margin(adv_c, e, e_ref):
    """sum_i A_c,i (e_i - e_ref_i) over some of a group's members (partial sums of its chunks add up)."""
    return (adv_c.double() * (e - e_ref)).sum()


def group_weight(margin, group_size, dpo_beta):
    """w_g = sigmoid((beta / K) margin), detached: 1/2 while theta = reference."""
    return torch.sigmoid(dpo_beta / group_size * margin).detach()


def clip_mask(e, e_old, adv_c, clip_range):
    """(keep, rho) with rho = exp(e_old - e): e_i keeps its gradient unless (A > 0 and rho > 1 + clip) or (A <= 0 and
    rho < 1 - clip), i.e. unless its error already moved past the clip range in the direction A pushes it."""
    rho = torch.exp(e_old - e)
    drop = ((adv_c > 0) & (rho > 1 + clip_range)) | ((adv_c <= 0) & (rho < 1 - clip_range))
    return ~drop, rho


def dgpo_loss(e, keep, w, adv_c, share):
    """share * sum_i w A_c,i e_i over a chunk of the group (share = chunks / K: the chunks' micro-steps add up to the
    group mean), e_i detached where the mask drops it."""
    return (share * w * adv_c.double() * torch.where(keep, e, e.detach())).sum().float()


def rows(cond, n):
    """The first n rows of a batch-first conditioning dict (every row of a group's is the same prompt)."""
    return {k: v[:n] if torch.is_tensor(v) else v for k, v in cond.items()}


def check_args(args):
    """This algorithm's flags, before anything loads (the shared ones: common/checks.py)."""
    checks.check_ranges(args, {"clip_range": (0, False), "ema_ref_decay": (0, 1), "ema_ref_ramp_rate": (0, True)})
    timesteps.check_config(args.time_sampler, args.num_train_timesteps, args.timestep_range, args.time_shift)
    if args.dpo_beta <= 0:
        raise ConfigError(f"--dpo-beta must be > 0, got {args.dpo_beta}")


def main(args: Args):
    check_args(args)
    lo, hi = args.timestep_range  # Wan2.2-A14B: the experts that the training sigmas reach must train
    run = Run(args, SCRIPT, trained_sigmas=(1 - hi, 1 - lo), time_sampler=args.time_sampler,
              reference=not args.use_ema_ref, whole_groups=True)  # each process holds M/W whole groups
    K, n_groups = args.group_size, args.prompts_per_epoch // run.world  # groups per process
    if n_groups % args.gradient_steps_per_epoch:
        raise ConfigError(f"{n_groups} groups per process do not split into --gradient-steps-per-epoch "
                          f"{args.gradient_steps_per_epoch} equal steps (optimizer steps fall between groups)")
    n_train = timesteps.num_timesteps(args.num_train_timesteps, args.num_steps, args.timestep_range)  # T
    chunks = sampler.micro_batches(K, args.batch_size)  # a group's members, --batch-size rows per forward
    grad_accum = n_groups // args.gradient_steps_per_epoch * n_train * len(chunks)  # micro-steps per optimizer step
    timesteps.sample_sigmas(args.time_sampler, n_train, 1, run.sigmas.cpu(), args.timestep_range,
                            args.time_shift)  # a range without schedule steps: one line, before anything is written
    keep_ema_ref = args.clip_dsm or args.use_ema_ref  # ema_ref's decay: min(0.3, 1e-3 optimizer step)
    ema_ref = run.checkpointed_ema("ema_ref", schedule="piecewise_linear", decay=args.ema_ref_decay,
                                   ramp_rate=args.ema_ref_ramp_rate) if keep_ema_ref else None
    run.accelerator.print(f"***** DGPO: {args.prompts_per_epoch} prompts x {K} images per epoch, {run.world} x "
                          f"{n_groups} groups in {len(chunks)} chunks of <= {args.batch_size}, T={n_train}, "
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
        groups = [dict(g, cond=run.encode([g["item"]] * min(K, args.batch_size)))  # a chunk's rows of the prompt
                  for g in run.by_group(samples, ("x0", "adv"))]
        sigs = [timesteps.sample_sigmas(args.time_sampler, n_train, 1, run.sigmas, args.timestep_range, args.time_shift,
                                        generator=run.generator("dgpo-t", epoch, inner))[:, 0].to(run.device)
                for inner in range(args.num_inner_epochs)]  # T sigmas per inner epoch, the same for every group
        for inner, b, s in run.train_batches(groups, epoch):
            x0, adv = s["x0"].float(), s["adv"].clamp(-args.adv_clip, args.adv_clip)
            for j, sigma in enumerate(sigs[inner]):
                eps = torch.randn(x0.shape[1:], generator=run.generator("dgpo", epoch, inner, s["group"], j))
                eps = eps.to(run.device).expand_as(x0)  # one noise for the whole group
                z_t, u = torch.lerp(x0, eps, sigma), eps - x0  # (1 - sigma) x0 + sigma eps; the target
                inputs = [(z_t[c], sigma.expand(c.stop - c.start), rows(s["cond"], c.stop - c.start)) for c in chunks]
                with torch.no_grad(), run.autocast():  # the members' errors before any backward; CFG-free forwards
                    e = None if len(chunks) == 1 else torch.cat([dsm_error(run.velocity(*x, guided=False), u[c])
                                                                 for x, c in zip(inputs, chunks)])  # 1 chunk: below
                    v_ref = ([run.reference_velocity(*x, guided=False) for x in inputs]
                             if not args.use_ema_ref or args.kl_beta > 0 else None)
                    e_old = None
                    if ema_ref is not None:
                        with ema_ref.swapped_in():
                            e_old = torch.cat([dsm_error(run.velocity(*x, guided=False), u[c])
                                               for x, c in zip(inputs, chunks)])
                e_ref = e_old if args.use_ema_ref else torch.cat([dsm_error(v, u[c]) for v, c in zip(v_ref, chunks)])
                for k, (x, c) in enumerate(zip(inputs, chunks)):
                    steps = run.global_step
                    with run.accumulate(grad_accum):
                        with run.autocast():
                            v = run.velocity(*x, guided=False)
                        e_c = dsm_error(v, u[c])
                        if k == 0:  # w_g and the mask from every member's error at these weights (1 chunk: e_c's)
                            e = e_c.detach() if e is None else e
                            margin = sum(group_margin(adv[i], e[i], e_ref[i]) for i in chunks)  # partial sums
                            w = group_weight(margin, K, args.dpo_beta)
                            keep, rho = clip_mask(e, e if e_old is None else e_old, adv,  # no mask: all keep
                                                  args.clip_range if args.clip_dsm else math.inf)
                        policy_loss = dgpo_loss(e_c, keep[c], w, adv[c], len(chunks) / K)
                        loss, kl = policy_loss, torch.zeros(())
                        if args.kl_beta > 0:  # v-space: mean_d, summed over the chunk with the loss's share
                            kl = ((v - v_ref[k]) ** 2).flatten(1).mean(1).sum() * len(chunks) / K
                            loss = loss + args.kl_beta * kl
                        run.backward(loss)
                    if ema_ref is not None and run.global_step > steps:  # after every optimizer step
                        ema_ref.step(run.global_step - 1)  # decay min(0.3, 1e-3 step): 0 at step 0, a copy
                    stats.add(loss=loss, policy_loss=policy_loss, kl=kl, group_weight=w,
                              clipfrac=(~keep[c]).float().mean(), **({} if e_old is None else {"ratio": rho[c]}))

        # ---- LOGGING, EVALUATION, CHECKPOINT ----
        run.end_epoch(epoch, stats, raw, advantages, sde_window=window)
    run.finish()  # the EMA weights exported (lora/ or transformer/), the summary; every process ends


if __name__ == "__main__":
    args = parse_with_presets(Args, PRESETS, TINY)
    algorithm = plan.Algorithm("DGPO", weight_copies=("EMA", "ema_ref")[:1 + (args.clip_dsm or args.use_ema_ref)],
                               reference=not args.use_ema_ref)
    with errors_as_one_line():  # a user error: one line (once per machine under accelerate launch), exit code 1
        if args.plan:  # the memory plan, built on the meta device: no weight loads
            print(plan.run_plan(args, algorithm))
        else:  # on a CUDA GPU, unset rollout and evaluation batches become the widest that fit
            main(plan.fit_batches(args, algorithm))
