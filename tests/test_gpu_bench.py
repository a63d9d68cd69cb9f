"""bench/gpu.py without a GPU: its refusal, the full-size build on the meta device, one model's real path (grpo.main
in-process, then the floors) on the tiny FLUX.1 on the CPU and the tables written from it, the settings of the
peer mode, and the budgets that keep the default run inside a GPU lease."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

import grpo
from bench import gpu
from common import checks, models, plan, sampler
from common.cli import parse_with_presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_refuses_without_a_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu.py")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 1
    assert (p.stdout + p.stderr).strip().splitlines() == ["error: bench/gpu.py needs a CUDA GPU; none found"]


def test_bench_full_build_takes_the_tiny_token_ids():
    """bench/gpu.py's full-size pipeline, built on the meta device: the text encoder's special-token ids are the tiny
    tokenizer's, Wan2.1 image-to-video gets CLIP's 224 px image processor, and the adapter takes the pipeline."""
    pipe = gpu.build_full("wan2_i2v", "2.1-14b-480p", device="meta")
    assert pipe.text_encoder.config.pad_token_id == pipe.tokenizer.pad_token_id
    assert pipe.image_processor.crop_size["height"] == pipe.image_encoder.config.image_size == 224
    qwen = gpu.build_full("qwen-image-edit-plus", "2511", device="meta").text_encoder.config
    tiny = models.adapter_class("qwen-image-edit-plus").build_tiny("2511").text_encoder.config
    assert (qwen.image_token_id, qwen.vision_start_token_id) == (tiny.image_token_id, tiny.vision_start_token_id)
    assert plan.full_adapter("wan2_i2v", "2.1-14b-480p", pipe=pipe).config.image_dim == 1280


def test_bench_run_floors_and_writers_on_a_tiny_cpu_run(tmp_path):
    """The real per-model path (grpo.main in-process over a monkeypatched models.load, then the floors on the
    finished run) on the tiny FLUX.1 on the CPU; then gpu.md, hardware.md and the activation JSON from its record, a
    synthetic GPU record and a failure."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    cls = models.adapter_class("flux1")
    rec = gpu.run_one("flux1", None, build=lambda: cls.build_tiny(), tiny=True, output_dir=str(tmp_path / "run"),
                      floor_calls=2)
    assert rec["status"] == "ok" and rec["epochs"] == 2 and rec["rollout_s"] > 0 and rec["train_s"] > 0
    assert rec["peak_gb"] is None  # a CPU run has no GPU peak: no activation figure
    assert rec["rollout_floor_ms"] > 0 and rec["train_floor_ms"] > 0 and rec["images_per_s"] > 0
    # --tiny: 2 prompts x 4 = 8 samples in 4 micro-batches of 2, 4 steps, a window of 2 trained steps
    assert (rec["samples"], rec["batch_size"], rec["rollout_batch"]) == (8, 2, 2)
    floor_s = rec["rollout_floor_ms"] / 1000
    assert rec["rollout_ratio"] == pytest.approx(rec["rollout_s"] / (4 * 4 * floor_s), rel=0.02)
    assert rec["train_ratio"] == pytest.approx(rec["train_s"] / (2 * 4 * rec["train_floor_ms"] / 1000), rel=0.02)
    assert rec["images_per_s"] == pytest.approx(8 / rec["epoch_s"], rel=0.01)
    synthetic = dict(rec, model="z-image", variant="turbo", peak_gb=40.0, training_static_gb=27.5,
                     activation_gb=12.5, gpu="H100 80GB", torch="2.11.0",
                     settings=plan.activation_settings(parse_with_presets(grpo.Args, grpo.PRESETS, grpo.TINY,
                                                                          ["--model", "z-image"])))
    failed = {"model": "flux2", "variant": None, "status": "out of memory"}
    gpu.write_results([rec, synthetic, failed], str(tmp_path))
    table = (tmp_path / "gpu.md").read_text()
    assert "| flux1 |" in table and "| z-image | turbo |" in table and "out of memory" in table
    for header in ("rollout floor ms", "rollout / floor", "train floor ms", "train / floor", "samples/s"):
        assert f"| {header} |" in table
    hardware = (tmp_path / "hardware.md").read_text().splitlines()
    rows = [line for line in hardware if line.startswith("| z-image turbo |")]
    assert len(rows) == 1 and "| H100 80GB |" in rows[0] and "| 2/2 |" in rows[0] and "| 40.00 |" in rows[0]
    assert f"| {rec['rollout_ratio']:.2f}x |" in rows[0] and "| flux2 | - |" in "\n".join(hardware)
    runs = json.loads((tmp_path / "activation_memory.json").read_text())["runs"]
    assert set(runs) == {"z-image:turbo"} and runs["z-image:turbo"]["activation_gb"] == 12.5


