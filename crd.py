"""CRD, Centered Reward Distillation: regress the policy's implicit reward onto the external reward, both centered
within each prompt's group.

Rollouts (the ODE by default, by the current weights or a lagging "sampling" EMA) keep only the final latents x0;
rewards become group advantages A and a weight a = clamp(A_c / C / 2 + 1/2, 0, 1). Training re-noises x0 at T
timesteps shared by the group and takes the implicit reward r_theta = -mean_d[(v_theta - u)^2 / w_theta -
(v_old - u)^2 / w_old] (u = eps - x0, adaptive weights w = max(mean_d |v - u|, 1e-5), detached, CFG-free) against an
EMA "old" snapshot; both rewards are centered within the group (which cancels the prompt's normaliser) and matched:
C/beta mean((beta R^theta_c - R_c)^2), plus a reward-adaptive v-space KL to the guided reference model.
Paper: CRD (arXiv 2603.14128). Math: docs/crd.md.

    python crd.py                                              # embedded shapes world + model on a CPU
    python crd.py --model flux1 --tiny                         # tiny random FLUX.1 on a CPU, no downloads
    accelerate launch crd.py --model flux1 --reward pickscore  # FLUX.1-dev, LoRA, PickScore
    accelerate launch --multi_gpu --num_processes 8 crd.py --model flux1 --dataset data/my_prompts
"""
import contextlib
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

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
    exp_name: str = "crd"
    output_dir: str = "runs/crd"
    # ALGO LOGIC: CRD's own flags and defaults
    crd_beta: float = 1.0
    """beta: the policy's centered implicit reward is matched to R_c / beta (larger: a smaller step from old)"""
    crd_loss: Literal["mse", "bce"] = "mse"
    """mse: C/beta mean((beta R^theta_c - R_c)^2); bce: C/beta BCE(logits beta R^theta_c, target sigmoid(R_c))"""
    adv_clip: float = 5.0
    """advantages are clipped to +-adv_clip, which is also C of the reward weight a = A_c/C/2 + 1/2 and the loss"""
    kl_beta: float = 0.1
    """weight of the v-space KL mean_d (v_theta - v_ref)^2 to the reference model (0: off, no reference)"""
    reward_adaptive_kl: bool = True
    """weigh each sample's KL by c + a (1 - c), c = 1e-4 / kl_beta: 1e-4 for the worst sample, kl_beta for the best"""
    kl_guided: bool = True
    """the reference velocity with the rollouts' guidance (--guidance-scale, --true-cfg-scale): a CFG-guided anchor"""
    off_policy: bool = False
    """sample rollouts with a sampling snapshot (an EMA of its own, --sampler-decay) instead of the current weights;
    either way the sampler is not the old snapshot"""
    old_decay: tuple[int, float, float, float] = (0, 0.25, 0.005, 0.999)
    """the old snapshot's EMA decay by optimizer step: START D0 RAMP MAX, D0 before step START, then D0 + RAMP per
    step up to MAX (0: a copy of the weights, 1: frozen)"""
    sampler_decay: tuple[int, float, float, float] = (75, 0.0, 0.0075, 0.999)
    """the sampling snapshot's EMA decay by optimizer step (--off-policy): START D0 RAMP MAX as --old-decay"""
    num_train_timesteps: int = 0
    """T, training timesteps per sample (0: max(1, int(num_steps * (hi - lo))))"""
    time_sampler: Literal["uniform", "logit_normal", "discrete", "discrete_with_init", "discrete_wo_init"] = "discrete"
    """how the training timesteps are drawn, per group: a group's members share them (common/timesteps.py)"""
    timestep_range: tuple[float, float] = (0.0, 0.99)
    """(lo, hi) fractions along the denoising axis: training sigmas lie in [1 - hi, 1 - lo]"""
    time_shift: float = 3.0
    """shift applied to sigma by the uniform and logit_normal samplers (> 1 favours noisy timesteps)"""


# each model's sampling settings are its adapter's `preset` (FLUX.1-dev's: the Args defaults); these add CRD's
# (every model: on-policy ODE rollouts, T = int(0.99 N) discrete timesteps, beta 1, KL 0.1)
PRESETS = {
    # CRD on the shapes world with the rule-checked reward, on a CPU (README)
    "shapes": dict(num_train_timesteps=4, timestep_range=(0.0, 0.9), kl_beta=0.01, num_epochs=100, eval_every=50,
                   save_every=50),
    # Flow-Factory's SD3.5 recipe (CFG-free rollouts; its KL anchor at CFG 4.5 needs a reference guidance of its own)
    "sd3_5": dict(num_steps=10, guidance_scale=1.0, group_size=24, gradient_steps_per_epoch=2, num_train_timesteps=20),
}
TINY = dict(gradient_steps_per_epoch=2, num_train_timesteps=2, sampler_decay=(1, 0.0, 0.5, 0.5))  # --off-policy lags


