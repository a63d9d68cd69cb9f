"""dpo.py: the Diffusion-DPO loss against fp64 formulas written here (docs/dpo.md: L = log 2 at the reference with
gradients +-beta/(4n), the winner/loser swap, identical arms), the pairing rule, the shared draws of a pair's two
arms, the pair layout and its checks, and a tiny run (at the reference before the first optimizer step)."""
import math

import pytest
import torch
from safetensors.torch import load_file

import dpo
from common import sampler, timesteps
from common.errors import USER_ERRORS
from tests.helpers import tiny_args, tiny_run
from tests.test_grpo import fresh_accelerator_state  # noqa: F401 (autouse fixture)

SIGMAS = torch.linspace(1, 0, 11)  # a schedule, for the discrete samplers


def loss64(e_w, e_l, r_w, r_l, beta):
    """Eq. 14 as the reference code writes it, fp64: z = -(beta/2)[(e_w - r_w) - (e_l - r_l)], L = mean log(1 + e^-z)."""
    z = -(beta / 2) * ((e_w - r_w) - (e_l - r_l))
    return torch.log1p(torch.exp(-z)).mean(), z


@pytest.mark.parametrize("n, beta", [(1, 2000.0), (5, 2000.0), (3, 0.5)])
def test_at_the_reference_loss_is_log2_and_gradients_are_beta_over_4n(n, beta):  # invariant 29
    g = torch.Generator().manual_seed(n)
    err = torch.rand(2 * n, generator=g, dtype=torch.float64).requires_grad_(True)
    loss, z = dpo.dpo_loss(err, err.detach().clone(), beta)
    assert loss.item() == math.log(2) and torch.all(z == 0)
    loss.backward()
    want = torch.tensor([beta / (4 * n)] * n + [-beta / (4 * n)] * n, dtype=torch.float64)
    torch.testing.assert_close(err.grad, want, rtol=1e-12, atol=0)  # descent lowers the winner's error


def test_loss_matches_the_formula_and_the_swap_changes_it_by_minus_z():  # invariant 29
    g = torch.Generator().manual_seed(0)
    n, beta = 6, 2000.0
    err, ref = (1 + 1e-3 * torch.randn(2 * n, generator=g, dtype=torch.float64) for _ in range(2))
    got, z = dpo.dpo_loss(err, ref, beta)
    want, z64 = loss64(err[:n], err[n:], ref[:n], ref[n:], beta)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z, z64, rtol=1e-12, atol=1e-12)
    assert z.abs().max() > 0.1  # the errors' differences are in the sigmoid's working range here
    swapped, _ = dpo.dpo_loss(torch.cat([err[n:], err[:n]]), torch.cat([ref[n:], ref[:n]]), beta)
    torch.testing.assert_close(got - swapped, -z64.mean(), rtol=1e-10, atol=1e-12)
    for i in range(n):  # per pair: L(w, l) - L(l, w) = -z
        one = [torch.stack([err[i], err[n + i]]), torch.stack([ref[i], ref[n + i]])]
        lw, _ = dpo.dpo_loss(*one, beta)
        ll, _ = dpo.dpo_loss(*(t.flip(0) for t in one), beta)
        torch.testing.assert_close(lw - ll, -z64[i], rtol=1e-10, atol=1e-12)


def _draws(keys, x_w, x_l, kind="logit_normal", per_arm=False):
    gens = [sampler.keyed_generator(42, "dpo", 0, 0, k, 0) for k in keys]
    if not per_arm:
        return dpo.pair_noise(gens, x_w, x_l, SIGMAS, kind, (0.0, 0.99), 1.0)
    # the wrong way, for contrast: each arm its own sigma and eps
    sig, eps = timesteps.sigmas_and_noise(kind, 2, x_w.shape[1:], SIGMAS, (0.0, 0.99), 1.0, gens)
    sig, eps, x0 = sig.flatten(), eps.flatten(0, 1), torch.cat([x_w, x_l]).float()
    return torch.lerp(x0, eps, sig.view(-1, 1, 1)), sig, eps - x0


@pytest.mark.parametrize("kind", ["logit_normal", "uniform", "discrete"])
def test_both_arms_share_sigma_and_eps(kind):
    g = torch.Generator().manual_seed(1)
    x_w, x_l = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    z_t, sig, u = _draws([7, 8, 9], x_w, x_l, kind)
    assert z_t.shape == (6, 4, 5) and sig.shape == (6,) and torch.equal(sig[:3], sig[3:])
    eps = u + torch.cat([x_w, x_l])
    torch.testing.assert_close(eps[:3], eps[3:], rtol=0, atol=1e-6)
    s = sig.double().view(-1, 1, 1)
    want = (1 - s) * torch.cat([x_w, x_l]).double() + s * eps.double()  # z = (1 - sigma) x0 + sigma eps
    torch.testing.assert_close(z_t.double(), want, rtol=1e-6, atol=1e-6)
    # the pair's own generator: what pair 8 draws does not depend on the pairs batched with it
    z1, sig1, u1 = _draws([8], x_w[1:2], x_l[1:2], kind)
    assert torch.equal(sig1, sig[[1, 4]]) and torch.equal(z1, z_t[[1, 4]]) and torch.equal(u1, u[[1, 4]])
    assert 0.01 - 1e-6 <= sig.min() and sig.max() <= 1.0