def test_seeded_hardware_table_has_the_written_format():
    """bench/results/hardware.md (seeded from the first H200 measurements) has the header write_results writes, and
    a row per model measured then."""
    seeded = open(os.path.join(ROOT, "bench", "results", "hardware.md")).read().splitlines()
    header = gpu.table([], gpu.HARDWARE)
    assert header[0] in seeded and seeded[seeded.index(header[0]) + 1] == header[1]
    for model in ("wan2_t2v 2.1-1.3b", "sd3_5 medium", "flux2-klein 4b", "z-image turbo", "flux1", "qwen-image 2512"):
        assert any(line.startswith(f"| {model} ") for line in seeded), model


def test_peer_mode_runs_the_peers_settings(tmp_path):
    """--peers: Qwen-Image as verl-omni (LoRA, 512 px, 10 steps, an SDE window of 2, true CFG 4 with a negative
    prompt) and SD3.5-Medium as miles_diffusion (LoRA rank 32, 512 px, 10 steps all trained, CFG 4.5); both pass the
    run's own checks."""
    qwen = gpu.bench_args("qwen-image", "2512", str(tmp_path / "q"), overrides=gpu.PEERS["qwen-image:2512"].settings)
    assert (qwen.finetune, qwen.resolution, qwen.num_steps, qwen.sde_window_size, qwen.true_cfg_scale) == \
        ("lora", (512,), 10, 2, 4.0)
    assert qwen.negative_prompt is not None
    sd = gpu.bench_args("sd3_5", "medium", str(tmp_path / "s"), overrides=gpu.PEERS["sd3_5:medium"].settings)
    assert (sd.finetune, sd.lora_rank, sd.resolution, sd.num_steps, sd.guidance_scale) == ("lora", 32, (512,), 10, 4.5)
    assert sampler.draw_sde_window(sd.num_steps, sd.sde_window_size, *sd.sde_window_range, seed=0) == list(range(10))
    for args in (qwen, sd):
        assert (args.mixed_precision, args.gradient_checkpointing, args.num_epochs) == ("bf16", True, 2)
        grpo.check_args(args)
        checks.check_run(args, 1, "grpo.py", steps=range(*args.sde_window_range))
    assert {p.images_per_gpu_s for p in gpu.PEERS.values()} == {0.305, 0.58}
    sized = gpu._by_size(list(gpu.PEERS), argparse.Namespace(prompts=2, group_size=4, peers=True))  # on meta
    assert [spec for _, spec in sized] == ["sd3_5:medium", "qwen-image:2512"] and sized[-1][0] < 80


def test_peers_table(tmp_path):
    rec = {"model": "qwen-image", "variant": "2512", "status": "ok", "images_per_s": 0.1525, "gpu": "NVIDIA H200"}
    skipped = {"model": "sd3_5", "variant": "medium", "status": "skipped: the total budget (--total-budget-s) is spent"}
    gpu.write_peers([rec, skipped], str(tmp_path))
    lines = (tmp_path / "peers.md").read_text().splitlines()
    assert "| 0.152 | verl-omni (512 images in 420 s on 4 x H800) | 0.305 | 0.50x | ok |" in lines[6]
    assert "| - | miles_diffusion (128 images per 110 s on 2 x H200) | 0.580 | - | skipped" in lines[7]


