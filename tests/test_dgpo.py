"""dgpo.py: docs/dgpo.md's invariants (the group weight and gradient at theta = reference, the group DPO gradient,
chunked partial sums, the clip mask, ema_ref's decay) against fp64 formulas written here, and tiny runs of the script
(shared noise in a group, w_g = 1/2 at the reference, ema_ref stepped per optimizer step, metrics, moved weights)."""
import math

import pytest
import torch
from safetensors.torch import load_file

import dgpo
from common.ema import EMA, ema_decay
from common.run import Run
from common.errors import USER_ERRORS
from tests.helpers import tiny_args, tiny_run
from tests.test_grpo import fresh_accelerator_state  # noqa: F401 (autouse fixture)

D = 24  # elements per sample


def _groups(seed, n_groups=3, K=6, ref_shift=0.0):
    """Velocities v (leaf, fp64), targets u, reference velocities and advantages (some beyond +-5) of n_groups x K."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n_groups, K, D, generator=g, dtype=torch.float64)
    v = (u + 0.7 * torch.randn(n_groups, K, D, generator=g, dtype=torch.float64)).requires_grad_(True)
    v_ref = v.detach() + ref_shift * torch.randn(n_groups, K, D, generator=g, dtype=torch.float64)
    adv = 3 * torch.randn(n_groups, K, generator=g, dtype=torch.float64)
    adv[0, 0], adv[1, 1] = 7.0, -6.0  # clipped to +-5
    return v, u, v_ref, adv


def _script_loss(v, u, v_ref, adv, beta, chunk, clip=None, e_old=None):
    """The script's composition: per group, w_g from the summed chunk margins, then one dgpo_loss per chunk (share
    chunks / K); run.backward divides each by the micro-steps of the optimizer step (groups x chunks, T = 1)."""
    n_groups, K = adv.shape
    chunks = [slice(i, min(i + chunk, K)) for i in range(0, K, chunk)]
    total, weights = 0.0, []
    for gi in range(n_groups):
        a = adv[gi].clamp(-5, 5)
        e, e_ref = dgpo.dsm_error(v[gi], u[gi]), dgpo.dsm_error(v_ref[gi], u[gi])
        w = dgpo.group_weight(sum(dgpo.group_margin(a[c], e[c].detach(), e_ref[c]) for c in chunks), K, beta)
        keep, _ = dgpo.clip_mask(e.detach(), e.detach() if e_old is None else e_old[gi], a,
                                 math.inf if clip is None else clip)
        total = total + sum(dgpo.dgpo_loss(e[c], keep[c], w, a[c], len(chunks) / K).double() for c in chunks)
        weights.append(w)
    return total / (n_groups * len(chunks)), torch.stack(weights)


# ---- invariant 30: theta = reference, and the group DPO gradient ----

@pytest.mark.parametrize("chunk", [6, 4, 1])  # one chunk, unequal chunks (4 + 2), one row per micro-step
def test_at_the_reference_w_is_half_and_the_gradient_is_half_the_advantage_weighted_matching(chunk):
    v, u, v_ref, adv = _groups(0)
    loss, w = _script_loss(v, u, v_ref, adv, 100.0, chunk)
    loss.backward()
    assert torch.equal(w, torch.full((3,), 0.5, dtype=torch.float64))
    # grad of 1/2 mean_i A_c,i e_i, e_i = mean_d (v_i - u_i)^2: (1/2) A_c,i 2 (v_i - u_i) / D / (n_groups K)
    want = 0.5 * adv.clamp(-5, 5)[..., None] * 2 * (v.detach() - u) / D / adv.numel()
    torch.testing.assert_close(v.grad, want, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("beta", [10.0, 100.0, 2000.0])
def test_gradient_is_the_group_dpo_loss_gradient_over_beta(beta):
    v, u, v_ref, adv = _groups(1, ref_shift=0.05)
    loss, w = _script_loss(v, u, v_ref, adv, beta, chunk=4)
    loss.backward()
    assert (w - 0.5).abs().max() > 1e-3  # off the reference: the weights are not all 1/2
    # mean_g -log sigmoid(-(beta/K) sum_i A_c,i (e_i - e_ref_i)), e = mean_d (v - u)^2, all in fp64 by hand
    v2 = v.detach().clone().requires_grad_(True)
    e, e_ref = ((v2 - u) ** 2).mean(-1), ((v_ref - u) ** 2).mean(-1)
    x = beta / 6 * (adv.clamp(-5, 5) * (e - e_ref)).sum(-1)
    (-torch.nn.functional.logsigmoid(-x)).mean().backward()
    torch.testing.assert_close(v.grad, v2.grad / beta, rtol=1e-6, atol=1e-14)
    torch.testing.assert_close(w, torch.sigmoid(x.detach()), rtol=1e-12, atol=0)


# ---- invariant 31: partial sums, the clip mask, ema_ref ----

@pytest.mark.parametrize("splits", [[6], [3, 3], [2, 2, 2], [1, 4, 1], [1] * 6])
def test_chunk_partial_sums_reproduce_the_group_weight(splits):
    g = torch.Generator().manual_seed(2)
    e, e_ref = torch.rand(6, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64)
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    bounds = torch.tensor([0, *splits]).cumsum(0).tolist()  # a group split over simulated ranks / micro-batches
    margin = sum(dgpo.group_margin(adv[a:b], e[a:b], e_ref[a:b]) for a, b in zip(bounds, bounds[1:]))
    want = 1 / (1 + math.exp(-30.0 / 6 * sum(adv[i].item() * (e[i].item() - e_ref[i].item()) for i in range(6))))
    assert abs(dgpo.group_weight(margin, 6, 30.0).item() - want) < 1e-12


def test_clip_mask_zero_gradient_set():
    g = torch.Generator().manual_seed(3)
    n, eps_clip = 400, 0.01
    e = (0.5 + torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_(True)
    e_old = e.detach() * torch.exp(0.04 * torch.randn(n, generator=g, dtype=torch.float64))  # rho around 1 +- 4%
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    keep, rho = dgpo.clip_mask(e.detach(), e_old, adv, eps_clip)
    dgpo.dgpo_loss(e, keep, torch.tensor(0.3, dtype=torch.float64), adv, 1 / n).backward()
    r = [math.exp(e_old[i].item() - e[i].item()) for i in range(n)]
    zero = [(adv[i] > 0 and r[i] > 1 + eps_clip) or (adv[i] <= 0 and r[i] < 1 - eps_clip) for i in range(n)]
    assert 0 < sum(zero) < n and torch.equal(e.grad == 0, torch.tensor(zero))
    torch.testing.assert_close(rho, torch.tensor(r, dtype=torch.float64), rtol=1e-12, atol=0)
    kept = ~torch.tensor(zero)
    torch.testing.assert_close(e.grad[kept], 0.3 * adv[kept] / n, rtol=1e-12, atol=0)  # d/de_i of w A_i e_i / n
    keep, _ = dgpo.clip_mask(e.detach(), e_old, adv, math.inf)  # --no-clip-dsm: every member keeps its gradient
    assert keep.all()


class _Built(Exception):
    """main() reached its ema_ref."""


def test_ema_ref_decay_is_min_of_0_3_and_1e_3_step(monkeypatch):
    schedule = {}

    def fake_init(self, args, script, **kw):  # no model: main() only needs the world size and the schedule here
        self.world, self.sigmas = 1, torch.linspace(1, 0, 11)

    def capture(self, name, **kw):
        schedule.update(kw, name=name)
        raise _Built

    monkeypatch.setattr(Run, "__init__", fake_init)
    monkeypatch.setattr(Run, "checkpointed_ema", capture)
    with pytest.raises(_Built):
        dgpo.main(dgpo.Args())
    assert schedule.pop("name") == "ema_ref"
    for step in (0, 1, 150, 299, 300, 301, 5000):
        assert ema_decay(step=step, **schedule) == pytest.approx(min(0.3, 1e-3 * step), rel=1e-12, abs=0)
    assert ema_decay(step=0, **schedule) == 0  # a copy


# ---- the script on the tiny FLUX.1 ----

def test_tiny_run_shares_noise_within_groups_and_steps_ema_ref_per_optimizer_step(tmp_path):
    calls, ema_steps = [], []
    by_group, velocity = Run.by_group, Run.velocity

    def same_x0(self, samples, keys):  # each group's members get its first member's x0: shared noise => equal rows
        groups = by_group(self, samples, keys)
        for g in groups:
            g["x0"] = g["x0"][:1].expand_as(g["x0"]).clone()
        return groups

    def record(self, z, sigma, cond, guided=True, adapter=None):
        if not guided:  # the training forwards (rollouts and evaluations are guided)
            calls.append((z.detach().clone(), torch.as_tensor(sigma).detach().clone()))
        return velocity(self, z, sigma, cond, guided, adapter)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Run, "by_group", same_x0)
        mp.setattr(Run, "velocity", record)
        ema_step = EMA.step
        mp.setattr(EMA, "step", lambda self, s: ema_steps.append((self.schedule.get("decay"), s)) or ema_step(self, s))
        rows = tiny_run("dgpo", tmp_path / "run", "--num-epochs", "2")
    # K = 4 in chunks of 2, T = 2, 4 groups, 2 epochs: per group and timestep 2 chunks x (policy, reference, ema_ref,
    # trained) forwards, every one on rows that are all equal
    assert len(calls) == 2 * 4 * 2 * 2 * 4
    assert all(torch.equal(z[0], z[i]) for z, _ in calls for i in range(len(z)))
    sigmas = {float(s[0]) for _, s in calls}
    assert len(sigmas) <= 2 * 2 and all(torch.equal(s, s[:1].expand_as(s)) for _, s in calls)
    # one noisy latent per (epoch, group, timestep): 16 distinct, also where two timesteps drew the same sigma
    assert len({tuple(z[0].flatten().tolist()) for z, _ in calls}) == 2 * 4 * 2
    # ema_ref (decay 0.3) stepped after each of the 2 x 2 optimizer steps, with the step's index
    assert [s for d, s in ema_steps if d == 0.3] == [0, 1, 2, 3]
    assert rows[-1]["step"] == 4
    for row in rows:
        for key in ("train/loss", "train/policy_loss", "train/kl", "train/group_weight", "train/clipfrac",
                    "train/ratio_mean", "grad_norm"):
            assert math.isfinite(row[key]), key
    lora = load_file(tmp_path / "run/checkpoints/checkpoint-4/trainable.safetensors")
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at 0: training moved it


@pytest.mark.parametrize("extra", [[], ["--use-ema-ref", "--no-clip-dsm", "--kl-beta", "0.01"], ["--batch-size", "4"]],
                         ids=["reference", "ema-ref-kl", "one-chunk"])
def test_first_epoch_at_the_reference_has_w_one_half(tmp_path, extra):
    # one optimizer step per epoch: every group of epoch 0 trains at theta = reference (or = ema_ref, a copy)
    rows = tiny_run("dgpo", tmp_path / "run", "--gradient-steps-per-epoch", "1", *extra)
    assert rows[0]["train/group_weight"] == 0.5 and rows[0]["step"] == 1
    if extra:
        assert rows[0]["train/kl"] == 0.0 and "train/ratio_mean" in rows[0]  # theta = reference before the step


@pytest.mark.parametrize("extra, match", [
    (["--dpo-beta", "0"], "--dpo-beta must be > 0"),
    (["--clip-range", "0"], "--clip-range must be > 0"),
    (["--gradient-steps-per-epoch", "8"], "4 groups per process do not split into --gradient-steps-per-epoch 8"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, extra, match):
    with pytest.raises(USER_ERRORS, match=match):
        dgpo.main(tiny_args("dgpo", tmp_path / "err", *extra))
    assert not (tmp_path / "err").exists()  # nothing written
