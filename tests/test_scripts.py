"""grpo_guard.py, nft.py and awm.py end to end on the tiny FLUX.1: every output of a subprocess run, exact resume,
the LoRA in diffusers format, variants of each algorithm, and bad inputs (one line, non-zero exit)."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from common import models
from common.errors import USER_ERRORS
from tests.helpers import POLICY_EMA, SCRIPTS, own_state, tiny_args, tiny_run
from tests.test_grpo import ENV, ROOT, fresh_accelerator_state, read_metrics  # noqa: F401 (autouse fixture)

ALGO_KEYS = {"grpo_guard": ["train/clipfrac", "train/approx_kl"], "nft": [],
             "awm": ["train/clipfrac", "train/approx_kl", "train/ema_kl"]}


@pytest.fixture(scope="module", params=SCRIPTS)
def smoke(request, tmp_path_factory):
    """`python <script>.py --model flux1 --tiny`: 2 epochs, evaluation every epoch, tensorboard."""
    out = tmp_path_factory.mktemp(request.param) / "run"
    r = subprocess.run([sys.executable, f"{request.param}.py", "--model", "flux1", "--tiny", "--output-dir", str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return request.param, out


def test_smoke_subprocess_writes_every_output(smoke):
    script, out = smoke
    rows = read_metrics(out)
    assert [m["epoch"] for m in rows] == [-1, 0, 1] and rows[1]["samples"] == 16
    assert rows[2]["step"] == 2 * rows[1]["step"] > 0
    for key in ["reward/jpeg_compressibility_mean", "reward/jpeg_compressibility_std", "adv/mean", "adv/std",
                "train/loss", "lr", "grad_norm", "time/rollout_s", "time/reward_s", "time/train_s",
                "memory/peak_rss_gb", "eval/reward_jpeg_compressibility", *ALGO_KEYS.get(script, [])]:
        assert key in rows[1], key
    assert all(v == v for row in rows for v in row.values() if isinstance(v, float))  # no NaN
    if script in ALGO_KEYS:  # the four algorithms' losses carry a ratio; a new one's need not
        assert rows[2]["step"] == 4
        for key in ["train/policy_loss", "train/kl", "train/ratio_mean", "train/ratio_min", "train/ratio_max"]:
            assert key in rows[1], key
        # first micro-batch: guard = rollout parameters; nft = old policy still theta; awm = the epoch-start snapshot
        assert rows[1]["train/onpolicy_ratio_dev"] == 0.0
        if script == "nft":  # from the 2nd epoch the old policy (EMA) lags behind theta
            assert rows[2]["train/onpolicy_ratio_dev"] > 0
        else:
            assert rows[2]["train/onpolicy_ratio_dev"] == 0.0
    if script == "awm":  # the 2nd optimizer step of an epoch sees the ratio leave 1, and the tiny clip range acts
        assert rows[2]["train/ratio_min"] < 1 < rows[2]["train/ratio_max"] and rows[2]["train/clipfrac"] > 0
    for f in ["config.json", "samples/eval_base.png", "samples/eval_epoch0001.png", "samples/train_epoch0001.png",
              "samples/before_after.png", "lora/pytorch_lora_weights.safetensors"]:
        assert (out / f).is_file(), f
    last = sorted(os.listdir(out / "checkpoints"), key=lambda d: int(d.split("-")[1]))
    assert len(last) == 2 and last[-1] == f"checkpoint-{rows[2]['step']}"
    if POLICY_EMA.get(script):
        assert own_state(out / "checkpoints" / last[-1]) == [POLICY_EMA[script]]
    assert any("tfevents" in f for _, _, fs in os.walk(out / script) for f in fs)
    keys = load_file(out / "lora/pytorch_lora_weights.safetensors").keys()
    assert keys and all(k.startswith("transformer.") and "lora" in k for k in keys)


def test_saved_lora_loads_into_flux_pipeline(smoke):
    from diffusers import FluxPipeline
    _, out = smoke
    ema = load_file(out / "checkpoints/checkpoint-4/ema.safetensors")  # what the LoRA was saved from
    trained, fresh = models.load("flux1", tiny=True), models.load("flux1", tiny=True)
    trained.add_lora(4, 8)
    with torch.no_grad():
        for i, p in enumerate(p for p in trained.pipe.transformer.parameters() if p.requires_grad):
            p.copy_(ema[f"ema.{i}"])
    state, cond = fresh.make_state(64, 64), fresh.encode_prompt(["a red cube"], max_sequence_length=32)
    z = fresh.prepare_noise(1, 64, 64, torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = fresh.predict(z, 0.6, cond, state, 3.5)
        FluxPipeline(**fresh.pipe.components).load_lora_weights(str(out / "lora"))
        after, want = fresh.predict(z, 0.6, cond, state, 3.5), trained.predict(z, 0.6, cond, state, 3.5)
    assert torch.equal(after, want) and not torch.equal(before, after)


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_equals_uninterrupted(tmp_path, script):
    tiny_run(script, tmp_path / "a", "--num-epochs", "4", "--checkpoints-total-limit", "5")
    tiny_run(script, tmp_path / "b", "--num-epochs", "2")
    tiny_run(script, tmp_path / "b", "--num-epochs", "4", "--resume-from", "latest")
    rows = read_metrics(tmp_path / "b")
    assert [m["epoch"] for m in rows] == [0, 1, 2, 3]
    last = f"checkpoint-{rows[-1]['step']}"
    own = own_state(tmp_path / "b/checkpoints" / last)
    for name in ["trainable", "ema", "optimizer", *own]:
        a, b = (load_file(tmp_path / x / f"checkpoints/{last}/{name}.safetensors") for x in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    first, final = (load_file(tmp_path / f"a/checkpoints/checkpoint-{rows[n]['step']}/trainable.safetensors")
                    for n in (0, -1))
    assert any(not torch.equal(first[k], final[k]) for k in first)  # training moved the weights
    for name in own:  # a checkpoint without the state its state.json lists cannot resume this script
        os.remove(tmp_path / "b/checkpoints" / last / f"{name}.safetensors")
        with pytest.raises(USER_ERRORS, match=f"{name}.safetensors is missing"):
            tiny_run(script, tmp_path / "b", "--num-epochs", "5", "--resume-from",
                     str(tmp_path / "b/checkpoints" / last))


@pytest.mark.parametrize("script, extra", [
    ("grpo_guard", ["--no-delta-reweight", "--kl-beta", "0.1"]),
    ("nft", ["--dynamics", "Flow-SDE", "--sde-window-range", "0", "4", "--no-off-policy", "--time-sampler",
             "logit_normal", "--advantage-aggregation", "gdpo"]),
    ("nft", ["--finetune", "full", "--learning-rate", "1e-5", "--time-sampler", "uniform", "--num-train-timesteps", "0"]),
    ("awm", ["--awm-weighting", "Uniform", "--kl-beta", "0.01", "--ema-kl-beta", "0", "--time-sampler",
             "discrete_with_init", "--num-inner-epochs", "2", "--gradient-steps-per-epoch", "1"]),
    ("awm", ["--mixed-precision", "bf16", "--gradient-checkpointing", "--dynamics", "CPS", "--noise-level", "0.8",
             "--sde-window-size", "2", "--sde-window-range", "0", "4", "--latent-storage-dtype", "bf16"]),
], ids=["guard-no-delta-kl", "nft-sde-logitnormal", "nft-full-uniform", "awm-uniform-kl-inner2", "awm-bf16-cps"])
def test_variants_train(tmp_path, script, extra):
    row = tiny_run(script, tmp_path / "v", *extra)[-1]
    assert row["step"] == 2
    if script != "grpo_guard":  # the decoupled scripts roll out with the ODE unless given an SDE
        assert len(row["sde_window"]) == (0 if "--dynamics" not in extra else 2 if "CPS" in extra else 1)
    assert all(v is None or v == v for v in row.values() if isinstance(v, float))  # no NaN
    if "--kl-beta" in extra or "full" in extra:
        assert row["train/kl"] > 0
    if "full" in extra:
        assert (tmp_path / "v/transformer/diffusion_pytorch_model.safetensors").is_file()
    if script == "awm" and "--num-inner-epochs" in extra:  # G = 1: the 2nd inner epoch is off the old policy
        assert row["train/ratio_min"] < 1 < row["train/ratio_max"]


@pytest.mark.parametrize("script, extra, match", [
    ("grpo_guard", ["--dynamics", "CPS"], "GRPO-Guard supports --dynamics Flow-SDE only, got CPS"),
    ("nft", ["--timestep-range", "0.9", "0.95"], r"timestep range \(0.9, 0.95\) holds none"),
    ("awm", ["--timestep-range", "0.5", "0.2"], "need 0 <= lo < hi <= 1"),
    ("nft", ["--nft-beta", "0"], "--nft-beta must be > 0"),
    ("awm", ["--dataset", "/no/such/folder"], "dataset folder not found"),
])
def test_bad_inputs(tmp_path, script, extra, match):
    with pytest.raises(USER_ERRORS, match=match):
        __import__(script).main(tiny_args(script, tmp_path / "err", *extra))


def test_cli_error_is_one_line_and_nonzero():
    r = subprocess.run([sys.executable, "grpo_guard.py", "--model", "flux1", "--tiny", "--dynamics", "Dance-SDE"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == "error: GRPO-Guard supports --dynamics Flow-SDE only, got Dance-SDE"
