"""dppo.py (Flow-DPPO, docs/dppo.md): invariant 34 of docs/dppo.md#tests against fp64 formulas written here (the
exact transition KL, E[log rho] = -kappa by Monte Carlo, the asymmetric mask's gradient, the on-policy gradient),
the script's kappa on the sampler's own transition std, and tiny runs (metrics, on-policy kappa, weights moved)."""
import math

import pytest
import torch
from safetensors.torch import load_file

import dppo
from common import sampler
from common.errors import USER_ERRORS
from tests.helpers import tiny_args, tiny_run
from tests.test_grpo import fresh_accelerator_state  # noqa: F401 (autouse fixture)

F64 = torch.float64


def normal_lp64(z_next, mean, std):
    """Per-element average Gaussian log density in fp64, (B,), from the density itself."""
    return (-0.5 * ((z_next - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)


def flow_sde64(z, v, sigma, sigma_next, eta):
    """Flow-SDE transition (docs/algorithms.md B), fp64, sigma < 1: mean and std."""
    g = eta * math.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    return z + (v + g**2 / (2 * sigma) * (z + (1 - sigma) * v)) * dt, torch.tensor(g * math.sqrt(-dt), dtype=F64)


def test_kappa_is_the_closed_form_gaussian_kl():
    g = torch.Generator().manual_seed(0)
    mean, old = torch.randn(3, 4, 5, generator=g, dtype=F64), torch.randn(3, 4, 5, generator=g, dtype=F64)
    for std in (torch.tensor(0.37, dtype=F64), torch.tensor([0.2, 0.5, 0.9], dtype=F64).view(3, 1, 1)):
        s = std.expand_as(mean)
        # KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2/s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2, per element
        want = (torch.log(s / s) + (s**2 + (mean - old) ** 2) / (2 * s**2) - 0.5).flatten(1).mean(1)
        lib = torch.distributions.kl_divergence(torch.distributions.Normal(mean, s), torch.distributions.Normal(old, s))
        got = dppo.transition_kl(mean, old, std)
        assert got.shape == (3,)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got, lib.flatten(1).mean(1), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dppo.transition_kl(old, mean, std), got, rtol=1e-12, atol=0)  # symmetric


def test_kappa_on_the_samplers_transition_std():  # what the script passes: sde_step's mean and std
    g = torch.Generator().manual_seed(1)
    z, v_old = torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, 8, generator=g)
    v = v_old + 0.05 * torch.randn(2, 16, 8, generator=g)
    old = sampler.sde_step(z, v_old, 0.7, 0.6, 0.8, "Flow-SDE", 0.9, generator=g)
    out = sampler.sde_step(z, v, 0.7, 0.6, 0.8, "Flow-SDE", 0.9, z_next=old.next)
    mean64, s64 = flow_sde64(z.double(), v.double(), 0.7, 0.6, 0.8)
    old64, _ = flow_sde64(z.double(), v_old.double(), 0.7, 0.6, 0.8)
    want = ((mean64 - old64) ** 2).flatten(1).mean(1) / (2 * s64**2)
    got = dppo.transition_kl(out.mean, old.mean, out.std).double()  # fp32 means: delta ~ 7e-3 keeps ~5 digits
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0)


def test_mc_mean_log_ratio_is_minus_kappa():  # E_xi[log rho] = -kappa; log rho = mean_d(xi delta / s) - kappa
    g = torch.Generator().manual_seed(2)
    n, d = 4000, 256
    z, v_old = torch.randn(1, d, generator=g, dtype=F64), torch.randn(1, d, generator=g, dtype=F64)
    v = v_old + 0.3 * torch.randn(1, d, generator=g, dtype=F64)
    mean, s = flow_sde64(z, v, 0.5, 0.4, 0.8)
    old, _ = flow_sde64(z, v_old, 0.5, 0.4, 0.8)
    kappa = dppo.transition_kl(mean, old, s)[0]
    z_next = old + s * torch.randn(n, d, generator=g, dtype=F64)  # rollout samples of the old policy
    log_rho = normal_lp64(z_next, mean.expand(n, d), s) - normal_lp64(z_next, old.expand(n, d), s)
    # each log rho has std sqrt(mean_d(delta^2 / s^2) / d) = sqrt(2 kappa / d): the MC mean's std is that / sqrt(n)
    mc_std = math.sqrt(2 * kappa / d / n)
    assert abs(log_rho.mean() + kappa) < 5 * mc_std
    assert kappa > 50 * mc_std  # the shift is resolved at this size (not a vacuous pass)
    assert abs(log_rho.std() - math.sqrt(2 * kappa / d)) < 0.05 * math.sqrt(2 * kappa / d)


def _batch():
    """Log-probs as leaves, one sample in each (sign of A, side of rho) cell, and A = 0."""
    adv = torch.tensor([1.5, 0.7, -1.2, -0.4, 0.0, 2.0], dtype=F64)
    old = torch.tensor([-1.0, -2.0, -0.5, -1.5, -1.0, -0.3], dtype=F64)
    delta = torch.tensor([3e-3, -2e-3, -4e-3, 1e-3, 5e-3, 0.0], dtype=F64)  # rho > 1, < 1, < 1, > 1, > 1, = 1
    return (old + delta).requires_grad_(), old, adv