# ALGO LOGIC: the CRD loss
def reward_weight(adv, adv_clip):
    """a = clamp(A_c / C / 2 + 1/2, 0, 1) with A_c = clamp(A, -C, C): -C -> 0, 0 -> 1/2, C -> 1 (as NFT's r)."""
    return (adv.clamp(-adv_clip, adv_clip) / adv_clip / 2 + 0.5).clamp(0, 1)


def weighted_error(v, u):
    """mean_d (v - u)^2 / w with w = max(mean_d |v - u|, 1e-5), detached, all in float64: (B,). r_theta is the old
    snapshot's minus the policy's."""
    err = (v.double() - u.double()).flatten(1)
    return (err**2).mean(1) / err.detach().abs().mean(1).clamp_min(1e-5)


def crd_loss(r, r_bar, centered_reward, beta, adv_clip, kind="mse"):
    """Per sample: C/beta (beta (r - r_bar) - R_c)^2 (mse) or C/beta BCE(beta (r - r_bar), sigmoid(R_c)) (bce), with
    r_bar the group mean of r_theta (detached) and R_c = a - mean_group(a): (B,)."""
    logit = beta * (r - r_bar.detach())
    if kind == "bce":
        return adv_clip / beta * F.binary_cross_entropy_with_logits(logit, torch.sigmoid(centered_reward.double()),
                                                                    reduction="none")
    return adv_clip / beta * (logit - centered_reward) ** 2


def kl_weight(a, kl_beta, adaptive):
    """The reward-adaptive KL weight c + a (1 - c), c = 1e-4 / kl_beta (1 without --reward-adaptive-kl)."""
    c = 1e-4 / kl_beta
    return c + a * (1 - c) if adaptive else torch.ones_like(a)


def rows(cond, n):
    """The first n rows of a group's conditioning (every row holds the group's prompt)."""
    return {k: v[:n] if torch.is_tensor(v) else v for k, v in cond.items()}


def decay_schedule(decay):
    """The EMA schedule (common/ema.py) of START D0 RAMP MAX: d = D0 before optimizer step START, then
    min(D0 + (step - START) RAMP, MAX) (docs/crd.md: "0-0.25-0.005-0.999" is (0, 0.25, 0.005, 0.999))."""
    start, d0, ramp, top = decay
    return dict(schedule="piecewise_linear", flat_steps=start, initial_decay=d0, ramp_rate=ramp, decay=top)


@torch.no_grad()
def group_errors(run, x0, eps, sig, chunks, cond):
    """(T, K) weighted errors of a group's members at its T timesteps with the weights loaded now, CFG-free."""
    out = []
    for j, sigma in enumerate(sig):
        e = eps[j].to(x0.device)
        z, u = torch.lerp(x0, e, sigma), e - x0  # (1 - sigma) x0 + sigma eps; the target
        with run.autocast():
            out.append(torch.cat([weighted_error(run.velocity(z[c], sigma.expand(c.stop - c.start),
                                                              rows(cond, c.stop - c.start), guided=False), u[c])
                                  for c in chunks]))
    return torch.stack(out)


def check_args(args):
    """This algorithm's flags, before anything loads (the shared ones: common/checks.py)."""
    checks.check_ranges(args, {"crd_beta": (0, False)})  # first: every float flag finite
    timesteps.check_config(args.time_sampler, args.num_train_timesteps, args.timestep_range, args.time_shift)
    for name in ("old_decay", "sampler_decay"):
        start, d0, ramp, top = getattr(args, name)
        if start < 0 or ramp < 0 or not (0 <= d0 <= 1 and 0 <= top <= 1):
            raise ConfigError(f"--{name.replace('_', '-')} START D0 RAMP MAX needs START >= 0, RAMP >= 0 and decays in "
                              f"[0, 1], got {start} {d0} {ramp} {top}")


