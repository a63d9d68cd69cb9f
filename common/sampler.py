"""Flow-matching sampling: one step of ODE / Flow-SDE / Dance-SDE / CPS with its Gaussian log-prob,
the SDE window, and a rollout that keeps only the latents training needs.

Conventions (docs/algorithms.md sections A, B): z_sigma = (1 - sigma) x0 + sigma eps, sigma = 1 is noise,
velocity v ~ eps - x0, steps go from sigma to sigma_next < sigma. All math runs in float32; the sampled
latent is rounded to the storage dtype *before* its log-prob is taken, so training, which reloads the
stored latent, sees exactly the tensor the rollout scored (on-policy ratio == 1).
"""
import hashlib
import math
from dataclasses import dataclass, field

import torch

from common import host

DYNAMICS = ("ODE", "Flow-SDE", "Dance-SDE", "CPS")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _bcast(x, like: torch.Tensor) -> torch.Tensor:
    """Per-sample (B,) or scalar -> (B, 1, ..., 1) for broadcasting against latents. A number is filled in on the
    device (torch.as_tensor would build it on the host and copy it over)."""
    x = (torch.full((), x, dtype=torch.float32, device=like.device) if isinstance(x, (int, float))
         else torch.as_tensor(x, dtype=torch.float32, device=like.device))
    return x.reshape(-1, *([1] * (like.dim() - 1))) if x.dim() == 1 else x


def step_mean_std(z, v, sigma, sigma_next, eta, dynamics: str, sigma_1=None):
    """Mean and std of the Gaussian transition z -> z_next (B.1-B.4).

    sigma, sigma_next, eta: floats or (B,) tensors. sigma_1 is the schedule's second sigma, used by
    Flow-SDE in place of sigma at the sigma == 1 edge (so the first step's std is exactly eta).
    Returns (mean, std) with std broadcastable to z; std == 0 for the ODE.
    """
    z, v = z.float(), v.float()
    s, s_next = _bcast(sigma, z), _bcast(sigma_next, z)
    dt = s_next - s
    if dynamics == "ODE" or (not torch.is_tensor(eta) and eta == 0):
        return z + v * dt, torch.zeros_like(s)
    eta = _bcast(eta, z)
    if dynamics == "CPS":
        std = s_next * torch.sin(eta * math.pi / 2)
        x0_hat, eps_hat = z - s * v, z + (1 - s) * v
        return (1 - s_next) * x0_hat + s_next * torch.cos(eta * math.pi / 2) * eps_hat, std
    if dynamics == "Flow-SDE":
        # g = eta sqrt(sigma / (1 - sigma)); at sigma == 1 the denominator uses 1 - sigma_1 (B.2)
        denom = 1 - s
        if sigma_1 is not None:
            denom = torch.where(s == 1.0, 1 - _bcast(sigma_1, z), denom)
        g = eta * torch.sqrt(s / denom)
    elif dynamics == "Dance-SDE":
        g = eta * torch.ones_like(s)
    else:
        raise ValueError(f"unknown dynamics {dynamics!r}; choose from {DYNAMICS}")
    mean = z + (v + g**2 / (2 * s) * (z + (1 - s) * v)) * dt
    return mean, g * torch.sqrt(-dt)


