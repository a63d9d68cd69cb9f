"""Runs that survive preemption and sharing (issue 21): a stop asked by SIGTERM / SIGINT ends the run with a
checkpoint and its resume equals the uninterrupted run (1 and 2 processes); resumed flags are refused or honoured
and recorded; a torn metrics line; one run per output folder; a full disk; Ctrl-C twice."""
import json
import os
import signal
import subprocess
import sys
import time
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

import grpo
import nft
from common import checkpoint, launch
from common.errors import CheckpointError, ConfigError, OutputError
from common.run import Run
from tests.helpers import checks_only, tiny_args
from tests.test_grpo import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--eval-every", "0", "--num-epochs", "4", "--checkpoints-total-limit", "10", "--save-every", "10"]


def same_numbers(a, b):
    """Every metrics.jsonl value but timings and memory, and the exported LoRA, bitwise."""
    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "memory/"))} for r in rows]
    assert strip(read_metrics(a)) == strip(read_metrics(b))
    la, lb = (load_file(os.path.join(x, "lora", "pytorch_lora_weights.safetensors")) for x in (a, b))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


@pytest.fixture(autouse=True)
def no_stop_left():
    yield
    launch._asked.clear()


def stop_when(monkeypatch, method, epoch_of):
    """Ask for a stop (as SIGTERM would) the first time Run.<method> runs in epoch 1."""
    original = getattr(Run, method)

    def wrapped(self, *a, **k):
        if epoch_of(self, a) == 1 and not launch._asked:
            launch.request_stop(signal.SIGTERM)
        return original(self, *a, **k)
    monkeypatch.setattr(Run, method, wrapped)


@pytest.mark.parametrize("script,phase", [("grpo", "rollout"), ("grpo", "train"), ("nft", "train")])
def test_a_stop_ends_with_a_checkpoint_and_the_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch, script,
                                                                                   phase, capsys):
    mod = {"grpo": grpo, "nft": nft}[script]
    mod.main(tiny_args(script, tmp_path / "whole", *RUN))
    with monkeypatch.context() as m:
        if phase == "rollout":
            stop_when(m, "rollout", lambda run, a: a[0])
        else:
            stop_when(m, "backward", lambda run, a: run.global_step // 2)  # tiny: 2 optimizer steps per epoch
        with pytest.raises(SystemExit) as e:
            mod.main(tiny_args(script, tmp_path / "cut", *RUN))
    assert e.value.code == 128 + signal.SIGTERM
    launch._asked.clear()  # as a new process would start
    done = 0 if phase == "rollout" else 1  # the last epoch whose state the checkpoint holds
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"SIGTERM: stopped after epoch {done}") and "--resume-from latest" in line
    assert [r["epoch"] for r in read_metrics(tmp_path / "cut") if r["epoch"] >= 0] == list(range(done + 1))
    mod.main(tiny_args(script, tmp_path / "cut", *RUN, "--resume-from", "latest"))
    same_numbers(tmp_path / "whole", tmp_path / "cut")


