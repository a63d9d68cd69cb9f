"""A refactor changes no number: fingerprints of short runs of every script on every model's tiny build (and the
shapes preset), to record before a change and compare after it.

A fingerprint holds what a run computes, not how fast: every metrics.jsonl line without its time/ and memory/ keys,
and a sha256 over the tensors (names, dtypes, shapes, bytes) of each file of the exported weights (lora/ or
transformer*/) and of the last checkpoint (trainable, optimizer, EMA and an algorithm's own EMA), with its state.json
(without the flags it records).

    python bench/equal_runs.py record bench/results/equal_runs.json            # every configuration (~12 min)
    python bench/equal_runs.py compare bench/results/equal_runs.json           # the same runs now: equal or not
    python bench/equal_runs.py record out.json --root /path/to/other/checkout  # the runs of another tree

Runs use one CPU thread (OMP_NUM_THREADS=1), so a fingerprint depends on the code, torch and the CPU's kernels
only; `record` stores torch's version and the CPU (model, capability, flags) beside the fingerprints.
tests/test_equal_runs.py keeps a few of these configurations against a stored reference.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH2 = ["-m", "accelerate.commands.launch", "--config_file", "docs/accelerate/two_cpu_processes.yaml"]
TINY = ["--tiny", "--log-with", "none"]
MODELS = ("flux1", "flux1-kontext", "sd3_5", "z-image", "qwen-image", "qwen-image-edit-plus", "flux2", "flux2-klein",
          "wan2_t2v", "wan2_i2v")
SCRIPTS = ("grpo", "grpo_guard", "nft", "awm")

# name -> (script, flags, launched on 2 processes)
CONFIGS = {f"{s}/{m}": (s, ["--model", m, *TINY], False) for s in SCRIPTS for m in MODELS}
CONFIGS.update({
    # variants: Wan2.2-A14B's two experts (both trained), TI2V-5B image-to-video, SD3.5 large
    "grpo/wan2_t2v-a14b": ("grpo", ["--model", "wan2_t2v", "--variant", "2.2-a14b", *TINY], False),
    "nft/wan2_t2v-a14b": ("nft", ["--model", "wan2_t2v", "--variant", "2.2-a14b", *TINY], False),
    "awm/wan2_i2v-ti2v5b": ("awm", ["--model", "wan2_i2v", "--variant", "2.2-ti2v-5b", "--resolution", "64", "96",
                                     "--eval-resolution", "64", "96", *TINY], False),
    "grpo/sd3_5-large": ("grpo", ["--model", "sd3_5", "--variant", "large", *TINY], False),
    # the options every script shares
    "grpo/kl-lora": ("grpo", ["--model", "flux1", *TINY, "--kl-beta", "0.1", "--kl-type", "v-based"], False),
    "grpo/full-kl-ref": ("grpo", ["--model", "flux1", *TINY, "--finetune", "full", "--kl-beta", "0.1",
                                  "--learning-rate", "1e-5"], False),
    "nft/full-kl-ref-cpu": ("nft", ["--model", "flux1", *TINY, "--finetune", "full", "--ref-device", "cpu",
                                    "--learning-rate", "1e-5"], False),
    "grpo/wide-async-offload": ("grpo", ["--model", "flux1", *TINY, "--rollout-batch-size", "4", "--async-rewards",
                                         "--offload-samples"], False),
    "nft/no-encode-once-inner2": ("nft", ["--model", "flux1", *TINY, "--no-encode-once", "--num-inner-epochs", "2",
                                          "--gradient-steps-per-epoch", "1", "--no-off-policy"], False),
    "awm/inner2-cps-bf16": ("awm", ["--model", "flux1", *TINY, "--num-inner-epochs", "2", "--dynamics", "CPS",
                                    "--noise-level", "0.8", "--sde-window-size", "2", "--sde-window-range", "0", "3",
                                    "--mixed-precision", "bf16", "--gradient-checkpointing",
                                    "--latent-storage-dtype", "bf16", "--ema-on-cpu"], False),
    "grpo_guard/no-delta-kl-gdpo": ("grpo_guard", ["--model", "flux1", *TINY, "--no-delta-reweight", "--kl-beta", "0.1",
                                                   "--advantage-aggregation", "gdpo"], False),
    "grpo/two-rewards-global-std": ("grpo", ["--model", "flux1", *TINY, "--reward", "jpeg_compressibility:0.5",
                                             "jpeg_incompressibility:0.1", "--global-std"], False),
    # 2 processes over gloo: DDP, and FSDP2 (NFT with Wan2.2-A14B's experts routed per rank)
    "grpo/ddp2": ("grpo", ["--model", "flux1", *TINY, "--eval-num-prompts", "3"], True),
    "nft/fsdp2": ("nft", ["--model", "flux1", *TINY, "--fsdp"], True),
    "awm/fsdp2-a14b": ("awm", ["--model", "wan2_t2v", "--variant", "2.2-a14b", *TINY, "--fsdp",
                               "--gradient-steps-per-epoch", "1"], True),
    # the embedded shapes world (its preset), a few epochs
    **{f"{s}/shapes": (s, ["--num-epochs", "3", "--eval-every", "3", "--save-every", "3", "--eval-num-prompts", "64"],
                       False) for s in SCRIPTS},
})


def tensor_hash(path) -> str:
    """sha256 over a safetensors file's tensors in name order: each one's name, dtype, shape and bytes (not the file's
    bytes: its header may order or pad them differently)."""
    import torch
    from safetensors.torch import load_file
    h = hashlib.sha256()
    for k, v in sorted(load_file(path).items()):
        h.update(f"{k}{v.dtype}{tuple(v.shape)}".encode())
        h.update(v.contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def fingerprint(out) -> dict:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "memory/"))} for line in f]
    files = {}
    for folder in ("lora", "lora/transformer_2", "transformer", "transformer_2"):
        d = os.path.join(out, folder)
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else ():
            if name.endswith(".safetensors"):
                files[f"{folder}/{name}"] = tensor_hash(os.path.join(d, name))
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")), key=lambda d: int(d.split("-")[1]))
    last = os.path.join(out, "checkpoints", ckpts[-1])
    for name in sorted(os.listdir(last)):
        if name.endswith(".safetensors"):
            files[f"checkpoint/{name}"] = tensor_hash(os.path.join(last, name))
    with open(os.path.join(last, "state.json")) as f:
        state = json.load(f)
    state.pop("config", None)  # the run's flags (its temporary output folder among them): not a computed number
    state.pop("files", None)  # the list of the checkpoint's files (since issue 27): their tensors are hashed above
    return {"metrics": metrics, "files": files, "state": state, "checkpoint": ckpts[-1]}


def run_config(name, root=ROOT) -> dict:
    script, flags, launched = CONFIGS[name]
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        cmd = [sys.executable, *(LAUNCH2 if launched else []), f"{script}.py", *flags, "--output-dir", out]
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"{name}: exit {r.returncode}\n{r.stderr[-3000:]}")
        return fingerprint(out)


def environment() -> dict:
    """What the numbers of a CPU run depend on besides the code: torch's build, the kernels the CPU selects."""
    import platform

    import torch
    cpu, flags = platform.processor(), ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}
        cpu, flags = info.get("model name", cpu), info.get("flags", "")
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu,
            "cpu_flags": hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16]}


