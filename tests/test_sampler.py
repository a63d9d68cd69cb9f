"""docs/algorithms.md I.1 (schedules and steps) and I.2 (log-probs), against independent fp64 formulas."""
import math

import numpy as np
import pytest
import torch

from common import sampler

DYN = ["Flow-SDE", "Dance-SDE", "CPS"]


def ref_mean_std(z, v, s, sn, eta, dyn, s1):
    """fp64 reference written straight from docs/algorithms.md B.2-B.4."""
    z, v = z.double(), v.double()
    dt = sn - s
    if dyn == "CPS":
        std = sn * math.sin(eta * math.pi / 2)
        x0, eps = z - s * v, z + (1 - s) * v
        return (1 - sn) * x0 + math.sqrt(sn**2 - std**2) * eps, std
    g = eta * math.sqrt(s / ((1 - s1) if s == 1.0 else (1 - s))) if dyn == "Flow-SDE" else eta
    # the first of the "two forms" of B.2
    mean = z * (1 + g**2 * dt / (2 * s)) + v * (1 + g**2 * (1 - s) / (2 * s)) * dt
    return mean, g * math.sqrt(-dt)


@pytest.mark.parametrize("dyn", DYN)
@pytest.mark.parametrize("s,sn", [(1.0, 0.9), (0.7, 0.55), (0.3, 0.0)])
def test_mean_std_match_reference(dyn, s, sn):  # I.1-8: both forms agree, Dance == Flow with g = eta
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(3, 16, 8, generator=g), torch.randn(3, 16, 8, generator=g)
    mean, std = sampler.step_mean_std(z, v, s, sn, 0.7, dyn, sigma_1=0.9)
    rmean, rstd = ref_mean_std(z, v, s, sn, 0.7, dyn, 0.9)
    torch.testing.assert_close(mean.double(), rmean, rtol=1e-5, atol=1e-5)
    assert float(std.flatten()[0]) == pytest.approx(rstd, rel=1e-6, abs=1e-7)


def test_ode_step():  # I.1-3
    z, v = torch.randn(2, 5), torch.randn(2, 5)
    out = sampler.sde_step(z, v, 0.8, 0.6, 0.0, "ODE")
    torch.testing.assert_close(out.next.double(), z.double() + v.double() * (0.6 - 0.8), rtol=1e-6, atol=1e-6)
    assert out.log_prob is None


@pytest.mark.parametrize("dyn", DYN)
def test_eta_zero_reduces_to_ode(dyn):  # I.1-4 (eta as a tensor exercises the SDE formulas themselves)
    z, v = torch.randn(4, 6, 3), torch.randn(4, 6, 3)
    mean, std = sampler.step_mean_std(z, v, 0.8, 0.6, torch.zeros(4), dyn, sigma_1=0.9)
    torch.testing.assert_close(mean, z + v * (0.6 - 0.8), rtol=1e-6, atol=1e-6)
    assert torch.all(std == 0)


def test_flow_sde_first_step_std_is_eta():  # I.1-5
    mean, std = sampler.step_mean_std(torch.randn(2, 4), torch.randn(2, 4), 1.0, 0.944, 0.7, "Flow-SDE", 0.944)
    assert torch.isfinite(mean).all() and float(std) == pytest.approx(0.7, abs=1e-6)


@pytest.mark.parametrize("eta", [0.3, 0.8, 1.0])
def test_cps_preserves_marginal_coefficients(eta):  # I.1-6
    s, sn = 0.6, 0.4
    std = sn * math.sin(eta * math.pi / 2)
    assert math.sqrt(sn**2 - std**2) ** 2 + std**2 == pytest.approx(sn**2, rel=1e-12)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 8, generator=g).double().expand(200_000, 8)
    z = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    v = (z - x0) / s  # exact velocity for Dirac data
    out = sampler.sde_step(z, v, s, sn, eta, "CPS", generator=g, storage_dtype=torch.float64)
    resid = out.next.double() - (1 - sn) * x0
    assert resid.mean().abs() < 3e-3
    assert resid.var() == pytest.approx(sn**2, rel=1e-2)


