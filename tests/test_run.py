"""common/run.py's pieces against independent formulas on the tiny FLUX.1: gradient accumulation and the optimizer
step (fp64 AdamW by hand), the reference velocity (the base model's, with nothing swapped or changed), training
statistics without a ratio, and the rewards (each spec parsed once, each remote reward health-checked once)."""
import pytest
import torch

import rewards
from common import models
from common.run import Run
from common.tracking import TrainStats, epoch_stats
from rewards.remote import PROTOCOL, RemoteReward
from tests.helpers import tiny_args
from tests.test_grpo import fresh_accelerator_state  # noqa: F401 (autouse fixture)


def tiny_run(tmp_path, *extra):
    return Run(tiny_args("grpo", tmp_path / "run", *extra), "grpo.py", trained_steps=range(0, 4))


def test_accumulate_steps_once_on_the_mean_gradient(tmp_path):
    run = tiny_run(tmp_path, "--learning-rate", "0.01", "--weight-decay", "0.1", "--max-grad-norm", "0.05")
    params = list(run.params.values())
    before = [p.detach().double().clone() for p in params]
    weights = (1.0, 3.0)  # loss_i = w_i sum_p sum(p^2): d/dp = 2 w_i p
    for k, w in enumerate(weights):
        with run.accumulate(len(weights)):
            run.backward(w * sum((p**2).sum() for p in params))
        if k == 0:  # no step yet: the weights are untouched
            assert run.global_step == 0 and all(torch.equal(p.double(), b) for p, b in zip(params, before))
    assert run.global_step == 1
    grads = [2 * sum(weights) / len(weights) * b for b in before]  # the mean loss's gradient
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    assert float(run.grad_norm) == pytest.approx(norm.item(), rel=1e-5)  # the norm before clipping
    scale = min(1.0, 0.05 / (norm.item() + 1e-6))
    for p, b, g in zip(params, before, grads):  # AdamW's first step: m_hat = g, v_hat = g^2
        g = g * scale
        want = b * (1 - 0.01 * 0.1) - 0.01 * g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_reference_velocity_is_the_base_model_and_changes_nothing(tmp_path, finetune):
    extra = ["--kl-beta", "0.1"] + (["--finetune", "full", "--learning-rate", "1e-5"] if finetune == "full" else [])
    run = tiny_run(tmp_path, *extra)
    base = models.load("flux1", tiny=True)  # the untrained model, built alike
    cond = base.encode_prompt(["a red cube", "a cat"], None, 32)
    z = base.prepare_noise(2, 64, 64, torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = base.predict(z, 0.6, cond, run.state, 3.5)
        for p in run.params.values():  # train away from the base
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    transformer, weights = run.adapter.transformer, {n: p.detach().clone() for n, p in run.params.items()}
    v_ref = run.reference_velocity(z, 0.6, cond)
    torch.testing.assert_close(v_ref, want, rtol=0, atol=1e-6)
    assert run.adapter.transformer is transformer  # nothing swapped in
    assert all(torch.equal(p, weights[n]) for n, p in run.params.items())
    with torch.no_grad():
        assert (run.velocity(z, 0.6, cond) - want).abs().max() > 1e-4  # the trained policy moved


def test_stats_without_a_ratio():
    class One:  # a one-process accelerator: reduce and gather are the identity
        device = torch.device("cpu")

        def reduce(self, x, op):
            return x

        def gather(self, x):
            return x

    stats = TrainStats()
    losses = [torch.tensor(1.5), torch.tensor(-0.25), torch.tensor(2.0)]
    for loss in losses:
        stats.add(loss=loss, kl=loss * 0)
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0])
    out = epoch_stats(One(), {"r": torch.tensor([0.5, 1.5])}, adv, stats)
    assert out["train/loss"] == pytest.approx(sum(float(x) for x in losses) / 3, rel=1e-7)
    assert out["adv/zero_frac"] == 0.5 and out["reward/r_mean"] == 1.0
    assert not any("ratio" in k for k in out)
    stats.add(loss=torch.tensor(0.0), ratio=torch.tensor([1.0, 1.25]))
    stats.add(loss=torch.tensor(0.0), ratio=torch.tensor([0.5]))
    out = epoch_stats(One(), {}, adv, stats)
    assert (out["train/ratio_min"], out["train/ratio_max"], out["train/onpolicy_ratio_dev"]) == (0.5, 1.25, 0.25)
    assert out["train/ratio_mean"] == pytest.approx(2.75 / 3)


