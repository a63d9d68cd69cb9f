"""grpo.py end to end on the tiny FLUX.1: CLI presets, outputs, exact on-policy ratio, resume, LoRA export,
2-process groups spanning ranks, and every bad input of the issue (one line, non-zero exit)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import grpo
from common.cli import parse_with_presets
from common.errors import USER_ERRORS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    # in-process runs with different --mixed-precision need accelerate's singleton state reset
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    yield


def tiny_args(out, *extra):
    return parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY,
                              ["--model", "flux1", "--tiny", "--output-dir", str(out), "--log-with", "none", *extra])


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_presets_and_overrides():
    a = tiny_args("x")
    assert (a.resolution, a.group_size, a.reward) == ((64,), 4, ("jpeg_compressibility",))
    b = tiny_args("x", "--group-size", "8", "--prompts-per-epoch", "2")
    assert (b.group_size, b.prompts_per_epoch, b.resolution) == (8, 2, (64,))
    full = parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY, ["--model", "flux1"])
    assert (full.resolution, full.mixed_precision, full.gradient_checkpointing) == ((512,), "bf16", True)
    with pytest.raises(SystemExit):
        parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY, ["--tiny", "--no-such-flag", "1"])


def test_smoke_subprocess_writes_every_output(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "grpo.py", "--model", "flux1", "--tiny", "--output-dir", str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_metrics(out)
    assert [m["epoch"] for m in rows] == [-1, 0, 1]
    for key in ["reward/jpeg_compressibility_mean", "reward/jpeg_compressibility_std", "adv/mean", "adv/std",
                "train/loss", "train/clipfrac", "train/approx_kl", "train/ratio_mean", "train/ratio_min",
                "train/ratio_max", "lr", "time/rollout_s", "time/reward_s", "time/train_s", "memory/peak_rss_gb",
                "eval/reward_jpeg_compressibility"]:
        assert key in rows[1], key
    # the first micro-batch is evaluated with the rollout's parameters: ratio exactly 1 (ALGORITHMS I.2-13)
    assert rows[1]["train/onpolicy_ratio_dev"] == 0.0 and rows[2]["train/onpolicy_ratio_dev"] == 0.0
    assert rows[1]["samples"] == 16
    for f in ["config.json", "samples/eval_base.png", "samples/eval_epoch0001.png", "samples/train_epoch0001.png",
              "lora/pytorch_lora_weights.safetensors"]:
        assert (out / f).is_file(), f
    per_prompt = json.loads((out / "samples/eval_epoch0001_prompts.json").read_text())["jpeg_compressibility"]
    assert sum(n for _, n in per_prompt.values()) == 4  # TINY: 4 evaluation rows, each prompt's mean and rows
    assert sum(m * n for m, n in per_prompt.values()) / 4 == pytest.approx(rows[2]["eval/reward_jpeg_compressibility"])
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint-2", "checkpoint-4"]
    assert any("tfevents" in f for _, _, fs in os.walk(out / "grpo") for f in fs)  # tensorboard
    keys = load_file(out / "lora/pytorch_lora_weights.safetensors").keys()
    assert keys and all(k.startswith("transformer.") and "lora" in k for k in keys)


def test_resume_equals_uninterrupted(tmp_path):
    common = ["--eval-every", "0", "--num-epochs", "4", "--checkpoints-total-limit", "5"]
    grpo.main(tiny_args(tmp_path / "a", *common))
    grpo.main(tiny_args(tmp_path / "b", *common[:2], "--num-epochs", "2"))
    grpo.main(tiny_args(tmp_path / "b", *common, "--resume-from", "latest"))
    a, b = (load_file(tmp_path / x / "checkpoints/checkpoint-8/trainable.safetensors") for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = (load_file(tmp_path / x / "checkpoints/checkpoint-8/ema.safetensors") for x in "ab")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert [m["epoch"] for m in read_metrics(tmp_path / "b")] == [0, 1, 2, 3]
    # training moved the weights
    assert any(not torch.equal(a[k], v) for k, v in load_file(
        tmp_path / "a" / "checkpoints/checkpoint-2/trainable.safetensors").items())


def test_saved_lora_reproduces_trained_predictions(tmp_path):
    from common import models
    from diffusers import FluxPipeline
    out = tmp_path / "run"
    grpo.main(tiny_args(out, "--eval-every", "0", "--num-epochs", "1"))
    # the trained (EMA) weights, restored independently from the checkpoint
    trained = models.load("flux1", tiny=True)
    trained.add_lora(4, 8)
    params = [p for p in trained.pipe.transformer.parameters() if p.requires_grad]
    ema = load_file(out / "checkpoints/checkpoint-2/ema.safetensors")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(ema[f"ema.{i}"])
    fresh = models.load("flux1", tiny=True)
    base_pipe = FluxPipeline(**fresh.pipe.components)
    state = fresh.make_state(64, 64)
    cond = fresh.encode_prompt(["a cat"], max_sequence_length=32)
    z = fresh.prepare_noise(1, 64, 64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        v_base = fresh.predict(z, 0.7, cond, state, 3.5)
        base_pipe.load_lora_weights(str(out / "lora"))
        v_loaded = fresh.predict(z, 0.7, cond, state, 3.5)
        v_trained = trained.predict(z, 0.7, cond, state, 3.5)
    assert not torch.equal(v_base, v_loaded)
    assert torch.equal(v_loaded, v_trained)


def test_kl_reference_is_zero_at_init_with_gradient_after(tmp_path):  # ALGORITHMS I.2-16, FF#122
    rows = None
    grpo.main(tiny_args(tmp_path / "kl", "--eval-every", "0", "--num-epochs", "1", "--kl-beta", "0.5",
                        "--lora-alpha", "8"))
    rows = read_metrics(tmp_path / "kl")
    assert rows[0]["train/kl"] > 0  # after the first optimizer step the policy left the reference
    from common import models
    a = models.load("flux1", tiny=True)
    a.add_lora(4, 8, init=True)  # peft's default init: B = 0, so the policy equals the reference
    state, cond = a.make_state(64, 64), a.encode_prompt(["a cat"], max_sequence_length=32)
    z = a.prepare_noise(1, 64, 64, torch.Generator().manual_seed(0))
    v = a.predict(z, 0.7, cond, state, 3.5)
    with torch.no_grad(), a.lora_disabled():
        v_ref = a.predict(z, 0.7, cond, state, 3.5)
    kl = grpo.kl_penalty("v-based", v, v_ref, None, None, None)
    assert kl.item() == 0.0
    with torch.no_grad():
        for n, p in a.pipe.transformer.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)
    v = a.predict(z, 0.7, cond, state, 3.5)
    kl = grpo.kl_penalty("v-based", v, v_ref, None, None, None)
    kl.backward()
    assert kl.item() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in a.pipe.transformer.parameters())


def test_two_processes_groups_span_ranks(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "grpo.py", "--model", "flux1",
           "--tiny", "--output-dir", str(out), "--log-with", "none", "--num-epochs", "1", "--eval-every", "1",
           "--batch-size", "2"]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes x 4 batches of 2" in r.stdout  # really distributed (MULTI_CPU over gloo), not 2 copies
    rows = read_metrics(out)
    assert rows[-1]["samples"] == 16  # 8 per rank, gathered
    assert rows[-1]["train/onpolicy_ratio_dev"] == 0.0
    # with this seed some group has members on both ranks (plan is rank-independent)
    from common.data import GroupSampler
    plan = GroupSampler(64, 4, 4, 2, 2, 42).plan(0)
    g0, g1 = set(plan.local(0, 2)[1]), set(plan.local(1, 2)[1])
    assert g0 & g1


# ---- bad input: one clear line, non-zero exit, before models load where possible ----

def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _expect_error(tmp_path, extra, match):
    with pytest.raises(USER_ERRORS, match=match):
        grpo.main(tiny_args(tmp_path / "err", "--eval-every", "0", "--num-epochs", "1", *extra))


def test_bad_inputs(tmp_path):
    _expect_error(tmp_path, ["--model", "sdxl"], "unknown model 'sdxl'")
    _expect_error(tmp_path, ["--reward", "nope"], "unknown reward 'nope'")
    _expect_error(tmp_path, ["--variant", "7b"], "flux1 has no variant '7b'; known: none")
    _expect_error(tmp_path, ["--dataset", str(tmp_path / "missing")], "dataset folder not found")
    _write(tmp_path / "empty/train.txt", "\n\n")
    _expect_error(tmp_path, ["--dataset", str(tmp_path / "empty")], "empty")
    _write(tmp_path / "bad/train.jsonl", '{"prompt": "a cat"}\n{"prompt": "a dog",}\n')
    _expect_error(tmp_path, ["--dataset", str(tmp_path / "bad")], r"train.jsonl:2: invalid JSON")
    _write(tmp_path / "img/train.jsonl", '{"prompt": "a cat", "image": "cat.png"}\n')
    _expect_error(tmp_path, ["--dataset", str(tmp_path / "img")], r"train.jsonl:1: image not found: .*cat.png")
    _expect_error(tmp_path, ["--prompts-per-epoch", "3", "--batch-size", "8"], "must be divisible")
    _expect_error(tmp_path, ["--resume-from", str(tmp_path)], "not a checkpoint folder")
    _expect_error(tmp_path, ["--group-size", "1", "--prompts-per-epoch", "16"], "group-size must be >= 2")


class NanReward:
    """A custom reward (dotted path) that fails: non-finite scores must name it."""
    def __call__(self, images, prompts, metadata):
        return torch.full((len(prompts),), float("nan"))


def test_non_finite_reward_named(tmp_path):
    _expect_error(tmp_path, ["--reward", "tests.test_grpo.NanReward"], "NanReward.*non-finite")


def test_cli_error_is_one_line_and_nonzero(tmp_path):
    r = subprocess.run([sys.executable, "grpo.py", "--model", "flux1", "--tiny", "--dataset", str(tmp_path / "nope")], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == f"error: dataset folder not found: {tmp_path / 'nope'}"


@pytest.mark.parametrize("extra", [
    ["--finetune", "full", "--kl-beta", "0.1", "--learning-rate", "1e-5"],
    ["--mixed-precision", "bf16", "--latent-storage-dtype", "bf16", "--gradient-checkpointing",
     "--attention-backend", "native"],
    ["--dynamics", "Dance-SDE", "--noise-level", "0.3", "--kl-beta", "0.1", "--kl-type", "v-based"],
    ["--dynamics", "CPS", "--noise-level", "0.8", "--sde-window-range", "0", "3", "--negative-prompt", "blurry",
     "--true-cfg-scale", "3.0",
     "--reward", "jpeg_compressibility:1.0", "jpeg_incompressibility:0.5", "--advantage-aggregation", "gdpo",
     "--num-inner-epochs", "2"],
], ids=["full-ft-kl", "bf16-ckpt", "dance-kl-v", "cps-cfg-gdpo"])
def test_variants_train(tmp_path, extra):
    out = tmp_path / "v"
    grpo.main(tiny_args(out, "--eval-every", "0", "--num-epochs", "1", *extra))
    row = read_metrics(out)[-1]
    assert row["step"] == 2 * (2 if "--num-inner-epochs" in extra else 1)
    assert all(v is None or v == v for v in row.values() if isinstance(v, float))  # no NaN
    assert row["train/onpolicy_ratio_dev"] == 0.0
    if "full" in extra:
        assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    if "--kl-beta" in extra:
        assert row["train/kl"] > 0


def test_checkpoint_is_written_whole_with_algorithm_state(tmp_path):
    """Weights, optimizer, EMA and an algorithm's own state (NFT's old policy, AWM's anchor) appear together,
    by one rename; a folder without the algorithm's state is refused on resume with one line."""
    from common import checkpoint
    w = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.ones(3)
    opt.step()
    path = checkpoint.save(str(tmp_path), 7, {"w": w}, opt, meta={"epoch": 3}, extra={"old_ema": {"x": torch.ones(2)}})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-7"]  # no temporary folder left behind
    assert sorted(os.listdir(path)) == ["old_ema.safetensors", "optimizer.safetensors", "state.json",
                                        "trainable.safetensors"]
    assert torch.equal(checkpoint.load_extra(path, "old_ema", "nft.py")["x"], torch.ones(2))
    with pytest.raises(checkpoint.CheckpointError, match=r"no anchor_ema.safetensors \(not a checkpoint of awm.py\)"):
        checkpoint.load_extra(path, "anchor_ema", "awm.py")