def _gaussian_chain(dyn, n_steps, m=0.5, c=0.6, n=200_000, eta=0.7):
    """Simulate the SDE with the exact velocity of x0 ~ N(m, c^2); return terminal mean and var errors."""
    def v_star(z, s):
        var_z = (1 - s) ** 2 * c**2 + s**2
        centred = z - (1 - s) * m
        return s / var_z * centred - (m + (1 - s) * c**2 / var_z * centred)
    sig = torch.linspace(1, 0, n_steps + 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(n, 1, generator=g, dtype=torch.float64)
    for i in range(n_steps):
        s, sn = float(sig[i]), float(sig[i + 1])
        z = sampler.sde_step(z, v_star(z, s), s, sn, eta, dyn, float(sig[1]), generator=g,
                             storage_dtype=torch.float64).next.double()
    return abs(z.mean().item() - m), abs(z.var().item() - c**2)


@pytest.mark.parametrize("dyn", ["Flow-SDE", "Dance-SDE"])
def test_sde_marginals_converge(dyn):  # I.1-7: terminal moments match the data, error shrinks with N
    coarse, fine = _gaussian_chain(dyn, 8), _gaussian_chain(dyn, 64)
    assert fine[1] < coarse[1]
    assert fine[0] < 0.02 and fine[1] < 0.03


@pytest.mark.parametrize("dyn", ["Flow-SDE", "Dance-SDE"])
def test_log_prob_matches_normal(dyn):  # I.2-9
    g = torch.Generator().manual_seed(3)
    z, v, zn = (torch.randn(3, 10, 4, generator=g) for _ in range(3))
    mean, std = sampler.step_mean_std(z, v, 0.7, 0.5, 0.8, dyn, 0.9)
    lp = sampler.gaussian_log_prob(zn, mean, std, dyn)
    ref = torch.distributions.Normal(mean.double(), std.double()).log_prob(zn.double()).mean((1, 2))
    torch.testing.assert_close(lp.double(), ref, rtol=1e-6, atol=1e-6)


def test_expected_log_prob():  # I.2-10
    mean, s = torch.zeros(50_000, 64), 0.3
    g = torch.Generator().manual_seed(4)
    lp = sampler.gaussian_log_prob(mean + s * torch.randn(mean.shape, generator=g), mean, torch.tensor(s), "Flow-SDE")
    assert lp.mean().item() == pytest.approx(-0.5 - math.log(s) - 0.5 * math.log(2 * math.pi), abs=1e-3)


def test_cps_log_prob():  # I.2-11
    g = torch.Generator().manual_seed(5)
    z, v = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    out = sampler.sde_step(z, v, 0.7, 0.5, 0.8, "CPS", generator=g)
    ref = -((out.next.double() - out.mean.double()) ** 2).mean(1)
    torch.testing.assert_close(out.log_prob.double(), ref, rtol=1e-6, atol=1e-7)
    s = float(out.std)
    gauss = sampler.gaussian_log_prob(out.next, out.mean, out.std, "Flow-SDE").double()
    torch.testing.assert_close(out.log_prob.double(), 2 * s**2 * (gauss + math.log(s) + 0.5 * math.log(2 * math.pi)),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_storage_round_trip_reproduces_log_prob(dtype):  # I.2-12
    g = torch.Generator().manual_seed(6)
    z, v = torch.randn(2, 32, 16, generator=g), torch.randn(2, 32, 16, generator=g)
    out = sampler.sde_step(z, v, 0.8, 0.7, 0.7, "Flow-SDE", 0.9, generator=g, storage_dtype=dtype)
    stored = out.next.to(dtype)
    again = sampler.sde_step(z, v, 0.8, 0.7, 0.7, "Flow-SDE", 0.9, z_next=stored.float())
    assert torch.equal(again.log_prob, out.log_prob)


def test_sde_window_draw():
    w = sampler.draw_sde_window(10, 3, 0, 10, seed=1)
    assert w == list(range(w[0], w[0] + 3)) and 0 <= w[0] <= 7
    assert sampler.draw_sde_window(10, 3, 0, 10, seed=1) == w  # same seed, same window on every rank
    assert {sampler.draw_sde_window(10, 1, 1, 4, seed=s)[0] for s in range(50)} == {1, 2, 3}
    assert sampler.draw_sde_window(10, 10, 0, 10, seed=5) == list(range(10))  # original Flow-GRPO
    with pytest.raises(ValueError):
        sampler.draw_sde_window(10, 4, 8, 10, seed=0)


def test_rollout_keeps_only_needed_latents():
    sig = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    traj = sampler.rollout(lambda z, i: torch.ones_like(z), torch.zeros(2, 3), sig, sde_steps=[1, 2], eta=0.7,
                           dynamics="Flow-SDE", generator=torch.Generator().manual_seed(0))
    assert sorted(traj.latents) == [1, 2, 3] and sorted(traj.log_probs) == [1, 2]
    ode = sampler.rollout(lambda z, i: torch.ones_like(z), torch.zeros(2, 3), sig)
    assert ode.latents == {} and torch.allclose(ode.final, -torch.ones(2, 3))


def test_cps_last_step_is_deterministic_and_has_no_log_prob():
    # CPS's std is sigma_next sin(eta pi / 2): 0 on the step to sigma 0, whose z_next is the mean itself
    sig = torch.tensor([1.0, 0.5, 0.0])
    traj = sampler.rollout(lambda z, i: torch.ones_like(z), torch.zeros(2, 3), sig, sde_steps=[0, 1], eta=0.8,
                           dynamics="CPS", keep_means=True, generator=torch.Generator().manual_seed(0))
    assert sorted(traj.log_probs) == [0] and sorted(traj.means) == [0, 1]
    assert torch.equal(traj.final, traj.means[1]) and traj.rows(slice(0, 1)).final.shape == (1, 3)


def test_flux1_schedule_formula():  # I.1-1/2: pipeline schedule == fp64 formula, static == dynamic(ln S)
    from diffusers import FlowMatchEulerDiscreteScheduler
    from common.models.flux1 import Flux1Adapter
    n, seq = 10, 1024
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq - 256)
    base = np.linspace(1.0, 1 / n, n)
    ref = np.append(np.exp(mu) / (np.exp(mu) + (1 / base - 1)), 0.0)
    adapter = Flux1Adapter.__new__(Flux1Adapter)
    adapter.pipe = type("P", (), {"scheduler": FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)})()
    sig = adapter.sigmas(n, {"seq_len": seq}).double().numpy()
    np.testing.assert_allclose(sig, ref, atol=1e-6)
    assert sig[0] == 1.0 and sig[-1] == 0.0 and np.all(np.diff(sig) < 0)
    np.testing.assert_allclose(sig[:11], [1, .944, .883, .814, .738, .653, .556, .446, .320, .173, 0], atol=6e-4)
    s = 3.0
    static = s * base / (1 + (s - 1) * base)
    dynamic = np.exp(np.log(s)) / (np.exp(np.log(s)) + (1 / base - 1))
    np.testing.assert_allclose(static, dynamic, rtol=1e-12)
