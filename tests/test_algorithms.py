"""docs/algorithms.md I.2 (GRPO-Guard RatioNorm, D.2) and I.4 (NFT, AWM, time samplers, EMA, accumulation: E, F,
G), against fp64 formulas written here from the document."""
import math

import pytest
import torch

import awm
import grpo_guard
import nft
from common import sampler, timesteps
from common.ema import EMA, ema_decay
from tests.helpers import tiny_run
from tests.test_grpo import fresh_accelerator_state  # noqa: F401 (autouse fixture)


def gaussian_lp64(z_next, mean, std):
    """B.5 in fp64: mean_d[-(z' - mu)^2 / (2 s^2) - log s - log(2 pi) / 2], (B,)."""
    lp = -((z_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(1)


# ---- I.2-15 GRPO-Guard RatioNorm ----

def _flow_sde_step(g, n=3, d=(32, 8)):
    """A Flow-SDE transition with a per-sample sigma (B,), and a policy mean moved by delta."""
    sigma = torch.tensor([0.9, 0.6, 0.3][:n])
    z, v_old = torch.randn(n, *d, generator=g), torch.randn(n, *d, generator=g)
    v = v_old + 0.3 * torch.randn(n, *d, generator=g)
    mean_old, std = sampler.step_mean_std(z, v_old, sigma, sigma - 0.1, 0.7, "Flow-SDE", 0.95)
    mean, _ = sampler.step_mean_std(z, v, sigma, sigma - 0.1, 0.7, "Flow-SDE", 0.95)
    return mean, mean_old, std


def test_ratio_norm_identity():  # log rho~ == mean_d(xi delta), to fp32 tolerance
    g = torch.Generator().manual_seed(0)
    mean, mean_old, std = _flow_sde_step(g)
    xi = torch.randn(mean.shape, generator=g)
    z_next = mean_old + std * xi
    lp, lp_old = (sampler.gaussian_log_prob(z_next, m, std, "Flow-SDE") for m in (mean, mean_old))
    got = grpo_guard.guard_log_ratio(lp, lp_old, mean, mean_old, std)
    want = (xi.double() * (mean.double() - mean_old.double())).flatten(1).mean(1)
    assert got.shape == (3,)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-5)


def test_ratio_norm_removes_the_bias():  # E[log rho] = -m / (2 s^2), E[log rho~] = 0 (Monte Carlo, fp64)
    g = torch.Generator().manual_seed(1)
    mean, mean_old, std = (t.double() for t in _flow_sde_step(g, n=1, d=(16,)))
    n = 20_000
    xi = torch.randn(n, 16, generator=g, dtype=torch.float64)
    mean, mean_old, std = mean.expand(n, 16), mean_old.expand(n, 16), std.reshape(1, 1).expand(n, 1)
    z_next = mean_old + std * xi
    lp, lp_old = gaussian_lp64(z_next, mean, std), gaussian_lp64(z_next, mean_old, std)
    m, s = ((mean - mean_old) ** 2).mean(1), std[:, 0]
    log_rho, log_rho_t = lp - lp_old, grpo_guard.guard_log_ratio(lp, lp_old, mean, mean_old, std)
    se = log_rho.std() / math.sqrt(n)
    assert abs(log_rho.mean() - (-m / (2 * s**2)).mean()) < 4 * se
    assert abs(log_rho_t.mean()) < 4 * log_rho_t.std() / math.sqrt(n)
    assert (-m / (2 * s**2)).mean() < -8 * se  # the bias is real at this size


def test_ratio_norm_is_one_on_policy():
    g = torch.Generator().manual_seed(2)
    _, mean_old, std = _flow_sde_step(g)
    lp = sampler.gaussian_log_prob(mean_old + std * torch.randn(mean_old.shape, generator=g), mean_old, std, "Flow-SDE")
    assert torch.equal(grpo_guard.guard_log_ratio(lp, lp, mean_old, mean_old, std).exp(), torch.ones(3))


# ---- I.4-22, 23 NFT ----

def _nft_inputs(seed, adv):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(4, 16, 4, generator=g, dtype=torch.float64), torch.randn(4, 16, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.95, 0.7, 0.4, 0.15], dtype=torch.float64)
    z_t = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * eps
    v = (eps - x0 + 0.5 * torch.randn(4, 16, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    return x0, eps, sigma, z_t, v, torch.tensor(adv, dtype=torch.float64)


@pytest.mark.parametrize("beta", [0.1, 1.0, 2.5])
def test_nft_on_policy_gradient_is_advantage_weighted_matching(beta):
    x0, _, sigma, z_t, v, adv = _nft_inputs(0, [2.0, -7.0, 0.5, -1.5])  # -7 is clipped to -C
    r = nft.optimality_weight(adv, 5.0)
    nft.nft_loss(v, v.detach(), x0, z_t, sigma, r, beta, 5.0).backward()
    err = z_t - sigma[:, None, None] * v - x0
    w = err.detach().abs().mean((1, 2)).clamp_min(1e-5)
    want = (adv.clamp(-5, 5) * (err**2).mean((1, 2)) / w).mean()
    (grad,) = torch.autograd.grad(want, v)
    torch.testing.assert_close(v.grad, grad, rtol=1e-6, atol=1e-9)


def test_nft_zero_advantage_gives_zero_gradient_and_r_in_unit_interval():
    x0, _, sigma, z_t, v, adv = _nft_inputs(1, [0.0, 0.0, 0.0, 0.0])
    nft.nft_loss(v, v.detach(), x0, z_t, sigma, nft.optimality_weight(adv, 5.0), 1.0, 5.0).backward()
    assert v.grad.abs().max() < 1e-12
    r = nft.optimality_weight(torch.linspace(-20, 20, 81), 5.0)
    assert r.min() == 0 and r.max() == 1 and nft.optimality_weight(torch.zeros(1), 5.0) == 0.5


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_nft_x0_error_is_sigma_times_velocity_error(beta):  # x0+ - x0 == sigma (u - v+): the velocity form of L+
    x0, eps, sigma, z_t, v, _ = _nft_inputs(2, [5.0] * 4)
    v_old = (v + 0.1).detach()
    loss = nft.nft_loss(v, v_old, x0, z_t, sigma, torch.ones(4, dtype=torch.float64), beta, 5.0)  # r = 1: L+ only
    v_pos, u = beta * v.detach() + (1 - beta) * v_old, eps - x0
    l_pos = sigma * ((v_pos - u) ** 2).mean((1, 2)) / (v_pos - u).abs().mean((1, 2))
    torch.testing.assert_close(loss.double(), (5.0 * l_pos / beta).mean(), rtol=1e-6, atol=0)


# ---- I.4-24 AWM ----

WEIGHTINGS = ["Uniform", "t", "t**2", "huber", "ghuber"]


def test_awm_weightings_match_the_table():
    ell, sigma = torch.rand(64, dtype=torch.float64) * 3, torch.rand(64, dtype=torch.float64)
    table = {"Uniform": ell, "t": sigma * ell, "t**2": sigma**2 * ell,
             "huber": sigma * (torch.sqrt(ell + 1e-10) - 1e-5),
             "ghuber": sigma * ((ell + 1e-10) ** 0.25 - 1e-10**0.25) / 0.25}
    for name, want in table.items():
        torch.testing.assert_close(awm.awm_weight(ell, sigma, name, 0.25), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(awm.awm_weight(ell, sigma, "ghuber", 1.0), sigma * ell, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(awm.awm_weight(ell, sigma, "ghuber", 0.5), 2 * table["huber"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_awm_log_prob_ratio_and_gradient_sign(weighting):
    g = torch.Generator().manual_seed(3)
    v, u = torch.randn(6, 16, 4, generator=g), torch.randn(6, 16, 4, generator=g)
    sigma = torch.rand(6, generator=g)
    lp = awm.awm_log_prob(v, u, sigma, weighting)
    ell = ((v.double() - u.double()) ** 2).mean((1, 2))
    torch.testing.assert_close(lp.double(), -awm.awm_weight(ell, sigma.double(), weighting), rtol=1e-6, atol=0)
    _, ratio = awm.ppo_clip_loss(lp, awm.awm_log_prob(v.clone(), u, sigma, weighting), torch.ones(6), 0.1)
    assert torch.equal(ratio, torch.ones(6))  # old == current
    adv = torch.tensor([1.0, -1.0, 0.3, -0.2, 2.0, -0.7])
    ell = ell.clone().requires_grad_(True)
    log_prob = -awm.awm_weight(ell, sigma.double(), weighting)
    awm.ppo_clip_loss(log_prob, log_prob.detach(), adv.double(), 0.1)[0].backward()
    assert torch.equal(torch.sign(ell.grad), torch.sign(adv.double()))


# ---- I.4-25 time samplers ----

SD35 = torch.cat([timesteps.time_shift(torch.linspace(1, 1 / 14, 14, dtype=torch.float64), 3.0), torch.zeros(1)])


@pytest.mark.parametrize("kind", timesteps.SAMPLERS)
@pytest.mark.parametrize("rng", [(0.0, 0.5), (0.1, 0.9), (0.0, 1.0)])
def test_time_sampler_range_and_per_sample_draws(kind, rng):
    g = torch.Generator().manual_seed(4)
    sig = timesteps.sample_sigmas(kind, 3, 500, SD35, rng, shift=3.0, generator=g)
    t = 1000 * sig.double()
    assert sig.shape == (3, 500) and sig.dtype == torch.float32
    assert t.min() >= 1000 * (1 - rng[1]) - 1e-3 and t.max() <= 1000 * (1 - rng[0]) + 1e-3
    assert not torch.equal(sig[:, 0], sig[:, 1]) or not torch.equal(sig[:, 1], sig[:, 2])  # per sample
    if kind.startswith("discrete"):
        assert set(sig.flatten().tolist()) <= set(SD35.float().tolist())


@pytest.mark.parametrize("kind, n, rng, bins", [
    ("discrete", 4, (0.0, 0.5), [{0, 1}, {2, 3, 4}, {5, 6}, {7, 8, 9}]),  # the NFT example of docs/algorithms.md E.5
    ("discrete_wo_init", 6, (0.0, 0.9), [{1, 2}, {3, 4}, {5, 6}, {7, 8}, {9, 10}, {11, 12}]),  # and its AWM one
    ("discrete_with_init", 3, (0.0, 0.5), [{0}, {1, 2, 3, 4}, {5, 6, 7, 8, 9}]),
])
def test_discrete_samplers_strata(kind, n, rng, bins):
    sig = timesteps.sample_sigmas(kind, n, 2000, SD35, rng, generator=torch.Generator().manual_seed(5))
    idx = (sig[..., None].double() - SD35.float().double()).abs().argmin(-1)
    assert [set(row.tolist()) for row in idx] == bins  # every stratum fully used; a first (with_init); b never


def test_continuous_samplers_shift_acts_on_sigma():
    x = torch.rand(1000, dtype=torch.float64)
    assert torch.equal(timesteps.time_shift(x, 1.0), x)  # shift 1 leaves the draws unchanged
    lo_s, hi_s = 0.1, 0.8  # timestep_range (0.2, 0.9)
    for kind in ("uniform", "logit_normal"):
        one = timesteps.sample_sigmas(kind, 4, 4000, SD35, (0.2, 0.9), 1.0, generator=torch.Generator().manual_seed(6))
        three = timesteps.sample_sigmas(kind, 4, 4000, SD35, (0.2, 0.9), 3.0, generator=torch.Generator().manual_seed(6))
        x = (one.double() - lo_s) / (hi_s - lo_s)  # the position along [1 - hi, 1 - lo]
        if kind == "logit_normal":
            x = x.clamp(0.01, 1 - 1e-6)
        else:  # shift 1: exactly one draw per stratum of the range, per sample
            assert torch.equal((x * 4).floor().sort(0).values, torch.arange(4.0, dtype=torch.float64)[:, None].expand(4, 4000))
        shifted = (3 * x / (1 + 2 * x)).clamp(0.01, 1 - 1e-6) if kind == "logit_normal" else 3 * x / (1 + 2 * x)
        torch.testing.assert_close(three.double(), lo_s + shifted * (hi_s - lo_s), rtol=1e-6, atol=1e-6)
        assert three.mean() > one.mean() + 0.05  # shift > 1 favours noisy timesteps


def test_time_sampler_bad_ranges_are_one_line_errors():
    from common.errors import ConfigError
    with pytest.raises(ConfigError, match="too few schedule steps"):
        timesteps.sample_sigmas("discrete_wo_init", 2, 1, SD35, (0.0, 0.03))
    with pytest.raises(ConfigError, match="0 <= lo < hi <= 1"):
        timesteps.check_config("uniform", 2, (0.5, 0.5), 1.0)
    assert timesteps.num_timesteps(0, 10, (0.0, 0.7)) == 7 and timesteps.num_timesteps(3, 10, (0.0, 0.7)) == 3


# ---- I.4-26 EMA ----

@pytest.mark.parametrize("schedule, step, kw, want", [
    ("piecewise_linear", 0, {}, 0.0), ("piecewise_linear", 75, dict(flat_steps=75), 0.0),
    ("piecewise_linear", 80, dict(flat_steps=75, ramp_rate=0.0075), 0.0375), ("piecewise_linear", 10**6, {}, 0.5),
    ("power", 0, {}, 0.1), ("power", 10**6, {}, 0.5), ("power", 5, dict(warmup_steps=0), 0.5),
    ("linear", 0, dict(initial_decay=0.1), 0.1), ("linear", 300, dict(warmup_steps=300), 0.5),
    ("linear", 150, dict(warmup_steps=300), 0.25), ("cosine", 0, dict(initial_decay=0.2), 0.2),
    ("cosine", 1000, {}, 0.5), ("warmup_cosine", 0, dict(initial_decay=0.2), 0.0),
    ("warmup_cosine", 10, dict(initial_decay=0.2), 0.2), ("warmup_cosine", 1000, dict(initial_decay=0.2), 0.5),
    ("constant", 7, {}, 0.5),
])
def test_ema_schedule_values(schedule, step, kw, want):
    assert ema_decay(schedule, step, 0.5, **kw) == pytest.approx(want, abs=1e-12)


def test_ema_interval_and_frozen_parameters():
    net = torch.nn.Linear(3, 2)
    net.bias.requires_grad_(False)
    ema = EMA(net.parameters(), interval=3, schedule="constant", decay=0.5)
    w0, b0 = net.weight.detach().clone(), net.bias.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    assert ema.step(0) is None and ema.step(1) is None and torch.equal(ema.shadow[0], w0)
    assert ema.step(2) == 0.5 and torch.allclose(ema.shadow[0].double(), w0.double() + 0.5)
    assert len(ema.shadow) == 1  # the frozen bias has no shadow
    with ema.swapped_in():
        assert torch.equal(net.bias, b0) and torch.allclose(net.weight, w0 + 0.5)
    assert torch.equal(net.weight, w0 + 1.0) and torch.equal(net.bias, b0)


# ---- I.4-27 accumulation: G optimizer steps per inner epoch ----

@pytest.mark.parametrize("script", ["grpo_guard", "nft", "awm"])
def test_optimizer_steps_per_inner_epoch(tmp_path, script):
    row = tiny_run(script, tmp_path, "--gradient-steps-per-epoch", "4", "--num-inner-epochs", "2")[-1]
    assert row["step"] == 4 * 2
