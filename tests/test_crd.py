"""crd.py: docs/crd.md's invariants (the implicit reward at theta = old, the on-policy gradient, within-group
centering, the reward weight, the reward-adaptive KL weight, the snapshots' decay schedules) against fp64 formulas
written here, and tiny runs that record what the loss is given."""
import pytest
import torch
from safetensors.torch import load_file

import crd
from common.ema import EMA, ema_decay
from common.errors import ConfigError
from tests.helpers import tiny_args, tiny_run
from tests.test_grpo import fresh_accelerator_state  # noqa: F401 (autouse fixture)

C = 5.0


def _velocities(seed, n=6, shape=(8, 4)):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    v = (u + 0.7 * torch.randn(n, *shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    return v, u


# ---- invariant 32: theta = old ----

@pytest.mark.parametrize("beta", [0.3, 1.0, 4.0])
def test_theta_equals_old_gives_zero_reward_and_reward_weighted_matching_gradient(beta):
    v, u = _velocities(0)
    adv = torch.tensor([2.0, -7.0, 0.5, -1.5, 0.0, 4.0], dtype=torch.float64)  # -7 is clipped to -C
    a = crd.reward_weight(adv, C)
    centered = a - a.mean()
    r = crd.weighted_error(v.detach(), u) - crd.weighted_error(v, u)  # the old snapshot's minus the policy's
    assert torch.equal(r.detach(), torch.zeros(6, dtype=torch.float64))
    crd.crd_loss(r, r.detach().mean(), centered, beta, C).mean().backward()
    # (2C/B) sum_i R_c,i grad(e_i / w_i), e = mean_d (v - u)^2, w = mean_d |v - u| detached: no beta anywhere
    v2 = v.detach().clone().requires_grad_(True)
    err = (v2 - u).flatten(1)
    a64 = (adv.clamp(-C, C) / C / 2 + 0.5).clamp(0, 1)
    want = 2 * C / 6 * ((a64 - a64.mean()) * (err**2).mean(1) / err.detach().abs().mean(1)).sum()
    (grad,) = torch.autograd.grad(want, v2)
    torch.testing.assert_close(v.grad, grad, rtol=1e-10, atol=1e-12)


def test_weighted_error_weight_is_detached_and_floored():
    v, u = _velocities(1, n=2)
    q = crd.weighted_error(v, u)
    err = (v - u).detach().flatten(1)
    torch.testing.assert_close(q.detach(), (err**2).mean(1) / err.abs().mean(1), rtol=1e-12, atol=0)
    q.sum().backward()  # d/dv of e / w with w constant: 2 (v - u) / (D w)
    torch.testing.assert_close(v.grad.flatten(1), 2 * err / err.shape[1] / err.abs().mean(1, keepdim=True),
                               rtol=1e-12, atol=1e-14)
    assert crd.weighted_error(u[:1], u[:1]).item() == 0.0  # w floored at 1e-5: no 0/0


def _group_loss(r, a, beta, kind="mse"):
    """The script's per-group loss: r and a (n_groups, K), each group centered on its own mean."""
    return torch.stack([crd.crd_loss(rg, rg.detach().mean(), ag - ag.mean(), beta, C, kind).mean()
                        for rg, ag in zip(r, a)]).mean()


def test_centering_within_groups():
    g = torch.Generator().manual_seed(2)
    r = 0.3 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    a = torch.rand(3, 5, generator=g, dtype=torch.float64)
    centered = a - a.mean(1, keepdim=True)
    assert centered.sum(1).abs().max() < 1e-15  # sum R_c = 0 per group
    beta = 2.0
    want = (C / beta * (beta * (r - r.mean(1, keepdim=True)) - centered) ** 2).mean()  # fp64, written out here
    torch.testing.assert_close(_group_loss(r, a, beta), want, rtol=1e-13, atol=0)
    shift = torch.tensor([[3.0], [-7.5], [0.25]], dtype=torch.float64)  # one constant per prompt
    torch.testing.assert_close(_group_loss(r + shift, a, beta), want, rtol=1e-12, atol=1e-14)
    # Flow-Factory's micro-batch centering (one mean over all groups) sees the per-prompt constants: the paper's
    # within-prompt centering is what cancels each prompt's normaliser
    flat = lambda x: (C / beta * (beta * (x - x.mean()) - (a - a.mean())) ** 2).mean()  # noqa: E731
    torch.testing.assert_close(flat(r + 1.7), flat(r), rtol=1e-12, atol=1e-14)
    assert (flat(r + shift) - flat(r)).abs() > 1e-2


@pytest.mark.parametrize("kind", ["mse", "bce"])
def test_both_losses_are_stationary_where_the_rewards_match(kind):
    g = torch.Generator().manual_seed(3)
    centered = torch.rand(6, generator=g, dtype=torch.float64) - 0.5
    beta, r_bar = 2.5, torch.tensor(0.4, dtype=torch.float64)
    r = (r_bar + centered / beta).requires_grad_(True)  # beta (r - r_bar) = R_c
    crd.crd_loss(r, r_bar, centered, beta, C, kind).sum().backward()
    assert r.grad.abs().max() < 1e-12
    r2 = (r.detach() + 0.1).requires_grad_(True)  # past the match: the gradient pushes r back
    crd.crd_loss(r2, r_bar, centered, beta, C, kind).sum().backward()
    assert (r2.grad > 0).all()


# ---- invariant 33: the reward weight, the adaptive KL, the decay schedules ----

def test_reward_weight_and_adaptive_kl_weight():
    a = crd.reward_weight(torch.tensor([-20.0, -5.0, 0.0, 2.5, 5.0, 20.0]), C)
    assert a.tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]
    for kl_beta in (0.1, 0.01, 1.0):
        w = kl_beta * crd.kl_weight(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), kl_beta, True)
        torch.testing.assert_close(w, torch.tensor([1e-4, (1e-4 + kl_beta) / 2, kl_beta], dtype=torch.float64),
                                   rtol=1e-12, atol=0)
    assert crd.kl_weight(torch.tensor([0.0, 1.0]), 0.1, False).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("decay, step, want", [
    ((0, 0.25, 0.005, 0.999), 0, 0.25), ((0, 0.25, 0.005, 0.999), 100, 0.75),
    ((0, 0.25, 0.005, 0.999), 149, 0.995), ((0, 0.25, 0.005, 0.999), 150, 0.999),
    ((0, 0.25, 0.005, 0.999), 10**5, 0.999),
    ((75, 0.0, 0.0075, 0.999), 0, 0.0), ((75, 0.0, 0.0075, 0.999), 74, 0.0), ((75, 0.0, 0.0075, 0.999), 80, 0.0375),
    ((75, 0.0, 0.0075, 0.999), 10**5, 0.999),
])
def test_snapshot_decays(decay, step, want):  # "START-D0-RAMP-MAX": D0 before START, then min(D0 + RAMP (s - START), MAX)
    assert ema_decay(step=step, **crd.decay_schedule(decay)) == pytest.approx(want, abs=1e-12)


