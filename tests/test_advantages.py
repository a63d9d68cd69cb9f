"""docs/algorithms.md I.3 (advantages, C.3) and I.2 (PPO clip and KL, C.4), against fp64 formulas."""
import math

import pytest
import torch

from common.advantages import compute_advantages
from grpo import kl_penalty, ppo_clip_loss


def _rewards(seed=0, m=5, k=6):
    g = torch.Generator().manual_seed(seed)
    groups = torch.arange(m).repeat_interleave(k)[torch.randperm(m * k, generator=g)]
    return {"a": torch.randn(m * k, generator=g, dtype=torch.float64),
            "b": 3 * torch.rand(m * k, generator=g, dtype=torch.float64)}, groups


def test_sum_per_group_zero_mean_unit_std():  # I.3-17
    r, groups = _rewards()
    r["a"][groups == 2] = 0.7  # a constant group
    adv = compute_advantages({"a": r["a"]}, {"a": 1.0}, groups, eps=1e-12).double()
    for gid in groups.unique():
        a = adv[groups == gid]
        if gid == 2:
            assert torch.all(a == 0)
        else:
            assert a.mean().abs() < 1e-6 and a.std(unbiased=False) == pytest.approx(1, abs=1e-5)


def test_sum_eps_is_additive():  # decision 3: (R - mean) / (std + eps)
    r, groups = _rewards()
    adv = compute_advantages({"a": r["a"]}, {"a": 1.0}, groups, eps=1e-4)
    sel = groups == 0
    x = r["a"][sel]
    torch.testing.assert_close(adv[sel].double(), (x - x.mean()) / (x.std(unbiased=False) + 1e-4), rtol=1e-6, atol=1e-6)


def test_sum_global_std_reconstructs_rewards():  # I.3-18
    r, groups = _rewards()
    total = 1.0 * r["a"] + 0.5 * r["b"]
    adv = compute_advantages(r, {"a": 1.0, "b": 0.5}, groups, global_std=True, eps=0.0, clip=1e9).double()
    group_mean = torch.stack([total[groups == g].mean() for g in groups])
    torch.testing.assert_close(adv * total.std(unbiased=False) + group_mean, total, rtol=1e-6, atol=1e-6)


def test_gdpo_global_standardised_and_affine_invariant():  # I.3-19
    r, groups = _rewards()
    adv = compute_advantages(r, {"a": 1.0, "b": 2.0}, groups, aggregation="gdpo", eps=1e-12, clip=1e9).double()
    assert adv.mean().abs() < 1e-6 and adv.std(unbiased=False) == pytest.approx(1, abs=1e-5)
    scaled = {"a": 4 * r["a"] - 3, "b": 0.1 * r["b"] + 7}
    adv2 = compute_advantages(scaled, {"a": 1.0, "b": 2.0}, groups, aggregation="gdpo", eps=1e-12, clip=1e9)
    torch.testing.assert_close(adv2.double(), adv, rtol=1e-5, atol=1e-5)


def test_clip():
    r, groups = _rewards()
    assert compute_advantages(r, {"a": 1, "b": 1}, groups, clip=0.5).abs().max() <= 0.5
    with pytest.raises(ValueError):
        compute_advantages(r, {"a": 1, "b": 1}, groups, aggregation="nope")


def test_ppo_clip_gradient():  # I.2-14
    eps = 0.1
    old = torch.zeros(6, dtype=torch.float64)
    logp = torch.tensor([0.0, 0.2, -0.2, 0.2, -0.2, 0.05], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -2.0], dtype=torch.float64)
    loss, ratio = ppo_clip_loss(logp, old, adv, eps)
    loss.backward()
    r = torch.exp(logp.detach())
    zero = ((adv > 0) & (r > 1 + eps)) | ((adv < 0) & (r < 1 - eps))
    expected = torch.where(zero, torch.zeros_like(r), -adv * r / len(r))
    torch.testing.assert_close(logp.grad, expected)
    # at ratio 1 the gradient is -mean(A * grad logp)
    lp = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    ppo_clip_loss(lp, torch.zeros(4, dtype=torch.float64), a, eps)[0].backward()
    torch.testing.assert_close(lp.grad, -a / 4)


def test_kl_x_based_relation():  # I.2-16: KL_x(exact) = (1+eta^2/2)^2 Delta KL_v / (2 g^2), Flow-SDE, sigma < 1
    from common.sampler import step_mean_std
    s, sn, eta = 0.7, 0.55, 0.8
    g = torch.Generator().manual_seed(0)
    z, v, v_ref = (torch.randn(3, 20, 4, generator=g, dtype=torch.float64) for _ in range(3))
    mean, std = step_mean_std(z, v, s, sn, eta, "Flow-SDE", 0.9)
    mean_ref, _ = step_mean_std(z, v_ref, s, sn, eta, "Flow-SDE", 0.9)
    kl_x = kl_penalty("x-based", v, v_ref, mean.double(), mean_ref.double(), std.double())
    kl_v = kl_penalty("v-based", v, v_ref, None, None, None)
    gt, delta = eta * math.sqrt(s / (1 - s)), s - sn
    assert kl_x.item() == pytest.approx((1 + eta**2 / 2) ** 2 * delta * kl_v.item() / (2 * gt**2), rel=1e-5)
    # the same exact KL from the fp64 Gaussian formula
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean.double(), std.double()),
                                            torch.distributions.Normal(mean_ref.double(), std.double())).mean()
    assert kl_x.item() == pytest.approx(ref.item(), rel=1e-5)
