"""Training-timestep samplers of the decoupled algorithms (docs/algorithms.md E.5, decision 8), used by nft.py and
awm.py.

`sample_sigmas` returns a (T, B) tensor of sigmas: T training timesteps for each of B samples, drawn
independently per sample (column). `timestep_range` (lo, hi) holds fractions along the denoising axis:
fraction f is sigma = 1 - f (t = 1000 sigma), so (0, 0.5) is the noisier half, sigma in [0.5, 1].
  uniform, logit_normal   continuous, stratified in T bins; the time shift S is applied to sigma (decision 8:
                          shift_S(x) = S x / (1 + (S - 1) x), so S > 1 favours noisy timesteps; S = 1: none)
  discrete*               indices into the rollout schedule's N sigmas (already shifted by the model's own
                          schedule), stratified on [a', b) where a, b bound the indices inside the range:
                          discrete a' = a; discrete_wo_init a' = a + 1; discrete_with_init: a, then T-1 on [a+1, b)
"""
import torch

from common.errors import ConfigError

SAMPLERS = ("uniform", "logit_normal", "discrete", "discrete_with_init", "discrete_wo_init")


def time_shift(x, shift: float):
    """shift_S(x) = S x / (1 + (S - 1) x): x = 0 and 1 stay, S > 1 pushes the inside towards 1."""
    return shift * x / (1 + (shift - 1) * x)


def check_config(kind: str, requested: int, timestep_range, shift: float):
    """What can be checked before the schedule is known; ConfigError (one line) on bad flags."""
    lo, hi = timestep_range
    if kind not in SAMPLERS:
        raise ConfigError(f"unknown time sampler {kind!r}; choose from {SAMPLERS}")
    if not 0 <= lo < hi <= 1:
        raise ConfigError(f"--timestep-range {lo} {hi}: need 0 <= lo < hi <= 1 (fractions of the denoising axis)")
    if shift <= 0 or requested < 0:
        raise ConfigError(f"need --time-shift > 0 and --num-train-timesteps >= 0, got {shift} and {requested}")


def num_timesteps(requested: int, num_steps: int, timestep_range) -> int:
    """T: `requested`, or with 0 (auto) max(1, int(N (hi - lo)))."""
    lo, hi = timestep_range
    return requested if requested > 0 else max(1, int(num_steps * (hi - lo)))


def discrete_range(sigmas, timestep_range) -> tuple[int, int]:
    """(a, b): the first and last index i < N with 1000(1 - hi) <= t_i <= 1000(1 - lo) (1e-3 slack)."""
    lo, hi = timestep_range
    t = 1000 * sigmas[:-1].double().cpu()
    inside = ((t >= 1000 * (1 - hi) - 1e-3) & (t <= 1000 * (1 - lo) + 1e-3)).nonzero().flatten()
    if len(inside) == 0:
        raise ConfigError(f"timestep range {tuple(timestep_range)} holds none of the schedule's timesteps "
                         f"{[round(x, 1) for x in t.tolist()]}")
    return int(inside[0]), int(inside[-1])


def _stratified_indices(start: int, end: int, n: int, batch: int, generator) -> torch.Tensor:
    """(n, batch) integers, one from each of n equal bins of [start, end); `end` is never drawn."""
    edges = start + torch.arange(n + 1, dtype=torch.float64) * (end - start) / n
    lo, hi = edges[:-1].floor()[:, None], edges[1:].floor()[:, None]
    u = torch.rand(n, batch, generator=generator, dtype=torch.float64)
    return (lo + (u * (hi - lo)).floor()).long()


def sample_sigmas(kind: str, n: int, batch: int, sigmas, timestep_range=(0.0, 1.0), shift: float = 1.0,
                  logit_mean: float = 0.0, logit_std: float = 1.0, generator=None) -> torch.Tensor:
    """(n, batch) float32 training sigmas (see the module docstring). `sigmas`: the rollout's N+1 schedule."""
    lo, hi = timestep_range
    if kind.startswith("discrete"):
        a, b = discrete_range(sigmas, timestep_range)
        first = a + (kind != "discrete")  # wo_init and with_init draw the stratified part from a + 1
        if b - first < 1:
            raise ConfigError(f"timestep range {tuple(timestep_range)} holds too few schedule steps for {kind} "
                             f"(indices {a}..{b})")
        if kind == "discrete_with_init":
            rest = _stratified_indices(first, b, n - 1, batch, generator) if n > 1 else torch.zeros(0, batch).long()
            idx = torch.cat([torch.full((1, batch), a), rest])
        elif kind in ("discrete", "discrete_wo_init"):
            idx = _stratified_indices(first, b, n, batch, generator)
        else:
            raise ValueError(f"unknown time sampler {kind!r}; choose from {SAMPLERS}")
        return sigmas.float().cpu()[idx]
    q = (torch.arange(n, dtype=torch.float64)[:, None] + torch.rand(n, batch, generator=generator,
                                                                      dtype=torch.float64)) / n
    if kind == "uniform":
        x = q
    elif kind == "logit_normal":
        x = torch.sigmoid(torch.special.ndtri(q.clamp(1e-7, 1 - 1e-7)) * logit_std + logit_mean)
    else:
        raise ValueError(f"unknown time sampler {kind!r}; choose from {SAMPLERS}")
    x = x.gather(0, torch.rand(n, batch, generator=generator).argsort(0))  # random stratum order per sample
    x = time_shift(x, shift)
    if kind == "logit_normal":
        x = x.clamp(0.01, 1 - 1e-6)
    return ((1 - hi) + x * (hi - lo)).float()  # position x in [0, 1] along sigma in [1 - hi, 1 - lo]


def sigmas_and_noise(kind: str, n: int, shape, sigmas, timestep_range, shift: float, generators):
    """Training draws of B samples, one generator each (Run.generator, keyed by the sample): (n, B) sigmas as
    sample_sigmas draws them and (n, B, *shape) Gaussian noise, both on the CPU; a sample's draws do not depend on
    the batch it sits in."""
    sig = torch.cat([sample_sigmas(kind, n, 1, sigmas, timestep_range, shift, generator=g) for g in generators], 1)
    eps = torch.stack([torch.randn((n, *shape), generator=g) for g in generators], 1)
    return sig, eps
