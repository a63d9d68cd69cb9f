"""Resume that a scheduler can rely on: the same command with `--resume-from latest` starts fresh when no checkpoint
exists yet; a run SIGKILLed inside a checkpoint write or inside the final LoRA export resumes to the uninterrupted
run's LoRA (bitwise) with no duplicated epoch lines and no temporary files left; `latest` skips a corrupt newest
checkpoint (saying so) for the newest good one. The kills are deterministic: a wrapper patches the writer."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import grpo
from common.cli import parse_with_presets
from common.errors import USER_ERRORS

from tests.helpers import checks_only
from tests.test_grpo import ENV, ROOT, read_metrics

FLAGS = ["--model", "flux1", "--tiny", "--log-with", "none", "--num-epochs", "3", "--save-every", "1",
         "--eval-every", "0"]
# runs grpo.py with a writer that SIGKILLs the process: KILL_AT_SAVE=N on the N-th checkpoint tensor file (after
# writing half of it), KILL_IN_EXPORT=1 right after the LoRA file is written into the export's temporary folder
WRAPPER = """
import os, signal, runpy, sys
import common.checkpoint as ck
calls = [0]
real_save = ck.save_file
def save_file(tensors, path, *a, **k):
    calls[0] += 1
    if calls[0] == int(os.environ.get("KILL_AT_SAVE", 0)):
        with open(path, "wb") as f:
            f.write(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(tensors, path, *a, **k)
ck.save_file = save_file
if os.environ.get("KILL_IN_EXPORT"):
    from diffusers import FluxPipeline
    real_export = FluxPipeline.save_lora_weights
    def save_lora_weights(*a, **k):
        real_export(*a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
    FluxPipeline.save_lora_weights = save_lora_weights
sys.argv = ["grpo.py"] + sys.argv[1:]
runpy.run_path("grpo.py", run_name="__main__")
"""


def _run(out, *extra, env=None, check=True):
    r = subprocess.run([sys.executable, "-c", WRAPPER, *FLAGS, "--output-dir", str(out), *extra], cwd=ROOT,
                       env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def _lora(out):
    return load_file(str(out / "lora/pytorch_lora_weights.safetensors"))


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_kills_resume_to_the_uninterrupted_run(tmp_path):
    _run(tmp_path / "whole")
    want, want_epochs = _lora(tmp_path / "whole"), [m["epoch"] for m in read_metrics(tmp_path / "whole")]
    assert want_epochs == [0, 1, 2]
    # killed inside the second checkpoint (file 5 of trainable/optimizer/ema x 3): epoch 1's line is already written
    out = tmp_path / "ckpt"
    r = _run(out, "--resume-from", "latest", env={"KILL_AT_SAVE": "5"}, check=False)
    assert r.returncode == -9 and "no checkpoint in" in r.stdout  # the same command started the run fresh
    assert [m["epoch"] for m in read_metrics(out)] == [0, 1]
    r = _run(out, "--resume-from", "latest")
    assert "resumed from" in r.stdout
    assert [m["epoch"] for m in read_metrics(out)] == want_epochs  # epoch 1 cut back, then redone once
    assert _same(_lora(out), want)
    assert not [d for d in os.listdir(out / "checkpoints") if d.startswith(".tmp")]
    # killed inside the final export: nothing half-written in lora/; the resumed run, all epochs done, redoes it
    out = tmp_path / "export"
    r = _run(out, env={"KILL_IN_EXPORT": "1"}, check=False)
    assert r.returncode == -9 and not (out / "lora").exists()
    r = _run(out, "--resume-from", "latest")
    assert _same(_lora(out), want) and not (out / ".tmp-export").exists()
    assert [m["epoch"] for m in read_metrics(out)] == want_epochs


def test_latest_skips_a_corrupt_newest_checkpoint(tmp_path):
    out = tmp_path / "run"
    _run(out)
    ckpts = sorted(os.listdir(out / "checkpoints"), key=lambda d: int(d.split("-")[1]))
    newest = out / "checkpoints" / ckpts[-1]
    (newest / "optimizer.safetensors").write_bytes(b"\x00" * 10)  # truncated
    r = _run(out, "--resume-from", "latest", "--num-epochs", "4")
    assert f"skipping checkpoint {newest}: optimizer.safetensors is corrupt" in r.stdout
    assert f"resumed from {out / 'checkpoints' / ckpts[-2]}" in r.stdout
    assert [m["epoch"] for m in read_metrics(out)] == [0, 1, 2, 3]


def test_runs_never_mix(tmp_path):
    """A fresh run into a folder holding another run's checkpoints stops in one line, the folder untouched; a resume
    that fails (another LoRA rank) leaves config.json as it was; --overwrite replaces the old run."""
    out = tmp_path / "run"
    _run(out, "--num-epochs", "1")
    before = {p: (out / p).read_bytes() for p in ("config.json", "metrics.jsonl")}
    r = _run(out, "--num-epochs", "1", check=False)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(
        f"error: --output-dir {out} holds another run's checkpoints (newest checkpoint-2): resume it")
    r = _run(out, "--resume-from", "latest", "--lora-rank", "8", check=False)
    assert r.returncode == 1 and "--lora-rank 4 -> 8: the flag defines the trained weights" in r.stderr.strip().splitlines()[-1]
    assert {p: (out / p).read_bytes() for p in before} == before  # nothing of the old run changed
    _run(out, "--num-epochs", "1", "--overwrite", "--seed", "7")
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint-2"]
    assert '"seed": 7' in (out / "config.json").read_text()


def test_a_checkpoint_of_another_algorithm_is_refused_before_loading(tmp_path):
    out = tmp_path / "nft"
    r = subprocess.run([sys.executable, "nft.py", "--model", "flux1", "--tiny", "--log-with", "none", "--num-epochs", "1",
                        "--eval-every", "0", "--output-dir", str(out)], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    args = parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY, ["--model", "flux1", "--tiny",
                              "--resume-from", "latest", "--output-dir", str(out)])
    with pytest.raises(USER_ERRORS, match=r"a checkpoint of nft.py, not of grpo.py"):
        checks_only("grpo", args)