def started(cmd, out, env, lines=2):
    """A run started in the background, once its metrics.jsonl holds `lines` records (the base evaluation: 1)."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < lines:
        assert p.poll() is None, p.communicate()
        time.sleep(0.05)
    return p


def test_sigterm_to_a_real_process_then_resume(tmp_path):
    """A real SIGTERM at whatever point the run has reached: exit 143 with one line, then the same command with
    --resume-from latest finishes; the result equals the uninterrupted run."""
    cmd = [sys.executable, "grpo.py", "--model", "flux1", "--tiny", "--log-with", "none", "--eval-every", "0",
           "--num-epochs", "6", "--save-every", "100", "--checkpoints-total-limit", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd + ["--output-dir", str(tmp_path / "whole")], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    cut = tmp_path / "cut"
    p = started(cmd + ["--output-dir", str(cut)], cut, env)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert "Traceback" not in err and "--resume-from latest" in err.strip().splitlines()[-1]
    subprocess.run(cmd + ["--output-dir", str(cut), "--resume-from", "latest"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    same_numbers(tmp_path / "whole", cut)


def _children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def test_sigterm_to_one_of_two_processes_stops_both_with_a_checkpoint(tmp_path):
    """accelerate launch with 2 processes: SIGTERM to rank 1 alone; the ranks agree (a collective), stop together with
    one checkpoint, and the resumed run equals the uninterrupted one."""
    launch2 = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               "docs/accelerate/two_cpu_processes.yaml", "grpo.py", "--model", "flux1", "--tiny", "--log-with", "none",
               "--eval-every", "0", "--num-epochs", "5", "--save-every", "100", "--checkpoints-total-limit", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(launch2 + ["--output-dir", str(tmp_path / "whole")], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    cut = tmp_path / "cut"
    p = started(launch2 + ["--output-dir", str(cut)], cut, env)
    ranks = sorted(_children(p.pid))
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode != 0 and "--resume-from latest" in err
    assert checkpoint.list_checkpoints(cut / "checkpoints")
    subprocess.run(launch2 + ["--output-dir", str(cut), "--resume-from", "latest"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    same_numbers(tmp_path / "whole", cut)


# ---- resume with changed flags ---------------------------------------------------------------------------------------
def test_a_changed_learning_rate_is_honoured_and_recorded(tmp_path, capsys):
    out = tmp_path / "run"
    grpo.main(tiny_args("grpo", out, "--eval-every", "0", "--num-epochs", "2"))
    grpo.main(tiny_args("grpo", out, "--eval-every", "0", "--num-epochs", "4", "--resume-from", "latest",
                        "--learning-rate", "1e-4", "--weight-decay", "0.05"))
    printed = capsys.readouterr().out
    assert "--learning-rate 0.001 -> 0.0001" in printed and "--num-epochs 2 -> 4" in printed
    lrs = [r["lr"] for r in read_metrics(out)]
    assert lrs == [1e-3, 1e-3, 1e-4, 1e-4]
    config = json.loads((out / "config.json").read_text())
    assert config["learning_rate"] == 1e-4 and config["weight_decay"] == 0.05
    assert config["resumed"][-1]["changed"]["learning_rate"] == [1e-3, 1e-4]
    state = json.loads((out / "checkpoints/checkpoint-8/state.json").read_text())
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-4


def test_a_flag_that_defines_the_weights_is_refused_before_the_model_loads(tmp_path):
    out = tmp_path / "run"
    grpo.main(tiny_args("grpo", out, "--eval-every", "0", "--num-epochs", "1"))
    with pytest.raises(CheckpointError, match=r"--lora-rank 4 -> 8: the flag defines the trained weights"):
        checks_only("grpo", tiny_args("grpo", out, "--num-epochs", "2", "--resume-from", "latest", "--lora-rank",
                                      "8"))


def test_resuming_a_finished_run_says_it_is_complete(tmp_path, capsys):
    out = tmp_path / "run"
    grpo.main(tiny_args("grpo", out, "--eval-every", "0", "--num-epochs", "1"))
    lines = (out / "metrics.jsonl").read_text()
    grpo.main(tiny_args("grpo", out, "--eval-every", "0", "--num-epochs", "1", "--resume-from", "latest"))
    assert "complete: 1 of 1 epochs trained" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == lines


# ---- files read back, the lock, the disk -----------------------------------------------------------------------------
def test_a_torn_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    out = tmp_path / "run"
    grpo.main(tiny_args("grpo", out, *RUN[:2], "--num-epochs", "2", "--save-every", "1"))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "step": 6, "rew')  # a crash in the middle of an append
    grpo.main(tiny_args("grpo", out, *RUN[:2], "--num-epochs", "3", "--save-every", "1", "--resume-from", "latest"))
    assert "metrics.jsonl: dropped a torn last line" in capsys.readouterr().err
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1, 2]


def test_one_run_per_output_folder(tmp_path):
    out = tmp_path / "run"
    grpo.main(tiny_args("grpo", out, "--eval-every", "0", "--num-epochs", "1"))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from common.lock import OutputLock; "
                               f"OutputLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)  # another run holds the folder
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"another run is writing to {out} \(pid {holder.pid} on .*started"):
            checks_only("grpo", tiny_args("grpo", out, "--num-epochs", "2", "--resume-from", "latest"))
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed (-9): its lock went with it, and the next run goes on
    assert json.loads((out / ".run.lock").read_text())["pid"] == holder.pid
    grpo.main(tiny_args("grpo", out, "--eval-every", "0", "--num-epochs", "2", "--resume-from", "latest"))
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1]


def test_a_full_disk_is_one_line_and_the_last_checkpoint_stays(tmp_path):
    out = tmp_path / "run"
    grpo.main(tiny_args("grpo", out, "--eval-every", "0", "--num-epochs", "1"))
    before = load_file(out / "checkpoints/checkpoint-2/trainable.safetensors")

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    with mock.patch.object(checkpoint, "save_file", full):
        with pytest.raises(OutputError, match=r"^cannot write the checkpoint .*checkpoint-4: No space left on device"):
            grpo.main(tiny_args("grpo", out, "--eval-every", "0", "--num-epochs", "2", "--resume-from", "latest"))
    after = load_file(out / "checkpoints/checkpoint-2/trainable.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert checkpoint.list_checkpoints(out / "checkpoints")[-1].endswith("checkpoint-2")


def test_ctrl_c_stops_with_a_checkpoint_in_one_line(tmp_path):
    cmd = [sys.executable, "grpo.py", "--model", "flux1", "--tiny", "--log-with", "none", "--eval-every", "0",
           "--num-epochs", "50", "--output-dir", str(tmp_path / "run")]
    p = started(cmd, tmp_path / "run", {**os.environ, "OMP_NUM_THREADS": "1"}, lines=1)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert p.returncode == 130 and "Traceback" not in err, err
    assert lines[-1].startswith("SIGINT: stopped after epoch") and "--resume-from latest" in lines[-1]


def test_ctrl_c_twice_stops_at_once_in_one_line(capsys):
    """The second Ctrl-C raises KeyboardInterrupt wherever the run is; the script's entry turns it into one line."""
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN when started in the background by a shell
    with pytest.raises(SystemExit) as e:
        with launch.errors_as_one_line():
            os.kill(os.getpid(), signal.SIGINT)  # the first: a stop at the end of the phase
            assert launch.stop_signal() == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)  # the second: at once
            time.sleep(5)  # never reached: the handler raises
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("interrupted: stopped at once; the last checkpoint "
                                                                "written is intact")
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are restored