def test_rewards_are_parsed_and_checked_once_per_process(tmp_path, monkeypatch):
    parsed, health = [], []
    parse = rewards.parse_spec
    monkeypatch.setattr(rewards, "parse_spec", lambda spec: parsed.append(spec) or parse(spec))
    monkeypatch.setattr(RemoteReward, "_health", lambda self: health.append(self.url) or {"protocol": PROTOCOL})
    monkeypatch.setattr(RemoteReward, "__call__", lambda self, images, prompts, metadata: torch.zeros(len(images)))
    specs = ["remote=http://127.0.0.1:9/:0.5", "jpeg_compressibility"]
    run = tiny_run(tmp_path, "--reward", *specs)  # the checks, the model, the rewards and their probe
    assert sorted(parsed) == sorted(specs) and len(health) == 1
    assert run.reward_set.names == ["remote", "jpeg_compressibility"] and run.reward_set.weights["remote"] == 0.5


def test_same_noise_in_group_shares_the_initial_noise_of_a_group_only(tmp_path):
    run = tiny_run(tmp_path, "--same-noise-in-group", "--batch-size", "2")  # TINY: 4 prompts x 4 images
    batches = run.groups.local_batches(0, 0)
    gens = [torch.Generator().manual_seed(b) for b in range(len(batches))]
    z = run._initial_noise(0, batches, gens)
    groups = [g for _, gs in batches for g in gs]
    assert len(z) == len(groups) == 16 and len(set(groups)) == 4
    for i, gi in enumerate(groups):
        for j, gj in enumerate(groups):
            assert torch.equal(z[i], z[j]) == (gi == gj)  # equal exactly within a group
    narrow = torch.cat([run._initial_noise(0, [b], [g]) for b, g in zip(batches, gens)])
    assert torch.equal(narrow, z)  # any rollout width (and any rank holding a member) draws the same
    assert not torch.equal(run._initial_noise(1, batches, gens), z)  # fresh every epoch
    plain = tiny_run(tmp_path / "plain", "--batch-size", "2")._initial_noise(0, batches, gens)
    assert not torch.equal(plain[0], plain[1]) and plain.shape == z.shape  # off: a draw per image


def test_same_noise_in_group_needs_stochastic_steps(tmp_path):
    from common.errors import ConfigError
    with pytest.raises(ConfigError, match="--same-noise-in-group needs stochastic steps"):
        Run(tiny_args("nft", tmp_path / "nft", "--same-noise-in-group"), "nft.py")


