"""--fsdp through the scripts: 2 processes over gloo (`accelerate launch --multi_gpu`, MULTI_CPU) with torch FSDP2 on
tiny FLUX.1 train the same LoRA as 1 process on the same global batch, export diffusers files the stock pipeline
loads, resume exactly from a sharded checkpoint; both Wan2.2-A14B experts shard and train (NFT's per-sample sigmas
route rows differently on each rank) and export loadable LoRA files. Library-level checks: tests/test_sharding.py."""
import subprocess
import sys

import torch
from safetensors.torch import load_file

from common import models
from tests.test_grpo import ENV, ROOT, read_metrics

# the config file the README documents (2 CPU processes over gloo)
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "docs/accelerate/two_cpu_processes.yaml"]
# one optimizer step per epoch: its micro-batches are the whole epoch's, however they split over processes; a smooth
# reward (the mean pixel): sharded and unsharded sums differ by rounding, which a JPEG size (a step function of the
# 8-bit pixels) would turn into different scores, advantages and weights by the second epoch
FLAGS = ["--model", "flux1", "--tiny", "--log-with", "none", "--gradient-steps-per-epoch", "1", "--eval-every", "0",
         "--reward", "tests.test_rollout_width.brightness"]


def _run(cmd, out, *extra):
    r = subprocess.run([*cmd, *FLAGS, "--output-dir", str(out), *extra], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _lora(out):
    return load_file(str(out / "lora/pytorch_lora_weights.safetensors"))


def test_sharded_run_equals_one_process_and_resumes_exactly(tmp_path):
    _run([sys.executable, "grpo.py"], tmp_path / "one")
    r = _run([*LAUNCH, "grpo.py", "--fsdp"], tmp_path / "fsdp")
    assert "2 processes x 4 batches of 2" in r.stdout
    one, sharded = _lora(tmp_path / "one"), _lora(tmp_path / "fsdp")
    assert set(one) == set(sharded) and len(one) == 30
    # the sharded gradient is the unsharded one up to the order of its sums (grad_norm: equal, then 1.6e-6 relative,
    # measured); AdamW's first steps g / sqrt(v) magnify that on near-zero components (LoRA max difference 5e-6)
    assert max((one[k] - sharded[k]).abs().max() for k in one) < 5e-5
    assert max(one[k].abs().max() for k in one if "lora_B" in k) > 1e-4  # trained away from B = 0
    for a, b in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "fsdp"), strict=True):
        assert abs(a["reward/tests.test_rollout_width.brightness_mean"]
                   - b["reward/tests.test_rollout_width.brightness_mean"]) < 1e-6
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * a["grad_norm"]
    # the sharded export loads into the stock pipeline and predicts as the 1-process LoRA does
    preds = []
    for out in ("one", "fsdp"):
        a = models.load("flux1", tiny=True)
        a.pipe.load_lora_weights(str(tmp_path / out / "lora"))
        cond, state = a.encode_prompt(["a red cube"], None, 32), a.make_state(64, 64)
        with torch.no_grad():
            preds.append(a.predict(a.prepare_noise(1, 64, 64, torch.Generator().manual_seed(0)), 0.6, cond, state, 3.5))
    assert (preds[0] - preds[1]).abs().max() < 1e-5
    # interrupted after epoch 0 (checkpoint written by every rank gathering), resumed to epoch 1: the same LoRA
    _run([*LAUNCH, "grpo.py", "--fsdp"], tmp_path / "resumed", "--num-epochs", "1")
    _run([*LAUNCH, "grpo.py", "--fsdp"], tmp_path / "resumed", "--resume-from", "latest")
    resumed = _lora(tmp_path / "resumed")
    assert max((resumed[k] - sharded[k]).abs().max() for k in sharded) < 1e-6
    assert [m["epoch"] for m in read_metrics(tmp_path / "resumed")] == [0, 1]


def test_both_wan_experts_shard_and_export(tmp_path):
    out = tmp_path / "a14b"
    r = subprocess.run([*LAUNCH, "nft.py", "--model", "wan2_t2v", "--tiny", "--variant", "2.2-a14b", "--fsdp",
                        "--num-epochs", "1", "--log-with", "none", "--output-dir", str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    pipe = models.adapter_class("wan2_t2v").build_tiny("2.2-a14b")
    pipe.load_lora_weights(str(out / "lora"))
    pipe.load_lora_weights(str(out / "lora/transformer_2"), load_into_transformer_2=True)
    for net in (pipe.transformer, pipe.transformer_2):  # both experts trained: their LoRA B left zero
        assert max(p.abs().max() for n, p in net.named_parameters() if "lora_B" in n) > 0
