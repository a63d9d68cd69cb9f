"""Diffusion-DPO, online: preference pairs from each epoch's own rollouts, against a frozen reference model.

Rollouts (any solver, the ODE by default) keep only the final latents x0; rewards become group advantages, and each
group yields one pair: its highest-advantage member (chosen, x_w) against its lowest (rejected, x_l). Training
noises both arms at ONE shared timestep with ONE shared noise and raises the policy's flow-matching fit on x_w
relative to the frozen reference's, against x_l's: L = -log sigmoid(-(beta/2) [(e_w - e_ref_w) - (e_l - e_ref_l)]),
e = mean_d (v - (eps - x0))^2. No log-probs, no ratio; the reference is the anchor (LoRA: adapters off).
Paper: Diffusion-DPO (arXiv 2311.12908, Eq. 14). Math: docs/dpo.md, docs/algorithms.md A.

    python dpo.py                                              # embedded shapes world + model on a CPU
    python dpo.py --model flux1 --tiny                         # tiny random FLUX.1 on a CPU, no downloads
    accelerate launch dpo.py --model flux1 --reward pickscore  # FLUX.1-dev, LoRA, PickScore
    accelerate launch --multi_gpu --num_processes 8 dpo.py --model flux1 --dataset data/my_prompts
"""
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from common import checks, plan, timesteps
from common.args import RunArgs
from common.cli import parse_with_presets
from common.errors import ConfigError
from common.launch import errors_as_one_line
from common.run import Run
from common.tracking import TrainStats

SCRIPT = os.path.basename(__file__)  # recorded in checkpoints: a resume by another algorithm is refused


@dataclass
class Args(RunArgs):  # the flags every script shares: common/args.py
    exp_name: str = "dpo"
    output_dir: str = "runs/dpo"
    # ALGO LOGIC: DPO's own flags and defaults
    dpo_beta: float = 2000.0
    """beta: the implicit reward is -(beta/2) (e_theta - e_ref); larger = a sharper preference, a tighter anchor"""
    kl_beta: float = 0.0
    """unused: DPO's anchor is the reference model inside its loss (--dpo-beta); must be 0"""
    num_train_timesteps: int = 1
    """T, training timesteps per pair (0: max(1, int(num_steps * (hi - lo))))"""
    time_sampler: Literal["uniform", "logit_normal", "discrete", "discrete_with_init", "discrete_wo_init"] = \
        "logit_normal"
    """how each pair's training timestep is drawn (common/timesteps.py); both arms share it"""
    timestep_range: tuple[float, float] = (0.0, 0.99)
    """(lo, hi) fractions along the denoising axis: training sigmas lie in [1 - hi, 1 - lo]"""
    time_shift: float = 1.0
    """shift applied to sigma by the uniform and logit_normal samplers (> 1 favours noisy timesteps)"""
    guided_training: bool = False
    """policy and reference forwards with the rollouts' guidance instead of guidance-free (the adapter's unguided)"""


# each model's sampling settings are its adapter's `preset` (FLUX.1-dev's: the Args defaults); these add DPO's
PRESETS = {
    # DPO on the shapes world with the rule-checked reward, on a CPU (README); beta for its error scale (docs/dpo.md)
    "shapes": dict(dpo_beta=200.0, learning_rate=5e-5, num_train_timesteps=4, num_epochs=100, eval_every=50,
                   save_every=50),
}
TINY = dict(gradient_steps_per_epoch=2)  # --tiny: 4 pair batches per epoch, 2 optimizer steps


