"""Nothing silently destroyed or silently wrong (issue 27): --overwrite removes only a run's outputs and refuses a
folder that is not a run; non-finite flags are refused before the model loads; training that goes NaN stops with one
line, keeps the last good checkpoint and exports nothing; damaged checkpoints of every kind (non-finite weights, a
missing file, no state.json) are skipped with one line each; a torn config.json does not stop a resume; a lock path
that is a folder is one line; the stop signals include SIGHUP and SIGUSR1, and a stop asked while the model loads
ends the run before anything is written."""
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

import grpo
from common import checkpoint, launch
from common.ema import EMA
from common.errors import CheckpointError, ConfigError, TrainingError
from common.lock import OutputLock
from tests.helpers import checks_only, tiny_args
from tests.test_grpo import read_metrics

RUN = ("--eval-every", "0", "--save-every", "1")


# ---- --overwrite -----------------------------------------------------------------------------------------------------
def _model_folder(path):
    """A diffusers model folder: what a user may pass as --output-dir by mistake."""
    (path / "transformer").mkdir(parents=True)
    (path / "transformer" / "config.json").write_text('{"_class_name": "Flux"}')
    (path / "samples").mkdir()
    (path / "samples" / "mine.png").write_bytes(b"png")
    (path / "config.json").write_text('{"_class_name": "FluxPipeline"}')
    return {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_folder_that_is_not_a_run_is_refused_and_untouched(tmp_path, overwrite):
    out = tmp_path / "model"
    before = _model_folder(out)
    args = tiny_args("grpo", out, *(["--overwrite"] if overwrite else []))
    with pytest.raises(CheckpointError, match="is not a run's folder .* holds transformer, samples, config.json"):
        checks_only("grpo", args)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_overwrite_removes_only_what_a_run_wrote(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-4" / "state.json").write_text('{"step": 4, "epoch": 1}')
    (out / "checkpoints" / ".tmp-checkpoint-6").mkdir()
    (out / "checkpoints" / "my_notes.txt").write_text("keep")
    (out / "lora").mkdir()
    (out / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (out / "config.json").write_text("{torn")  # a torn config: the checkpoint still says this is a run
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "dataset.txt").write_text("keep")
    assert checkpoint.is_run_folder(out)
    checkpoint.clear_run(out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "checkpoints", "checkpoints/my_notes.txt", "dataset.txt"]


def test_a_run_config_is_told_from_another_programs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert not checkpoint.is_run_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(vars(tiny_args("grpo", tmp_path))))
    assert checkpoint.is_run_folder(tmp_path)


# ---- non-finite flags and training -----------------------------------------------------------------------------------
@pytest.mark.parametrize("script,flag,value", [
    ("grpo", "--learning-rate", "inf"), ("grpo", "--learning-rate", "nan"), ("grpo", "--max-grad-norm", "nan"),
    ("grpo", "--guidance-scale", "nan"), ("grpo", "--adv-clip", "nan"), ("grpo", "--clip-range", "nan"),
    ("grpo", "--kl-beta", "nan"), ("grpo", "--weight-decay", "nan"), ("grpo", "--noise-level", "nan"),
    ("nft", "--nft-beta", "inf"), ("nft", "--timestep-range", "nan 0.9"), ("awm", "--time-shift", "nan")])
def test_non_finite_flags_are_refused_before_the_model_loads(tmp_path, script, flag, value):
    args = tiny_args(script, tmp_path / "out", flag, *value.split())
    with pytest.raises(ConfigError, match=f"^{flag} must be a finite number, got {value}$"):
        checks_only(script, args)
    assert not (tmp_path / "out").exists()


def test_training_that_goes_nan_stops_keeps_the_last_checkpoint_and_exports_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = grpo.ppo_clip_loss

    def nan_in_epoch_1(log_prob, old_log_prob, adv, clip_range):
        loss, ratio = real(log_prob, old_log_prob, adv, clip_range)
        return (loss * torch.nan if nan_in_epoch_1.epoch == 1 else loss), ratio
    monkeypatch.setattr(grpo, "ppo_clip_loss", nan_in_epoch_1)
    real_train = grpo.Run.train_batches

    def train_batches(self, samples, epoch):
        nan_in_epoch_1.epoch = epoch
        return real_train(self, samples, epoch)
    monkeypatch.setattr(grpo.Run, "train_batches", train_batches)
    with pytest.raises(TrainingError) as e:
        grpo.main(tiny_args("grpo", out, *RUN, "--num-epochs", "3"))
    kept = out / "checkpoints" / "checkpoint-2"  # tiny: 2 optimizer steps per epoch
    assert str(e.value) == (f"epoch 1: the loss, the gradient norm and the weights became non-finite (NaN or inf); the "
                            f"run stopped without saving or exporting (the last checkpoint, {kept}, is intact); lower "
                            "--learning-rate or --max-grad-norm, or check the reward and the model's dtype")
    assert os.listdir(out / "checkpoints") == ["checkpoint-2"] and not (out / "lora").exists()
    assert checkpoint.problem(str(kept)) is None
    assert [r["epoch"] for r in read_metrics(out)] == [0]


# ---- damaged checkpoints --------------------------------------------------------------------------------------------
def _checkpoints(root, n=2, extra=False):
    """n complete checkpoints of a 2-tensor 'model' (steps 1..n), written as a run writes them."""
    params = {"a": torch.nn.Parameter(torch.randn(3, 4)), "b": torch.nn.Parameter(torch.randn(4))}
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    params["a"].sum().backward()
    opt.step()
    ema = EMA(params.values(), decay=0.9)
    extras = {"old_ema": ema.state_dict()} if extra else None
    return [checkpoint.save(str(root), step, params, opt, ema, meta={"epoch": step - 1}, extra=extras)
            for step in range(1, n + 1)]


@pytest.mark.parametrize("damage,why", [
    ("nan", "trainable.safetensors holds non-finite values (NaN or inf) in a"),
    ("inf_ema", "ema.safetensors holds non-finite values (NaN or inf) in ema.0"),
    ("no_optimizer", "optimizer.safetensors is missing"), ("no_ema", "ema.safetensors is missing"),
    ("no_extra", "old_ema.safetensors is missing"),
    ("no_state", "no state.json (a checkpoint is complete only once it is written)")])
def test_latest_skips_a_damaged_newest_checkpoint_in_one_line(tmp_path, damage, why):
    old, new = _checkpoints(tmp_path, extra=True)
    if damage == "nan":
        t = load_file(os.path.join(new, "trainable.safetensors"))
        t["a"][1, 2] = float("nan")
        save_file(t, os.path.join(new, "trainable.safetensors"))
    elif damage == "inf_ema":
        t = load_file(os.path.join(new, "ema.safetensors"))
        next(iter(t.values())).view(-1)[0] = float("inf")
        save_file(t, os.path.join(new, "ema.safetensors"))
    else:
        name = {"no_optimizer": "optimizer", "no_ema": "ema", "no_extra": "old_ema", "no_state": "state"}[damage]
        os.remove(os.path.join(new, name + (".json" if name == "state" else ".safetensors")))
    lines = []
    assert checkpoint.resolve("latest", str(tmp_path), log=lines.append) == old
    assert lines == [f"skipping checkpoint {new}: {why}"]
    if damage != "no_state":  # a checkpoint named outright: the same reason, as an error
        with pytest.raises(CheckpointError) as e:
            checkpoint.resolve(new, str(tmp_path))
        assert str(e.value) == f"--resume-from {new}: {why}"


def test_latest_with_every_checkpoint_damaged_is_an_error_that_says_how_to_go_on(tmp_path):
    for path in _checkpoints(tmp_path):
        os.remove(os.path.join(path, "optimizer.safetensors"))
    lines = []
    with pytest.raises(CheckpointError, match="^--resume-from latest: none of the 2 checkpoints in .* can be resumed "
                                              r"\(each named above\); to start the run afresh, pass --overwrite"):
        checkpoint.resolve("latest", str(tmp_path), log=lines.append)
    assert len(lines) == 2


def test_a_torn_config_json_does_not_stop_a_resume(tmp_path, capsys):
    out = tmp_path / "out"
    grpo.main(tiny_args("grpo", out, *RUN, "--num-epochs", "1"))
    (out / "config.json").write_text('{"model": "flu')  # an older version killed while writing it
    grpo.main(tiny_args("grpo", out, *RUN, "--num-epochs", "2", "--resume-from", "latest"))
    assert "is not a run's config (empty or torn); written anew" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["num_epochs"] == 2 and config["resumed"][0]["epoch"] == 1
    assert not list(out.glob("*.tmp")) and not list(out.glob(".tmp-*"))


# ---- the lock, signals -----------------------------------------------------------------------------------------------
def test_a_lock_path_that_is_a_folder_is_one_line(tmp_path):
    (tmp_path / ".run.lock").mkdir()
    with pytest.raises(ConfigError, match=r"\.run\.lock is not a lock file \(a folder or a broken link\?\)"):
        OutputLock(str(tmp_path)).check()


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM])
def test_hangup_and_slurms_warning_ask_for_a_stop(sig):
    with launch.stop_on_signals():
        os.kill(os.getpid(), sig)
        assert launch.stop_signal() == sig
    assert launch.stop_signal() is None


def test_a_stop_asked_while_the_model_loads_ends_before_anything_is_written(tmp_path, monkeypatch, capsys):
    from common import models
    real = models.load

    def load(*a, **k):
        launch.request_stop(signal.SIGTERM)
        return real(*a, **k)
    monkeypatch.setattr(models, "load", load)
    try:
        with pytest.raises(SystemExit) as e:
            grpo.main(tiny_args("grpo", tmp_path / "out", *RUN, "--num-epochs", "1"))
    finally:
        launch._asked.clear()
    assert e.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("SIGTERM: stopped before the first optimizer step; "
                                                                "the same command starts again")
    assert not (tmp_path / "out").exists()


def test_a_peer_that_died_is_told_from_a_bug():
    """The survivor of a killed process exits quietly (the launcher reports the death): gloo's messages for it, as
    seen when one of two FSDP processes was killed in a rollout (reset) and in training (closed)."""
    gloo = "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:36505: Connection {}"
    assert launch._peer_lost(RuntimeError(gloo.format("reset by peer. This is typically caused by ...")))
    assert launch._peer_lost(RuntimeError(gloo.format("closed by peer")))
    assert not launch._peer_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