def differences(want: dict, got: dict) -> list[str]:
    """What differs between two fingerprints, one line each (empty: equal)."""
    out = []
    if len(want["metrics"]) != len(got["metrics"]):
        out.append(f"metrics.jsonl: {len(want['metrics'])} lines, now {len(got['metrics'])}")
    for a, b in zip(want["metrics"], got["metrics"]):
        for k in sorted(set(a) | set(b)):
            if a.get(k, "missing") != b.get(k, "missing"):
                out.append(f"epoch {a.get('epoch')} {k}: {a.get(k, 'missing')} -> {b.get(k, 'missing')}")
    for f in sorted(set(want["files"]) | set(got["files"])):
        if want["files"].get(f) != got["files"].get(f):
            out.append(f"{f}: tensors differ")
    if (want["state"], want["checkpoint"]) != (got["state"], got["checkpoint"]):
        out.append("checkpoint state.json differs")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["record", "compare"])
    p.add_argument("path", help="the fingerprints file")
    p.add_argument("--root", default=ROOT, help="the checkout whose scripts run")
    p.add_argument("--only", nargs="*", help="configuration names (default: all)")
    a = p.parse_args()
    names = a.only or list(CONFIGS)
    if a.mode == "record":  # written after every run; a record into an existing file adds what it lacks
        data = {"environment": environment(), "runs": {}}
        if os.path.exists(a.path):
            with open(a.path) as f:
                stored = json.load(f)
            if stored["environment"] == data["environment"]:  # fingerprints of another CPU or torch never mix
                data = stored
            else:
                print(f"note: {a.path} was recorded on {stored['environment']}: recording it afresh")
        for name in names:
            if name in data["runs"] and not a.only:
                continue
            data["runs"][name] = run_config(name, os.path.abspath(a.root))
            with open(a.path + ".tmp", "w") as f:
                json.dump(data, f, indent=0)
            os.replace(a.path + ".tmp", a.path)
            print(f"recorded {name}", flush=True)
        return
    with open(a.path) as f:
        ref = json.load(f)
    if ref["environment"] != environment():
        print(f"note: recorded on {ref['environment']}, running on {environment()}")
    failed = 0
    for name in names:
        diff = differences(ref["runs"][name], run_config(name, os.path.abspath(a.root)))
        failed += bool(diff)
        print(f"{'EQUAL' if not diff else 'DIFFERENT'} {name}" + "".join(f"\n    {d}" for d in diff[:8]), flush=True)
    print(f"{len(names) - failed} of {len(names)} equal")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