def test_old_snapshot_blends_a_quarter_of_itself_at_step_0():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    old = EMA([p], **crd.decay_schedule((0, 0.25, 0.005, 0.999)))
    with torch.no_grad():
        p.add_(4.0)
    assert old.step(0) == 0.25 and torch.equal(old.shadow[0], 0.25 * torch.tensor([1.0, -2.0]) + 0.75 * p.detach())


def test_bad_flags_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="--old-decay START D0 RAMP MAX"):
        crd.check_args(tiny_args("crd", tmp_path, "--old-decay", "0", "1.5", "0.005", "0.999"))
    with pytest.raises(ConfigError, match="--crd-beta must be > 0"):
        crd.check_args(tiny_args("crd", tmp_path, "--crd-beta", "0"))
    with pytest.raises(ConfigError, match="4 groups per process do not split"):  # 8 micro-batches, 4 groups
        crd.main(tiny_args("crd", tmp_path, "--gradient-steps-per-epoch", "8"))


# ---- tiny runs: what the loss is given ----

@pytest.fixture
def recorded(monkeypatch):
    calls = []

    def recording(r, r_bar, centered, *rest):
        calls.append((r.detach().clone(), r_bar.detach().clone(), centered.clone()))
        return loss(r, r_bar, centered, *rest)

    loss = crd.crd_loss
    monkeypatch.setattr(crd, "crd_loss", recording)
    return calls


def test_tiny_run_centers_each_group_over_its_chunks(tmp_path, recorded):
    """--tiny: 4 groups of K = 4 in 2 chunks of 2, T = 2, an optimizer step after every 2 groups."""
    row = tiny_run("crd", tmp_path, "--off-policy")[-1]  # rollouts by the sampling snapshot
    assert len(recorded) == 4 * 2 * 2
    for n in range(0, len(recorded), 2):  # a (group, timestep): its two chunks
        (r0, bar0, c0), (r1, bar1, c1) = recorded[n], recorded[n + 1]
        assert torch.equal(bar0, bar1)  # r_bar from the no-gradient pass over every member, at the same weights
        torch.testing.assert_close(bar0, torch.cat([r0, r1]).mean(), rtol=1e-5, atol=1e-12)
        assert torch.cat([c0, c1]).sum().abs() < 1e-6
        if n < 2 * 2 * 2:  # the first optimizer step's groups: old = theta, r_theta = 0 exactly
            assert not r0.any() and not r1.any()
    assert any(r.abs().max() > 0 for r, _, _ in recorded[8:])  # after it, theta has left old
    for key in ["train/loss", "train/policy_loss", "train/kl", "train/implicit_reward", "train/target_reward",
                "train/ratio_mean", "train/onpolicy_ratio_dev", "grad_norm"]:
        assert row[key] == row[key] and abs(row[key]) < 1e6, key
    assert row["step"] == 2 and row["train/kl"] > 0 and row["train/onpolicy_ratio_dev"] == 0.0
    trained = load_file(tmp_path / "checkpoints/checkpoint-2/trainable.safetensors")
    assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)  # LoRA B starts at 0: moved


def test_tiny_run_one_chunk_bce_on_policy(tmp_path, recorded):
    """A group in one chunk takes r_bar from the gradient pass itself; BCE; rollouts by the weights; plain KL."""
    row = tiny_run("crd", tmp_path, "--batch-size", "4", "--crd-loss", "bce", "--no-reward-adaptive-kl",
                   "--kl-beta", "0.05")[-1]
    assert len(recorded) == 4 * 2
    for r, bar, centered in recorded:
        assert torch.equal(bar, r.mean()) and centered.sum().abs() < 1e-6
    assert row["step"] == 2 and row["train/kl"] > 0 and row["train/loss"] == row["train/loss"]