# ALGO LOGIC: pairs and the DPO loss
def pair_layout(args, world) -> tuple[int, int]:
    """(P pairs per batch, pair batches per process): a process holds M/W groups, one pair each; P is the largest
    divisor of M/W not above max(1, B // 2), so every batch holds P pairs and a forward on both arms <= B rows."""
    n = args.prompts_per_epoch // world
    size = max(d for d in range(1, max(1, args.batch_size // 2) + 1) if n % d == 0)
    return size, n // size


def preference_pairs(groups, size) -> list[dict]:
    """One pair per group (run.by_group's dicts): chosen = argmax A, rejected = argmin A (a constant group gives the
    same sample twice: a degenerate pair, z = 0 and no gradient, kept so that every process trains as many
    micro-steps), in batches of `size` pairs: {"group", "item": tuples of ints, "x_w", "x_l": (size, ...)}."""
    batches = []
    for i in range(0, len(groups), size):
        chunk = groups[i:i + size]
        batches.append({"group": tuple(g["group"] for g in chunk), "item": tuple(g["item"] for g in chunk),
                        "x_w": torch.stack([g["x0"][g["adv"].argmax()] for g in chunk]),
                        "x_l": torch.stack([g["x0"][g["adv"].argmin()] for g in chunk])})
    return batches


def count_pairs(adv, groups) -> int:
    """The epoch's non-degenerate pairs over every process: groups whose advantages are not all equal (`adv`: the
    epoch's gathered advantages, row n of group `groups[n]`)."""
    g = torch.as_tensor(groups, device=adv.device)
    hi, lo = (torch.zeros(int(g.max()) + 1, dtype=adv.dtype, device=adv.device).scatter_reduce(
        0, g, adv, how, include_self=False) for how in ("amax", "amin"))
    return int((hi > lo).sum())


def pair_noise(generators, x_w, x_l, sigmas, kind, timestep_range, shift):
    """Both arms of P pairs noised with ONE sigma and ONE eps per pair (drawn from the pair's generator): returns
    z = lerp(x0, eps, sigma), sigma (2P,) and the flow target u = eps - x0, x0 = cat([x_w, x_l]) (chosen first)."""
    sig, eps = (t[0].to(x_w.device) for t in timesteps.sigmas_and_noise(kind, 1, x_w.shape[1:], sigmas,
                                                                        timestep_range, shift, generators))
    sig, eps, x0 = torch.cat([sig, sig]), torch.cat([eps, eps]), torch.cat([x_w, x_l]).float()
    return torch.lerp(x0, eps, sig.view(-1, *[1] * (x0.dim() - 1))), sig, eps - x0


def flow_errors(v, u):
    """e = mean_d (v - u)^2 per row, in fp64 (docs/algorithms.md A: u = eps - x0)."""
    return ((v.double() - u.double()) ** 2).flatten(1).mean(1)


def dpo_loss(err, err_ref, beta):
    """L = -mean_pairs log sigmoid(z), z = -(beta/2) [(e_w - e_ref_w) - (e_l - e_ref_l)] (Eq. 14 with the reference
    code's beta/2 on mean errors); `err`, `err_ref`: (2P,) errors, the chosen arms first. Returns (L, z)."""
    d = (err - err_ref).view(2, -1)
    z = -0.5 * beta * (d[0] - d[1])
    return -F.logsigmoid(z).mean(), z


def check_args(args, world):
    """This algorithm's flags, before anything loads (the shared ones: common/checks.py); `world`: the processes."""
    checks.check_ranges(args, {**checks.RANGES, "dpo_beta": (0, False)})  # first: every float flag finite
    timesteps.check_config(args.time_sampler, args.num_train_timesteps, args.timestep_range, args.time_shift)
    if args.kl_beta > 0:
        raise ConfigError(f"--kl-beta {args.kl_beta}: DPO has no separate KL (its reference is in the loss, scaled "
                          "by --dpo-beta); leave --kl-beta at 0")
    size, n_batches = pair_layout(args, world)
    if args.prompts_per_epoch % world == 0 and n_batches % args.gradient_steps_per_epoch:
        raise ConfigError(f"{n_batches} pair batches per process per epoch ({size} pairs each: --prompts-per-epoch "
                          f"{args.prompts_per_epoch} over {world} processes, --batch-size {args.batch_size}) do not "
                          f"split into --gradient-steps-per-epoch {args.gradient_steps_per_epoch} equal steps")


def main(args: Args):
    check_args(args, int(os.environ.get("WORLD_SIZE", "1")))  # the process count accelerate launch sets
    lo, hi = args.timestep_range  # Wan2.2-A14B: the experts that the training sigmas reach must train
    run = Run(args, SCRIPT, trained_sigmas=(1 - hi, 1 - lo), time_sampler=args.time_sampler, reference=True,
              whole_groups=True)  # the frozen reference always; each process holds whole groups
    sigmas = run.sigmas
    n_train = timesteps.num_timesteps(args.num_train_timesteps, args.num_steps, args.timestep_range)  # T per pair
    size, n_batches = pair_layout(args, run.world)  # the same on every process: DDP never waits on a missing step
    grad_accum = n_batches // args.gradient_steps_per_epoch * n_train  # micro-steps per optimizer step
    timesteps.sample_sigmas(args.time_sampler, n_train, 1, sigmas.cpu(), args.timestep_range,
                            args.time_shift)  # a range without schedule steps: one line, before anything is written
    run.accelerator.print(f"***** DPO: {args.prompts_per_epoch} prompts x {args.group_size} images per epoch, one "
                          f"pair per prompt: {run.world} x {n_batches} batches of {size} pairs, T={n_train}, "
                          f"G={args.gradient_steps_per_epoch}, beta={args.dpo_beta:g} *****")
    run.start()  # outputs, prompts encoded once, the base model evaluated

    for epoch in run.epochs():
        # ---- SAMPLING ----
        window = run.sde_window(epoch)
        samples = run.rollout(epoch, window, store=("x0",))  # only the final latent x0

        # ---- ADVANTAGES ----
        raw, advantages = run.advantages(samples, epoch)  # group-relative, over every process's samples

        # ---- TRAINING ----
        pairs = preference_pairs(run.by_group(samples, ("x0", "adv")), size)  # (chosen, rejected) per group
        stats = TrainStats()  # train/pairs: the non-degenerate pairs of the epoch, all processes (no collective)
        stats.add(pairs=torch.tensor(float(count_pairs(advantages, run.groups.plan(epoch).groups))))
        for inner, b, s in run.train_batches(pairs, epoch):
            cond = run.encode(list(s["item"]) * 2)  # both arms of a pair: its group's prompt
            for j in range(n_train):
                gens = [run.generator("dpo", epoch, inner, g, j) for g in s["group"]]  # per pair: both arms' draws
                z_t, sig, u = pair_noise(gens, s["x_w"], s["x_l"], sigmas, args.time_sampler, args.timestep_range,
                                         args.time_shift)
                with torch.no_grad(), run.autocast():
                    err_ref = flow_errors(run.reference_velocity(z_t, sig, cond, guided=args.guided_training), u)
                with run.accumulate(grad_accum):
                    with run.autocast():
                        v = run.velocity(z_t, sig, cond, guided=args.guided_training)
                    err = flow_errors(v, u)
                    loss, z = dpo_loss(err, err_ref, args.dpo_beta)
                    run.backward(loss.float())
                gap, ref_gap = ((e[:len(z)] - e[len(z):]).mean() for e in (err.detach(), err_ref))
                stats.add(loss=loss, policy_loss=loss, accuracy=(z > 0).double().mean(), margin=z.mean(),
                          err_gap=gap, ref_gap=ref_gap, drift=(err.detach() - err_ref).mean())

        # ---- LOGGING, EVALUATION, CHECKPOINT ----
        run.end_epoch(epoch, stats, raw, advantages, sde_window=window)
    run.finish()  # the EMA weights exported (lora/ or transformer/), the summary; every process ends


if __name__ == "__main__":
    args = parse_with_presets(Args, PRESETS, TINY)
    algorithm = plan.Algorithm("DPO", weight_copies=("EMA",), reference=True)  # what its memory plan counts
    with errors_as_one_line():  # a user error: one line (once per machine under accelerate launch), exit code 1
        if args.plan:  # the memory plan, built on the meta device: no weight loads
            print(plan.run_plan(args, algorithm))
        else:  # on a CUDA GPU, unset rollout and evaluation batches become the widest that fit
            main(plan.fit_batches(args, algorithm))