def test_identical_arms_give_zero_loss_and_zero_gradient():  # invariant 29
    torch.manual_seed(0)
    net, ref = torch.nn.Linear(5, 5).double(), torch.nn.Linear(5, 5).double()  # a "velocity" per row
    x = torch.randn(2, 4, 5)

    def grad(per_arm):
        net.zero_grad()
        z_t, sig, u = _draws([3, 4], x, x.clone(), per_arm=per_arm)
        v = net(z_t.double()) + sig.double().view(-1, 1, 1)
        with torch.no_grad():
            v_ref = ref(z_t.double())
        loss, z = dpo.dpo_loss(dpo.flow_errors(v, u), dpo.flow_errors(v_ref, u), 1.0)
        loss.backward()
        return loss, z, torch.cat([p.grad.flatten() for p in net.parameters()])

    loss, z, g = grad(per_arm=False)
    assert torch.all(z == 0) and loss.item() == math.log(2) and g.abs().max() < 1e-10  # the arms cancel (fp64)
    _, z, g = grad(per_arm=True)  # eps and sigma drawn per arm: a spurious preference between equal samples
    assert z.abs().min() > 0 and g.abs().max() > 1e-3


def _group(g, item, adv):
    adv = torch.tensor(adv)
    return {"group": g, "item": item, "adv": adv, "x0": torch.arange(len(adv)).float().view(-1, 1) + 10 * g}


def test_pairs_are_argmax_against_argmin_and_a_constant_group_is_degenerate():
    groups = [_group(0, 5, [0.1, 1.2, -0.7, 0.3]), _group(1, 2, [0.0, 0.0, 0.0, 0.0]),
              _group(2, 9, [-1.0, 0.5, 0.5, -1.5]), _group(3, 4, [2.0, -2.0, 0.0, 0.0]), _group(4, 1, [1.0, 0.0])]
    batches = dpo.preference_pairs(groups[:4], 2)
    assert [b["group"] for b in batches] == [(0, 1), (2, 3)] and [b["item"] for b in batches] == [(5, 2), (9, 4)]
    x_w = torch.cat([b["x_w"] for b in batches]).flatten().tolist()
    x_l = torch.cat([b["x_l"] for b in batches]).flatten().tolist()
    assert x_w == [1, 10, 21, 30]  # argmax; a tie (group 2: members 1 and 2) picks the first
    assert x_l == [2, 10, 23, 31]  # argmin; the constant group 1: the same sample as its x_w
    assert [len(b["x_w"]) for b in dpo.preference_pairs(groups, 2)] == [2, 2, 1]
    rows = [(g["group"], a) for g in groups[:4] for a in g["adv"].tolist()]
    rows = [rows[i] for i in torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]  # as gathered
    ids, adv = [g for g, _ in rows], torch.tensor([a for _, a in rows], dtype=torch.float64)
    assert dpo.count_pairs(adv, ids) == 3
    assert dpo.count_pairs(torch.zeros(8, dtype=torch.float64), [0] * 4 + [1] * 4) == 0


@pytest.mark.parametrize("m, world, batch, want", [
    (8, 1, 16, (8, 1)), (8, 2, 16, (4, 1)), (48, 1, 2, (1, 48)), (12, 1, 10, (4, 3)), (7, 1, 4, (1, 7)),
    (4, 1, 1, (1, 4)), (6, 2, 6, (3, 1))])
def test_pair_layout(m, world, batch, want):
    args = dpo.Args(prompts_per_epoch=m, batch_size=batch)
    size, n = dpo.pair_layout(args, world)
    assert (size, n) == want and size * n == m // world and 2 * size <= max(2, batch)


@pytest.mark.parametrize("extra, match", [
    (["--kl-beta", "0.1"], "DPO has no separate KL"),
    (["--gradient-steps-per-epoch", "3"], r"4 pair batches per process per epoch \(1 pairs each.* do not split into --gradient-steps-per-epoch 3 "),
    (["--dpo-beta", "0"], "--dpo-beta must be > 0"),
    (["--timestep-range", "0.5", "0.2"], "need 0 <= lo < hi <= 1"),
])
def test_bad_flags_are_one_line_before_loading(tmp_path, extra, match):
    with pytest.raises(USER_ERRORS, match=match):
        dpo.main(tiny_args("dpo", tmp_path / "err", *extra))
    assert not (tmp_path / "err").exists()


def test_tiny_run_starts_at_the_reference_and_moves_the_weights(tmp_path):
    # one optimizer step per epoch: every micro-step of epoch 0 sees theta = reference (LoRA B = 0)
    rows = tiny_run("dpo", tmp_path, "--gradient-steps-per-epoch", "1")
    row = rows[-1]
    for key in ["loss", "policy_loss", "accuracy", "margin", "err_gap", "ref_gap", "drift", "pairs"]:
        assert math.isfinite(row[f"train/{key}"]), key
    assert row["step"] == 1 and 0 <= row["train/pairs"] <= 4
    assert abs(row["train/loss"] - math.log(2)) < 1e-6 and row["train/margin"] == 0 == row["train/drift"]
    assert row["train/err_gap"] == pytest.approx(row["train/ref_gap"], abs=1e-7) and row["train/accuracy"] == 0
    weights = load_file(tmp_path / f"checkpoints/checkpoint-{row['step']}/trainable.safetensors")
    assert any(k.endswith("lora_B.default.weight") and v.abs().max() > 0 for k, v in weights.items())