def gaussian_log_prob(z_next, mean, std, dynamics: str) -> torch.Tensor:
    """Per-element average log density (B.5), shape (B,). CPS uses its constant-free form."""
    z_next, mean = z_next.float(), mean.float()
    dims = tuple(range(1, z_next.dim()))
    if dynamics == "CPS":
        return -((z_next - mean) ** 2).mean(dims)
    std = std.expand_as(z_next) if torch.is_tensor(std) else torch.full_like(z_next, std)
    lp = -((z_next - mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    return lp.mean(dims)


@dataclass
class StepOut:
    next: torch.Tensor      # z_next, fp32 values exactly representable in the storage dtype
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor | None


def _noise(like, generator):
    """Standard normal noise shaped like `like`; `generator`: one generator, or a list of them that draw equal
    consecutive row blocks (micro-batches), so that a wide rollout draws each micro-batch's noise exactly as a
    rollout of that micro-batch alone would."""
    if not isinstance(generator, (list, tuple)):
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32)
    n = like.shape[0] // len(generator)
    return torch.cat([torch.randn((n, *like.shape[1:]), generator=g, device=like.device, dtype=torch.float32)
                      for g in generator])


def _noisy(sigma, sigma_next, eta, dynamics, sigma_1=None) -> bool:
    """Whether a step draws noise (std > 0 for some row; CPS's last step, to sigma 0, does not): its std computed on
    the host from the Python values of its arguments (common/host.py reads a schedule once), not read from the
    device."""
    if dynamics == "ODE":
        return False
    s, s_next, eta, s_1 = (host.value(a) for a in (sigma, sigma_next, eta, sigma_1))
    zero = torch.zeros(())
    return bool(step_mean_std(zero, zero, s, s_next, eta, dynamics, s_1)[1].gt(0).any())


def sde_step(z, v, sigma, sigma_next, eta, dynamics, sigma_1=None, z_next=None, generator=None,
             storage_dtype=torch.float32, stochastic=None) -> StepOut:
    """One denoising step. With z_next given (training), score it instead of sampling. `stochastic`: whether the
    step draws noise, when the caller has decided it (the rollout, before its loop); else it is decided on the host
    (_noisy), from the values of sigma, sigma_next, eta and sigma_1 (a schedule's, once read, cost nothing)."""
    mean, std = step_mean_std(z, v, sigma, sigma_next, eta, dynamics, sigma_1)
    if stochastic is None:
        stochastic = _noisy(sigma, sigma_next, eta, dynamics, sigma_1)
    if z_next is None:
        z_next = mean
        if stochastic:
            z_next = mean + std * _noise(mean, generator)
        z_next = z_next.to(storage_dtype).float()  # round trip: what is stored is what is scored
    log_prob = gaussian_log_prob(z_next.detach(), mean, std, dynamics) if stochastic else None
    return StepOut(z_next.float(), mean, std, log_prob)


def draw_sde_window(num_steps: int, size: int, lo: int, hi: int, seed: int) -> list[int]:
    """Contiguous window of `size` stochastic steps with a start drawn uniformly in [lo, hi - size]
    from `seed` alone (same on every rank). size == num_steps with (0, num_steps) = original Flow-GRPO."""
    hi = min(hi, num_steps)
    if size <= 0:
        return []
    if not 0 <= lo <= hi - size:
        raise ValueError(f"sde window of {size} steps does not fit range ({lo}, {hi}) of {num_steps} steps")
    g = torch.Generator().manual_seed(seed)
    start = lo + int(torch.randint(0, hi - size - lo + 1, (1,), generator=g))
    return list(range(start, start + size))


@dataclass
class Trajectory:
    """What a rollout keeps: latents at the positions training needs, per-step log-probs and means."""
    sigmas: torch.Tensor                                    # (N+1,) fp32 schedule
    latents: dict[int, torch.Tensor] = field(default_factory=dict)   # position i -> z_i (storage dtype)
    log_probs: dict[int, torch.Tensor] = field(default_factory=dict)  # step i -> (B,) fp32
    means: dict[int, torch.Tensor] = field(default_factory=dict)      # step i -> mu_old (GRPO-Guard only)
    final: torch.Tensor | None = None                       # z_N (fp32)

    def rows(self, index) -> "Trajectory":
        """The trajectory of rows `index` (a slice) of the batch."""
        return Trajectory(self.sigmas, {k: v[index] for k, v in self.latents.items()},
                          {k: v[index] for k, v in self.log_probs.items()}, {k: v[index] for k, v in self.means.items()},
                          None if self.final is None else self.final[index])


def micro_batches(n: int, size: int) -> list[slice]:
    """Consecutive row slices of `size` (the last may be shorter) covering n rows."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def rollout(predict, z, sigmas, sde_steps=(), eta=0.0, dynamics="ODE", keep=None, keep_means=False,
            generator=None, storage_dtype=torch.float32) -> Trajectory:
    """Integrate from sigmas[0] to sigmas[-1].

    predict(z, sigma_index) -> velocity (model forward incl. CFG). Steps in `sde_steps` use `dynamics`
    with noise level `eta`, all others the ODE. `keep`: positions whose latents are stored (default:
    every i and i+1 of the SDE steps, docs/algorithms.md B.8).
    """
    sde_steps = set(sde_steps)
    keep = set(keep) if keep is not None else {p for i in sde_steps for p in (i, i + 1)}
    traj = Trajectory(sigmas=sigmas)
    z = z.to(storage_dtype).float()
    sigma_1 = sigmas[1] if len(sigmas) > 1 else None
    # which steps draw noise, decided before the loop (the schedule read once on the host): no step waits for it
    steps = range(len(sigmas) - 1)
    noisy = {i for i in steps if i in sde_steps and _noisy(sigmas[i], sigmas[i + 1], eta, dynamics, sigma_1)}
    for i in steps:
        if i in keep:
            traj.latents[i] = z.to(storage_dtype)
        v = predict(z, i)
        on = i in sde_steps and dynamics != "ODE"
        out = sde_step(z, v, sigmas[i], sigmas[i + 1], eta if on else 0.0, dynamics if on else "ODE",
                       sigma_1, generator=generator, storage_dtype=storage_dtype, stochastic=i in noisy)
        if on:
            if out.log_prob is not None:  # CPS's last step (to sigma 0) has no noise, hence no log-prob
                traj.log_probs[i] = out.log_prob
            if keep_means:
                traj.means[i] = out.mean
        z = out.next
    if len(sigmas) - 1 in keep:
        traj.latents[len(sigmas) - 1] = z.to(storage_dtype)
    traj.final = z
    return traj


def keyed_generator(*key) -> torch.Generator:
    """A CPU generator seeded by what a draw belongs to (ints and strings, e.g. ("train", seed, epoch, inner, group,
    member)), never by where it runs: the same key draws the same numbers on any process, batch and layout."""
    digest = hashlib.blake2b(repr(tuple(key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)  # 63 bits: a valid seed


def to_device(obj, device):
    """Tensors of a nested dict / list / tuple on `device` (a tensor already there is returned as is)."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