def test_budgets_fit_the_lease():
    """The default models' budgets sum to the default total; a model starts only when its whole budget fits in
    what is left, so the default run ends within the total even when every model runs to its budget."""
    assert sum(gpu.BUDGETS_S.values()) <= gpu.TOTAL_BUDGET_S == 480
    assert gpu.skip_reason(90, 480) is None and gpu.skip_reason(220, 220) is None
    assert gpu.skip_reason(220, 219.6) == "skipped: 219 s of the total budget left, fewer than its budget of 220 s"
    assert gpu.skip_reason(90, 0) == gpu.skip_reason(90, -3) == "skipped: the total budget (--total-budget-s) is spent"

    def ran(durations, budgets, total):  # the command's loop with made-up run times
        spent, out = 0, []
        for spec, budget in budgets.items():
            if gpu.skip_reason(budget, total - spent) is None:
                spent += min(durations[spec], budget)
                out.append(spec)
        return out

    every = list(gpu.BUDGETS_S)
    assert ran(gpu.BUDGETS_S, gpu.BUDGETS_S, 480) == every  # each at its full budget: exactly the total
    assert ran(gpu.BUDGETS_S, gpu.BUDGETS_S, 470) == every[:3]  # Qwen-Image's 220 s no longer fit
    assert ran({s: 30 for s in every}, gpu.BUDGETS_S, 300) == every[:3]  # budgets decide: 210 s left < 220 s
    assert ran({s: 30 for s in every}, {"qwen-image:2512": 220, "flux1": 90}, 200) == ["flux1"]  # a later one fits


def test_command_runs_what_fits_and_writes_tables(tmp_path, monkeypatch, capsys):
    """main() on a pretend GPU whose workers (the `bench/gpu.py --worker` commands) are answered here: a record, a
    timeout, an out-of-memory exit, then a model whose budget no longer fits; the tables; --peers forwards its flag
    and writes peers.md."""
    real_run, workers = subprocess.run, []

    def run(cmd, **kw):
        if "--worker" not in cmd:  # git rev-parse for the commit
            return real_run(cmd, **kw)
        spec, peers = cmd[cmd.index("--worker") + 1], "--peers" in cmd
        workers.append((spec, kw["timeout"], peers))
        if spec == "sd3_5:medium" and not peers:
            raise subprocess.TimeoutExpired(cmd, kw["timeout"])
        if spec == "wan2_t2v:2.1-1.3b":
            kw["stdout"].write("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
            kw["stdout"].flush()  # a child writes to the file itself
            return subprocess.CompletedProcess(cmd, 1)
        model, variant = gpu.split_spec(spec)
        with open(cmd[cmd.index("--record") + 1], "w") as f:
            json.dump(dict(model=model, variant=variant, status="ok", images_per_s=0.29, gpu="NVIDIA H200"), f)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu.subprocess, "run", run)
    monkeypatch.setattr(gpu, "_gpu_memory_gb", lambda: 139.0)
    monkeypatch.setattr(gpu, "_by_size", lambda specs, a: [(10.0, s) for s in specs])  # sizing: the peer test
    gpu.main(["--total-budget-s", "200", "--out", str(tmp_path)])
    assert workers == [("flux1", 90, False), ("sd3_5:medium", 70, False), ("wan2_t2v:2.1-1.3b", 100, False)]
    rows = [line for line in (tmp_path / "hardware.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert [row.rsplit("|", 2)[-2].strip() for row in rows][:3] == ["ok", "over the budget (70 s)", "out of memory"]
    assert rows[3].startswith("| qwen-image 2512 |") and "fewer than its budget of 220 s" in rows[3]
    assert "out of memory" in (tmp_path / "gpu.md").read_text()
    workers.clear()
    gpu.main(["--peers", "--out", str(tmp_path / "peers")])
    assert workers == [("qwen-image:2512", 270, True), ("sd3_5:medium", 90, True)]
    assert "| 0.290 | verl-omni" in (tmp_path / "peers" / "peers.md").read_text()
    assert "| miles_diffusion (128 images per 110 s on 2 x H200) | 0.580 | 0.50x | ok |" in capsys.readouterr().out