def test_lr_schedule_by_epoch(tmp_path):
    from common.run import lr_factor
    assert [lr_factor("constant", e, 4) for e in range(4)] == [1.0] * 4
    assert [lr_factor("linear", e, 4) for e in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert [lr_factor("cosine", e, 4) for e in range(4)] == pytest.approx(
        [1.0, (1 + 2**-0.5) / 2, 0.5, (1 - 2**-0.5) / 2])
    run = tiny_run(tmp_path, "--lr-schedule", "linear", "--learning-rate", "0.002", "--num-epochs", "8")
    for epoch, want in ((0, 0.002), (6, 0.0005)):
        next(run.train_batches([{}], epoch))  # each epoch's training sets the epoch's rate
        assert run.optimizer.param_groups[0]["lr"] == pytest.approx(want)


def test_the_reference_model_on_request(tmp_path):
    """A full fine-tuning run keeps a frozen reference when its script asks (Run(reference=True)), whatever --kl-beta;
    without one, asking for a reference velocity is one line saying how."""
    from common.errors import ConfigError
    full = ["--finetune", "full", "--learning-rate", "1e-5"]
    run = tiny_run(tmp_path / "none", *full)
    cond = run.adapter.encode_prompt(["a red cube"], None, 32)
    z = run.adapter.prepare_noise(1, 64, 64, torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="keeps no reference model; build the Run with reference=True"):
        run.reference_velocity(z, 0.6, cond)
    run = Run(tiny_args("grpo", tmp_path / "ref", *full), "grpo.py", trained_steps=range(0, 4), reference=True)
    with torch.no_grad():
        want = run.velocity(z, 0.6, cond)
        for p in run.params.values():  # train away from the base
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        assert (run.velocity(z, 0.6, cond) - want).abs().max() > 1e-4
    torch.testing.assert_close(run.reference_velocity(z, 0.6, cond), want, rtol=0, atol=1e-6)


def test_an_epoch_ends_on_a_full_accumulation_and_logs_its_scalars(tmp_path):
    """An epoch whose micro-steps leave an accumulation incomplete is refused at its end (its gradients would carry
    into the next epoch); a complete one logs the algorithm's per-epoch scalars as train/<name>."""
    from common.errors import ConfigError
    from tests.test_grpo import read_metrics
    run = tiny_run(tmp_path, "--num-epochs", "1", "--eval-every", "0")
    run.start()
    params = list(run.params.values())
    for _ in run.train_batches([{}] * 3, 0):
        with run.accumulate(2):
            run.backward(sum((p**2).sum() for p in params))
    raw, adv = {"jpeg_compressibility": torch.zeros(4)}, torch.zeros(4)
    with pytest.raises(ConfigError, match="^epoch 0: 3 training micro-steps do not fill optimizer steps of 2"):
        run.end_epoch(0, TrainStats(), raw, adv, [], scalars={"pairs": 6})
    for i, _ in enumerate(run.train_batches([{}] * 2, 0)):  # a new epoch's training starts from no gradient
        assert i > 0 or all(p.grad is None for p in params)
        with run.accumulate(2):
            run.backward(sum((p**2).sum() for p in params))
    run.end_epoch(0, TrainStats(), raw, adv, [], scalars={"pairs": 6})
    assert read_metrics(tmp_path / "run")[-1]["train/pairs"] == 6.0


def test_each_sample_carries_its_row_and_group(tmp_path):
    """run.rollout's samples name each row's dataset item and its group in the epoch: a group is its item's K copies,
    and the items are the prompts that were rolled out."""
    run = tiny_run(tmp_path, "--batch-size", "2", "--rollout-batch-size", "4")  # TINY: 4 prompts x 4 images
    samples = run.rollout(0, [0], store=("x0",))
    items = [i for s in samples for i in s["item"]]
    groups = [g for s in samples for g in s["group"]]
    assert len(items) == len(groups) == 16 and all(len(s["item"]) == len(s["x0"]) for s in samples)
    for g in set(groups):  # each group: K = 4 copies of one dataset row
        members = [i for i, gg in zip(items, groups) if gg == g]
        assert len(members) == 4 and len(set(members)) == 1
    assert sorted(set(groups)) == list(range(4))
    plan = run.groups.local_batches(0, 0)
    assert items == [i for idx, _ in plan for i in idx] and groups == [g for _, gs in plan for g in gs]


def test_members_by_group_and_gather(tmp_path):
    """Each row's member index counts its group's copies in the plan's global order (the same under any layout);
    run.by_group stacks a process's whole groups in member order; run.gather returns the rows in the plan's order."""
    from common.data import GroupSampler
    plan = GroupSampler(10, 4, 4, 1, 2, seed=7).plan(3)
    want = []
    for g in plan.groups:  # independent count
        want.append(sum(1 for h in plan.groups[:len(want)] if h == g))
    assert plan.members() == want and sorted(plan.members()) == sorted([0, 1, 2, 3] * 4)
    run = Run(tiny_args("nft", tmp_path / "r", "--batch-size", "2"), "nft.py", whole_groups=True)
    samples = run.rollout(0, [], store=("x0",))
    members = [(g, m) for s in samples for g, m in zip(s["group"], s["member"])]
    assert sorted(members) == sorted((g, m) for g in range(4) for m in range(4))
    for s in samples:
        s["adv"] = torch.arange(len(s["x0"]), dtype=torch.float32) + 10 * torch.tensor(s["group"]) \
            + 100 * torch.tensor(s["member"])  # the row's identity, readable after regrouping
    groups = run.by_group(samples, ("x0", "adv"))
    assert [g["group"] for g in groups] == list(dict.fromkeys(g for s in samples for g in s["group"]))
    for g in groups:
        assert ((g["adv"] % 100 // 10) == g["group"]).all() and (g["adv"] // 100 == torch.arange(4)).all()
        for m in range(4):  # the stacked x0 rows are the members' own
            i, r = next((i, r) for i, s in enumerate(samples) for r, (gg, mm) in enumerate(zip(s["group"], s["member"]))
                        if (gg, mm) == (g["group"], m))
            assert torch.equal(g["x0"][m], samples[i]["x0"][r]) and g["item"] == samples[i]["item"][r]
    assert torch.equal(run.gather(samples, "adv"), torch.cat([s["adv"] for s in samples]))  # 1 process: as is
    cond = run.encode([groups[0]["item"]] * 2)
    want = run.conditioning.encode([run.train_items[groups[0]["item"]]] * 2, run.state)
    assert all(torch.equal(cond[k], want[k]) for k in want if torch.is_tensor(want[k]))
    shuffled = Run(tiny_args("nft", tmp_path / "s", "--batch-size", "2"), "nft.py")  # groups spread over batches
    with pytest.raises(ValueError, match="whole_groups=True"):
        shuffled.by_group(shuffled.rollout(0, [], store=("x0",))[:2], ("x0",))


def test_keyed_draws_depend_on_the_key_only():
    """run.generator / sampler.keyed_generator: the same key draws the same numbers wherever it is made; another key
    (or seed) draws others; per-sample training draws do not depend on the batch a sample sits in."""
    from common import sampler, timesteps
    a, b = sampler.keyed_generator(42, "train", 3, 0, 5, 1), sampler.keyed_generator(42, "train", 3, 0, 5, 1)
    assert torch.equal(torch.randn(8, generator=a), torch.randn(8, generator=b))
    others = [(43, "train", 3, 0, 5, 1), (42, "train", 3, 0, 1, 5), (42, "dpo", 3, 0, 5, 1), (42, "train", 3, 0, 5)]
    draws = {tuple(torch.randn(4, generator=sampler.keyed_generator(*k)).tolist()) for k in others}
    assert len(draws) == len(others) and tuple(torch.randn(4, generator=sampler.keyed_generator(
        42, "train", 3, 0, 5, 1)).tolist()) not in draws
    sig = torch.linspace(1, 0, 9)
    keys = [(42, "t", g, m) for g in range(3) for m in range(2)]
    whole = timesteps.sigmas_and_noise("discrete", 2, (3, 4), sig, (0.0, 0.9), 1.0,
                                       [sampler.keyed_generator(*k) for k in keys])
    parts = [timesteps.sigmas_and_noise("discrete", 2, (3, 4), sig, (0.0, 0.9), 1.0,
                                        [sampler.keyed_generator(*k) for k in keys[i:i + 2]]) for i in (4, 0, 2)]
    assert whole[0].shape == (2, 6) and whole[1].shape == (2, 6, 3, 4)
    for n, i in enumerate((4, 0, 2)):  # the same samples in other batches, in another order
        assert torch.equal(parts[n][0], whole[0][:, i:i + 2]) and torch.equal(parts[n][1], whole[1][:, i:i + 2])