def _reference(lp, old, adv, keep):
    """fp64: the loss mean(-A rho keep) and its gradient -A rho keep / B (d rho / d lp = rho)."""
    rho = torch.exp(lp.detach() - old)
    return (-adv * rho * keep).mean(), -adv * rho * keep / len(adv)


def test_below_tau_everything_passes():
    lp, old, adv = _batch()
    kappa = torch.full((6,), 9e-6, dtype=F64)
    loss, ratio, drop = dppo.dppo_loss(lp, old, adv, kappa, 1e-5)
    loss.backward()
    want_loss, want_grad = _reference(lp, old, adv, torch.ones(6, dtype=F64))
    assert not drop.any()
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(lp.grad, want_grad, rtol=1e-12, atol=1e-15)


def test_above_tau_only_pushing_updates_are_dropped():
    lp, old, adv = _batch()
    kappa = torch.tensor([2e-5, 2e-5, 1e-5, 1e-4, 1e-3, 1.0], dtype=F64)  # all >= tau (kappa == tau drops too)
    loss, ratio, drop = dppo.dppo_loss(lp, old, adv, kappa, 1e-5)
    loss.backward()
    # dropped: A > 0 and rho > 1 (row 0), A < 0 and rho < 1 (row 2); corrective rows 1, 3 keep their gradient
    assert drop.tolist() == [True, False, True, False, False, False]
    assert lp.grad[0] == 0 and lp.grad[2] == 0  # exactly
    assert lp.grad[1] != 0 and lp.grad[3] != 0
    assert lp.grad[1] < 0 < lp.grad[3]  # descent moves both ratios back towards 1
    want_loss, want_grad = _reference(lp, old, adv, (~drop).to(F64))
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(lp.grad, want_grad, rtol=1e-12, atol=1e-15)
    # per sample: a row below tau passes whatever its direction
    lp.grad = None
    loss, _, drop = dppo.dppo_loss(lp, old, adv, torch.tensor([0.0, 1, 1, 1, 1, 1], dtype=F64), 1e-5)
    assert drop.tolist() == [False, False, True, False, False, False]


def test_on_policy_kappa_zero_rho_one_and_the_reinforce_gradient():
    g = torch.Generator().manual_seed(3)
    b, d = 5, 12
    w = torch.randn(d, d, generator=g, dtype=F64) / d
    z = torch.randn(b, d, generator=g, dtype=F64)
    adv = torch.randn(b, generator=g, dtype=F64)
    with torch.no_grad():  # the rollout: theta_old = w
        old_mean, s = flow_sde64(z, z @ w, 0.8, 0.7, 0.8)
        z_next = old_mean + s * torch.randn(b, d, generator=g, dtype=F64)
        old_lp = normal_lp64(z_next, old_mean, s)
    theta = w.clone().requires_grad_()
    mean, _ = flow_sde64(z, z @ theta, 0.8, 0.7, 0.8)
    lp = normal_lp64(z_next, mean, s)
    kappa = dppo.transition_kl(mean.detach(), old_mean, s)
    loss, ratio, drop = dppo.dppo_loss(lp, old_lp, adv, kappa, 0.0)  # tau = 0: the mask could act, rho = 1 stops it
    assert torch.equal(kappa, torch.zeros(b, dtype=F64)) and torch.equal(ratio.detach(), torch.ones(b, dtype=F64))
    assert not drop.any()
    grad = torch.autograd.grad(loss, theta)[0]
    theta2 = w.clone().requires_grad_()
    mean2, _ = flow_sde64(z, z @ theta2, 0.8, 0.7, 0.8)
    want = torch.autograd.grad((-adv * normal_lp64(z_next, mean2, s)).mean(), theta2)[0]  # -mean(A grad l)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-14)
    assert grad.abs().max() > 0


def test_tiny_run_logs_kappa_and_trains(tmp_path):
    rows = tiny_run("dppo", tmp_path / "a", "--num-epochs", "2", "--save-every", "1")
    for row in rows:
        for key in ("train/loss", "train/policy_loss", "train/maskfrac", "train/kappa", "train/kappa_max",
                    "train/onpolicy_kappa", "train/ratio_mean", "train/ratio_min", "train/ratio_max"):
            assert math.isfinite(row[key]), key
        # the first micro-batch, re-scored before any update: kappa << tau (here bitwise 0: the same kernels)
        assert row["train/onpolicy_kappa"] <= 1e-3 * 1e-5
        assert row["train/onpolicy_ratio_dev"] == 0.0
        assert 0 < row["train/kappa"] <= row["train/kappa_max"]  # the second optimizer step is off-policy
    a, b = (load_file(tmp_path / f"a/checkpoints/checkpoint-{r['step']}/trainable.safetensors") for r in rows)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the weights moved


def test_tau_zero_masks_the_pushing_updates(tmp_path):  # every off-policy step pushing along A is dropped
    row = tiny_run("dppo", tmp_path / "m", "--trust-tau", "0")[-1]
    assert 0 < row["train/maskfrac"] < 1


def test_bad_tau(tmp_path):
    with pytest.raises(USER_ERRORS, match="--trust-tau must be >= 0"):
        dppo.main(tiny_args("dppo", tmp_path / "err", "--trust-tau", "-1"))