def main(args: Args):
    check_args(args)
    lo, hi = args.timestep_range  # Wan2.2-A14B: the experts that the training sigmas reach must train
    run = Run(args, SCRIPT, trained_sigmas=(1 - hi, 1 - lo), time_sampler=args.time_sampler,
              reference=args.kl_beta > 0, whole_groups=True)  # each process holds M/W whole groups
    K, n_groups = args.group_size, args.prompts_per_epoch // run.world  # groups per process
    if n_groups % args.gradient_steps_per_epoch:
        raise ConfigError(f"{n_groups} groups per process do not split into --gradient-steps-per-epoch "
                          f"{args.gradient_steps_per_epoch} equal steps (optimizer steps fall between groups)")
    n_train = timesteps.num_timesteps(args.num_train_timesteps, args.num_steps, args.timestep_range)  # T
    chunks = sampler.micro_batches(K, args.batch_size)  # a group's members, --batch-size rows per forward
    grad_accum = n_groups // args.gradient_steps_per_epoch * n_train * len(chunks)  # micro-steps per optimizer step
    timesteps.sample_sigmas(args.time_sampler, n_train, 1, run.sigmas.cpu(), args.timestep_range,
                            args.time_shift)  # a range without schedule steps: one line, before anything is written
    old = run.checkpointed_ema("old_ema", **decay_schedule(args.old_decay))  # r_theta's old snapshot
    sampling = run.checkpointed_ema("sampler_ema", **decay_schedule(args.sampler_decay)) if args.off_policy else None
    run.accelerator.print(f"***** CRD: {args.prompts_per_epoch} prompts x {K} images per epoch, {run.world} x "
                          f"{n_groups} groups in {len(chunks)} chunks of <= {args.batch_size}, T={n_train}, "
                          f"G={args.gradient_steps_per_epoch} *****")
    run.start()  # outputs, prompts encoded once, the base model evaluated

    for epoch in run.epochs():
        # ---- SAMPLING ----
        window = run.sde_window(epoch)
        with sampling.swapped_in() if sampling is not None else contextlib.nullcontext():  # --off-policy
            samples = run.rollout(epoch, window, store=("x0",))  # only the final latent x0

        # ---- ADVANTAGES ----
        raw, advantages = run.advantages(samples, epoch)  # group-relative, over every process's samples

        # ---- TRAINING ----
        stats = TrainStats()
        groups = [dict(g, cond=run.encode([g["item"]] * min(K, args.batch_size)))  # a chunk's rows of the prompt
                  for g in run.by_group(samples, ("x0", "adv"))]
        for inner, _, s in run.train_batches(groups, epoch):
            x0, a = s["x0"].float(), reward_weight(s["adv"], args.adv_clip)
            centered = a - a.mean()  # R_c: the external reward centered within the group
            sig = timesteps.sample_sigmas(args.time_sampler, n_train, 1, run.sigmas, args.timestep_range,
                                          args.time_shift, generator=run.generator("crd-t", epoch, inner, s["group"]))
            sig = sig[:, 0].to(run.device)  # T sigmas shared by the group's members: their r_theta compare at one t
            eps = torch.stack([torch.randn((n_train, *x0.shape[1:]), generator=run.generator(
                "crd", epoch, inner, s["group"], m)) for m in range(K)], 1)  # (T, K, ...): fresh per (sample, t)
            with old.swapped_in():  # first: weights swapped between a forward and its backward would break autograd
                q_old = group_errors(run, x0, eps, sig, chunks, s["cond"])  # (T, K) q(v_old), no gradient
            q_now = group_errors(run, x0, eps, sig, chunks, s["cond"]) if len(chunks) > 1 else None  # for r_bar
            for j, sigma in enumerate(sig):
                e = eps[j].to(run.device)
                z_t, u = torch.lerp(x0, e, sigma), e - x0
                for c in chunks:
                    t, cond = sigma.expand(c.stop - c.start), rows(s["cond"], c.stop - c.start)
                    with run.autocast():  # the KL's anchor, without gradient (before the micro-step)
                        v_ref = run.reference_velocity(z_t[c], t, cond, guided=args.kl_guided) if args.kl_beta else None
                    with run.accumulate(grad_accum):  # optimizer steps fall between groups: r_bar saw these weights
                        with run.autocast():
                            v = run.velocity(z_t[c], t, cond, guided=False)
                        r = q_old[j, c] - weighted_error(v, u[c])  # r_theta, with gradient
                        r_bar = (q_old[j] - q_now[j]).mean() if q_now is not None else r.detach().mean()
                        share = len(chunks) / K  # a chunk's sum, so the group's micro-steps average to its mean
                        policy_loss = crd_loss(r, r_bar, centered[c], args.crd_beta, args.adv_clip,
                                               args.crd_loss).sum() * share
                        loss, kl = policy_loss, torch.zeros(())
                        if v_ref is not None:
                            kl_v = ((v.double() - v_ref.double()) ** 2).flatten(1).mean(1)  # v-space, (B,)
                            kl = kl_v.mean()
                            loss = loss + args.kl_beta * (kl_weight(a[c], args.kl_beta, args.reward_adaptive_kl)
                                                          * kl_v).sum() * share
                        run.backward(loss.float())
                    implicit = args.crd_beta * (r.detach() - r_bar)
                    stats.add(loss=loss, policy_loss=policy_loss, kl=kl, ratio=r.detach().exp().float(),
                              implicit_reward=implicit.abs().mean(), target_reward=centered[c].abs().mean())
        old.step(run.global_step - 1)  # theta_old <- d theta_old + (1 - d) theta, d by the last optimizer step
        if sampling is not None:  # the sampling snapshot, the same way
            sampling.step(run.global_step - 1)

        # ---- LOGGING, EVALUATION, CHECKPOINT ----
        run.end_epoch(epoch, stats, raw, advantages, sde_window=window)
    run.finish()  # the EMA weights exported (lora/ or transformer/), the summary; every process ends


if __name__ == "__main__":
    args = parse_with_presets(Args, PRESETS, TINY)
    algorithm = plan.Algorithm("CRD", weight_copies=("EMA", "old policy") + ("sampling policy",) * args.off_policy)
    with errors_as_one_line():  # a user error: one line (once per machine under accelerate launch), exit code 1
        if args.plan:  # the memory plan, built on the meta device: no weight loads
            print(plan.run_plan(args, algorithm))
        else:  # on a CUDA GPU, unset rollout and evaluation batches become the widest that fit
            main(plan.fit_batches(args, algorithm))
